"""What the passes share: the options of one run, the records each pass leaves for the next, and
what each pass reports it did."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx

from evtrace.graph.meta import PLAN, REGIONS, SITES, SPACES, note_read, note_write
from evtrace.graph.plan import AttentionMode


@dataclass(frozen=True)
class PassOptions:
    """The choices a pipeline run makes; ``policy`` None plans without checking a budget.

    The runner hands each pass the options it takes as fields of the pass object (its
    ``configured(options)``); a pass without that method reads them from the context.
    """

    attention: AttentionMode = AttentionMode.EXACT
    policy: Any = None  # evtrace.runtime.policies.Policy
    repair_rows: int = 8
    always_update_prefix: bool = True
    keep_dense: tuple[tuple[str, str], ...] = ()  # (region or site name, reason): not rewritten
    token_inputs: tuple[tuple[int, tuple[int, ...]], ...] = ()  # inputs that are token sequences
    pack_linears: bool = True  # sparse regions' linears read packed weights (CPU fp32)


@dataclass(frozen=True)
class PassResult:
    """What one pass did: the names of what it rewrote and its counts by what they count.

    ``str(result)`` is the pass's entry in the report's analysis line ("3 regions rewritten").
    """

    counts: tuple[tuple[str, int], ...] = ()
    rewrote: tuple[str, ...] = ()
    note: str = ""  # a few words where a count says nothing ("no per-step sub-model")

    def count(self, what: str) -> int:
        return dict(self.counts).get(what, 0)

    def __str__(self) -> str:
        parts = [f"{n} {what}" for what, n in self.counts]
        if self.note:
            parts.append(self.note)
        return ", ".join(parts) or "-"


@dataclass
class PassContext:
    """One pipeline run: the graph, the options, the records by key (``evtrace.graph.meta``),
    the time of each pass and what each pass reported (``results``, by pass name)."""

    gm: torch.fx.GraphModule
    options: PassOptions = field(default_factory=PassOptions)
    model_name: str = ""
    records: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    results: dict[str, PassResult] = field(default_factory=dict)

    def put(self, key: str, value: Any) -> None:
        note_write(key)
        self.records[key] = value

    def get(self, key: str) -> Any:
        note_read(key)
        if key not in self.records:
            raise KeyError(
                f"no pass has written the record {key!r} yet; written so far: {sorted(self.records)}"
            )
        return self.records[key]

    def find(self, key: str, default: Any = None) -> Any:
        """The record ``key``, or ``default`` where no pass of this run writes it."""
        note_read(key)
        return self.records.get(key, default)

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
