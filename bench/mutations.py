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
CHECKPOINT_TESTS = (
    "tests/test_stream_files.py",
    "tests/test_stream_files_stateful.py",
    "tests/test_checkpoint.py",
    "tests/test_state_safety.py",
)
CHECKPOINTS = "evtrace/checkpoints.py"
STREAM_FILES = "tests/test_stream_files.py"
STATE_FOLLOWS = "tests/test_state_follows.py"
CALL_KWARGS = "tests/test_call_kwargs.py"

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
        "elif not _static_shapes(need) and bool(need):",
        "elif not _static_shapes(need):",
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
    # -- skips where nothing changed (gates, attention, the default policy's floor)
    Mutation(
        "skip-gate-prefix-only",
        "skip",
        GATES,
        "picked = error.gather(1, selection.index)",
        "picked = error.gather(1, selection.index[:, :1])",
        "the gate skip looks at the first selected token only (the forced class token): a frame whose "
        "patches changed skips the region",
        ("tests/test_skips.py",),
    ),
    Mutation(
        "skip-gate-first-stream-only",
        "skip",
        GATES,
        "picked = error.gather(1, selection.index)",
        "picked = error[:1].gather(1, selection.index[:1])",
        "the gate skip looks at stream 0 only: a moving stream next to a static one skips",
        ("tests/test_skips.py",),
    ),
    Mutation(
        "skip-attention-ignores-keys",
        "skip",
        ATTENTION,
        "if kept is None or idx_q.shape[1] or idx_k.shape[1] or self._fresh_streams:",
        "if kept is None or idx_q.shape[1] or self._fresh_streams:",
        "attention returns its kept output when only keys changed",
        ("tests/test_skips.py",),
    ),
    Mutation(
        "skip-attention-no-version-guard",
        "skip",
        ATTENTION,
        "if now != key or out.shape[:3] != q.shape[:3] or out.dtype != q.dtype:",
        "if out.shape[:3] != q.shape[:3] or out.dtype != q.dtype:",
        "attention returns its kept output after the caller wrote into it",
        ("tests/test_skips.py",),
    ),
    Mutation(
        "floor-forgets-forced",
        "skip",
        POLICIES,
        "candidates = (moved if forced is None else moved | forced).sum(dim=1)",
        "candidates = moved.sum(dim=1)",
        "the default policy's floor counts only changed tokens, not the forced prefix it also takes: "
        "a changed token is left out",
        ("tests/test_skips.py", "tests/test_steered_threshold.py"),
    ),
    # -- graph analysis and rewrite (hierarchical models, stems, sites) --
    Mutation(
        "rewrite-order-unsorted",
        "rewrite",
        SPARSE,
        "        place_in_order(gm.graph)\n",
        "",
        "region calls stay after their last input even where an exit is read before it",
        ("tests/test_hierarchical.py",),
    ),
    Mutation(
        "rewrite-sites-stale-qkv",
        "rewrite",
        SPARSE,
        "site.q, site.k, site.v = (replaced.get(x, x) for x in (site.q, site.k, site.v))",
        "pass",
        "a site whose q, k or v is a region exit keeps pointing at the erased node (one-head Swin stages)",
        ("tests/test_hierarchical.py",),
    ),
    Mutation(
        "flow-no-merge",
        "analysis",
        "passes/token_flow.py",
        "if rows.shape[0] // max(ids.shape[0], 1) < 2 or not _disjoint_rows(rows):",
        "if True:",
        "a norm or linear over merged tokens (timm's patch merging) no longer opens a sequence",
        ("tests/test_token_flow.py", "tests/test_hierarchical.py"),
    ),
    Mutation(
        "flow-overlap-merges",
        "analysis",
        "passes/token_flow.py",
        "return not bool(((tokens[1:] == tokens[:-1]) & (owner[1:] != owner[:-1])).any())",
        "return True",
        "tokens in several merged rows (overlapping groups) are taken for a patch merging",
        ("tests/test_token_flow.py",),
    ),
    Mutation(
        "sites-bias-unscaled",
        "analysis",
        "passes/attention_sites.py",
        "chain.append((nxt, current))  # an earlier term is scaled with the logits",
        "pass",
        "a logit term added before the scale is no longer scaled with the logits",
        ("tests/test_attention_sites.py",),
    ),
    Mutation(
        "sites-nonlinear-logits",
        "analysis",
        "passes/attention_sites.py",
        "if kind == OpKind.UNARY and (name in _IDENTITIES or _identity_module(node)):",
        "if kind == OpKind.UNARY:",
        "a non-linear function of the logits (tanh soft-cap) is taken for an identity",
        ("tests/test_attention_sites.py",),
    ),
    # front ends: fixed arguments reach both front ends, static inputs evaluated while tracing
    Mutation(
        "frontend-export-ignores-fixed",
        "front ends",
        "evtrace/graph/tracer.py",
        "    if binding is not None and binding.user:\n        model = _bound_module(",
        "    if False:\n        model = _bound_module(",
        "concrete_args and static_inputs reach only the fx front end, as before",
        ("tests/test_frontends.py",),
    ),
    Mutation(
        "frontend-static-not-evaluated",
        "front ends",
        "evtrace/graph/tracer.py",
        "        if all(id(t) in self.static for t in tensors):",
        "        if False:",
        "values computed from static inputs stay fake under export (.tolist() data-dependent)",
        ("tests/test_frontends.py",),
    ),
    Mutation(
        "frontend-static-evaluates-everything",
        "front ends",
        "evtrace/graph/tracer.py",
        "        if all(id(t) in self.static for t in tensors):",
        "        if any(id(t) in self.static for t in tensors):",
        "an op mixing a static input with the frame is evaluated at trace time (the frame baked in)",
        ("tests/test_frontends.py",),
    ),
    Mutation(
        "frontend-static-any-value-accepted",
        "front ends",
        EVENTFUL,
        "            and bool(torch.equal(value.detach().cpu(), fixed.detach().cpu()))",
        "            or True",
        "a call with another value of a static input runs the graph traced for the example's",
        ("tests/test_frontends.py",),
    ),
    Mutation(
        "frontend-fixed-kwarg-unchecked",
        "front ends",
        EVENTFUL,
        "                        self._check_fixed(key, value[key], self.fixed[key], traced)\n",
        "                        pass\n",
        "a flag fixed for the trace (in **kwargs) is accepted at any value",
        ("tests/test_frontends.py",),
    ),
    Mutation(
        "frontend-numpy-T-kept",
        "front ends",
        "evtrace/graph/tracer.py",
        "    _spell_transposes(gm)\n",
        "",
        "Tensor.T stays numpy_T under export: no token rule, Pixtral's tower stays dense",
        ("tests/test_frontends.py",),
    ),
    Mutation(
        "frontend-hint-no-static",
        "front ends",
        "evtrace/graph/tracer.py",
        "        if integer and binding is not None",
        "        if False",
        "the TraceError no longer names the integer input to fix with static_inputs",
        ("tests/test_frontends.py",),
    ),
    # -- streams: stream files, state that follows the stream, eval semantics, keyword calls ------
    Mutation(
        "stream-file-unsafe-load",
        "streams",
        CHECKPOINTS,
        'torch.load(source, map_location="cpu", weights_only=True)',
        'torch.load(source, map_location="cpu", weights_only=False)',
        "a stream file is unpickled with weights_only=False (a crafted file runs code)",
        (STREAM_FILES,),
    ),
    Mutation(
        "stream-load-no-shape-check",
        "streams",
        CHECKPOINTS,
        "if tuple(value.shape) != tuple(current.shape):",
        "if False:",
        "load_stream skips the shape check (a (C,) tensor broadcasts into a (1, N, C) buffer)",
        (STREAM_FILES,),
    ),
    Mutation(
        "stream-load-no-finite-check",
        "streams",
        CHECKPOINTS,
        "if value.is_floating_point() and not bool(torch.isfinite(value).all()):",
        "if False:",
        "load_stream accepts NaN and Inf state",
        (STREAM_FILES,),
    ),
    Mutation(
        "stream-load-not-atomic",
        "streams",
        CHECKPOINTS,
        "    if problems:\n        raise StreamFileError(",
        "    if problems:\n        _apply(emodel, saved)\n        raise StreamFileError(",
        "load_stream copies the file in before refusing it (not validate all, then copy all)",
        (STREAM_FILES,),
    ),
    Mutation(
        "stream-load-no-graph-hash",
        "streams",
        CHECKPOINTS,
        '        "graph": graph_hash(emodel.graph_module),\n    }\n    for key, mine',
        '        "graph": saved.get("graph"),\n    }\n    for key, mine',
        "load_stream skips the graph hash (another architecture with the same state tensors loads)",
        (STREAM_FILES,),
    ),
    Mutation(
        "stream-load-policy-settings-ignored",
        "streams",
        CHECKPOINTS,
        "if gates[name] != settings[name]:",
        "if False:",
        "load_stream accepts a stream saved under other policy settings",
        (STREAM_FILES,),
    ),
    Mutation(
        "stream-load-detector-ignored",
        "streams",
        CHECKPOINTS,
        '    problems += _detector_problems(emodel, saved.get("detectors"))\n',
        "",
        "load_stream ignores whether the scene-cut detectors (and their settings) match",
        (STREAM_FILES,),
    ),
    Mutation(
        "stream-save-no-policy-state",
        "streams",
        CHECKPOINTS,
        '[{"gates": gates, "state": policy.state_dict()} for gates, policy in stateful]',
        '[{"gates": gates, "state": policy.fresh_copy().state_dict()} for gates, policy in stateful]',
        "save_stream drops the stateful policies' state (a restore is no longer bit for bit)",
        (STATE_FOLLOWS,),
    ),
    Mutation(
        "policy-load-skips-inner",
        "streams",
        POLICIES,
        '            self.policy.load_state_dict(state["inner"], device)',
        "            pass",
        "Staleness.load_state_dict leaves the wrapped stateful policy's state out",
        (STATE_FOLLOWS,),
    ),
    Mutation(
        "policy-deepcopy-fresh",
        "streams",
        POLICIES,
        "    def fresh_copy(self) -> StatefulPolicy:",
        "    def __deepcopy__(self, memo):\n        import copy\n\n        new = copy.copy(self)\n"
        "        new._slots = []\n        return new\n\n    def fresh_copy(self) -> StatefulPolicy:",
        "deepcopy of a stateful policy drops its per-gate state (deepcopy(emodel) restarts it)",
        (STATE_FOLLOWS,),
    ),
    Mutation(
        "policy-shared-between-models",
        "streams",
        EVENTFUL,
        "            policy = policy.fresh_copy()",
        "            pass",
        "a stateful policy object given to a second model is shared by both streams",
        (STATE_FOLLOWS,),
    ),
    Mutation(
        "dropout-live",
        "streams",
        EVENTFUL,
        "if isinstance(target, nn.modules.dropout._DropoutNd) and node.args:",
        "if False:",
        "the rewritten graph keeps the original's nn.Dropout (model.train() turns it on)",
        (STATE_FOLLOWS,),
    ),
    Mutation(
        "train-turns-on",
        "streams",
        EVENTFUL,
        "        if mode:\n            warnings.warn(\n",
        "        if mode:\n            return super().train(mode)\n            warnings.warn(\n",
        "emodel.train() switches the eventful model to training mode",
        (STATE_FOLLOWS,),
    ),
    Mutation(
        "kwargs-passed-through",
        "streams",
        EVENTFUL,
        "        if kwargs or len(args) != self._call.traced:\n"
        "            args, kwargs = self._call.positional"
        "(args, kwargs), {}\n        if (",
        "        if (",
        "keyword arguments go to the traced graph unmapped (torch's error and a reset stream)",
        (CALL_KWARGS,),
    ),
    Mutation(
        "kwargs-fixed-args-ignored",
        "streams",
        EVENTFUL,
        "        if not _same_value(value, fixed):",
        "        if False:",
        "an argument the trace fixed, given another value, is silently ignored",
        (CALL_KWARGS,),
    ),
    # --- selection (evtrace/runtime/selection.py) and the fidelity baselines
    Mutation(
        "random-tokens-by-error",
        "policy",
        "evtrace/runtime/selection.py",
        "score = torch.rand(b, n, generator=self._gen).to(error.device)",
        "score = error.clone()",
        "RandomTokens picks the tokens with the largest error instead of random ones",
        ("tests/test_selection.py",),
    ),
    Mutation(
        "budgeted-dense-free",
        "policy",
        "evtrace/runtime/selection.py",
        'step = step + torch.where(state["dense"], zero + (self.target - 1.0), zero)',
        "step = step",
        "BudgetedThreshold does not charge dense frames (cuts, refreshes, keyframes) to its budget",
        ("tests/test_selection.py",),
    ),
    Mutation(
        "budgeted-no-cap",
        "policy",
        "evtrace/runtime/selection.py",
        "r = _bucketed(torch.minimum(r, allowance), low, peak, self.buckets)",
        "r = _bucketed(r, low, peak, self.buckets)",
        "BudgetedThreshold spends what tau asks for, whatever the bank holds",
        ("tests/test_selection.py",),
    ),
    Mutation(
        "keyframes-never",
        "policy",
        "evtrace/runtime/selection.py",
        "self._key = self._since >= self.k",
        "self._key = False",
        "Keyframes never updates every token",
        ("tests/test_selection.py",),
    ),
    Mutation(
        "reuse-priced-per-k",
        "fidelity",
        "evtrace/tools/fidelity.py",
        "return sum(1 for t in range(1, frames) if t % k == 0) / (frames - 1)",
        "return 1.0 / k",
        "reuse-last-output is priced at 1/k of dense, not at the dense frames it really scored",
        ("tests/test_fidelity_baselines.py",),
    ),
    Mutation(
        "flow-stem-patch-only",
        "analysis",
        "passes/token_flow.py",
        "if kind in (OpKind.CONV, OpKind.POOL) and self._positions(n) >= 2:",
        "if kind == OpKind.CONV and self._is_patch_embedding(n):",
        "only an unpadded conv with kernel == stride starts a sequence (overlapping and padded stems do not)",
        ("tests/test_stems.py",),
    ),
    Mutation(
        "flow-conv-same-grid-new-space",
        "analysis",
        "passes/token_flow.py",
        "        if same_grid:",
        "        if False:",
        "a stride-1 conv over tokens (Mix-FFN, position conv) numbers its positions as a new sequence",
        ("tests/test_stems.py",),
    ),
    Mutation(
        "flow-batchnorm-training-tokenwise",
        "analysis",
        "passes/token_flow.py",
        "        if training or not isinstance(x, Ids):",
        "        if not isinstance(x, Ids):",
        "batch norm with batch statistics (training mode) is taken for token-wise",
        ("tests/test_stems.py",),
    ),
    Mutation(
        "canon-spellings-apart",
        "analysis",
        "passes/canonicalize.py",
        "    return SPELLINGS.get(name, name)",
        "    return name",
        "in-place and operator spellings (div_, truediv, add_) are not one op to the matchers",
        ("tests/test_canonicalize.py", "tests/test_attention_sites.py"),
    ),
    Mutation(
        "canon-in-place-observed",
        "analysis",
        "passes/canonicalize.py",
        "if not isinstance(target, torch.fx.Node) or len(target.users) != 1:",
        "if not isinstance(target, torch.fx.Node):",
        "an in-place op whose mutation a later read observes is rewritten out of place",
        ("tests/test_canonicalize.py",),
    ),
    Mutation(
        "regions-stages-token-inputs",
        "analysis",
        "passes/regions.py",
        "        # that hold no token (a statistic, a view of a mixed tensor) and come back into it\n"
        "        for arg in _value_inputs(node):",
        "        for arg in _token_inputs(node):",
        "region stages follow token inputs only: a path out through a statistic and back is not seen",
        ("tests/test_hierarchical.py",),
    ),
    Mutation(
        "regions-stale-statistic-gated",
        "analysis",
        "passes/regions.py",
        "        elif stale is not None:",
        "        elif False:",
        "a region that reads a frame-dependent value without tokens is gated (stale rows)",
        ("tests/test_hierarchical.py",),
    ),
    # -- the pass contract, the build's partial-frame check, site-level advice
    Mutation(
        "delta-attention-join-by-position",
        "passes",
        "passes/delta_attention.py",
        "plan = plans[site.name]",
        "plan = ctx.plan.sites[index]",
        "delta attention pairs each site with the plan entry at its position, not its name",
        ("tests/test_pipeline.py",),
    ),
    Mutation(
        "runner-ignores-undeclared-touches",
        "passes",
        "passes/pipeline.py",
        "    if reads or writes:\n        found = []",
        "    if False:\n        found = []",
        "the runner lets a pass read and write node metadata it does not declare",
        ("tests/test_pipeline.py",),
    ),
    Mutation(
        "build-skips-partial-frame-check",
        "passes",
        "passes/build.py",
        "failures = check_partial_frames(ctx.gm, args) if options.validate else []",
        "failures = []",
        "transform keeps a region that crashes or disagrees on partial frames",
        ("tests/test_partial_frames.py",),
    ),
    Mutation(
        "partial-frame-check-no-numbers",
        "passes",
        "passes/validate.py",
        "        if worst > tolerance:\n            fail(\n                module.name,",
        "        if False:\n            fail(\n                module.name,",
        "the partial-frame check lets a region whose sparse rows disagree with its dense graph pass",
        ("tests/test_partial_frames.py",),
    ),
    Mutation(
        "kept-dense-silently",
        "passes",
        "passes/build.py",
        "                _warn_kept_dense(type(model).__name__, keep_dense)",
        "                pass",
        "what is kept dense after a failed rewrite or check is not warned about",
        ("tests/test_partial_frames.py",),
    ),
    Mutation(
        "strict-ignored",
        "passes",
        "passes/build.py",
        "if options.strict or failure.name in keep_dense:",
        "if failure.name in keep_dense:",
        "transform(strict=True) keeps a failing region dense instead of raising",
        ("tests/test_partial_frames.py",),
    ),
    Mutation(
        "attention-output-memory-order",
        "passes",
        "passes/delta_attention.py",
        "order = memory_order(site.output)",
        "order = None",
        "delta attention hands out contiguous (B, H, N, d) where export's fused attention did not",
        ("tests/test_partial_frames.py",),
    ),
    Mutation(
        "advice-no-site-share",
        "advice",
        "evtrace/advice.py",
        "elif plan.sites and delta < MIN_SHARE * len(plan.sites) and not asked:",
        "elif False:",
        "no warning when fewer than half of the attention sites are delta-updated",
        ("tests/test_advice.py",),
    ),
    Mutation(
        "advice-no-linear-share",
        "advice",
        "evtrace/advice.py",
        "if gated < MIN_SHARE * len(plan.linears):",
        "if False:",
        "no warning when fewer than half of the linears are gated",
        ("tests/test_advice.py",),
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
    Mutation(
        "wrapper-frame-not-passed",
        "policy",
        "evtrace/runtime/selection.py",
        "        super().start_frame()\n"
        "        if isinstance(self.policy, StatefulPolicy):\n"
        "            self.policy.start_frame()",
        "        super().start_frame()",
        "a wrapping policy does not pass the frame on to the stateful policy it wraps",
        ("tests/test_selection.py",),
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
