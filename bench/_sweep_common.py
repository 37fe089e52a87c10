"""What the conformance sweeps (bench/sweep_timm.py, bench/sweep_hf.py) share.

A *case* is one architecture: a name and a function that builds (model, example input) in a small
configuration. :func:`check_case` runs every step on it, each in try/except under a time limit, and
fills a :class:`Row`; a failing step records its reason and skips the steps that need it, so a
sweep never stops on a model. :func:`run_cases` runs each case in a forked child process (a hard
time limit, and a crash or an exhausted memory ends only that case) with a progress bar, and
:func:`write_markdown` writes the table with totals and failure classes.

Steps: build (the original runs on the example), transform at TopFraction(0.25) (warnings
recorded), the report's sites and linears, full update (``All()``) against the original on real
frames (``verify``, <= 1e-4), 3 partial frames against the reference simulator
(tests/reference.py), ``count_flops`` of both in both conventions (the steady FLOP ratio at N/4).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import signal
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

TOL = 1e-4  # full update and partial frames: relative error bound
POLICY_FRACTION = 0.25
FRAMES = 4  # frame 0 (dense) and 3 partial frames


class StepTimeout(Exception):
    """A step ran past its time limit."""


@dataclass
class Case:
    """One architecture to sweep: ``build()`` returns (model in eval mode, example input) or
    (model, example, a description of the configuration)."""

    family: str
    arch: str
    model: str  # the constructor or class it came from
    build: Callable[[], tuple]
    note: str = ""


@dataclass
class Row:
    family: str
    arch: str
    model: str
    config: str = ""
    transformer: bool | None = None  # None: not known (the build failed)
    tokens: str = ""
    steps: dict[str, str] = field(default_factory=dict)  # step -> "ok" or the reason
    failed_step: str = ""
    reason: str = ""
    full_error: float = math.nan
    partial_error: float = math.nan
    partial_vs_original: float = math.nan
    ratio_paper: float = math.nan
    ratio_fvcore: float = math.nan
    convs_left_out: float = math.nan  # fvcore FLOPs of ops the paper convention leaves free, share
    sites: int = -1
    delta_sites: int = -1
    gated_linears: int = -1
    dense_linears: int = -1
    warnings: list[str] = field(default_factory=list)
    kept_dense: list[str] = field(default_factory=list)
    seconds: float = 0.0
    step_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def transformed(self) -> bool:
        return self.steps.get("transform") == "ok"

    @property
    def verdict(self) -> str:
        if self.transformer is False:
            return "excluded: no attention"
        if self.steps.get("build", "ok") != "ok":
            return "build failed"
        if not self.transformed:
            return "transform failed"
        for step in ("partial", "full", "count_paper", "count_fvcore", "report"):
            state = self.steps.get(step)
            if state not in (None, "ok") and not state.startswith("wrong"):
                return "CRASH after transform"
        if any(self.steps.get(s, "").startswith("wrong") for s in ("full", "partial")):
            return "wrong result"
        if self.ratio_paper >= 2.0:
            return "ok >= 2x"
        if self.warned:
            return "warned < 2x"
        return "quiet < 2x"

    @property
    def warned(self) -> bool:
        return any(w.startswith(("LowSavingsWarning", "FrozenTokensWarning")) for w in self.warnings)


# ------------------------------------------------------------------------------------ frames


_FRAMES: list[torch.Tensor] = []


def load_frames(count: int = FRAMES + 1) -> list[torch.Tensor]:
    """Real consecutive frames (bigbuckbunny) at 448 px, resized per case by :func:`frames_like`."""
    if not _FRAMES:
        from evtrace.tools.video import frames

        _FRAMES.extend(frames("bigbuckbunny", size=448, patch_size=16, max_frames=count, start=40))
    return _FRAMES


def frames_like(example, count: int = FRAMES) -> list:
    """``count`` real frames shaped like ``example`` (a tensor (B, C, H, W), a clip (B, T, C, H, W)
    or (B, C, T, H, W), or a tuple whose first entry is one of those; the rest is kept)."""
    rest = ()
    if isinstance(example, tuple):
        example, rest = example[0], example[1:]
    real = load_frames(count + 8)
    out = []
    for i in range(count):
        if example.dim() == 4:
            b, c, h, w = example.shape
            x = _resize(real[i], c, h, w).expand(b, c, h, w).clone()
        elif example.dim() == 5 and example.shape[2] in (1, 3) and example.shape[1] not in (1, 3):
            b, t, c, h, w = example.shape  # (B, T, C, H, W)
            x = torch.stack([_resize(real[i + j], c, h, w)[0] for j in range(t)])[None].expand(
                b, -1, -1, -1, -1
            )
            x = x.clone()
        elif example.dim() == 5:
            b, c, t, h, w = example.shape  # (B, C, T, H, W)
            x = torch.stack([_resize(real[i + j], c, h, w)[0] for j in range(t)], dim=1)[None]
            x = x.expand(b, -1, -1, -1, -1).clone()
        else:
            x = example + 0.05 * i * torch.randn_like(example)  # not an image: perturbed copies
        x = x.to(example.dtype)
        out.append((x, *rest) if rest else x)
    return out


def _resize(frame: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    x = torch.nn.functional.interpolate(frame, size=(h, w), mode="bilinear", antialias=True)
    if c != 3:
        x = x.mean(1, keepdim=True).expand(1, c, h, w)
    return x


# ------------------------------------------------------------------------------------ steps


WIDTH_FLOOR = 192  # widths are not shrunk below this: narrower, attention would outweigh the linears


def shrink_width(value: int, factor: int) -> int:
    """``value`` divided by the largest of factor, factor / 2, ..., 1 that divides it and keeps it
    at least ``min(value, WIDTH_FLOOR)``: a narrow model at a real token count would price
    attention far above what it costs in the model it stands for."""
    d = factor
    while d > 1 and (value % d or value // d < min(value, WIDTH_FLOOR)):
        d //= 2
    return value // max(d, 1)


def _alarm(signum, frame):
    raise StepTimeout()


def reason_of(error: BaseException) -> str:
    if isinstance(error, StepTimeout):
        return "timed out"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:300]}"


def has_attention(model: torch.nn.Module) -> bool:
    """Whether any submodule is an attention (by its class name): what the sweeps count as a
    transformer; CNN and MLP architectures are listed as excluded. Attribute names do not count:
    CNNs call their squeeze-excitation layers ``attention``."""
    for module in model.modules():
        kind = type(module).__name__.lower()
        if isinstance(module, torch.nn.MultiheadAttention) or "attention" in kind or "attn" in kind:
            return True
    return False


def _call(model, x):
    return model(*x) if isinstance(x, tuple) else model(x)


def _warning_text(w: warnings.WarningMessage) -> str:
    return f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}"


def check_case(case: Case, step_limit: int = 240, progress: Callable[[Row], None] | None = None) -> Row:
    """Run every step on ``case``; never raises (a failure is recorded on the row)."""
    import evtrace
    from evtrace.cost.count import count_flops
    from evtrace.verification import verify
    from tests.reference import ReferenceStream, relative_error

    start = time.perf_counter()
    row = Row(case.family, case.arch, case.model, config=case.note)
    old = signal.signal(signal.SIGALRM, _alarm)
    state: dict = {}

    def step(name: str, fn: Callable[[], None]) -> bool:
        began = time.perf_counter()
        signal.alarm(step_limit)
        try:
            fn()
            row.steps[name] = row.steps.get(name) or "ok"
            return True
        except Exception as error:  # noqa: BLE001 - the row records why the step failed
            row.steps[name] = reason_of(error)
            if os.environ.get("SWEEP_TRACEBACK"):
                traceback.print_exc()
            if not row.failed_step:
                row.failed_step, row.reason = name, row.steps[name]
            return False
        finally:
            signal.alarm(0)
            row.step_seconds[name] = round(time.perf_counter() - began, 2)
            row.seconds = time.perf_counter() - start
            if progress is not None:
                progress(row)

    def build():
        torch.manual_seed(0)
        built = case.build()
        model, example = built[:2]
        if len(built) > 2:
            row.config = built[2]
        state["model"], state["example"] = model, example
        row.transformer = has_attention(model)
        state["frames"] = frames_like(example)
        row.tokens = "x".join(map(str, (example[0] if isinstance(example, tuple) else example).shape))

    def transform():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state["emodel"] = evtrace.transform(
                state["model"], state["example"], policy=evtrace.TopFraction(POLICY_FRACTION), scene_cut=None
            )
        row.warnings = sorted(
            {
                _warning_text(w)
                for w in caught
                if w.category.__module__.startswith("evtrace")
                or "evtrace" in w.category.__name__.lower()
                or w.category.__name__ in ("LowSavingsWarning", "FrozenTokensWarning")
            }
        )

    def report():
        rep = state["emodel"].report()
        row.sites = len(rep.sites)
        row.delta_sites = sum(s.mode != "dense" for s in rep.sites)
        row.gated_linears = len(rep.sparse_linears)
        row.dense_linears = len(rep.linears) - row.gated_linears
        row.kept_dense = sorted(
            {f"{x.module or x.node}: {x.reason}" for x in rep.linears if getattr(x, "reason", "")}
            | {f"{s.name}: {s.reason}" for s in rep.sites if getattr(s, "reason", "")}
        )[:6]

    def full():
        efull = evtrace.transform(state["model"], state["example"], policy=evtrace.All(), scene_cut=None)
        result = verify(state["model"], efull, state["frames"])
        row.full_error = result.max_relative
        if not row.full_error <= TOL:
            row.steps["full"] = f"wrong: full update differs from the original by {row.full_error:.1e}"

    def partial():
        emodel, model = state["emodel"], state["model"]
        sim = ReferenceStream(model, state["example"], evtrace.TopFraction(POLICY_FRACTION))
        emodel.reset()
        worst, moved = 0.0, 0.0
        with torch.no_grad():
            for x in state["frames"]:
                args = x if isinstance(x, tuple) else (x,)
                got = emodel(*args)
                want = sim(*args)
                worst = max(worst, relative_error(got, want))
                moved = max(moved, relative_error(got, model(*args)))
        row.partial_error, row.partial_vs_original = worst, moved
        if not worst <= TOL:
            row.steps["partial"] = f"wrong: partial frames differ from the reference by {worst:.1e}"

    def count_paper():
        dense = count_flops(state["model"], state["example"]).total
        steady = count_flops(state["emodel"], state["example"]).steady
        row.ratio_paper = dense / max(steady, 1)

    def count_fvcore():
        dense = count_flops(state["model"], state["example"], convention="fvcore").total
        steady = count_flops(state["emodel"], state["example"], convention="fvcore").steady
        row.ratio_fvcore = dense / max(steady, 1)

    try:
        if not step("build", build):
            return row
        if not row.transformer:
            return row
        if step("transform", transform):
            step("report", report)
            step("partial", partial)
            step("full", full)
            step("count_paper", count_paper)
            step("count_fvcore", count_fvcore)
    finally:
        signal.signal(signal.SIGALRM, old)
        row.seconds = time.perf_counter() - start
    return row


# ------------------------------------------------------------------------------------ runner


def _child(case: Case, step_limit: int, conn) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the transform step records evtrace's warnings itself

    def progress(row: Row) -> None:
        conn.send(asdict(row))

    try:
        row = check_case(case, step_limit, progress)
        conn.send(asdict(row))
    finally:
        conn.close()


def run_cases(
    cases: list[Case],
    jobs: int = 1,
    step_limit: int = 240,
    case_limit: int = 900,
    on_row: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Each case in a forked child (``jobs`` at once): a hard ``case_limit`` per case, and a crash
    of the child (segfault, out of memory) ends that case only. Rows come back in case order;
    ``on_row(rows_so_far)`` after each."""
    from tqdm import tqdm

    torch.set_num_threads(1)
    load_frames(FRAMES + 8)
    context = multiprocessing.get_context("fork")
    pending = list(enumerate(cases))
    running: dict[int, tuple] = {}
    done: dict[int, Row] = {}
    bar = tqdm(total=len(cases), desc="architectures", unit="arch", dynamic_ncols=True)

    def stop(signum, frame):  # the children are daemons only for a normal exit: end them here
        for process, *_ in running.values():
            process.kill()
        os._exit(128 + signum)  # the tables are written after every case: nothing to flush

    signal.signal(signal.SIGTERM, stop)
    while pending or running:
        while pending and len(running) < jobs:
            index, case = pending.pop(0)
            parent, child = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(case, step_limit, child), daemon=True)
            process.start()
            child.close()
            running[index] = (process, parent, time.monotonic(), Row(case.family, case.arch, case.model))
        for index in list(running):
            process, conn, began, last = running[index]
            try:
                while conn.poll():
                    last = Row(**conn.recv())
            except (EOFError, OSError):
                pass
            running[index] = (process, conn, began, last)
            finished = not process.is_alive()
            if not finished and time.monotonic() - began > case_limit:
                process.kill()
                process.join()
                finished = True
                last.steps[_next_step(last)] = f"timed out (case limit {case_limit} s)"
                last.failed_step = last.failed_step or _next_step(last)
                last.reason = last.reason or f"timed out (case limit {case_limit} s)"
            if finished:
                process.join()
                try:
                    while conn.poll():
                        last = Row(**conn.recv())
                except (EOFError, OSError):
                    pass
                if process.exitcode not in (0, None) and not last.reason:
                    step = _next_step(last)
                    last.steps[step] = f"process died (exit code {process.exitcode})"
                    last.failed_step, last.reason = step, last.steps[step]
                last.seconds = last.seconds or time.monotonic() - began
                done[index] = last
                del running[index]
                bar.update(1)
                bar.set_postfix_str(f"{last.arch}: {last.verdict}"[:60])
                if on_row is not None:
                    on_row([done[i] for i in sorted(done)])
        time.sleep(0.2)
    bar.close()
    return [done[i] for i in sorted(done)]


