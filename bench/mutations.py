"""Mutation checks: break the core paths on purpose, one at a time, and see the tests fail.

Each mutation replaces one exact snippet of one source file by a broken version, in a temporary
COPY of the repository (the real tree is never touched), then runs the relevant test files there
with this interpreter. A mutation is *caught* when those tests fail. A snippet that is not in
the file (the code moved) is reported as "snippet not found", not as a crash.

    python bench/mutations.py                     # every mutation, on the committed tree (HEAD)
    python bench/mutations.py --worktree          # on the working tree (uncommitted edits too)
    python bench/mutations.py --only gate-         # names starting with gate-
    python bench/mutations.py --list              # the mutations and whether their snippets exist
    python bench/mutations.py --markdown out.md   # also write the report table

The report table is in docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: the default suite's files that check the eventful semantics; every mutation runs them
CORE_TESTS = ("tests/test_reference.py", "tests/test_options.py")


@dataclass(frozen=True)
class Mutation:
    name: str
    area: str
    path: str
    old: str
    new: str
    what: str
    tests: tuple[str, ...] = field(default=())  # run after CORE_TESTS

    def all_tests(self) -> tuple[str, ...]:
        # the mutation's own files first: one that catches it stops the run sooner (same files)
        return tuple(t for t in self.tests if t not in CORE_TESTS) + CORE_TESTS


GATES = "evtrace/runtime/gates.py"
POLICIES = "evtrace/runtime/policies.py"
ATTENTION = "evtrace/runtime/attention.py"
EVENTFUL = "evtrace/eventful.py"
SPARSE = "passes/sparse_regions.py"
COUNT = "evtrace/cost/count.py"
SERVING = "evtrace/serving.py"
DEPLOY = "evtrace/deploy.py"
SCENE_CUT = "evtrace/runtime/scene_cut.py"
POOL_TESTS = ("tests/test_stream_pool.py",)
DEPLOY_TESTS = ("tests/test_export_streams.py", "tests/test_deploy.py")
CUT_TESTS = ("tests/test_scene_cut.py", "tests/test_hard_video.py")
CHECKPOINT_TESTS = ("tests/test_stream_files.py", "tests/test_checkpoint.py", "tests/test_state_safety.py")

MUTATIONS = (
    Mutation(
        "gate-no-reference-update",
        "gate",
        GATES,
        "put_tokens_(ref, index, new, self.maps[i], positions)",
        "None",
        "the gate never writes the selected rows into its reference",
    ),
    Mutation(
        "gate-first-entry-only",
        "gate",
        GATES,
        "total = torch.hypot(total, other)",
        "total = total",
        "the error norm ignores every region entry but the first",
    ),
    Mutation(
        "gate-canonical-positions",
        "gate",
        GATES,
        'return None if self.maps[i].canonical else getattr(self, f"positions{i}")',
        "return None",
        "the gate reads windowed/padded entries as if rows were tokens in order",
    ),
    Mutation(
        "buffer-no-scatter",
        "buffer",
        GATES,
        "put_tokens_(buffer, index, value, row_map, positions)",
        "None",
        "recomputed rows are never written into the exit buffers",
    ),
    Mutation(
        "buffer-streams-share-rows",
        "buffer",
        GATES,
        "flat = index + torch.arange(batch, device=index.device).unsqueeze(1) * tokens",
        "flat = index",
        "every stream of a batch reads and writes stream 0's rows",
    ),
    Mutation(
        "attention-no-old-terms",
        "attention",
        ATTENTION,
        "z.mul_(alpha).add_(s_new).sub_(s_old)",
        "z.mul_(alpha).add_(s_new)",
        "exact attention no longer subtracts the old terms (denominator)",
        ("tests/test_attention.py",),
    ),
    Mutation(
        "attention-keys-not-stored",
        "attention",
        ATTENTION,
        "_rows_write_(self.k_ref, idx_k, k_new)",
        "None",
        "exact attention forgets to store the changed keys",
    ),
    Mutation(
        "attention-queries-not-recomputed",
        "attention",
        ATTENTION,
        "if rows.shape[2] > 0:",
        "if False:",
        "changed query rows and repair rows are not recomputed",
    ),
    Mutation(
        "attention-no-repair-rows",
        "attention",
        ATTENTION,
        "c = min(self.repair_rows, nq)",
        "c = 0",
        "no repair rows against cancellation (peaky attention)",
        ("tests/test_attention.py",),
    ),
    Mutation(
        "attention-windows-miss-changes",
        "attention",
        ATTENTION,
        "    changed[flat.reshape(-1) + 1] = True\n",
        "    changed[flat.reshape(-1)[:1] + 1] = True\n",
        "grouped (windowed) attention updates only the first changed token's positions",
        ("tests/test_families.py",),
    ),
    Mutation(
        "attention-always-dense",
        "fallback",
        ATTENTION,
        "if idx_q is None or self._needs_init or not self._state_matches(q, k, v):",
        "if True:",
        "exact attention recomputes the full state every call (silently dense)",
    ),
    Mutation(
        "attention-fallback-every-frame",
        "fallback",
        ATTENTION,
        "elif not torch.jit.is_tracing() and bool(need):",
        "elif not torch.jit.is_tracing():",
        "exact attention falls back to a full recompute every frame",
    ),
    Mutation(
        "refresh-never",
        "refresh",
        EVENTFUL,
        "self.frames_since_refresh >= options.refresh_every",
        "self.frames_since_refresh >= options.refresh_every and False",
        "refresh_every never fires",
    ),
    Mutation(
        "scene-cut-never",
        "refresh",
        "evtrace/runtime/scene_cut.py",
        "(count >= warmup) & (change > min_change) & (change > factor * median)",
        "(count >= warmup) & (change > min_change) & (change > factor * median) & False",
        "scene cuts never fire",
    ),
    Mutation(
        "check-inputs-ignored",
        "refresh",
        EVENTFUL,
        "if self._options.check_inputs:\n            for i, t in enumerate(tensors):",
        "if True:\n            for i, t in enumerate(tensors):",
        "check_inputs=False still rejects non-finite frames",
    ),
    Mutation(
        "topk-smallest",
        "policy",
        POLICIES,
        "torch.topk(score, r, dim=1, largest=True, sorted=False)",
        "torch.topk(score, r, dim=1, largest=False, sorted=False)",
        "top-k picks the tokens that changed least",
        ("tests/test_policies.py",),
    ),
    Mutation(
        "topfraction-floor",
        "policy",
        POLICIES,
        "math.ceil(round(self._f * n, 9))",
        "math.floor(round(self._f * n, 9))",
        "TopFraction rounds its count down",
    ),
    Mutation(
        "threshold-batch-unmasked",
        "policy",
        POLICIES,
        "return Selection(index, values > self._tau if score.shape[0] > 1 else None)",
        "return Selection(index, None)",
        "Threshold in a batch updates the padding slots of the quieter streams",
    ),
    Mutation(
        "fixed-capacity-unmasked",
        "policy",
        POLICIES,
        "return Selection(index, values > self._tau)",
        "return Selection(index, None)",
        "FixedCapacityThreshold updates every slot, above tau or not",
    ),
    Mutation(
        "relative-threshold-absolute",
        "policy",
        POLICIES,
        "need_reference=self.relative)\n"
        "        score = relative_error(error, reference_norm) if self.relative else error",
        "need_reference=self.relative)\n        score = error",
        "a relative threshold compares the absolute error",
    ),
    Mutation(
        "prefix-not-forced",
        "prefix",
        SPARSE,
        "if always_update_prefix and space.prefix:",
        "if False:",
        "class/register tokens no longer always updated",
    ),
    Mutation(
        "stream-reset-all",
        "reset",
        EVENTFUL,
        "self._reset_streams([stream])",
        "self._reset()",
        "reset(stream=i) restarts every stream of the batch (issue 15)",
    ),
    Mutation(
        "stream-reset-region-noop",
        "reset",
        GATES,
        "self.fresh_streams = tuple(sorted(self.fresh_streams + (b,)))",
        "pass",
        "a region ignores reset_stream(b): the restarted stream keeps its old references",
    ),
    Mutation(
        "flops-eventful-dense",
        "flops",
        COUNT,
        "module.gate.policy = counting_policy(chosen)",
        "module.gate.policy = All()",
        "count_flops returns the dense count for eventful models",
        ("tests/test_cost.py",),
    ),
    Mutation(
        "flops-no-bias-adds",
        "flops",
        COUNT,
        "return out.numel() * args[1].shape[-1] + out.numel()",
        "return out.numel() * args[1].shape[-1]",
        "the paper convention drops the bias adds of linears",
        ("tests/test_cost.py",),
    ),
    # ---- streams (pool, scene cuts, export, stream files) and the core: an audit's survivors, then
    # mutations written before any test for them (their catch rate before: docs/testing.md)
    Mutation(
        "threshold-ge",
        "policy",
        POLICIES,
        "r = int((score > self._tau).sum(dim=1).max().item())",
        "r = int((score >= self._tau).sum(dim=1).max().item())",
        "Threshold takes the tokens whose error equals tau (an unchanged frame updates every token)",
        ("tests/test_selection_edges.py", "tests/test_policies.py"),
    ),
    Mutation(
        "relative-current-norm",
        "gate",
        GATES,
        "[token_norm(ref, self.maps[i], self._positions(i)) for i, ref in enumerate(refs)]",
        "[token_norm(x, self.maps[i], self._positions(i)) for i, x in enumerate(inputs)]",
        "a relative threshold divides by the current token's norm, not the reference's",
        ("tests/test_selection_edges.py", "tests/test_policies.py", "tests/test_steered_threshold.py"),
    ),
    Mutation(
        "pool-idle-unmasked-mixed",
        "serving",
        SERVING,
        "            chosen &= ~idle[:, None]\n",
        "            pass\n",
        "the pool does not mask idle rows when policies differ per stream",
        POOL_TESTS,
    ),
    Mutation(
        "save-stream-no-policy-state",
        "checkpoint",
        EVENTFUL,
        '"policies": policies,',
        '"policies": {},',
        "save_stream drops the stateful policies' state",
        CHECKPOINT_TESTS,
    ),
    Mutation(
        "load-stream-no-graph-check",
        "checkpoint",
        EVENTFUL,
        'for key in ("model", "signature", "attention", "graph"):',
        'for key in ("model", "signature", "attention"):',
        "load_stream skips the rewritten graph's hash (another architecture's stream is accepted)",
        CHECKPOINT_TESTS,
    ),
    Mutation(
        "export-ignores-scene-cuts",
        "deploy",
        DEPLOY,
        "if frame is not None and bool(self.scene_cut.update(frame).any()):",
        "if False:",
        "the exported runner ignores scene cuts",
        DEPLOY_TESTS,
    ),
    Mutation(
        "scene-cut-no-jump",
        "scene cut",
        SCENE_CUT,
        "& (change > jump * previous)",
        "",
        "a cut need not jump against the change before it (motion that speeds up fires)",
        CUT_TESTS,
    ),
    Mutation(
        "scene-cut-burst",
        "scene cut",
        SCENE_CUT,
        "torch.where(cut, torch.zeros_like(self._count), self._count + measured.long())",
        "self._count + (measured & ~cut).long()",
        "a cut leaves its stream's history as it was (a burst of unrelated frames fires on every one)",
        CUT_TESTS,
    ),
    Mutation(
        "scene-cut-median-batch",
        "scene cut",
        SCENE_CUT,
        "median = torch.nanmedian(history, dim=1).values if history.shape[1]",
        "median = torch.nanmedian(history).expand_as(change) if history.shape[1]",
        "the scene-cut median is taken over the whole batch, not per stream",
        CUT_TESTS,
    ),
    Mutation(
        "gate-masked-slots-update",
        "gate",
        GATES,
        "new = torch.where(keep, new, old)",
        "new = new",
        "masked (padding) slots write the current value into the reference",
    ),
    Mutation(
        "region-restart-stale-references",
        "reset",
        GATES,
        "        self.gate.initialise_streams(entries, streams)\n",
        "",
        "a restarted stream's references keep their old values (its exit buffers are dense)",
    ),
    Mutation(
        "fixed-capacity-ge",
        "policy",
        POLICIES,
        "return Selection(index, values > self._tau)",
        "return Selection(index, values >= self._tau)",
        "FixedCapacityThreshold updates the slots whose error equals tau",
        ("tests/test_selection_edges.py", "tests/test_policies.py"),
    ),
    Mutation(
        "topfraction-no-round",
        "policy",
        POLICIES,
        "math.ceil(round(self._f * n, 9))",
        "math.ceil(self._f * n)",
        "TopFraction's count takes float rounding up (0.55 x 100 -> 56 tokens)",
        ("tests/test_selection_edges.py", "tests/test_policies.py"),
    ),
    Mutation(
        "staleness-one-late",
        "policy",
        POLICIES,
        "due = age >= self.k",
        "due = age > self.k",
        "Staleness(p, k) lets a token wait k + 1 frames",
        ("tests/test_adaptive_policies.py",),
    ),
    Mutation(
        "steered-tau-wrong-way",
        "policy",
        POLICIES,
        'state["log_tau"] = (state["log_tau"] + step)',
        'state["log_tau"] = (state["log_tau"] - step)',
        "SteeredThreshold lowers tau when it overspends",
        ("tests/test_steered_threshold.py",),
    ),
    Mutation(
        "budget-unchecked",
        "policy",
        POLICIES,
        "if r is not None and not 1 <= r <= tokens:",
        "if False:",
        "check_budget accepts a budget larger than the gate's tokens",
        ("tests/test_selection_edges.py", "tests/test_policies.py"),
    ),
    Mutation(
        "attention-magnitude-not-tracked",
        "attention",
        ATTENTION,
        "mag.mul_(alpha).add_(s_new).add_(s_old)",
        "mag.mul_(alpha)",
        "exact attention stops tracking the magnitude of its updates (cancellation unseen)",
        ("tests/test_attention.py",),
    ),
    Mutation(
        "paper-attention-no-old-terms",
        "attention",
        ATTENTION,
        "self.y.add_(a_new @ v_new - a_old @ v_old)",
        "self.y.add_(a_new @ v_new)",
        "the paper's delta attention adds the new columns without taking the old ones out",
        ("tests/test_attention.py",),
    ),
    Mutation(
        "pool-restore-noop",
        "serving",
        SERVING,
        "for owner, name, index, shape, rows in saved:",
        "for owner, name, index, shape, rows in []:",
        'idle="restore" never writes the idle slots\' state back',
        POOL_TESTS,
    ),
    Mutation(
        "pool-reset-whole-batch",
        "serving",
        SERVING,
        "model.reset(stream=info.slot)",
        "model.reset()",
        "a new or refreshed stream restarts every slot of the pool",
        POOL_TESTS,
    ),
    Mutation(
        "pool-output-of-slot-0",
        "serving",
        SERVING,
        "return leaf[slot : slot + 1].clone()",
        "return leaf[0:1].clone()",
        "every stream gets slot 0's output",
        POOL_TESTS,
    ),
    Mutation(
        "export-refresh-never",
        "deploy",
        DEPLOY,
        "if self.refresh_every is not None and self.frames_since_refresh >= self.refresh_every:",
        "if False:",
        "the exported runner never refreshes",
        DEPLOY_TESTS,
    ),
    Mutation(
        "export-reset-not-dense",
        "deploy",
        DEPLOY,
        '        """A new stream: the next frame runs the dense step."""\n        self.fresh = True',
        '        """A new stream: the next frame runs the dense step."""\n        self.fresh = False',
        "the exported runner's reset() keeps running the steady step",
        DEPLOY_TESTS,
    ),
    Mutation(
        "scene-cut-flat-frames-compared",
        "scene cut",
        SCENE_CUT,
        "measured = has_content & self._seen",
        "measured = torch.ones_like(has_content)",
        "frames without content (a fade through black) are compared like any other",
        CUT_TESTS,
    ),
    Mutation(
        "scene-cut-flat-cells-count",
        "scene cut",
        SCENE_CUT,
        "content = var.amax(dim=1).flatten(1) > texture * texture",
        "content = var.amax(dim=1).flatten(1) >= 0",
        "flat cells (letterbox bars) count in the correlation",
        CUT_TESTS,
    ),
    Mutation(
        "flops-sdpa-no-mask",
        "flops",
        COUNT,
        "return macs + (rows * k.shape[-2] if mask is not None else 0)",
        "return macs",
        "fused attention's mask add is not counted",
        ("tests/test_count_edges.py", "tests/test_cost.py"),
    ),
    Mutation(
        "flops-index-add-free",
        "flops",
        COUNT,
        "return source.numel() if source.is_floating_point() else 0",
        "return 0",
        "index_add / scatter_add are counted as free",
        ("tests/test_count_edges.py", "tests/test_cost.py"),
    ),
    Mutation(
        "region-constants-first-rows",
        "sparse region",
        GATES,
        "return table.index_select(0, rows).reshape(shape)",
        "return table[: rows.numel()].reshape(shape)",
        "a region's token-varying constant (position embedding, padding mask) is read at the first rows",
        ("tests/test_sparse_regions.py",),
    ),
)


# ----------------------------------------------------------------------------- the copy


def _files(worktree: bool) -> list[str]:
    if worktree:  # tracked and untracked files that git does not ignore, as they are on disk
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        return [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]
    return []


def make_copy(worktree: bool) -> Path:
    """A fresh copy of the repository (HEAD, or the working tree) in a temporary folder."""
    target = Path(tempfile.mkdtemp(prefix="evtrace-mutant-"))
    if worktree:
        for f in _files(True):
            (target / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, target / f)
    else:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def source_text(path: str, worktree: bool) -> str | None:
    if worktree:
        file = ROOT / path
        return file.read_text() if file.is_file() else None
    shown = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=ROOT, capture_output=True)
    return shown.stdout.decode() if shown.returncode == 0 else None


def snippet_status(m: Mutation, worktree: bool) -> str:
    text = source_text(m.path, worktree)
    if text is None:
        return f"file not found: {m.path}"
    count = text.count(m.old)
    if count == 0:
        return "snippet not found"
    if count > 1:
        return f"snippet ambiguous ({count} places)"
    return "ok"


# ----------------------------------------------------------------------------- running


def run_tests(folder: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONPATH=str(folder),
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:logging",
        "--tb=line",
        *tests,
    ]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout", time.perf_counter() - start
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - start


def first_failure(output: str) -> str:
    found = re.search(r"^FAILED (\S+)", output, re.M)
    if found:
        return found.group(1).split("::", 1)[-1][:70]
    found = re.search(r"^ERROR (\S+)", output, re.M)
    return ("error: " + found.group(1))[:70] if found else ""


@dataclass
class Outcome:
    mutation: Mutation
    status: str  # caught / NOT caught / snippet not found / ...
    by: str = ""
    seconds: float = 0.0


def run_mutation(m: Mutation, worktree: bool, timeout: float) -> Outcome:
    status = snippet_status(m, worktree)
    if status != "ok":
        return Outcome(m, status)
    folder = make_copy(worktree)
    try:
        file = folder / m.path
        text = file.read_text()
        mutated = text.replace(m.old, m.new, 1)
        try:  # a mutant that does not even compile would be "caught" for nothing
            compile(mutated, str(file), "exec")
        except SyntaxError as error:
            return Outcome(m, f"mutant does not compile ({error.msg})")
        file.write_text(mutated)
        rc, output, seconds = run_tests(folder, m.all_tests(), timeout)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if rc == -1:  # no test failed within the limit: undecided, not a catch (raise --timeout)
        return Outcome(m, "timeout (no failure yet)", "", seconds)
    if rc == 0:
        return Outcome(m, "NOT caught", "", seconds)
    if rc == 5:
        return Outcome(m, "no tests ran", "", seconds)
    return Outcome(m, "caught", first_failure(output), seconds)


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| mutation | area | what it breaks | result | first failing test | s |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        m = o.mutation
        lines.append(f"| `{m.name}` | {m.area} | {m.what} | {o.status} | {o.by or '-'} | {o.seconds:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worktree", action="store_true", help="mutate a copy of the working tree, not HEAD")
    parser.add_argument(
        "--only", default="", help="run only mutations whose name starts with this (several: comma-separated)"
    )
    parser.add_argument("--list", action="store_true", help="list the mutations and their snippet status")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation")
    parser.add_argument("--markdown", type=Path, help="write the report table there")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = parser.parse_args(argv)
    prefixes = tuple(p for p in args.only.split(",") if p) or ("",)
    chosen = [m for m in MUTATIONS if m.name.startswith(prefixes)]
    if not chosen:
        print(f"no mutation starts with {args.only!r}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:34s} {m.path:30s} {snippet_status(m, args.worktree)}")
        return 0
    if not args.no_baseline:
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.all_tests()))
        folder = make_copy(args.worktree)
        try:
            rc, output, seconds = run_tests(folder, tests, args.timeout * 2)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if rc != 0:
            print(f"the unmutated tests fail (rc {rc}); fix them first:\n{output[-3000:]}", file=sys.stderr)
            return 1
        print(f"baseline: {len(tests)} test files pass unmutated ({seconds:.0f} s)", flush=True)
    outcomes = []
    for m in chosen:
        outcome = run_mutation(m, args.worktree, args.timeout)
        outcomes.append(outcome)
        print(f"{m.name:34s} {outcome.status:18s} {outcome.seconds:5.0f} s  {outcome.by}", flush=True)
    report = table(outcomes)
    print()
    print(report)
    if args.markdown:
        args.markdown.write_text(report + "\n")
    missed = [o for o in outcomes if o.status != "caught" and not o.status.startswith("caught")]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
