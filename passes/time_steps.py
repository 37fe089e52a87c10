"""Time steps folded into the batch: find the sub-model that runs once per time step.

Factorised video models (ViViT's factorised encoder, a per-frame image encoder followed by a
temporal model) fold the time axis into the batch: a tensor of ``B * T'`` rows, one per
(view, time step), goes through a spatial sub-model in which no op mixes rows, and the rows are
unfolded afterwards into a (B, T', ...) sequence for the temporal model. Such a sub-model can run
its time steps in order with its state carried from step to step (the paper's ViViT setting).

A **fold** is the first tensor with ``B * T'`` rows (B: the input's batch, T' >= 2): a layout op
whose token ids show rows of one view holding consecutive blocks of its token sequence (time
outermost, as a tubelet embedding numbers them), or a reshape that merges the batch and time
dims of a video before the patch embedding. From the folds the sub-model grows node by node:
a node joins when every data input it reads is in the sub-model and its rows stay apart (its
token ids in row i belong to row i; a matmul, softmax or reduction does not act along the rows;
elementwise ops broadcast the rows). The sub-model's nodes read by anything outside are its
outputs. Windows folded into the batch (Swin) are not time steps: their rows are not
consecutive blocks of the sequence. Models that fold time more than once (TimeSformer's divided
attention unfolds it in every block) have no single per-step sub-model; the search says why.

Reads: ``meta[OP]``, ``meta[TENSOR]``, ``meta[TOKENS]``, ``meta[ROLE]``, SPACES.
Writes: the STEPS record (:class:`~evtrace.graph.plan.StepSearch`).
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from evtrace.graph.meta import (
    MODULE_PATH,
    OP,
    ROLE,
    SPACES,
    STEPS,
    TENSOR,
    TOKENS,
    OpKind,
    Role,
    TokenSpace,
    module_path,
    op_kind,
    role,
    tensor_info,
    token_layout,
)
from evtrace.graph.plan import StepSearch, StepStructure

from .canonicalize import op_name

_ROW_KEEPING_LAYOUTS = ("contiguous", "clone", "to", "float", "half", "bfloat16", "type_as", "detach")
_RESHAPES = ("reshape", "view", "flatten", "unflatten", "_unsafe_view")
_REDUCTIONS_WITH_DIM = ("softmax", "log_softmax", "mean", "sum", "amax", "amin", "max", "min", "norm")


def _shape(node) -> tuple[int, ...] | None:
    info = tensor_info(node) if isinstance(node, torch.fx.Node) else None
    return None if info is None or isinstance(info, tuple) else tuple(info.shape)


def _shapes(node) -> list[tuple[int, ...]] | None:
    info = tensor_info(node)
    if info is None:
        return None
    if isinstance(info, tuple):
        return [tuple(i.shape) for i in info if i is not None]
    return [tuple(info.shape)]


def _batch(gm: torch.fx.GraphModule) -> int | None:
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = _shape(node)
            if shape:
                return shape[0]
    return None


def _video_input(gm: torch.fx.GraphModule) -> bool:
    """Whether an input has a time axis: 5 dims (B, C, T, H, W) or (B, T, C, H, W)."""
    return any(len(_shape(n) or ()) == 5 for n in gm.graph.nodes if n.op == "placeholder")


def _data_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes whose values depend on the input's data (a shape read cuts the dependence)."""
    data: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if _shapes(node):
                data.add(node)
            continue
        if op_kind(node) in (OpKind.SHAPE, OpKind.GUARD, OpKind.PARAM, OpKind.OUTPUT):
            continue
        if any(a in data for a in node.all_input_nodes):
            data.add(node)
    return data


def _dim_arg(node: torch.fx.Node, position: int, name: str = "dim"):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[position] if len(node.args) > position else None


def _norm_dims(dims, ndim: int) -> set[int] | None:
    if dims is None:
        return None  # over everything
    if isinstance(dims, int):
        dims = [dims]
    try:
        return {int(d) % ndim for d in dims}
    except (TypeError, ValueError):
        return None


