"""A slow, obviously correct reference of the eventful semantics, and state invariants.

``ReferenceStream`` runs the ORIGINAL traced graph densely (a ``torch.fx`` interpreter) with each
gated region's entry tensors replaced, for the region's own nodes only, by the region's reference
tokens. Per region and per stream the reference ``p`` of every entry holds, for each token, the
value it had at the frame the token was last selected. The error of a token is the L2 norm over
channels of ``c - p``, combined over the region's entries as sqrt(sum of squares); the policy picks
tokens from it (re-implemented here, not called); picked tokens get ``p = c``; the first frame after
a reset sets ``p = c`` for all tokens of the stream. Always-updated prefix tokens (class, registers)
are forced. Attention is whatever the original graph does, run densely on the values it is given,
i.e. dense attention on the buffered q, k, v.

Nothing here uses the sparse machinery (``SparseRegion``, ``TokenGate``, the sparse-region rewrite,
delta attention, ``Policy.select``): only the analysis (which regions, which entries, which rows
hold which token), through ONE adapter, :func:`analyse`, the only place to change if the analysis
entry point moves.

``InvariantChecker`` checks the eventful model's state after every frame: gate references hold the
selected rows and nothing else moved, exit buffers equal the region's dense subgraph applied to the
references, exact-attention state equals its dense recomputation on the buffered k, v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx
import torch.utils._pytree as pytree

from evtrace.runtime import policies as P

# ------------------------------------------------------------------------------ the adapter


@dataclass
class EntryView:
    node: torch.fx.Node
    row_ids: torch.Tensor  # (R,) global token id of each row of the leading token dims, 0 = none
    token_ndim: int


@dataclass
class RegionView:
    name: str
    members: list[torch.fx.Node]
    entries: list[EntryView]
    batch: int
    tokens: int
    offset: int
    prefix: tuple[int, ...]
    linears: list[str]  # module paths of the region's linears (per-gate overrides match on them)


@dataclass
class AnalysisView:
    gm: torch.fx.GraphModule
    regions: list[RegionView]  # gated regions only


def analyse(model, example) -> AnalysisView:
    """THE adapter to the analysis: traced graph, gated regions, entries, token layouts."""
    from evtrace.graph.meta import TOKENS, module_path
    from passes.pipeline import analyze

    a = analyze(model, example)
    try:
        gated = {r.name for r in a.plan.gated_regions}
    except (AttributeError, KeyError):
        gated = {r.name for r in a.regions if r.gated}
    regions = []
    for r in a.regions:
        if r.name not in gated:
            continue
        entries = []
        for e in r.entries:
            layout = e.meta[TOKENS]
            entries.append(EntryView(e, layout.row_ids.reshape(-1).long().clone(), layout.token_ndim))
        linears = [module_path(n) for n in r.heavy]
        regions.append(
            RegionView(
                r.name,
                list(r.nodes),
                entries,
                r.space.batch,
                r.space.tokens,
                r.space.offset,
                tuple(r.space.prefix),
                linears,
            )
        )
    return AnalysisView(a.gm, regions)


# ------------------------------------------------------------------------------ token rows


def _rows(x: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
    """x as a (R, channels) table of its token rows (a view when x is contiguous)."""
    return x.reshape(row_ids.numel(), -1)


def _token_row(entry: EntryView, offset: int, count: int) -> torch.Tensor:
    """(count,) row of each canonical token (b * N + t) in the entry's tensor."""
    where = torch.full((count,), -1, dtype=torch.long)
    for row, ident in enumerate(entry.row_ids.tolist()):
        if ident > 0:
            assert where[ident - offset - 1] == -1, "a token on two rows"
            where[ident - offset - 1] = row
    assert bool((where >= 0).all()), "a token on no row"
    return where


