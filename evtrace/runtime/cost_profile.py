"""The device-dependent constants of the runtime's static choices, as one record.

Two choices on the per-frame path depend on how fast a device runs small, thin products against
its fused kernels, not on the model:

- exact delta attention against fused attention on the buffers (``delta_costs_more``): the
  delta update's fixed work, in fused multiply-adds, and what one of its multiply-adds is worth
  in fused ones;
- a packed (oneDNN) linear against ``F.linear``: the row counts between which packing pays.

The shipped :data:`DEFAULT_PROFILE` was fitted on this project's development machine (a 2-core
x86-64 CPU with AVX-512, eager fp32, 2 threads; attention over N = 197 to 1764 tokens, 6 and 12
heads of 64, r = N/8 to N/2; linears of ViT-B and DINOv2-S widths). Another device has other
constants: :func:`evtrace.calibrate` measures them in a few seconds, :meth:`CostProfile.save`
keeps them, and ``transform(..., cost_profile=...)`` applies them. The choices only move work
between exact paths: a profile changes speed and the FLOP count, never the outputs beyond float
rounding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

_VERSION = 1


@dataclass(frozen=True)
class CostProfile:
    """Constants of the runtime's static cost choices for one device.

    Attributes:
        delta_overhead_macs: the fixed work of one exact delta-attention update (about 40 small
            ops whatever the sizes), in multiply-adds of fused attention on the same device.
        delta_mac_cost: what one multiply-add of the delta update (thin batched matmuls, the exp of
            the swapped logits) costs in fused-attention multiply-adds.
        key_chunk_rows: query rows per block of the eager key update (sized for the cache).
        min_packed_rows, max_packed_rows: a packed linear runs between these row counts, plain
            ``F.linear`` outside them.
        device: the device the constants were measured on, in words.
        source: how they were obtained.
    """

    delta_overhead_macs: int = 2**26
    delta_mac_cost: Fraction = Fraction(7, 5)
    key_chunk_rows: int = 256
    min_packed_rows: int = 16
    max_packed_rows: int = 1024
    device: str = "cpu"
    source: str = (
        "shipped default: fitted on a 2-core x86-64 CPU (AVX-512), eager fp32, 2 threads, "
        "attention over N = 197 .. 1764, linears of ViT-B and DINOv2-S widths"
    )

    def __post_init__(self):
        for name in ("delta_overhead_macs", "key_chunk_rows", "min_packed_rows", "max_packed_rows"):
            value = getattr(self, name)
            low = 0 if name == "delta_overhead_macs" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"CostProfile.{name} must be an int >= {low}, got {value!r}")
        if self.min_packed_rows > self.max_packed_rows:
            raise ValueError(
                f"CostProfile.min_packed_rows ({self.min_packed_rows}) is above max_packed_rows "
                f"({self.max_packed_rows})"
            )
        cost = self.delta_mac_cost
        if not isinstance(cost, Fraction):
            if isinstance(cost, bool) or not isinstance(cost, (int, float, str)):
                raise TypeError(f"CostProfile.delta_mac_cost must be a Fraction, got {type(cost).__name__}")
            try:
                cost = Fraction(cost).limit_denominator(1000)
            except (ValueError, ZeroDivisionError) as error:
                raise ValueError(f"CostProfile.delta_mac_cost: {error}") from None
            object.__setattr__(self, "delta_mac_cost", cost)
        if cost <= 0:
            raise ValueError(f"CostProfile.delta_mac_cost must be > 0, got {cost}")

    def to_dict(self) -> dict:
        """A JSON-ready dict (the Fraction as ``"num/den"``), with a format version."""
        data = asdict(self)
        data["delta_mac_cost"] = str(self.delta_mac_cost)
        return {"version": _VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict) -> CostProfile:
        """The profile of :meth:`to_dict`'s output; unknown or missing keys are errors."""
        if not isinstance(data, dict):
            raise TypeError(f"a cost profile is a dict, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", None)
        if version != _VERSION:
            raise ValueError(f"cost profile format version {version!r} is not {_VERSION}: calibrate again")
        fields = set(cls.__dataclass_fields__)
        unknown, missing = set(data) - fields, fields - set(data)
        if unknown or missing:
            raise ValueError(
                f"cost profile keys do not match: unknown {sorted(unknown)}, missing {sorted(missing)}"
            )
        data["delta_mac_cost"] = Fraction(data["delta_mac_cost"])
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostProfile:
        """Read a profile written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not a cost profile (invalid JSON: {error})") from None
        return cls.from_dict(data)


DEFAULT_PROFILE = CostProfile()


def as_profile(value) -> CostProfile:
    """``None`` (the default profile), a :class:`CostProfile`, or the path of a saved one."""
    if value is None:
        return DEFAULT_PROFILE
    if isinstance(value, CostProfile):
        return value
    if isinstance(value, (str, Path)):
        return CostProfile.load(value)
    raise TypeError(
        f"cost_profile must be a CostProfile, the path of a saved one, or None, got {type(value).__name__}"
    )


def apply_cost_profile(root, profile: CostProfile) -> int:
    """Give ``profile`` to every module under ``root`` (an ``nn.Module``) that takes one (its
    ``take_cost_profile`` method: exact delta attention, packed linear kernels); returns how many."""
    count = 0
    for module in root.modules():
        take = getattr(module, "take_cost_profile", None)
        if callable(take):
            take(profile)
            count += 1
    return count
