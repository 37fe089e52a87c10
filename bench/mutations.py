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
        return CORE_TESTS + tuple(t for t in self.tests if t not in CORE_TESTS)


GATES = "evtrace/runtime/gates.py"
POLICIES = "evtrace/runtime/policies.py"
ATTENTION = "evtrace/runtime/attention.py"
EVENTFUL = "evtrace/eventful.py"
SPARSE = "passes/sparse_regions.py"
COUNT = "evtrace/cost/count.py"

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
        "    return (count >= warmup) & (change > min_change) & (change > factor * median)",
        "    return (count >= warmup) & (change > min_change) & (change > factor * median) & False",
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
        "score = relative_error(error, reference_norm) if self.relative else error",
        "score = error",
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
    # counting: ops without a rule, user rules, what the paper convention leaves out
    Mutation(
        "flops-generic-zero",
        "flops",
        COUNT,
        "            return value.numel()\n    return 0",
        "            return 0\n    return 0",
        "an op without a rule is counted as zero (silently, in the paper convention)",
        ("tests/test_flop_rules.py",),
    ),
    Mutation(
        "flops-generic-unlisted",
        "flops",
        COUNT,
        "                self.generic[name] += flops",
        "                pass",
        "ops counted by the generic rule are not listed in generic_ops",
        ("tests/test_flop_rules.py",),
    ),
    Mutation(
        "flops-user-rule-ignored",
        "flops",
        COUNT,
        "    if user is not None:\n        return user, False",
        "    if False:\n        return user, False",
        "a rule registered with register_flop_rule is ignored in the paper convention",
        ("tests/test_flop_rules.py",),
    ),
    Mutation(
        "flops-fvcore-generic-skipped",
        "flops",
        COUNT,
        "handles | {op: generic_handle for op in unsupported}",
        "handles",
        "fvcore skips the ops it has no handle for (counted as zero)",
        ("tests/test_flop_rules.py",),
    ),
    Mutation(
        "flops-left-out-dropped",
        "flops",
        COUNT,
        "            self.left_out[self.key] += int(left_out(args, out))",
        "            pass",
        "convolutions left out of the paper convention are neither reported nor warned about",
        ("tests/test_flop_rules.py",),
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
    if rc == -1:
        return Outcome(m, "caught (timeout)", "", seconds)
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
    parser.add_argument("--only", default="", help="run only mutations whose name starts with this")
    parser.add_argument("--list", action="store_true", help="list the mutations and their snippet status")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation")
    parser.add_argument("--markdown", type=Path, help="write the report table there")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if m.name.startswith(args.only)]
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