def _token_norms(x: torch.Tensor, entry: EntryView, where: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, N) L2 norm over the channels of each token of x."""
    table = _rows(x, entry.row_ids).double()
    return table.square().sum(dim=1).sqrt()[where].reshape(batch, -1)


# ------------------------------------------------------------------------------ policies


def _top(score: torch.Tensor, r: int) -> list[int]:
    """The r largest scores of one stream (ties: lowest index first)."""
    order = sorted(range(score.numel()), key=lambda i: (-float(score[i]), i))
    return order[:r]


class SteeredReference:
    """SteeredThreshold's semantics in plain Python, for one policy object shared by the gates it
    is set on: one tau per stream; per gate, the tokens whose relative error exceeds it, at least
    min(low N, the tokens that changed at all or are forced), at most peak N; after each frame
    log tau moves by rate (spent / offered - target) / target over the gates where the stream
    changed at all (a gate where nothing of it changed neither spends nor offers)."""

    def __init__(self, policy: P.SteeredThreshold, batch: int):
        self.policy = policy
        self.log_tau = [math.log(policy.tau)] * batch
        self.spent = [0] * batch
        self.offered = [0] * batch

    def start_frame(self) -> None:
        p = self.policy
        for b, offered in enumerate(self.offered):
            if offered:
                step = p.rate * (self.spent[b] / offered - p.target) / p.target
                self.log_tau[b] = min(math.log(1e2), max(math.log(1e-4), self.log_tau[b] + step))
        self.spent = [0] * len(self.spent)
        self.offered = [0] * len(self.offered)

    def count(self, b: int, error: torch.Tensor, score: torch.Tensor, forced: list[int]) -> int:
        """Tokens stream b updates at this gate (error, score: (N,) of that stream)."""
        p, n = self.policy, error.numel()
        peak = min(n, max(1, math.ceil(round(p.peak * n, 9))))
        low = min(peak, max(1, math.floor(round(p.low * n, 9))))
        tau = math.exp(self.log_tau[b])
        above = sum(1 for i in range(n) if float(score[i]) > tau)
        candidates = sum(1 for i in range(n) if float(error[i]) != 0.0 or i in forced)
        r = min(peak, max(above, min(low, candidates)))
        if any(float(e) != 0.0 for e in error):
            self.spent[b] += r
            self.offered[b] += n
        return r


def select(
    policy,
    error: torch.Tensor,
    ref_norm: torch.Tensor,
    forced: list[int],
    steered=None,
    generators: dict | None = None,
) -> list[list[int]]:
    """Per stream, the tokens the policy updates (a list of token indices per stream).

    error, ref_norm: (B, N) float64. forced: token indices always updated. steered: the
    ``SteeredReference`` of a SteeredThreshold policy. generators: the random draws of each
    RandomTokens policy (by id), kept by the caller across calls.
    """
    batch, n = error.shape
    if type(policy).__name__ == "RandomTokens":  # uniform draws from its own seeded generator
        gens = {} if generators is None else generators
        gen = gens.setdefault(id(policy), torch.Generator().manual_seed(policy.seed))
        draws = torch.rand(batch, n, generator=gen).tolist()
        chosen = []
        for b in range(batch):
            order = sorted(range(n), key=lambda i: (i not in forced, -draws[b][i], i))
            chosen.append(sorted(order[: policy.r]))
        return chosen
    score = error.clone()
    if getattr(policy, "relative", False):
        score = error / ref_norm.clamp_min(1e-12)
    score[:, forced] = math.inf
    chosen = []
    for b in range(batch):
        s = score[b]
        if isinstance(policy, P.SteeredThreshold):
            picked = _top(s, steered.count(b, error[b], s, forced))
        elif isinstance(policy, P.TopK):
            assert policy.r <= n
            picked = _top(s, policy.r)
        elif isinstance(policy, P.TopFraction):
            picked = _top(s, min(n, max(1, math.ceil(round(policy.f * n, 9)))))
        elif isinstance(policy, P.FixedCapacityThreshold):
            picked = [i for i in _top(s, policy.capacity) if float(s[i]) > policy.tau]
        elif isinstance(policy, P.Threshold):
            picked = [i for i in range(n) if float(s[i]) > policy.tau]
        elif isinstance(policy, P.All):
            picked = list(range(n))
        else:
            raise NotImplementedError(f"no reference for {policy!r}")
        chosen.append(sorted(picked))
    return chosen


# ------------------------------------------------------------------------------ the simulator


def _order(gm: torch.fx.GraphModule, regions: list[RegionView]) -> list[torch.fx.Node]:
    """Graph order, except that a region's members wait until all its entries exist."""
    extra: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for region in regions:
        for m in region.members:
            extra[m] = [e.node for e in region.entries]
    done: set[torch.fx.Node] = set()
    order = []
    for start in gm.graph.nodes:
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in done:
                continue
            if expanded:
                done.add(node)
                order.append(node)
                continue
            stack.append((node, True))
            for dep in reversed(list(node.all_input_nodes) + extra.get(node, [])):
                if dep not in done:
                    stack.append((dep, False))
    return order


