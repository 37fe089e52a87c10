"""Rewrite: every gated token-wise region becomes one SparseRegion call.

For a region with entries E (token tensors made outside it), constants K and exits X, the
pass builds two subgraphs from the region's nodes:

  dense   the nodes as they are, on full tensors (first frame, refresh)
  sparse  the same nodes on gathered rows (B, r, ..., channels); layout ops that only move
          token rows become a reshape of the gathered rows (the order of gathered rows is the
          selection's, whatever the layout), and constants that vary along the token dims
          (position embeddings, padding masks) are gathered at the selected tokens

and replaces the region in the main graph by ``call_module(SparseRegion, (*E, *K))`` whose
outputs are the exit buffers and the selection index (read by delta attention).

Reads: the PLAN (which regions are gated) and REGIONS records, ``meta[OP]``, ``meta[ROLE]``,
``meta[TOKENS]``, ``meta[TENSOR]``. Writes: new ``call_module`` nodes (``evtrace_region_<i>``),
erases the region's nodes; the SELECTIONS record (region name -> its selection-index node).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx

from evtrace.graph.errors import RewriteError
from evtrace.graph.meta import (
    OP,
    PLAN,
    REGIONS,
    ROLE,
    SELECTIONS,
    SITES,
    TENSOR,
    TOKENS,
    OpKind,
    Role,
    TokenLayout,
    op_kind,
    role,
    set_role,
    set_tensor_info,
    set_tokens,
    tensor_info,
    token_layout,
)
from evtrace.runtime.gates import ConstantSpec, RowMap, SparseRegion, TokenGate, position_table
from evtrace.runtime.policies import Policy

from .attention_sites import materialize_bias
from .regions import Region


@dataclass
class RegionRewrite:
    region: Region
    module_name: str
    call: torch.fx.Node
    index: torch.fx.Node  # the selection index output (None after a dense frame)
    exit_outputs: dict[torch.fx.Node, torch.fx.Node]  # original exit node -> getitem of the call


def row_map(node: torch.fx.Node) -> RowMap:
    layout: TokenLayout = token_layout(node)
    return RowMap(
        tuple(tensor_info(node).shape),
        layout.token_ndim,
        layout.space.batch,
        layout.space.tokens,
        layout.canonical,
    )


def positions(node: torch.fx.Node) -> torch.Tensor | None:
    layout: TokenLayout = token_layout(node)
    if layout.canonical:
        return None
    space = layout.space
    return position_table(layout.row_ids, space.offset, space.batch * space.tokens)


def _rows_preserving(node: torch.fx.Node, root: torch.nn.Module) -> bool:
    """Does this layout op keep every row's channels in order (moving only token rows)?

    Probed by running the op on a tensor whose channels hold their own index.
    """
    token_inputs = [a for a in node.all_input_nodes if token_layout(a) is not None]
    other_nodes = [a for a in node.all_input_nodes if token_layout(a) is None]
    if len(token_inputs) != 1 or other_nodes:
        return False
    x = token_inputs[0]
    in_map, out_map = row_map(x), row_map(node)
    channels = math.prod(in_map.channel_shape)
    if channels != math.prod(out_map.channel_shape):
        return False
    probe = torch.arange(channels, dtype=torch.float64).reshape(in_map.channel_shape or (1,))
    probe = probe.reshape(in_map.channel_shape).expand(in_map.shape).contiguous()
    args = torch.fx.node.map_arg(node.args, lambda a: probe)
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: probe)
    if node.op == "call_module":
        out = root.get_submodule(str(node.target))(*args, **kwargs)
    elif node.op == "call_method":
        out = getattr(args[0], node.target)(*args[1:], **kwargs)
    else:
        out = node.target(*args, **kwargs)
    rows = out.reshape(out_map.rows, -1)
    real = token_layout(node).row_ids > 0
    return bool((rows[real] == torch.arange(channels, dtype=torch.float64)).all())


def _needs_gather(constant: torch.fx.Node, consumer: torch.fx.Node) -> tuple[int, ...] | None:
    """The constant's shape aligned to the consumer's rank when it varies along token dims.

    Only elementwise ops broadcast their operands against the token rows; the weights of a
    linear or a norm are not token-aligned whatever their shape.
    """
    if op_kind(consumer) != OpKind.BINARY:
        return None
    info = tensor_info(constant)
    if info is None or isinstance(info, tuple):
        return None
    out_shape = tensor_info(consumer).shape
    if len(info.shape) > len(out_shape):
        return None
    aligned = (1,) * (len(out_shape) - len(info.shape)) + tuple(info.shape)
    k = token_layout(consumer).token_ndim
    return aligned if any(aligned[d] > 1 for d in range(k)) else None


def _is_token_input(node: torch.fx.Node) -> bool:
    record = role(node)
    return token_layout(node) is not None or (record is not None and record.role != Role.NON_TOKEN)


def rewrite_region(
    gm: torch.fx.GraphModule,
    region: Region,
    index: int,
    policy: Policy,
    always_update_prefix: bool,
    replaced: dict[torch.fx.Node, torch.fx.Node],
) -> RegionRewrite:
    """Replace one gated region of ``gm`` by a SparseRegion call; see the module docstring.

    ``replaced`` maps exits of regions rewritten before to the nodes that now carry them; this
    region's own exits are added to it.
    """
    members = set(region.nodes)
    entries = [replaced.get(e, e) for e in region.entries]
    constants: list[
        tuple[torch.fx.Node, tuple[int, ...] | None, torch.fx.Node]
    ] = []  # (node, aligned, consumer)
    constant_keys: dict[tuple[torch.fx.Node, tuple | None], int] = {}

    dense_graph = torch.fx.Graph()
    sparse_graph = torch.fx.Graph()
    dense_env: dict[torch.fx.Node, torch.fx.Node] = {}
    sparse_env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i, entry in enumerate(entries):
        dense_env[entry] = dense_graph.placeholder(f"entry{i}")
        sparse_env[entry] = sparse_graph.placeholder(f"entry{i}")

    # constants first: placeholders must precede every other node
    per_node_constants: dict[torch.fx.Node, dict[torch.fx.Node, int]] = {}
    for node in region.nodes:
        for arg in node.all_input_nodes:
            if arg in members or arg in entries or _is_token_input(arg):
                continue
            aligned = _needs_gather(arg, node)
            if arg.op == "get_attr" and aligned is None:
                continue  # copied into both subgraphs below
            key = (arg, aligned)
            if key not in constant_keys:
                constant_keys[key] = len(constants)
                constants.append((arg, aligned, node))
            per_node_constants.setdefault(node, {})[arg] = constant_keys[key]
    dense_constants = [dense_graph.placeholder(f"constant{j}") for j in range(len(constants))]
    sparse_constants = [sparse_graph.placeholder(f"constant{j}") for j in range(len(constants))]

    def copy_get_attr(graph, env, arg):
        if arg not in env:
            env[arg] = graph.get_attr(arg.target)
        return env[arg]

    for node in region.nodes:
        local = per_node_constants.get(node, {})
        for graph, env, placeholders in (
            (dense_graph, dense_env, dense_constants),
            (sparse_graph, sparse_env, sparse_constants),
        ):

            def lookup(arg, env=env, placeholders=placeholders, graph=graph, local=local):
                if arg in local:
                    return placeholders[local[arg]]
                if arg.op == "get_attr" and arg not in members:
                    return copy_get_attr(graph, env, arg)
                return env[arg]

            if graph is sparse_graph and op_kind(node) == OpKind.LAYOUT and _rows_preserving(node, gm):
                out_map = row_map(node)
                shape = out_map.gathered_shape(-1)
                if out_map.token_ndim >= 2:
                    shape = (out_map.batch, -1) + shape[2:]
                env[node] = graph.call_method("reshape", (lookup(node.all_input_nodes[0]), shape))
            else:
                env[node] = graph.node_copy(node, lookup)
    dense_graph.output(tuple(dense_env[x] for x in region.exits))
    sparse_graph.output(tuple(sparse_env[x] for x in region.exits))
    dense = torch.fx.GraphModule(gm, dense_graph, f"{region.name}.dense")
    sparse = torch.fx.GraphModule(gm, sparse_graph, f"{region.name}.sparse")

    entry_maps = [row_map(e) for e in entries]
    space = region.space
    forced = None
    if always_update_prefix and space.prefix:
        forced = torch.zeros(space.tokens, dtype=torch.bool)
        forced[list(space.prefix)] = True
    gate = TokenGate(
        region.name,
        entry_maps,
        [positions(e) for e in entries],
        [tensor_info(e).dtype for e in entries],
        policy,
        forced,
    )
    specs, constant_positions = [], []
    for _arg, aligned, consumer in constants:
        if aligned is None:
            specs.append(None)
            constant_positions.append(None)
        else:
            specs.append(ConstantSpec(row_map(consumer), aligned))
            constant_positions.append(positions(consumer))
    module = SparseRegion(
        region.name,
        gate,
        dense,
        sparse,
        len(entries),
        specs,
        constant_positions,
        [row_map(x) for x in region.exits],
        [positions(x) for x in region.exits],
        [tensor_info(x).dtype for x in region.exits],
        exit_names=[x.name for x in region.exits],
    )
    module_name = f"evtrace_region_{index}"
    gm.add_submodule(module_name, module)

    graph = gm.graph
    inputs = entries + [arg for arg, _, _ in constants]
    order = {n: i for i, n in enumerate(graph.nodes)}
    anchor = max(inputs, key=order.__getitem__) if inputs else region.nodes[0]
    with graph.inserting_after(anchor):
        call = graph.call_module(module_name, tuple(inputs))
    outputs: dict[torch.fx.Node, torch.fx.Node] = {}
    previous = call
    for j, exit_node in enumerate(region.exits):
        with graph.inserting_after(previous):
            item = graph.call_function(operator.getitem, (call, j))
        set_tensor_info(item, tensor_info(exit_node))
        set_tokens(item, token_layout(exit_node))
        set_role(item, role(exit_node))
        exit_node.replace_all_uses_with(item, delete_user_cb=lambda user: user not in members)
        outputs[exit_node] = item
        replaced[exit_node] = item
        previous = item
    with graph.inserting_after(previous):
        index_node = graph.call_function(operator.getitem, (call, len(region.exits)))
    for node in reversed(region.nodes):
        graph.erase_node(node)
    return RegionRewrite(region, module_name, call, index_node, outputs)


def place_in_order(graph: torch.fx.Graph) -> int:
    """Reorder ``graph`` in place so that every node follows its inputs, moving as few as possible.

    A region call goes after the last of its inputs; when a region has several entries, a user
    of an exit computed before the last entry may sit before that point (hierarchical models:
    a stage's blocks read the previous stage's exits). Nodes keep their relative order wherever
    the data allows (Kahn's algorithm, the earliest ready node first). Returns how many nodes moved.
    """
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}

    def key(node):
        # a call's outputs right after it: later rewrites insert before a site's output, and
        # must find the selection index of the region that feeds the site already defined
        return (-1 if node.op == "call_function" and node.target is operator.getitem else position[node],)

    pending = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [key(n) + (position[n],) for n in nodes if pending[n] == 0]
    heapq.heapify(ready)
    order: list[torch.fx.Node] = []
    while ready:
        node = nodes[heapq.heappop(ready)[-1]]
        order.append(node)
        for user in node.users:
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(ready, key(user) + (position[user],))
    if len(order) != len(nodes):
        stuck = [n.name for n in nodes if pending[n] > 0][:5]
        raise RuntimeError(f"the rewritten graph has a cycle through {stuck}: a region is not convex")
    moved = sum(1 for a, b in zip(order, nodes, strict=True) if a is not b)
    if moved:
        anchor = order[0]
        for node in order[1:]:
            anchor.append(node)
            anchor = node
    return moved


class SparseRegions:
    """Pass: every region the plan gates becomes one SparseRegion call."""

    name = "sparse_regions"
    reads = frozenset({PLAN, REGIONS, SITES, OP, ROLE, TOKENS, TENSOR})
    writes = frozenset({SELECTIONS, TENSOR, TOKENS, ROLE, OP})  # exits on their getitems; built biases
    rewrites = True

    def run(self, gm: torch.fx.GraphModule, ctx) -> None:
        gated = {region.name for region in ctx.plan.gated_regions}
        replaced: dict[torch.fx.Node, torch.fx.Node] = {}
        selections = {}
        for index, region in enumerate(r for r in ctx.regions if r.name in gated):
            try:
                rewrite = rewrite_region(
                    gm, region, index, ctx.options.policy, ctx.options.always_update_prefix, replaced
                )
            except Exception as error:
                raise RewriteError(region.name, error) from error
            selections[region.name] = rewrite.index
        # q, k or v may itself be a region's exit (one head: the head layout keeps rows whole)
        for site, site_plan in zip(ctx.sites, ctx.plan.sites, strict=True):
            site.q, site.k, site.v = (replaced.get(x, x) for x in (site.q, site.k, site.v))
            if site_plan.delta and site.bias is not None and site.bias.recipe:
                combined = materialize_bias(gm.graph, site.bias, site.output)
                site.bias = dataclasses.replace(site.bias, inputs=(combined,), recipe=())
        place_in_order(gm.graph)
        ctx.put(SELECTIONS, selections)