class _Grower:
    """Grows the per-step sub-model from the folds; see the module docstring."""

    def __init__(self, gm, batch: int, rows: int, spaces: list[TokenSpace], data: set):
        self.gm = gm
        self.batch = batch
        self.rows = rows
        self.data = data
        self.row_dim: dict[torch.fx.Node, int | tuple[int, ...]] = {}
        self.inside: set[torch.fx.Node] = set()
        self.member_names: set[str] = set()
        self.owner = None
        self.spaces = spaces
        self.stops: list[tuple[torch.fx.Node, str]] = []

    # -- token ownership: which row each token id belongs to -------------------------------
    def own(self, folds: list[torch.fx.Node]) -> None:
        total = max((s.offset + s.batch * s.tokens for s in self.spaces), default=0)
        owner = torch.full((total + 1,), -1, dtype=torch.long)
        for fold in folds:
            layout = token_layout(fold)
            if layout is None or layout.ids is None:
                continue
            ids = layout.ids.expand(_shape(fold)).reshape(self.rows, -1).long()
            rows = torch.arange(self.rows).unsqueeze(1).expand_as(ids)
            owner[ids.flatten()] = rows.flatten()
        self.owner = owner

    def own_space(self, space: TokenSpace) -> None:
        if space.batch != self.rows:
            return
        start = space.offset + 1
        self.owner[start : start + space.batch * space.tokens] = torch.arange(space.batch).repeat_interleave(
            space.tokens
        )

    def ids_row_dim(self, node: torch.fx.Node) -> int | None:
        """The dim whose index is the row that owns every token id of ``node``, or None."""
        layout = token_layout(node)
        shape = _shape(node)
        if layout is None or layout.ids is None or shape is None:
            return None
        ids = layout.ids.long()
        if layout.space.batch == self.rows and (
            layout.space.source in self.member_names or node.name == layout.space.source
        ):
            self.own_space(layout.space)  # a sequence opened inside the sub-model: its streams are the rows
        mapped = self.owner[ids.clamp(0, self.owner.numel() - 1)]
        ignore = ids == 0
        for dim, size in enumerate(shape):
            if size != self.rows or ids.shape[dim] != size:
                continue
            index = torch.arange(size).view([size if d == dim else 1 for d in range(ids.dim())])
            if bool(((mapped == index) | ignore).all()) and not bool(ignore.all()):
                return dim
        return None

    # -- one node --------------------------------------------------------------------------
    def rows_of(self, arg) -> int | None:
        if not isinstance(arg, torch.fx.Node) or arg not in self.inside:
            return None
        dim = self.row_dim.get(arg)
        return dim if isinstance(dim, int) else None

    def legal(self, node: torch.fx.Node) -> tuple[int | tuple | None, str]:
        """(the row dim of ``node``'s value, or why its rows would mix)."""
        kind = op_kind(node)
        shape = _shape(node)
        name = op_name(node)
        if kind == OpKind.UNKNOWN:
            return None, f"an op no rule understands ({name})"
        if isinstance(tensor_info(node), tuple):  # unbind / split / chunk of a row tensor
            source = node.args[0] if node.args else None
            dim = self.rows_of(source)
            split = _dim_arg(node, 1 if name == "unbind" else 2)
            split = 0 if split is None else split
            ndim = len(_shape(source) or ())
            if dim is None or not ndim or int(split) % ndim == dim:
                return None, f"{name} along the rows"
            out_dim = dim - 1 if name == "unbind" and int(split) % ndim < dim else dim
            return (out_dim,), ""
        if (
            node.op == "call_function"
            and node.target is operator.getitem
            and isinstance(self.row_dim.get(node.args[0]), tuple)
        ):
            return self.row_dim[node.args[0]][0], ""
        if shape is None:
            return None, "not a tensor"
        by_ids = self.ids_row_dim(node)
        if kind == OpKind.LAYOUT and name in _RESHAPES:  # sizes may spell the steps: rows stay leading
            source_dim = self.rows_of(node.args[0]) if node.args else None
            if source_dim != 0 or shape[0] != self.rows:
                return None, f"{name} that moves the rows"
            return 0, ""
        data_args = [a for a in node.all_input_nodes if a in self.data]
        dims = [self.rows_of(a) for a in data_args]
        if any(d is None for d in dims):
            return None, "reads a tensor from outside the per-step sub-model"
        if kind in (OpKind.CONV, OpKind.POOL):
            return (
                (0, "")
                if dims and dims[0] == 0 and shape[0] == self.rows
                else (None, f"{name} over the rows")
            )
        if kind == OpKind.MATMUL:
            return self._matmul(node, shape)
        if kind == OpKind.SDPA:
            q = dims[0] if dims else None
            return (q, "") if q is not None and q < len(shape) - 2 else (None, "attention along the rows")
        if kind in (OpKind.SOFTMAX, OpKind.REDUCE) or name in _REDUCTIONS_WITH_DIM:
            source_shape = _shape(data_args[0]) if data_args else None
            if source_shape is None:
                return None, f"{name} of no tensor"
            reduced = _norm_dims(_dim_arg(node, 1), len(source_shape))
            if reduced is None or dims[0] in reduced:
                return None, f"{name} over the rows"
            if by_ids is not None:
                return by_ids, ""
            keep = kind == OpKind.SOFTMAX or bool(_dim_arg(node, 2, "keepdim"))
            return (dims[0] if keep else dims[0] - sum(1 for d in reduced if d < dims[0])), ""
        if by_ids is not None:
            return by_ids, ""
        if kind in (OpKind.UNARY, OpKind.BINARY, OpKind.LAYER_NORM, OpKind.LINEAR):
            return self._elementwise(node, shape, data_args, dims)
        if kind == OpKind.LAYOUT:
            return self._layout(node, shape, data_args, dims, name)
        if kind == OpKind.EINSUM:
            return None, "einsum without token ids"
        return None, f"{name} on rows whose tokens it does not keep apart"

    def _elementwise(self, node, shape, data_args, dims):
        if not data_args:
            return None, "no data input"
        ndim = len(shape)
        aligned = set()
        for arg, dim in zip(data_args, dims, strict=True):
            arg_shape = _shape(arg) or ()
            aligned.add(dim + ndim - len(arg_shape))
        if len(aligned) != 1:
            return None, "operands with their rows in different dims"
        dim = aligned.pop()
        if shape[dim] != self.rows:
            return None, "an elementwise op that broadcasts the rows away"
        return dim, ""

    def _matmul(self, node, shape):
        operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        ndim = len(shape)
        dims = set()
        for arg in operands:
            arg_shape = _shape(arg) or ()
            if arg not in self.data:
                if len(arg_shape) > 2 and arg_shape[0] != 1:
                    return None, "a matmul with a batched constant"
                continue
            dim = self.rows_of(arg)
            if dim is None or dim >= len(arg_shape) - 2:
                return None, "a matmul that contracts or keeps the rows as a matrix dim"
            dims.add(dim + ndim - len(arg_shape))
        if len(dims) != 1:
            return None, "a matmul with its operands' rows in different dims"
        return dims.pop(), ""

    def _layout(self, node, shape, data_args, dims, name):
        if len(data_args) != 1:
            return None, f"{name} of several row tensors without token ids"
        source = _shape(data_args[0])
        dim = dims[0]
        if name in _ROW_KEEPING_LAYOUTS and shape == source:
            return dim, ""
        if (
            dim == 0
            and shape
            and shape[0] == self.rows
            and name in ("reshape", "view", "flatten", "unflatten")
        ):
            return 0, ""
        if name in ("permute", "transpose", "swapaxes") and source is not None:
            order = list(range(len(source)))
            if name == "permute":
                perm = node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) > 1 else None
                perm = node.kwargs.get("dims", perm)
                order = [int(p) % len(source) for p in perm]
            else:
                a, b = (int(x) % len(source) for x in node.args[1:3])
                order[a], order[b] = order[b], order[a]
            return order.index(dim), ""
        return None, f"{name} that may move the rows (no token ids to check it)"

    # -- the closure -------------------------------------------------------------------------
    def grow(self, folds: list[torch.fx.Node]) -> None:
        for fold in folds:
            self.inside.add(fold)
            self.row_dim[fold] = 0
        fold_set = set(folds)
        for node in self.gm.graph.nodes:
            if node in fold_set or node.op in ("placeholder", "output", "get_attr"):
                continue
            args = node.all_input_nodes
            if not any(a in self.inside for a in args):
                continue
            data_args = [a for a in args if a in self.data]
            if node not in self.data:  # a shape read or a constant shaped by a row tensor
                self.inside.add(node)
                continue
            if any(a not in self.inside for a in data_args):
                self.stops.append((node, "it also reads a tensor computed outside the per-step sub-model"))
                continue
            dim, reason = self.legal(node)
            if dim is None:
                self.stops.append((node, reason))
                continue
            self.inside.add(node)
            self.member_names.add(node.name)
            self.row_dim[node] = dim
        for node in reversed(list(self.gm.graph.nodes)):  # shape reads for the ops after the sub-model
            if node in self.inside and node not in self.data and node not in fold_set:
                if not any(u in self.inside for u in node.users):
                    self.inside.discard(node)


