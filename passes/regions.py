"""Token-wise regions: maximal connected token-wise subgraphs between token-mixing ops.

A node joins a region when it is token-wise or a token layout op, lies outside every attention
site, and both its output and every token input are *row-major* and *complete* tensors of one
token space (each token exactly once, channels trailing), so that it can run on a gathered
subset of rows. Regions are the weakly connected components of those nodes (networkx). Gates
sit on a region's entries and buffers on its exits.

Reads: ``meta[OP]``, ``meta[ROLE]``, ``meta[TOKENS]``, ``meta[ATTENTION]``.
Writes: ``meta[REGION]`` on member nodes; returns the regions (``REGIONS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx

from evtrace.graph.meta import (
    ATTENTION,
    MODULE_PATH,
    OP,
    REGION,
    REGIONS,
    ROLE,
    TOKENS,
    OpKind,
    Role,
    TokenSpace,
    module_path,
    op_kind,
    role,
    set_region,
    site_of,
    token_layout,
)

from .canonicalize import op_name

HEAVY = (OpKind.LINEAR, OpKind.MATMUL)


@dataclass
class Region:
    name: str
    space: TokenSpace
    nodes: list[torch.fx.Node]
    entries: list[torch.fx.Node]  # token tensors produced outside, gated
    exits: list[torch.fx.Node]  # members used outside, buffered
    heavy: list[torch.fx.Node] = field(default_factory=list)  # linears that become sparse
    dense_reason: str = ""

    @property
    def gated(self) -> bool:
        return not self.dense_reason


def _gatherable(node) -> bool:
    layout = token_layout(node) if isinstance(node, torch.fx.Node) else None
    return layout is not None and layout.row_major and layout.complete


def _token_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [
        a
        for a in node.all_input_nodes
        if token_layout(a) is not None or (role(a) and role(a).role not in (Role.NON_TOKEN,))
    ]


def is_member(node: torch.fx.Node) -> bool:
    record = role(node)
    if record is None or record.role not in (Role.TOKENWISE, Role.LAYOUT):
        return False
    if site_of(node) or not _gatherable(node):
        return False
    space = token_layout(node).space
    for arg in _token_inputs(node):
        if not _gatherable(arg) or token_layout(arg).space != space:
            return False
    return True


def _is_heavy(node: torch.fx.Node) -> bool:
    if op_kind(node) not in HEAVY:
        return False
    return role(node).role == Role.TOKENWISE


def _name(nodes: list[torch.fx.Node], heavy: list[torch.fx.Node]) -> str:
    """``first..last`` heavy module paths, so that a name says where the region starts and ends."""
    paths = [module_path(n) or n.name for n in (heavy or nodes)]
    return paths[0] if len(paths) == 1 else f"{paths[0]}..{paths[-1]}"


def _stages(gm: torch.fx.GraphModule, member_set: set) -> dict:
    """Longest-path stage of every node, counting each step into or out of the member set.

    Members joined only through the same stage form convex regions: a path that leaves a
    region (through attention, say) and comes back arrives two stages later.
    """
    stage: dict[torch.fx.Node, int] = {}
    for node in gm.graph.nodes:
        best = 0
        # every input, not only token tensors: a path out of a region may pass through values
        # that hold no token (a statistic, a view of a mixed tensor) and come back into it
        for arg in _value_inputs(node):
            step = 1 if (arg in member_set) != (node in member_set) else 0
            best = max(best, stage.get(arg, 0) + step)
        stage[node] = best
    return stage


def _data_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users that read the tensor's values (shape reads are folded to constants by the rewrite)."""
    return [u for u in node.users if op_kind(u) != OpKind.SHAPE]


def _value_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The inputs whose values a node reads: not shape reads, not the operand of ``type_as``
    (only its dtype: RoPE tables cast to the dtype of the queries)."""
    if op_name(node) == "type_as" and node.args:
        first = node.args[0]
        return [first] if isinstance(first, torch.fx.Node) else []
    return [a for a in node.all_input_nodes if op_kind(a) != OpKind.SHAPE]


def _frame_dependent(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes whose values depend on the input's values (not only on its shape)."""
    found: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            found.add(node)
        elif op_kind(node) != OpKind.SHAPE and any(a in found for a in _value_inputs(node)):
            found.add(node)
    return found


def find_regions(gm: torch.fx.GraphModule) -> list[Region]:
    """Group token-wise nodes into regions; see the module docstring."""
    frame_dependent = _frame_dependent(gm)
    members = [n for n in gm.graph.nodes if is_member(n)]
    member_set = set(members)
    stage = _stages(gm, member_set)
    graph = nx.DiGraph()
    graph.add_nodes_from(members)
    for node in members:
        for arg in node.all_input_nodes:
            if arg in member_set and stage[arg] == stage[node]:
                graph.add_edge(arg, node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    regions: list[Region] = []
    taken: set[str] = set()
    for component in sorted(nx.weakly_connected_components(graph), key=lambda c: min(order[n] for n in c)):
        nodes = sorted(component, key=order.__getitem__)
        entries: list[torch.fx.Node] = []
        exits: list[torch.fx.Node] = []
        for node in nodes:
            for arg in _token_inputs(node):
                if arg not in component and arg not in entries:
                    entries.append(arg)
            if any(user not in component for user in _data_users(node)):
                exits.append(node)
        heavy = [n for n in nodes if _is_heavy(n)]
        name = _name(nodes, heavy)
        base, i = name, 1
        while name in taken:
            i += 1
            name = f"{base}#{i}"
        taken.add(name)
        region = Region(
            name=name,
            space=token_layout(nodes[0]).space,
            nodes=nodes,
            entries=entries,
            exits=exits,
            heavy=heavy,
        )
        stale = next(
            (
                arg
                for node in nodes
                for arg in node.all_input_nodes
                if arg not in component
                and arg not in entries
                and arg in frame_dependent
                and op_kind(arg) not in (OpKind.SHAPE, OpKind.GUARD)
            ),
            None,
        )
        if not heavy:
            region.dense_reason = "no linear inside: gating would cost more than it saves"
        elif not entries:
            region.dense_reason = "no token input to gate"
        elif stale is not None:
            region.dense_reason = (
                f"reads '{stale.name}', a value computed from the frame that holds no token (a statistic "
                "over tokens): rows that are not recomputed would keep its old value"
            )
        for node in nodes:
            set_region(node, name)
        regions.append(region)
    return regions


class Regions:
    """Pass: the token-wise regions between token-mixing ops."""

    name = "regions"
    reads = frozenset({OP, ROLE, TOKENS, ATTENTION, MODULE_PATH})
    writes = frozenset({REGION, REGIONS})

    def run(self, gm: torch.fx.GraphModule, ctx) -> None:
        ctx.put(REGIONS, find_regions(gm))
