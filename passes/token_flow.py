"""Token-axis inference by running the graph on token ids.

Instead of one shape rule per layout op, the pass runs every layout op for real on a tensor
that holds, in each element, the id of the token it belongs to (0 for "no token": padding,
constants). Whatever reshapes, permutes, pads, window partitions or concatenations the model
does, the ids end up where the data would. Compute ops get a rule per op kind (a linear keeps
its input's row ids, a softmax over a channel dim is token-wise, a matmul contracting over
tokens mixes them).

Token sequences start at *sources*, each opening a new token space numbered in sequence order:

* a stem: any convolution or pooling of the input or of features that hold no token yet (a
  patch embedding, an overlapping or padded conv stem, a hybrid's conv stem), or a linear over a
  (B, N, D) input (pre-patchified pixels); the stem itself stays dense;
* a convolution or pooling of tokens onto a new grid (downsampling, the spatial reduction of K
  and V); on the same grid (stride 1) each output position keeps its token instead;
* a concatenation that adds tokens not derived from the input (class and register tokens);
* a merge of disjoint groups of tokens into one (Swin's patch merging, by concatenation or by
  reshape-permute-flatten ahead of a norm or linear over the merged channels).

Eval-mode batch norm (running statistics) is a per-channel affine map, hence token-wise.

Reads: ``meta[OP]``, ``meta[TENSOR]``. Writes: ``meta[TOKENS]`` (TokenLayout or None) and
``meta[ROLE]`` (RoleRecord) on every node; returns the TokenSpace list (``SPACES``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from evtrace.graph.errors import NoTokenSequenceError, where
from evtrace.graph.meta import (
    OP,
    ROLE,
    SPACES,
    TENSOR,
    TOKENS,
    OpKind,
    Role,
    RoleRecord,
    TokenLayout,
    TokenSpace,
    op_kind,
    role,
    set_role,
    set_tokens,
    tensor_info,
    token_layout,
)

from .canonicalize import op_name

ID_DTYPE = torch.int32
# Layout ops that take an index tensor: with a constant index they permute or pick tokens (MAE's
# shuffle with fixed noise); an index computed from the frame is data-dependent selection.
INDEXING = ("gather", "index_select", "take_along_dim", "index", "_unsafe_index")


@dataclass
class Ids:
    """Token ids of one tensor, same shape as the tensor."""

    ids: torch.Tensor


@dataclass
class Pairwise:
    """A tensor indexed by (query token, key token): attention logits and probabilities.

    Only the query ids are kept (a full N x N id tensor would cost as much as the logits).
    """

    query_ids: torch.Tensor
    shape: tuple[int, ...]


@dataclass
class Derived:
    """A tensor computed from tokens whose rows are no longer tokens (pooled, unknown op)."""

    shape: tuple[int, ...]
    reason: str

    def zeros(self) -> torch.Tensor:
        return torch.zeros((), dtype=ID_DTYPE).expand(self.shape)


def _is_token(value) -> bool:
    return isinstance(value, (Ids, Pairwise, Derived))


def _flatten(obj) -> list:
    if isinstance(obj, (list, tuple)):
        return [y for x in obj for y in _flatten(x)]
    if isinstance(obj, dict):
        return [y for x in obj.values() for y in _flatten(x)]
    return [obj]


def _all_equal(ids: torch.Tensor, expected: torch.Tensor) -> bool:
    """``(ids == expected).all()`` for broadcastable int tensors; a min/max reduction of the
    difference is several times faster than reducing a boolean tensor."""
    low, high = torch.aminmax(ids - expected)
    return int(low) == 0 and int(high) == 0


def _constant_along(ids: torch.Tensor, dim: int) -> bool:
    if ids.shape[dim] <= 1:
        return True
    low, high = torch.aminmax(ids, dim=dim)
    return torch.equal(low, high)


class TokenFlow(torch.fx.Interpreter):
    """Interpreter over token ids; see the module docstring."""

    def __init__(self, gm: torch.fx.GraphModule, token_inputs: tuple = ()):
        super().__init__(gm, garbage_collect_values=True)
        self.spaces: list[TokenSpace] = []
        self._next_offset = 0
        self._token_inputs = dict(token_inputs)  # placeholder index -> token dims
        self._placeholders = 0
        self._from_input: set[torch.fx.Node] = set()  # nodes computed from the inputs' values
        for node in gm.graph.nodes:
            if node.op == "placeholder" or any(a in self._from_input for a in node.all_input_nodes):
                self._from_input.add(node)

    # -- spaces ------------------------------------------------------------------------------
    def _new_space(
        self,
        node: torch.fx.Node,
        shape: tuple[int, ...],
        token_dims: list[int],
        prefix_mask: torch.Tensor | None,
    ) -> tuple[TokenSpace, torch.Tensor]:
        """Number the positions of ``token_dims`` (dim 0 = streams) in row-major order."""
        batch = shape[0]
        sizes = [shape[d] for d in token_dims]
        total = math.prod(sizes)
        tokens = total // batch
        offset = self._next_offset
        self._next_offset += total
        prefix: tuple[int, ...] = ()
        if prefix_mask is not None:
            prefix = tuple(int(t) for t in torch.nonzero(prefix_mask.reshape(batch, tokens)[0]).flatten())
        space = TokenSpace(
            name=f"tokens{len(self.spaces)}",
            batch=batch,
            tokens=tokens,
            offset=offset,
            prefix=prefix,
            source=node.name,
        )
        self.spaces.append(space)
        numbered = torch.arange(offset + 1, offset + 1 + total, dtype=ID_DTYPE).reshape(sizes)
        view_shape = [shape[d] if d in token_dims else 1 for d in range(len(shape))]
        return space, numbered.reshape(view_shape).expand(shape).contiguous()

    # -- interpreter hooks -------------------------------------------------------------------
    def placeholder(self, target, args, kwargs):
        info = tensor_info(self.current_node)
        if info is not None and not isinstance(info, tuple):
            return torch.zeros(info.shape, dtype=info.dtype)
        return super().placeholder(target, args, kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current_node = n
        kind = op_kind(n)
        if kind == OpKind.INPUT:
            index = self._placeholders
            self._placeholders += 1
            if index in self._token_inputs and self._shape(n):
                _, ids = self._new_space(n, self._shape(n), list(self._token_inputs[index]), None)
                return self._record(n, Ids(ids), Role.SOURCE, "token input")
        if kind in (OpKind.INPUT, OpKind.PARAM, OpKind.OUTPUT):
            set_role(n, RoleRecord(Role.NON_TOKEN))
            set_tokens(n, None)
            return super().run_node(n)
        if kind == OpKind.GUARD:
            set_role(n, RoleRecord(Role.NON_TOKEN, "input guard"))
            set_tokens(n, None)
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        tokens = [v for v in _flatten((args, kwargs)) if _is_token(v)]
        if not any(isinstance(v, (Ids, Pairwise)) for v in tokens):
            source = self._stem_source(n, kind, args)
            if source is not None:
                return source
        if not tokens:
            set_role(n, RoleRecord(Role.NON_TOKEN))
            set_tokens(n, None)
            return getattr(self, n.op)(n.target, args, kwargs)
        if any(isinstance(v, Derived) for v in tokens) and not any(
            isinstance(v, (Ids, Pairwise)) for v in tokens
        ):
            reason = next(v.reason for v in tokens if isinstance(v, Derived))
            set_role(n, RoleRecord(Role.NON_TOKEN, f"after {reason}"))
            set_tokens(n, None)
            if kind == OpKind.SHAPE:
                try:
                    return getattr(self, n.op)(n.target, *self._unwrap(args, kwargs))
                except (AttributeError, TypeError, IndexError):  # a field of a derived named tuple (topk)
                    return self._derived(n, reason)
            return self._derived(n, reason)
        handler = _HANDLERS.get(kind, TokenFlow._unknown)
        return handler(self, n, args, kwargs)

    # -- helpers -----------------------------------------------------------------------------
    def _shape(self, n: torch.fx.Node) -> tuple[int, ...] | None:
        info = tensor_info(n)
        return info.shape if info is not None and not isinstance(info, tuple) else None

    def _derived(self, n: torch.fx.Node, reason: str):
        info = tensor_info(n)
        if isinstance(info, tuple):
            return tuple(Derived(i.shape, reason) if i is not None else None for i in info)
        return Derived(self._shape(n) or (), reason)

    def _record(self, n: torch.fx.Node, value, role: Role, reason: str = ""):
        set_role(n, RoleRecord(role, reason))
        set_tokens(n, self.describe(value.ids) if isinstance(value, Ids) else None)
        return value

    def _unwrap(self, args, kwargs):
        def conv(v):
            if isinstance(v, Ids):
                return v.ids
            if isinstance(v, Derived):
                return v.zeros()
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return torch.zeros((), dtype=ID_DTYPE).expand(v.shape)
            return v

        def walk(obj):
            if isinstance(obj, (list, tuple)):
                return type(obj)(walk(x) for x in obj)
            if isinstance(obj, dict):
                return {k: walk(x) for k, x in obj.items()}
            return conv(obj)

        return walk(args), walk(kwargs)

    def _ids_of(self, value, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if isinstance(value, Ids):
            ids = value.ids
        elif isinstance(value, torch.Tensor):
            ids = torch.zeros((), dtype=ID_DTYPE).expand(value.shape)
        else:
            ids = torch.zeros((), dtype=ID_DTYPE)
        if shape is not None:
            ids = ids.reshape((1,) * (len(shape) - ids.dim()) + tuple(ids.shape)).expand(shape)
        return ids

    def _arg(self, n: torch.fx.Node, args, kwargs, index: int, name: str, default=None):
        if len(args) > index:
            return args[index]
        return kwargs.get(name, default)

    def _module(self, n: torch.fx.Node) -> nn.Module | None:
        return self.module.get_submodule(str(n.target)) if n.op == "call_module" else None

    # -- sources -----------------------------------------------------------------------------
    def _conv_geometry(self, n: torch.fx.Node):
        module = self._module(n)
        if module is not None:
            return (
                tuple(module.kernel_size),
                tuple(module.stride),
                tuple(module.padding) if not isinstance(module.padding, str) else (module.padding,),
            )
        weight = n.args[1]
        kernel = tensor_info(weight).shape[2:] if isinstance(weight, torch.fx.Node) else ()
        dims = len(kernel)
        stride = n.args[3] if len(n.args) > 3 else n.kwargs.get("stride", 1)
        padding = n.args[4] if len(n.args) > 4 else n.kwargs.get("padding", 0)
        stride = tuple(stride) if isinstance(stride, (list, tuple)) else (stride,) * dims
        padding = tuple(padding) if isinstance(padding, (list, tuple)) else (padding,) * dims
        return tuple(kernel), stride, padding

    def _is_patch_embedding(self, n: torch.fx.Node) -> bool:
        kernel, stride, padding = self._conv_geometry(n)
        return bool(kernel) and tuple(kernel) == tuple(stride) and all(p == 0 for p in padding)

    def _patch_source(self, n: torch.fx.Node) -> Ids:
        shape = self._shape(n)
        token_dims = [0] + list(range(2, len(shape)))
        _, ids = self._new_space(n, shape, token_dims, None)
        return Ids(ids)

    def _positions(self, n: torch.fx.Node) -> int:
        """Spatial positions per stream of a channels-first (B, C, *spatial) output."""
        shape = self._shape(n)
        return math.prod(shape[2:]) if shape is not None and len(shape) >= 3 else 0

    def _stem_source(self, n: torch.fx.Node, kind: OpKind, args) -> Ids | None:
        """A sequence that starts where no token exists yet, from the input's values.

        Any convolution (or pooling) of the input or of features without tokens (a hybrid's
        conv stem) outputs positions that later token-wise ops treat one by one; the stem itself
        stays dense, overlapping or padded alike. A linear over a (B, N, D) input (pre-patchified
        pixels) makes N tokens."""
        if n not in self._from_input:
            return None
        if kind in (OpKind.CONV, OpKind.POOL) and self._positions(n) >= 2:
            if kind == OpKind.CONV and self._is_patch_embedding(n):
                reason = "patch embedding"
            else:
                what = "convolution" if kind == OpKind.CONV else op_name(n)
                reason = f"{what} stem (runs dense): its output positions"
            return self._record(n, self._patch_source(n), Role.SOURCE, reason)
        shape = self._shape(n)
        x = args[0] if args else None
        if kind == OpKind.LINEAR and shape is not None and len(shape) >= 3 and not _is_token(x):
            token_dims = [0] + [d for d in range(1, len(shape) - 1) if shape[d] > 1]
            if len(token_dims) > 1:
                _, ids = self._new_space(n, shape, token_dims, None)
                return self._record(
                    n, Ids(ids), Role.SOURCE, "linear patch embedding of pre-patchified input"
                )
        return None

    # -- handlers ----------------------------------------------------------------------------
    def _unknown(self, n, args, kwargs):
        module = self._module(n)
        if op_name(n) in self._BATCH_NORMS or isinstance(module, nn.modules.batchnorm._BatchNorm):
            return self._batch_norm(n, args, kwargs)
        reason = f"no token rule for op '{op_name(n)}'"
        set_role(n, RoleRecord(Role.UNKNOWN, reason))
        set_tokens(n, None)
        return self._derived(n, f"unknown op '{op_name(n)}' at {n.name}")

    def _mixing(self, n, reason: str, value=None):
        set_role(n, RoleRecord(Role.MIXING, reason))
        set_tokens(n, self.describe(value.ids) if isinstance(value, Ids) else None)
        return value if value is not None else self._derived(n, f"{reason} at {n.name}")

    def _shape_op(self, n, args, kwargs):
        set_role(n, RoleRecord(Role.NON_TOKEN, "shape"))
        set_tokens(n, None)
        a, k = self._unwrap(args, kwargs)
        return getattr(self, n.op)(n.target, a, k)

    def _layout(self, n, args, kwargs):
        if any(isinstance(v, Pairwise) for v in _flatten((args, kwargs))):
            pw = next(v for v in _flatten((args, kwargs)) if isinstance(v, Pairwise))
            set_role(n, RoleRecord(Role.MIXING, "inside attention"))
            set_tokens(n, None)
            shape = self._shape(n)
            return (
                Pairwise(pw.query_ids, shape)
                if shape is not None
                else self._derived(n, "attention internals")
            )
        name = op_name(n)
        if name in ("cat", "concat", "concatenate"):
            return self._cat(n, args, kwargs)
        if name in INDEXING and any(isinstance(v, (Ids, Derived)) for v in _flatten((args[1:], kwargs))):
            reason = (
                f"'{name}' picks tokens by an index computed from the frame (dynamic token selection): "
                "everything behind it stays dense"
            )
            set_role(n, RoleRecord(Role.UNKNOWN, reason))
            set_tokens(n, None)
            return self._derived(n, f"dynamic token selection at {n.name}")
        a, k = self._unwrap(args, kwargs)
        try:
            out = getattr(self, n.op)(n.target, a, k)
        except RuntimeError:
            a = tuple(x.contiguous() if isinstance(x, torch.Tensor) else x for x in a)
            out = getattr(self, n.op)(n.target, a, k)
        if isinstance(out, (list, tuple)):
            set_role(n, RoleRecord(Role.LAYOUT))
            set_tokens(n, None)
            return type(out)(Ids(t) if isinstance(t, torch.Tensor) else t for t in out)
        if not isinstance(out, torch.Tensor):
            return self._unknown(n, args, kwargs)
        if out.numel() == 0:  # an empty slice (x[:, :0]) holds no token: a constant, not a readout
            set_role(n, RoleRecord(Role.NON_TOKEN, "empty"))
            set_tokens(n, None)
            return torch.zeros(out.shape, dtype=out.dtype)
        value = Ids(out)
        layout = self.describe(out)
        set_tokens(n, layout)
        if layout is None:
            set_role(n, RoleRecord(Role.SELECTING, "keeps no token"))
            return self._derived(n, f"token readout at {n.name}")
        if layout.complete:
            set_role(n, RoleRecord(Role.LAYOUT))
        else:
            set_role(n, RoleRecord(Role.SELECTING, "keeps a subset of the tokens"))
        return value

    def _cat(self, n, args, kwargs):
        parts = self._arg(n, args, kwargs, 0, "tensors")
        dim = self._arg(n, args, kwargs, 1, "dim", 0)
        shape = self._shape(n)
        dim = dim % len(shape)
        ids_parts = [self._ids_of(p) for p in parts]
        token_parts = [p for p in parts if isinstance(p, Ids)]
        if any(isinstance(p, (Derived, Pairwise)) for p in parts):
            return self._unknown(n, args, kwargs)
        along_tokens = any(not _constant_along(p.ids, dim) for p in token_parts) or any(
            p.ids.shape[dim] == 1 for p in token_parts
        )
        if not along_tokens:
            rows = [p.ids.narrow(dim, 0, 1) for p in token_parts]
            if all(torch.equal(r, rows[0]) for r in rows[1:]):
                # channel concat of one token's features (constants beside them): rows keep their token
                ids = rows[0].expand(shape).contiguous()
                return self._record(n, Ids(ids), Role.TOKENWISE, "concatenates channels")
            merged = torch.cat([p.contiguous() for p in ids_parts], dim=dim)
            for d in range(merged.dim()):
                if d != dim and _constant_along(merged, d):
                    merged = merged.narrow(d, 0, 1)
            merged = merged.movedim(dim, -1)
            if len(token_parts) == len(parts) and _disjoint_rows(merged.reshape(-1, merged.shape[-1])):
                # each row joins several tokens, each token in one row (Swin's patch merging): a
                # new, coarser sequence; a token in several rows (shifted copies) mixes tokens
                varying = {d for d in range(len(shape)) if d != dim and not _constant_along(rows[0], d)}
                _, new_ids = self._new_space(n, shape, sorted({0} | varying), None)
                return self._record(
                    n, Ids(new_ids), Role.SOURCE, "merges several tokens into one (patch merging)"
                )
            if len(token_parts) == len(parts):
                return self._mixing(n, "concatenates the channels of overlapping groups of tokens")
            return self._unknown(n, args, kwargs)
        out = torch.cat([p.contiguous() for p in ids_parts], dim=dim)
        spaces = {self._space_of(int(v)) for v in out.unique().tolist() if v > 0}
        fresh = any(not isinstance(p, Ids) for p in parts)
        if not fresh and len(spaces) == 1:
            layout = self.describe(out)
            if not (
                layout is not None and not layout.complete and self._regroups_streams(out, next(iter(spaces)))
            ):
                role = Role.LAYOUT if layout is not None and layout.complete else Role.SELECTING
                set_role(n, RoleRecord(role))
                set_tokens(n, layout)
                return Ids(out)
            # tokens of several streams gathered into one row of the batch (TimeSformer folds its
            # frames into one sequence): a new sequence, as when fresh tokens are added
        token_dims = sorted({0, dim} | {d for d in range(len(shape)) if not _constant_along(out, d)})
        prefix_ids = set()
        for sp in spaces:
            # a class token moved within its streams stays a prefix; class tokens of many
            # streams gathered into one new sequence (ViViT's time steps) carry input content
            if sp is not None and sp.batch == shape[0]:
                prefix_ids.update(
                    sp.offset + b * sp.tokens + t + 1 for b in range(sp.batch) for t in sp.prefix
                )
        prefix_mask = out == 0
        if prefix_ids:
            prefix_mask |= torch.isin(out, torch.tensor(sorted(prefix_ids), dtype=ID_DTYPE))
        index = [slice(None) if d in token_dims else slice(0, 1) for d in range(len(shape))]
        prefix_mask = prefix_mask[tuple(index)].reshape([shape[d] for d in token_dims])
        _, new_ids = self._new_space(n, shape, token_dims, prefix_mask)
        return self._record(n, Ids(new_ids), Role.SOURCE, "adds tokens to the sequence")

    @staticmethod
    def _regroups_streams(ids: torch.Tensor, space: TokenSpace) -> bool:
        """Whether some batch row of ``ids`` holds tokens of more than one stream of ``space``."""
        if space is None or space.batch == 1:
            return False
        for row in ids.reshape(ids.shape[0], -1):
            real = row[row > 0].long() - space.offset - 1
            if real.numel() and int(real.div(space.tokens, rounding_mode="floor").unique().numel()) > 1:
                return True
        return False

    def _space_of(self, ident: int) -> TokenSpace | None:
        for space in self.spaces:
            if space.contains(ident):
                return space
        return None

    def _unary(self, n, args, kwargs):
        if op_name(n) == "type_as" and args and not _is_token(args[0]):
            # a constant cast to a token tensor's dtype: only the dtype of the tokens is read
            set_role(n, RoleRecord(Role.NON_TOKEN, "constant cast to the dtype of a token tensor"))
            set_tokens(n, None)
            a, k = self._unwrap(args, kwargs)
            return getattr(self, n.op)(n.target, a, k)
        first = next(v for v in _flatten((args, kwargs)) if _is_token(v))
        shape = self._shape(n)
        if isinstance(first, Pairwise):
            set_role(n, RoleRecord(Role.MIXING, "inside attention"))
            set_tokens(n, None)
            return Pairwise(first.query_ids, shape)
        ids = (
            first.ids
            if shape is None or tuple(first.ids.shape) == tuple(shape)
            else self._ids_of(first, shape)
        )
        return self._record(n, Ids(ids), Role.TOKENWISE)

    def _binary(self, n, args, kwargs):
        values = [v for v in _flatten((args, kwargs)) if isinstance(v, (Ids, Pairwise, torch.Tensor))]
        shape = self._shape(n)
        pair = next((v for v in values if isinstance(v, Pairwise)), None)
        if pair is not None:
            set_role(n, RoleRecord(Role.MIXING, "inside attention"))
            set_tokens(n, None)
            return Pairwise(pair.query_ids, shape)
        token_vals = [v for v in values if isinstance(v, Ids)]
        out = None
        for v in token_vals:
            ids = self._ids_of(v, shape)
            if out is None:
                out = ids
                continue
            clash = (out != 0) & (ids != 0) & (out != ids)
            if bool(clash.any()):
                return self._mixing(n, "elementwise op combines different tokens")
            out = torch.where(out != 0, out, ids)
        return self._record(n, Ids(out.contiguous()), Role.TOKENWISE)

    def _channels_only(self, ids: torch.Tensor, dims) -> bool:
        return all(_constant_along(ids, d % ids.dim()) for d in dims)

    def _linear(self, n, args, kwargs):
        x = args[0]
        if isinstance(x, Ids) and not self._channels_only(x.ids, [-1]):
            merged = self._merge(n, x.ids, 1)
            if merged is not None:
                return merged
        if not isinstance(x, Ids) or not self._channels_only(x.ids, [-1]):
            return self._mixing(n, "linear over the token axis")
        return self._record(n, Ids(x.ids[..., :1].expand(self._shape(n)).contiguous()), Role.TOKENWISE)

    def _layer_norm(self, n, args, kwargs):
        x = args[0]
        module = self._module(n)
        if module is not None:
            ndims = len(module.normalized_shape)
        else:
            normalized = self._arg(n, args, kwargs, 1, "normalized_shape", [0])
            ndims = len(normalized) if isinstance(normalized, (list, tuple)) else 1
        if isinstance(x, Ids) and not self._channels_only(x.ids, range(-ndims, 0)):
            merged = self._merge(n, x.ids, ndims)
            if merged is not None:
                return merged
        if not isinstance(x, Ids) or not self._channels_only(x.ids, range(-ndims, 0)):
            return self._mixing(n, "normalises over tokens")
        return self._record(n, Ids(x.ids), Role.TOKENWISE)

    def _merge(self, n, ids: torch.Tensor, ndims: int) -> Ids | None:
        """A channel-wise op (norm, linear over the last ``ndims`` dims) whose channels hold
        several tokens, each token in exactly one row: the rows are groups of tokens (Swin's
        patch merging as reshape, permute, flatten), so the op opens a new, coarser sequence.
        None when some token feeds several rows (an overlapping merge mixes tokens) or when
        fewer than two rows per stream remain (that is a readout, not a sequence)."""
        shape = self._shape(n)
        if shape is None or ids.dim() <= ndims:
            return None
        lead = ids
        for d in range(ids.dim() - ndims):
            if _constant_along(lead, d):
                lead = lead.narrow(d, 0, 1)
        rows = lead.reshape(-1, math.prod(ids.shape[-ndims:]))
        if rows.shape[0] // max(ids.shape[0], 1) < 2 or not _disjoint_rows(rows):
            return None
        token_dims = [0] + [d for d in range(1, ids.dim() - ndims) if shape[d] > 1]
        _, new_ids = self._new_space(n, shape, token_dims, None)
        return self._record(n, Ids(new_ids), Role.SOURCE, "merges several tokens into one (patch merging)")

    def _softmax(self, n, args, kwargs):
        x = args[0]
        module = self._module(n)
        dim = module.dim if module is not None else self._arg(n, args, kwargs, 1, "dim", -1)
        if isinstance(x, Pairwise):
            set_role(n, RoleRecord(Role.MIXING, "attention softmax"))
            set_tokens(n, None)
            return Pairwise(x.query_ids, self._shape(n))
        if isinstance(x, Ids) and self._channels_only(x.ids, [dim]):
            return self._record(n, Ids(x.ids), Role.TOKENWISE)
        return self._mixing(n, "softmax over tokens")

    def _reduce(self, n, args, kwargs):
        x = args[0]
        dims = self._arg(n, args, kwargs, 1, "dim", None)
        shape = self._shape(n)
        if not isinstance(x, Ids):
            return self._mixing(n, "reduction inside attention")
        if dims is None:
            dims = list(range(x.ids.dim()))
        dims = [dims] if isinstance(dims, int) else list(dims)
        if self._channels_only(x.ids, dims):
            ids = x.ids
            for d in sorted((d % ids.dim() for d in dims), reverse=True):
                ids = ids.narrow(d, 0, 1)
            return self._record(n, Ids(ids.reshape(shape).contiguous()), Role.TOKENWISE)
        set_role(n, RoleRecord(Role.SELECTING, f"{op_name(n)} over tokens (pooling)"))
        set_tokens(n, None)
        return Derived(shape, f"pooling at {n.name}")

    def _matmul(self, n, args, kwargs):
        a, b = args[0], args[1]
        shape = self._shape(n)
        if isinstance(a, Pairwise):
            if isinstance(b, Ids) and not _constant_along(b.ids, -2) or isinstance(b, Ids):
                rows = a.query_ids[..., :1]
                try:
                    ids = rows.expand(shape).contiguous()
                except RuntimeError:
                    return self._mixing(n, "attention output with a layout this pass does not follow")
                return self._mixing(n, "attention: probabilities x values", Ids(ids))
            return self._mixing(n, "attention internals")
        a_tokens = isinstance(a, Ids)
        b_tokens = isinstance(b, Ids)
        if a_tokens and not self._channels_only(a.ids, [-1]):
            return self._mixing(n, "matmul contracts over tokens")
        if b_tokens and b.ids.dim() >= 2 and not _constant_along(b.ids, -1):
            if a_tokens:
                return self._pairwise(n, a.ids)
            if _feeds_softmax(n):
                return self._mixing(
                    n,
                    "attention pooling: queries that are not tokens (a learned probe) attend over the tokens",
                )
            return self._mixing(n, "matmul mixes tokens")
        if b_tokens and b.ids.dim() >= 2 and not _constant_along(b.ids, -2):
            return self._mixing(n, "matmul contracts over tokens")
        if a_tokens:
            return self._record(n, Ids(a.ids[..., :1].expand(shape).contiguous()), Role.TOKENWISE)
        return self._mixing(n, "matmul mixes tokens")

    def _pairwise(self, n, query_ids: torch.Tensor):
        set_role(n, RoleRecord(Role.MIXING, "attention: query x key logits", pairwise=True))
        set_tokens(n, None)
        return Pairwise(query_ids, self._shape(n))

    def _einsum(self, n, args, kwargs):
        equation = args[0]
        operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        token_ops = [(i, v) for i, v in enumerate(operands) if isinstance(v, Ids)]
        if len(token_ops) != 1 or any(isinstance(v, (Pairwise, Derived)) for v in operands):
            return self._mixing(n, "einsum over several token operands")
        inputs, output = equation.replace(" ", "").split("->")
        subs = inputs.split(",")
        index, x = token_ops[0]
        mine = subs[index]
        ids = x.ids
        for pos, letter in enumerate(mine):
            if letter not in output and not _constant_along(ids, pos):
                return self._mixing(n, "einsum contracts over tokens")
        kept = [letter for letter in mine if letter in output]
        reduced = ids
        for pos in sorted((p for p, letter in enumerate(mine) if letter not in output), reverse=True):
            reduced = reduced.narrow(pos, 0, 1).squeeze(pos)
        perm_shape = []
        order = []
        for letter in output:
            if letter in kept:
                order.append(kept.index(letter))
        reduced = reduced.permute(order) if order else reduced
        for letter in output:
            perm_shape.append(
                reduced.shape[[x for x in output if x in kept].index(letter)] if letter in kept else 1
            )
        reduced = reduced.reshape(perm_shape)
        return self._record(n, Ids(reduced.expand(self._shape(n)).contiguous()), Role.TOKENWISE)

    def _sdpa(self, n, args, kwargs):
        q = args[0]
        if not isinstance(q, Ids):
            return self._mixing(n, "attention on non-token queries")
        ids = q.ids[..., :1].expand(self._shape(n)).contiguous()
        return self._mixing(n, "attention (fused)", Ids(ids))

    def _conv(self, n, args, kwargs):
        """A convolution or pooling over token positions: it mixes neighbours, so it runs dense.
        On the same grid (stride 1: a depthwise conv in an FFN, a conditional position encoding)
        each output position keeps its token, so the token-wise ops around it stay gated. On a
        new grid (spatial reduction of K and V, downsampling) its output is a new sequence."""
        x = args[0] if args else None
        shape = self._shape(n)
        what = "convolution" if op_kind(n) == OpKind.CONV else op_name(n)
        if not isinstance(x, Ids) or shape is None or self._positions(n) < 2:
            return self._mixing(n, f"{what} mixes neighbouring tokens")
        ids = x.ids
        same_grid = (
            ids.dim() == len(shape)
            and tuple(ids.shape[2:]) == tuple(shape[2:])
            and ids.shape[0] == shape[0]
            and _constant_along(ids, 1)
        )
        if same_grid:
            return self._mixing(
                n,
                f"{what} mixes neighbouring tokens (same grid: each position keeps its token)",
                Ids(ids[:, :1].expand(shape).contiguous()),
            )
        return self._record(
            n,
            self._patch_source(n),
            Role.SOURCE,
            f"{what} of the tokens to a new grid (runs dense): a new sequence",
        )

    _BATCH_NORMS = ("batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training")

    def _batch_norm(self, n, args, kwargs) -> Any:
        """Batch norm with running statistics is a per-channel affine map: token-wise. With batch
        statistics (training mode, or no running statistics) it mixes every token."""
        module = self._module(n)
        if module is not None:
            training = module.training or not module.track_running_stats
        elif op_name(n) == "_native_batch_norm_legit_no_training":
            training = False
        elif n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):  # aten: training 6th
            training = bool(self._arg(n, args, kwargs, 5, "training", False)) or n.args[3] is None
        else:  # F.batch_norm(input, running_mean, running_var, weight, bias, training)
            training = bool(self._arg(n, args, kwargs, 5, "training", False)) or (
                len(n.args) > 1 and n.args[1] is None
            )
        x = args[0]
        if training or not isinstance(x, Ids):
            return self._mixing(n, "batch norm with batch statistics (training mode) mixes tokens")
        info = tensor_info(n)
        if isinstance(info, tuple):  # (output, saved mean, saved rstd)
            set_role(n, RoleRecord(Role.TOKENWISE, "batch norm (running statistics)"))
            set_tokens(n, None)
            return (Ids(x.ids),) + tuple(Derived(i.shape, "batch norm statistics") for i in info[1:])
        return self._record(n, Ids(x.ids), Role.TOKENWISE, "batch norm (running statistics)")

    # -- layouts -----------------------------------------------------------------------------
    def describe(self, ids: torch.Tensor) -> TokenLayout | None:
        """The TokenLayout of a tensor given its token ids."""
        if ids.numel() == 0:
            return None
        reduced = _reduce_channels(ids)
        top = int(reduced.max())
        if top <= 0:
            return None
        space = self._space_of(top)
        if space is None or int(reduced[reduced > 0].min()) <= space.offset:
            return None
        shape = tuple(ids.shape)
        token_dims = tuple(d for d in range(len(shape)) if reduced.shape[d] > 1)
        token_ndim = (max(token_dims) + 1) if token_dims else 1
        row_major = all(d in token_dims or shape[d] == 1 for d in range(token_ndim))
        expected = space.batch * space.tokens
        present = reduced[reduced > 0].long() - (space.offset + 1)
        counts = torch.bincount(present, minlength=expected)
        complete = counts.numel() == expected and bool((counts == 1).all())
        rows = reduced.reshape(-1).contiguous() if row_major else None
        canonical = False
        if row_major and complete and rows.numel() == expected:
            canonical = _all_equal(
                rows, torch.arange(space.offset + 1, space.offset + 1 + expected, dtype=ID_DTYPE)
            )
        return TokenLayout(
            space=space,
            token_dims=token_dims,
            token_ndim=token_ndim,
            row_ids=rows,
            row_major=row_major,
            complete=complete,
            canonical=canonical,
            sequence_dim=_sequence_dim(reduced, space),
            heads_canonical=_heads_canonical(ids, space),
            ids=reduced,
        )


def _disjoint_rows(rows: torch.Tensor) -> bool:
    """Whether no token id (> 0) appears in two rows of ``rows`` (rows, channels)."""
    rows = rows.long()
    real = rows > 0
    owner = torch.arange(rows.shape[0]).unsqueeze(1).expand_as(rows)[real]
    tokens = rows[real]
    order = torch.argsort(tokens, stable=True)
    tokens, owner = tokens[order], owner[order]
    return not bool(((tokens[1:] == tokens[:-1]) & (owner[1:] != owner[:-1])).any())


def _reduce_channels(ids: torch.Tensor) -> torch.Tensor:
    """Narrow every dim along which the ids are constant to size 1 (keeps the rank)."""
    reduced = ids
    for d in reversed(range(ids.dim())):
        if reduced.shape[d] > 1 and _constant_along(reduced, d):
            reduced = reduced.narrow(d, 0, 1)
    return reduced


def _sequence_dim(ids: torch.Tensor, space: TokenSpace) -> int | None:
    """The dim s with ids[b, ..., t@s, ...] == offset + b*N + t + 1 everywhere, if any."""
    shape = ids.shape
    if shape[0] != space.batch and not (shape[0] == 1 and space.batch == 1):
        return None
    for s in range(1, ids.dim()):
        if shape[s] != space.tokens:
            continue
        view = [1] * ids.dim()
        view[0], view[s] = space.batch, space.tokens
        expected = (space.offset + 1 + torch.arange(space.batch * space.tokens, dtype=ID_DTYPE)).reshape(view)
        if _all_equal(ids, expected):
            return s
    return None


def _heads_canonical(ids: torch.Tensor, space: TokenSpace) -> bool:
    """True when ids viewed as (B, heads, N, d) hold token t of stream b at [b, :, t, :]."""
    shape = ids.shape
    if ids.dim() < 2 or shape[-2] != space.tokens or ids.numel() % (space.batch * space.tokens * shape[-1]):
        return False
    view = ids.reshape(space.batch, -1, space.tokens, shape[-1])
    expected = (space.offset + 1 + torch.arange(space.batch * space.tokens, dtype=ID_DTYPE)).reshape(
        space.batch, 1, space.tokens, 1
    )
    return _all_equal(view, expected)


_HANDLERS = {
    OpKind.SHAPE: TokenFlow._shape_op,
    OpKind.LAYOUT: TokenFlow._layout,
    OpKind.UNARY: TokenFlow._unary,
    OpKind.BINARY: TokenFlow._binary,
    OpKind.LINEAR: TokenFlow._linear,
    OpKind.LAYER_NORM: TokenFlow._layer_norm,
    OpKind.SOFTMAX: TokenFlow._softmax,
    OpKind.REDUCE: TokenFlow._reduce,
    OpKind.MATMUL: TokenFlow._matmul,
    OpKind.EINSUM: TokenFlow._einsum,
    OpKind.SDPA: TokenFlow._sdpa,
    OpKind.CONV: TokenFlow._conv,
    OpKind.POOL: TokenFlow._conv,
    OpKind.UNKNOWN: TokenFlow._unknown,
}


def _feeds_softmax(node: torch.fx.Node, steps: int = 4) -> bool:
    """Whether ``node`` reaches a softmax through elementwise ops (scale, bias): attention logits."""
    frontier = [node]
    for _ in range(steps):
        frontier = [u for n in frontier for u in n.users]
        if any(op_kind(u) == OpKind.SOFTMAX for u in frontier):
            return True
        frontier = [u for u in frontier if op_kind(u) in (OpKind.BINARY, OpKind.UNARY, OpKind.LAYOUT)]
    return False


def infer_tokens(gm: torch.fx.GraphModule, token_inputs: tuple = ()) -> list[TokenSpace]:
    """Run token-axis inference over ``gm``; see the module docstring. ``token_inputs``:
    (placeholder index, token dims) of inputs that already are token sequences (dim 0 streams).

    Raises:
        NoTokenSequenceError: the graph never forms a token sequence (for example a CNN).
    """
    flow = TokenFlow(gm, token_inputs)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        flow.run(*[None] * len(inputs))
    if not flow.spaces:
        raise NoTokenSequenceError(
            "the model never forms a token sequence: no convolution, pooling or linear of the input "
            "outputs positions, and no tokens are concatenated to it"
        )
    by_name = {n.name: n for n in gm.graph.nodes}
    from_convolutions = all(
        op_kind(by_name[space.source]) in (OpKind.CONV, OpKind.POOL)
        and role(by_name[space.source]).reason != "patch embedding"
        for space in flow.spaces
    )
    if from_convolutions and not any(_acts_on_tokens(n) for n in gm.graph.nodes):
        raise NoTokenSequenceError(_unused_tokens_message(gm, flow))
    return flow.spaces


def _acts_on_tokens(node: torch.fx.Node) -> bool:
    """Attention over tokens, or a linear (or matmul with weights) applied to each token."""
    record = role(node)
    if record is None:
        return False
    if record.pairwise or (
        op_kind(node) == OpKind.SDPA and record.role == Role.MIXING and token_layout(node)
    ):
        return True
    return record.role == Role.TOKENWISE and op_kind(node) in (OpKind.LINEAR, OpKind.MATMUL, OpKind.EINSUM)


def _unused_tokens_message(gm: torch.fx.GraphModule, flow: TokenFlow) -> str:
    first = next(n for n in gm.graph.nodes if n.name == flow.spaces[0].source)
    what = role(first).reason if role(first) is not None else "a source"
    if op_kind(first) == OpKind.CONV:
        kernel, stride, padding = flow._conv_geometry(first)
        what += f"; kernel {tuple(kernel)}, stride {tuple(stride)}, padding {tuple(padding)}"
    return (
        f"the model never forms a token sequence that attention or a linear acts on: {where(first)} "
        f"({what}) outputs {flow.spaces[0].tokens} positions per stream, and {len(flow.spaces)} such "
        "sequence(s) were found, but no attention and no linear reads them (only convolutions, pooling "
        "and element-wise ops), so there is nothing to gate"
    )


class TokenFlowPass:
    """Pass: token layouts and roles on every node, the token sequences."""

    name = "token_flow"
    reads = frozenset({OP, TENSOR})
    writes = frozenset({TOKENS, ROLE, SPACES})

    def run(self, gm: torch.fx.GraphModule, ctx) -> None:
        ctx.put(SPACES, infer_tokens(gm, ctx.options.token_inputs))