_ORDER = ("build", "transform", "report", "partial", "full", "count_paper", "count_fvcore")


def _next_step(row: Row) -> str:
    for name in _ORDER:
        if name not in row.steps:
            return name
    return "count_fvcore"


# ------------------------------------------------------------------------------------ tables


def failure_class(row: Row) -> str:
    """The reason with names, numbers and shapes taken out: rows of one class share a mechanism."""
    text = row.reason
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r'"[^"]*"', '"…"', text)
    text = re.sub(r"\[[^\]]*\]", "[…]", text)
    text = re.sub(r"\([^)]*\)", "(…)", text)
    text = re.sub(r"\b[\w.]*\d[\w.]*\b", "#", text)
    text = re.sub(r"\s+", " ", text)
    return f"{row.failed_step}: {text[:140]}"


def _fmt(value: float, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def totals(rows: list[Row]) -> dict:
    swept = [r for r in rows if r.transformer is not False]
    built = [r for r in swept if r.steps.get("build") == "ok"]
    verdicts = Counter(r.verdict for r in swept)
    no_crash = [r for r in built if r.transformed and r.verdict != "CRASH after transform"]
    good = [r for r in built if r.verdict in ("ok >= 2x", "warned < 2x")]
    return {
        "listed": len(rows),
        "excluded": len(rows) - len(swept),
        "swept": len(swept),
        "built": len(built),
        "verdicts": verdicts,
        "no_crash": len(no_crash),
        "good": len(good),
    }


def markdown(rows: list[Row], title: str, intro: str, total_cases: int | None = None) -> str:
    t = totals(rows)
    pct = lambda a, b: f"{100 * a / b:.0f} %" if b else "-"  # noqa: E731
    lines = [f"# {title}", "", intro.strip(), ""]
    if total_cases is not None and total_cases != len(rows):
        lines += [f"**Partial table: {len(rows)} of {total_cases} architectures done so far.**", ""]
    lines += [
        "## Totals",
        "",
        f"- architectures listed: {t['listed']}; excluded (no attention module: CNN/MLP): {t['excluded']}; "
        f"swept: {t['swept']}; original model built and ran: {t['built']}",
        f"- transform succeeded and nothing crashed after it: {t['no_crash']} of {t['built']} "
        f"({pct(t['no_crash'], t['built'])}; target >= 90 %)",
        f"- steady FLOP ratio >= 2x at N/4 (paper convention) or warned: {t['good']} of {t['built']} "
        f"({pct(t['good'], t['built'])}; target >= 80 %)",
        "",
        "| verdict | architectures |",
        "|---|---|",
    ]
    for verdict, n in sorted(t["verdicts"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {verdict} | {n} |")
    lines += [
        "",
        "## Failure classes",
        "",
        "| class (step: reason, names and numbers elided) | count | architectures |",
        "|---|---|---|",
    ]
    classes: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r.transformer is not False and r.reason:
            classes[failure_class(r)].append(r.arch)
    for name, archs in sorted(classes.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(archs[:12]) + (f", … ({len(archs) - 12} more)" if len(archs) > 12 else "")
        lines.append(f"| {_cell(name)} | {len(archs)} | {_cell(shown)} |")
    quiet = [r for r in rows if r.verdict == "quiet < 2x"]
    if quiet:
        lines += ["", f"Quiet below 2x (no warning): {', '.join(r.arch for r in quiet)}"]
    lines += [
        "",
        "## Architectures",
        "",
        "| family | architecture | model | config | input | verdict | full update error "
        "| partial vs reference | FLOP ratio paper / fvcore | sites delta / total "
        "| linears gated / dense | warnings | reason / what stays dense |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        if r.transformer is False:
            continue
        note = r.reason or "; ".join(r.kept_dense[:2])
        sites = f"{r.delta_sites} / {r.sites}" if r.sites >= 0 else "-"
        linears = f"{r.gated_linears} / {r.dense_linears}" if r.gated_linears >= 0 else "-"
        lines.append(
            f"| {r.family} | {_cell(r.arch)} | {_cell(r.model)} | {_cell(r.config)} | {r.tokens} "
            f"| {r.verdict} "
            f"| {_fmt(r.full_error, '.1e')} | {_fmt(r.partial_error, '.1e')} "
            f"| {_fmt(r.ratio_paper)}x / {_fmt(r.ratio_fvcore)}x | {sites} | {linears} "
            f"| {_cell('; '.join(w.split(':')[0] for w in r.warnings)) or '-'} | {_cell(note[:300])} |"
        )
    excluded = [r for r in rows if r.transformer is False]
    if excluded:
        lines += [
            "",
            "Excluded (no attention module): " + ", ".join(f"{r.arch} ({r.model})" for r in excluded),
        ]
    return "\n".join(lines) + "\n"


def print_table(rows: Iterable[Row]) -> None:
    for r in rows:
        if r.transformer is False:
            continue
        print(
            f"{r.arch:40.40s} {r.verdict:22s} full {_fmt(r.full_error, '.0e'):>6s} "
            f"part {_fmt(r.partial_error, '.0e'):>6s} "
            f"{_fmt(r.ratio_paper)}x/{_fmt(r.ratio_fvcore)}x sites {r.delta_sites}/{r.sites} {r.reason[:80]}"
        )


def write_outputs(
    rows: list[Row], title: str, intro: str, paths: list[Path], total: int | None = None
) -> None:
    text = markdown(rows, title, intro, total)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)


# ------------------------------------------------------------------------------------ command line


def save_json(rows: list[Row], path: Path) -> None:
    import json

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(r) for r in rows], indent=0))
    tmp.replace(path)


def load_json(paths: list[Path]) -> list[Row]:
    import json

    return [Row(**d) for path in paths for d in json.loads(path.read_text())]


def sweep_main(
    doc: str,
    cases_fn: Callable[[list[str] | None], list[Case]],
    list_fn: Callable[[], None],
    title: str,
    intro: str,
    default_out: Path,
    order: Callable[[Row], tuple] | None = None,
) -> int:
    """The command line both sweeps share (see their docstrings)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="cases whose name contains one of these words")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--jobs", type=int, default=1, help="cases at once (each in its own process)")
    parser.add_argument("--shard", default=None, help="K/N: every N-th case from the K-th (0-based)")
    parser.add_argument("--step-limit", type=int, default=240, help="seconds per step")
    parser.add_argument("--case-limit", type=int, default=900, help="seconds per case")
    parser.add_argument("--out", nargs="*", type=Path, default=None, help="markdown files to write")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--merge", nargs="*", type=Path, help="write the table of these JSON row files")
    parser.add_argument(
        "--resume",
        nargs="*",
        type=Path,
        help="JSON row files of an earlier run: skip their cases, keep their rows",
    )
    args = parser.parse_args()
    if args.list:
        list_fn()
        return 0
    outs = args.out if args.out is not None else ([] if args.only or args.shard else [default_out])
    if args.merge:
        rows = load_json(args.merge)
        if order is not None:
            rows.sort(key=order)
        print_table(rows)
        write_outputs(rows, title, intro, outs, len(cases_fn(args.only)))
        print("wrote " + ", ".join(map(str, outs)))
        return 0
    todo = cases_fn(args.only)
    if args.shard:
        k, n = (int(v) for v in args.shard.split("/"))
        todo = todo[k::n]
    selected = {c.arch for c in todo}
    earlier = [r for r in load_json([p for p in args.resume or [] if p.exists()]) if r.arch in selected]
    done = {r.arch for r in earlier}
    total = len(todo)
    todo = [c for c in todo if c.arch not in done]

    def on_row(rows):
        rows = earlier + rows
        if order is not None:
            rows = sorted(rows, key=order)
        if outs:
            write_outputs(rows, title, intro, outs, total)
        if args.json:
            save_json(rows, args.json)

    rows = run_cases(
        todo, jobs=args.jobs, step_limit=args.step_limit, case_limit=args.case_limit, on_row=on_row
    )
    on_row(rows)
    print_table(earlier + rows)
    if outs:
        print("wrote " + ", ".join(map(str, outs)))
    return 0