def _folds(gm, batch: int, data: set) -> list[tuple[torch.fx.Node, int]]:
    """(fold node, steps) candidates: the first tensors with batch * steps rows."""
    found = []
    for node in gm.graph.nodes:
        if node not in data or op_kind(node) != OpKind.LAYOUT:
            continue
        shape = _shape(node)
        if not shape or shape[0] <= batch or shape[0] % batch:
            continue
        data_args = [a for a in node.all_input_nodes if a in data]
        if len(data_args) != 1:
            continue
        source = _shape(data_args[0])
        if not source or source[0] != batch:
            continue
        found.append((node, shape[0] // batch))
    return found


def _fold_order(node: torch.fx.Node, batch: int, steps: int) -> tuple[str | None, str]:
    """("view-major" | "step-major", "") when ``node`` folds time steps, else (None, why)."""
    layout = token_layout(node)
    shape = _shape(node)
    if layout is not None and layout.ids is not None:
        space = layout.space
        if space.batch != batch:
            return None, f"its rows come from a token sequence of {space.batch} streams"
        ids = layout.ids.expand(shape).reshape(shape[0], -1).long()
        if bool((ids == 0).any()):
            return None, "padded rows"
        local = ids - space.offset - 1
        stream = local // space.tokens
        position = local % space.tokens
        if not bool((stream == stream[:, :1]).all()):
            return None, "rows that mix views"
        per_step = space.tokens // steps
        if per_step * steps != space.tokens:
            return None, "rows that are not equal blocks of the token sequence"
        block = position // per_step
        if not bool((block == block[:, :1]).all()):
            return (
                None,
                "rows that are not consecutive blocks of its sequence (windows, not time steps)",
            )
        views, step = stream[:, 0], block[:, 0]
        rows = torch.arange(shape[0])
        if bool((views == rows // steps).all()) and bool((step == rows % steps).all()):
            return "view-major", ""
        if bool((views == rows % batch).all()) and bool((step == rows // batch).all()):
            return "step-major", ""
        return None, "rows in an order that is neither view- nor step-major"
    if role(node) is not None and role(node).role != Role.NON_TOKEN:
        return None, "a token tensor without token ids"
    source = _shape(next(a for a in node.all_input_nodes if _shape(a)))
    if op_name(node) not in ("reshape", "view", "flatten") or source is None or len(source) < 5:
        return None, "not a reshape of a video"
    if source[:2] == (batch, steps) and tuple(shape[1:]) == tuple(source[2:]):
        return "view-major", ""
    if source[:2] == (steps, batch) and batch != steps and tuple(shape[1:]) == tuple(source[2:]):
        return "step-major", ""
    return None, "a reshape that does not merge the batch and time dims"


def _token_dims(fold: torch.fx.Node) -> tuple[int, ...] | None:
    layout = token_layout(fold)
    if layout is None or not layout.row_major or layout.token_dims[:1] != (0,):
        return None
    return tuple(layout.token_dims)


def _summary(nodes) -> str:
    paths = [module_path(n) for n in nodes if module_path(n)]
    if not paths:
        return "(root ops)"
    heads = sorted({p.split(".")[0] for p in paths})
    return ", ".join(heads)


def find_time_steps(gm: torch.fx.GraphModule, spaces: list[TokenSpace]) -> StepSearch:
    """The per-step sub-model of ``gm``, or why there is none (module docstring)."""
    batch = _batch(gm)
    if batch is None:
        return StepSearch(None, "the model has no tensor input")
    if not _video_input(gm):
        return StepSearch(None, "")  # an image model: time is the calls
    data = _data_nodes(gm)
    candidates = _folds(gm, batch, data)
    reasons = []
    folds: list[torch.fx.Node] = []
    steps = order = None
    for node, k in candidates:
        found, why = _fold_order(node, batch, k)
        if found is None:
            reasons.append(f"{node.name} ({module_path(node) or 'root'}: {batch} x {k} rows): {why}")
            continue
        if steps is None:
            steps, order = k, found
        if (k, found) == (steps, order):
            folds.append(node)
    if not folds:
        spaces_text = ", ".join(f"{s.name}: {s.batch} x {s.tokens}" for s in spaces) or "none"
        detail = f"; candidates: {'; '.join(reasons[:3])}" if reasons else ""
        return StepSearch(
            None,
            f"no tensor folds time steps into the batch of {batch} (token sequences {spaces_text}): "
            "the time steps, if any, are tokens of one sequence and its attention mixes them "
            f"(joint space-time attention){detail}",
        )
    grower = _Grower(gm, batch, batch * steps, spaces, data)
    grower.own(folds)
    grower.grow(folds)
    fold_set = set(folds)
    members = [n for n in gm.graph.nodes if n in grower.inside and n not in fold_set]
    member_set = set(members)
    refolded = [f for f in folds[1:] if _depends(f, members)]
    if refolded:
        again = refolded[0]
        return StepSearch(
            None,
            f"time steps are unfolded and folded into the batch again at {again.name} "
            f"({module_path(again) or 'root'}): the blocks mix time steps between per-step parts "
            "(divided space-time attention), so no single sub-model runs per time step",
        )
    rewritable = [n for n in members if op_kind(n) in (OpKind.LINEAR, OpKind.MATMUL, OpKind.SDPA)]
    if not rewritable:
        meet = [f"{n.name} ({module_path(n) or 'root'}: {why})" for n, why in grower.stops]
        text = f"the time steps folded into the batch at {folds[0].name} meet again"
        text += f" at {meet[0]}" if meet else ""
        text += " before any linear or attention"
        again = [n for n, k in candidates if k == steps and n not in fold_set and _depends(n, members)]
        if again:
            more = f", +{len(again) - 1} more" if len(again) > 1 else ""
            text += (
                f", and are folded again later ({again[0].name} at {module_path(again[0]) or 'root'}{more}): "
                "divided space-time attention mixes time steps in every block, so no single sub-model "
                "runs per time step"
            )
        return StepSearch(None, text)
    outputs, row_dims = [], []
    for node in members:
        if any(u not in member_set for u in node.users):
            if node not in data:
                return StepSearch(
                    None,
                    f"the per-step sub-model's {op_name(node)} {node.name} (a shape or constant of one "
                    f"time step) is read after the sub-model",
                )
            dim = grower.row_dim[node]
            if not isinstance(dim, int):
                return StepSearch(None, f"the per-step sub-model's tuple {node.name} is read after it")
            outputs.append(node)
            row_dims.append(dim)
    structure = StepStructure(
        steps=steps,
        views=batch,
        order=order,
        inputs=tuple(n.name for n in folds),
        outputs=tuple(n.name for n in outputs),
        row_dims=tuple(row_dims),
        nodes=tuple(n.name for n in members),
        modules=_summary(members),
        token_dims=tuple(_token_dims(n) for n in folds),
    )
    return StepSearch(structure, _describe(structure, grower.stops, member_set))


def _depends(node: torch.fx.Node, sources: list[torch.fx.Node], limit: int = 100000) -> bool:
    """Whether ``node`` is computed from any of ``sources`` (a walk back along its inputs)."""
    targets = set(sources)
    frontier, seen = [node], set()
    while frontier and len(seen) < limit:
        current = frontier.pop()
        if current in targets:
            return True
        if current in seen:
            continue
        seen.add(current)
        frontier.extend(current.all_input_nodes)
    return False


def _describe(structure: StepStructure, stops, members) -> str:
    ends = [f"{n.name} ({why})" for n, why in stops if any(a in members for a in n.all_input_nodes)]
    text = (
        f"{structure.modules} runs once per time step: {structure.steps} steps x {structure.views} "
        f"view(s) folded into the batch ({structure.order}) at {', '.join(structure.inputs)}"
    )
    if ends:
        text += f"; time steps meet again at {ends[0]}"
    return text


class TimeStepsPass:
    """Pass: the per-step sub-model, if the graph folds time steps into the batch (STEPS)."""

    name = "time_steps"
    reads = frozenset({OP, TENSOR, TOKENS, ROLE, MODULE_PATH, SPACES})
    writes = frozenset({STEPS})

    def run(self, gm: torch.fx.GraphModule, ctx) -> None:
        ctx.put(STEPS, find_time_steps(gm, ctx.spaces))