class _State:
    """One region's references, for every stream."""

    def __init__(self, region: RegionView):
        self.region = region
        self.refs: list[torch.Tensor | None] = [None] * len(region.entries)
        count = region.batch * region.tokens
        self.where = [_token_row(e, region.offset, count) for e in region.entries]
        self.last: list[list[int]] | None = None  # tokens selected at the last frame, per stream

    def stream_rows(self, i: int, b: int, tokens: list[int]) -> torch.Tensor:
        n = self.region.tokens
        return self.where[i][torch.tensor([b * n + t for t in tokens], dtype=torch.long)]


class ReferenceStream:
    """The eventful semantics, simulated densely. Call it once per frame, like the model."""

    def __init__(
        self, model, example, policy, always_update_prefix: bool = True, refresh_every: int | None = None
    ):
        self.view = analyse(model, example)
        self.gm = self.view.gm
        self.order = _order(self.gm, self.view.regions)
        self.member_of = {m: r.name for r in self.view.regions for m in r.members}
        self.states = {r.name: _State(r) for r in self.view.regions}
        policy = P.TopK(policy) if isinstance(policy, int) else policy
        self.policies = {r.name: policy for r in self.view.regions}
        self.always_update_prefix = always_update_prefix
        self.refresh_every = refresh_every
        self.batch = self.view.regions[0].batch if self.view.regions else 1
        self.fresh = [True] * self.batch
        self.since_refresh = 0
        self.selected: dict[str, list[list[int]] | None] = {}  # at the last frame, per stream
        self.history: list[dict[str, list[list[int]] | None]] = []  # ``selected`` of every frame
        self.steered: dict[int, SteeredReference] = {}  # per SteeredThreshold object
        self.generators: dict = {}  # RandomTokens' draws, per policy

    def _steered(self, policy, batch: int):
        if not isinstance(policy, P.SteeredThreshold):
            return None
        if id(policy) not in self.steered:
            self.steered[id(policy)] = SteeredReference(policy, batch)
        return self.steered[id(policy)]

    # -- control, mirroring EventfulModel -------------------------------------------------------
    def regions(self) -> list[str]:
        return [r.name for r in self.view.regions]

    def set_policy(self, policy, gates=None) -> list[str]:
        """Set a policy on every region, or on regions named by ``gates``: a region name, or a
        module path / dotted prefix of a linear inside the region. Returns the names matched."""
        policy = P.TopK(policy) if isinstance(policy, int) else policy
        names = None if gates is None else ([gates] if isinstance(gates, str) else list(gates))
        hits = []
        for region in self.view.regions:
            if names is None or any(
                region.name == g or any(p == g or p.startswith(g + ".") for p in region.linears)
                for g in names
            ):
                self.policies[region.name] = policy
                hits.append(region.name)
        return hits

    def reset(self, stream: int | None = None) -> None:
        if stream is None:
            self.fresh = [True] * self.batch
            self.since_refresh = 0
            self.steered = {}
        else:
            self.fresh[stream] = True

    # -- one frame --------------------------------------------------------------------------------
    def _gate(self, state: _State, current: list[torch.Tensor]) -> None:
        region = state.region
        if state.refs[0] is None or all(self.fresh):
            state.refs = [c.detach().clone(memory_format=torch.contiguous_format) for c in current]
            state.last = None
            self.selected[region.name] = None
            return
        norms = [
            _token_norms(c - p, e, w, region.batch)
            for c, p, e, w in zip(current, state.refs, region.entries, state.where)
        ]
        ref_norms = [
            _token_norms(p, e, w, region.batch) for p, e, w in zip(state.refs, region.entries, state.where)
        ]
        error = torch.stack(norms).square().sum(0).sqrt()
        ref_norm = torch.stack(ref_norms).square().sum(0).sqrt()
        forced = list(region.prefix) if self.always_update_prefix else []
        policy = self.policies[region.name]
        chosen = select(policy, error, ref_norm, forced, self._steered(policy, region.batch), self.generators)
        for b in range(region.batch):
            if self.fresh[b]:
                chosen[b] = list(range(region.tokens))
        for i, (c, p) in enumerate(zip(current, state.refs)):
            assert p.is_contiguous()  # so that the row table below is a view of p
            table, source = _rows(p, region.entries[i].row_ids), _rows(c, region.entries[i].row_ids)
            for b, tokens in enumerate(chosen):
                if tokens:
                    rows = state.stream_rows(i, b, tokens)
                    table[rows] = source[rows]
        state.last = chosen
        self.selected[region.name] = chosen

    def __call__(self, *args):
        if self.refresh_every is not None and self.since_refresh >= self.refresh_every:
            self.reset()
        for steered in self.steered.values():
            steered.start_frame()
        flat = pytree.tree_leaves(args)
        interp = torch.fx.Interpreter(self.gm)
        interp.args_iter = iter(flat)
        env = interp.env
        gated: set[str] = set()
        result = None
        with torch.no_grad():
            for node in self.order:
                name = self.member_of.get(node)
                if name is None:
                    value = interp.run_node(node)
                else:
                    state = self.states[name]
                    if name not in gated:
                        self._gate(state, [env[e.node] for e in state.region.entries])
                        gated.add(name)
                    saved = {e.node: env[e.node] for e in state.region.entries}
                    env.update({e.node: ref for e, ref in zip(state.region.entries, state.refs)})
                    try:
                        value = interp.run_node(node)
                    finally:
                        env.update(saved)
                env[node] = value
                if node.op == "output":
                    result = value
        self.fresh = [False] * self.batch
        self.since_refresh += 1
        self.history.append(dict(self.selected))
        return result


def leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def relative_error(got, want) -> float:
    """Worst over outputs of max |got - want| / max |want|."""
    got, want = leaves(got), leaves(want)
    assert len(got) == len(want), (len(got), len(want))
    worst = 0.0
    for g, w in zip(got, want):
        assert g.shape == w.shape, (g.shape, w.shape)
        scale = float(w.abs().max()) if w.numel() else 0.0
        worst = max(
            worst, float((g.double() - w.double()).abs().max()) / max(scale, 1e-30) if w.numel() else 0.0
        )
    return worst


# ------------------------------------------------------------------------------ invariants


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
    """Relative max error of a against b."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a.double() - b.double()).abs().max()) if b.numel() else 0.0
    return err / max(scale, 1e-30) if scale > 0 else err


class InvariantChecker:
    """Hooks on an EventfulModel's regions and exact-attention sites; ``check()`` after a frame.

    - gate references: a token outside the frame's index keeps its reference bit for bit; a
      token in it has its reference equal to the current entry value (or, for masked policies,
      unchanged); always-updated prefix tokens equal the current value; after a dense frame the
      references equal the entries.
    - exit buffers == ``region.dense(*references, *constants)``.
    - exact attention: output == dense attention on the buffered q, k, v; where state is live,
      k_ref == k, v_ref == v, and m, n, z are the softmax state of the dense logits.
    """

    def __init__(self, emodel, tol: float = 1e-5, always_update_prefix: bool = True):
        from evtrace.runtime.attention import ExactDeltaAttention

        self.emodel = emodel
        self.tol = tol
        self.always_update_prefix = always_update_prefix
        self.records: dict[str, dict] = {}
        self.attention: dict[str, dict] = {}
        self.checks = 0
        self.handles = []
        for name, region in emodel.regions().items():
            self.handles.append(region.register_forward_pre_hook(self._pre(name)))
            self.handles.append(region.register_forward_hook(self._post(name)))
        for name, module in emodel.attention_modules().items():
            if isinstance(module, ExactDeltaAttention):
                self.handles.append(module.register_forward_hook(self._attn(name), with_kwargs=True))

    def _pre(self, name):
        def hook(module, inputs):
            self.records[name] = dict(
                before=[r.clone() for r in module.gate.references()],
                restarted=tuple(getattr(module, "fresh_streams", ())),  # reset(stream=b) pending
            )

        return hook

    def _post(self, name):
        def hook(module, inputs, output):
            record = self.records[name]
            record["inputs"] = [x.detach().clone() for x in inputs]
            record["index"] = None if output[-1] is None else output[-1].clone()

        return hook

    def _attn(self, name):
        def hook(module, args, kwargs, output):
            tables = args[5] if len(args) > 5 else kwargs.get("tables", ())
            self.attention[name] = dict(
                module=module,
                q=args[0].clone(),
                k=args[1].clone(),
                v=args[2].clone(),
                tables=tuple(t.clone() for t in tables),
                out=output.clone(),
                live=not module._needs_init,
            )

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def check(self) -> None:
        for name, region in self.emodel.regions().items():
            record = self.records.pop(name, None)
            assert record is not None, f"region {name} did not run"
            self._check_region(name, region, record)
        for name, record in self.attention.items():
            self._check_attention(name, record)
        self.attention = {}
        self.checks += 1

    def _check_region(self, name, region, record) -> None:
        gate = region.gate
        entries = record["inputs"][: region.n_entries]
        constants = record["inputs"][region.n_entries :]
        refs = gate.references()
        index = record["index"]
        masked = isinstance(gate.policy, P.FixedCapacityThreshold) or (
            isinstance(gate.policy, (P.Threshold, P.SteeredThreshold, P.AdaptiveBudget)) and gate.batch > 1
        )
        forced = [int(t) for t in torch.nonzero(gate.forced).flatten()] if self.always_update_prefix else []
        count = gate.batch * gate.tokens
        for i, (ref, before, x) in enumerate(zip(refs, record["before"], entries)):
            row_map = gate.maps[i]
            ids = _row_ids_of(gate, i, count)
            entry = EntryView(None, ids, row_map.token_ndim)
            where = _token_row(entry, 0, count)
            now, old, cur = _rows(ref, ids), _rows(before, ids), _rows(x, ids)
            if index is None:
                assert torch.equal(now[where], cur[where]), (
                    f"{name}: reference {i} != input after a dense frame"
                )
                continue
            chosen = torch.zeros(count, dtype=torch.bool)
            flat = (index + torch.arange(gate.batch).unsqueeze(1) * gate.tokens).reshape(-1)
            chosen[flat] = True
            restart = torch.isin(torch.arange(count) // gate.tokens, torch.tensor(record["restarted"]))
            rows_new = where[restart]  # the streams restarted by reset(stream=b): every token taken
            assert torch.equal(now[rows_new], cur[rows_new]), f"{name}: reference {i} of a restarted stream"
            chosen &= ~restart
            rows_out = where[~chosen & ~restart]
            assert torch.equal(now[rows_out], old[rows_out]), (
                f"{name}: reference {i} moved outside the selection"
            )
            rows_in = where[chosen]
            updated = (now[rows_in] == cur[rows_in]).all(dim=1)
            if masked:
                kept = (now[rows_in] == old[rows_in]).all(dim=1)
                assert bool((updated | kept).all()), f"{name}: reference {i} neither updated nor kept"
            else:
                assert bool(updated.all()), f"{name}: reference {i} does not hold the selected rows"
            for b in range(gate.batch):
                for t in forced if b not in record["restarted"] else ():
                    row = where[b * gate.tokens + t]
                    assert torch.equal(now[row], cur[row]), (
                        f"{name}: prefix token {t} of stream {b} not updated"
                    )
        with torch.no_grad():
            want = region.dense(*[r.clone() for r in refs], *constants)
        for j, (buffer, w) in enumerate(zip(region.buffers_out(), want)):
            err = _close(buffer, w, self.tol)
            assert err <= self.tol, f"{name}: exit buffer {j} != region(reference): {err:.2e}"

    def _check_attention(self, name, rec) -> None:
        from evtrace.runtime.attention import dense_attention

        module, q, k, v, tables = rec["module"], rec["q"], rec["k"], rec["v"], rec["tables"]
        want = dense_attention(
            q.double(), k.double(), v.double(), module.scale, module.bias, tuple(t.double() for t in tables)
        )
        err = _close(rec["out"], want, self.tol)
        assert err <= self.tol, f"{name}: output != dense attention on the buffers: {err:.2e}"
        if not rec["live"] or module.k_ref is None:
            return
        assert torch.equal(module.k_ref, k) and torch.equal(module.v_ref, v), (
            f"{name}: k_ref/v_ref != buffers"
        )
        qd, kd, vd = q.double(), k.double(), v.double()
        logits = qd @ kd.transpose(-1, -2) * module.scale
        if module.bias is not None:
            logits = logits + module.bias.full(qd, tuple(t.double() for t in tables)).double()
        weights = torch.exp(logits - module.m.double()[..., None])
        z = weights.sum(-1)
        n = weights @ vd
        assert _close(module.z, z, self.tol) <= self.tol, f"{name}: z != dense softmax denominator"
        assert _close(module.n, n, self.tol) <= self.tol, f"{name}: n != dense softmax numerator"


def _row_ids_of(gate, i: int, count: int) -> torch.Tensor:
    """Row ids (1-based canonical token + 1, 0 = padding) of gate input i, from its position table."""
    row_map = gate.maps[i]
    ids = torch.zeros(row_map.rows, dtype=torch.long)
    if row_map.canonical:
        ids[:count] = torch.arange(1, count + 1)
    else:
        table = getattr(gate, f"positions{i}")
        ids[table] = torch.arange(1, count + 1)
    return ids
