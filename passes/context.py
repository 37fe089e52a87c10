"""What the passes share: the options of one run and the records each pass leaves for the next."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx

from evtrace.graph.meta import PLAN, REGIONS, SITES, SPACES
from evtrace.graph.plan import AttentionMode


@dataclass(frozen=True)
class PassOptions:
    """The choices a pipeline run makes; ``policy`` None plans without checking a budget."""

    attention: AttentionMode = AttentionMode.EXACT
    policy: Any = None  # evtrace.runtime.policies.Policy
    repair_rows: int = 8
    always_update_prefix: bool = True
    keep_dense: tuple[tuple[str, str], ...] = ()  # (region or site name, reason): not rewritten
    token_inputs: tuple[tuple[int, tuple[int, ...]], ...] = ()  # inputs that are token sequences
    pack_linears: bool = True  # sparse regions' linears read packed weights (CPU fp32)


@dataclass
class PassContext:
    """One pipeline run: the graph, the options, and the records by key (``evtrace.graph.meta``)."""

    gm: torch.fx.GraphModule
    options: PassOptions = field(default_factory=PassOptions)
    model_name: str = ""
    records: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def put(self, key: str, value: Any) -> None:
        self.records[key] = value

    def get(self, key: str) -> Any:
        if key not in self.records:
            raise KeyError(
                f"no pass has written the record {key!r} yet; written so far: {sorted(self.records)}"
            )
        return self.records[key]

    @property
    def spaces(self):
        return self.get(SPACES)

    @property
    def sites(self):
        return self.get(SITES)

    @property
    def regions(self):
        return self.get(REGIONS)

    @property
    def plan(self):
        return self.get(PLAN)
