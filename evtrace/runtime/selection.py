"""More token selection policies: a random baseline, and budget-keeping variants of the default.

Everything here builds on the :class:`~evtrace.runtime.policies.Policy` API (``select``,
``start_frame``, ``reset_state``) and changes nothing in it.

==========================  ==============================================================
policy                      what it selects
==========================  ==============================================================
``RandomTokens(r, seed)``   r tokens per row drawn uniformly at random (forced tokens
                            first): the baseline that shows what choosing by error is worth
``BudgetedThreshold``       the default's steered relative threshold, with the budget kept
                            over the whole stream: dense frames (scene cuts, refreshes,
                            keyframes) are charged to it, and a per-frame cap spends no more
                            than the tokens the stream still has in hand
``Keyframes(p, k)``         every k-th frame every token (a dense refresh through the
                            sparse path), ``p`` in between
==========================  ==============================================================
"""

from __future__ import annotations

import math
import numbers

import torch

from evtrace.runtime.policies import (
    Policy,
    Selection,
    StatefulPolicy,
    SteeredThreshold,
    _bucketed,
    _check_inputs,
    _check_int,
    _rows_mask,
    as_policy,
    forced_scores,
    relative_error,
)

__all__ = ["RandomTokens", "BudgetedThreshold", "Keyframes", "AttentionWeighted"]


class RandomTokens(Policy):
    """``r`` tokens per batch row, drawn uniformly at random without replacement; forced tokens
    (class, registers) always, and counted in ``r``. Static shapes.

    The draws come from a private generator seeded with ``seed`` (on the CPU, so that a run is
    the same on any device): per call, the scores ``torch.rand(B, N, generator=g)`` and the
    top ``r`` of them (forced tokens raised to +inf). :meth:`reseed` restarts the sequence.
    A baseline, not a policy to deploy: it ignores the error.
    """

    def __init__(self, r: int, seed: int = 0):
        self.r = _check_int("r", r, 1)
        self.seed = _check_int("seed", seed, 0)
        self._gen = torch.Generator().manual_seed(self.seed)

    def reseed(self) -> None:
        """Start the sequence of draws again from ``seed``."""
        self._gen = torch.Generator().manual_seed(self.seed)

    def select(self, error, reference_norm=None, forced=None) -> Selection:
        _check_inputs(error, reference_norm, forced, need_reference=False)
        b, n = error.shape
        if self.r > n:
            raise ValueError(f"RandomTokens: r must be in [1, N] = [1, {n}], got r={self.r} for N={n} tokens")
        score = torch.rand(b, n, generator=self._gen).to(error.device)
        _, index = torch.topk(forced_scores(score, forced), self.r, dim=1, sorted=False)
        return Selection(index, None)

    def tokens_per_frame(self, n: int) -> int:
        return self.r

    def __deepcopy__(self, memo):
        return RandomTokens(self.r, self.seed)

    def __getstate__(self):
        return {"r": self.r, "seed": self.seed}

    def __setstate__(self, state):
        self.__init__(state["r"], state["seed"])

    def __repr__(self) -> str:
        return f"RandomTokens(r={self.r}, seed={self.seed})"


class BudgetedThreshold(SteeredThreshold):
    """The default's steered relative threshold, with the average kept over the whole stream.

    ``SteeredThreshold`` only nudges tau after each frame, so on fast video its spend lags above
    the target for tens of frames, and the dense frames (scene cuts, ``refresh_every``,
    :class:`Keyframes`) are not counted at all. This policy keeps, per stream, a *bank*: the
    tokens (as fractions of the gates' tokens, summed over frames) the stream has spent under
    ``target`` so far, a dense frame counting 1; it is clamped to +-``bank`` frames of the target.
    Each gate of a frame then updates the tokens above tau, as ``SteeredThreshold``, but at most
    ``allowance = target + gain * bank`` of its tokens (within [low, peak]): a stream that has
    overspent pays back on its next frames, one that has saved may spend above the target. tau
    is steered as in ``SteeredThreshold``, so on quiet video the bank fills and spikes are free.

    Args: as :class:`~evtrace.runtime.policies.SteeredThreshold`, plus
        gain: the fraction of the bank spent per frame, in (0, 1].
        bank: the bank is clamped to +-``bank`` frames of the target (>= 0).
    """

    def __init__(
        self,
        target: float,
        tau: float = 0.12,
        peak=None,
        low=None,
        rate: float = 0.05,
        buckets=None,
        gain: float = 0.3,
        bank: float = 8.0,
    ):
        super().__init__(target, tau=tau, peak=peak, low=low, rate=rate, buckets=buckets)
        if isinstance(gain, bool) or not isinstance(gain, numbers.Real) or not 0.0 < float(gain) <= 1.0:
            raise ValueError(f"gain must be a real number in (0, 1], got {gain!r}")
        if isinstance(bank, bool) or not isinstance(bank, numbers.Real) or not 0.0 <= float(bank) < math.inf:
            raise ValueError(f"bank must be a finite real number >= 0, got {bank!r}")
        self.gain, self.bank = float(gain), float(bank)

    def _controller(self, b: int, device) -> dict:
        state = super()._controller(b, device)
        if "bank" not in state:
            state["bank"] = torch.zeros(b, dtype=torch.float64, device=device)
            state["dense"] = torch.zeros(b, dtype=torch.bool, device=device)
        return state

    _CONTROLLER = SteeredThreshold._CONTROLLER | {
        "bank": (("b",), torch.float64, False),
        "dense": (("b",), torch.bool, False),
    }

    def _extra_state(self) -> dict:
        # the allowance is derived: recomputed from the bank at each frame's first gate
        streams = {
            b: {k: v.detach().clone() for k, v in c.items() if k != "allowance"}
            for b, c in self._streams.items()
        }
        return {"streams": streams}

    def start_frame(self) -> None:
        cap = self.bank * self.target
        for state in self._streams.values():
            if "bank" not in state:
                continue
            offered = state["offered"]
            zero = torch.zeros_like(offered)
            step = torch.where(offered > 0, self.target - state["spent"] / offered.clamp_min(1.0), zero)
            step = step + torch.where(state["dense"], zero + (self.target - 1.0), zero)
            state["bank"] = (state["bank"] + step).clamp(-cap, cap)
            state["dense"] = torch.zeros_like(state["dense"])
            state["allowance"] = {}  # per gate size, computed once a frame
        super().start_frame()

    def reset_state(self, streams=None, batch=None, cut: bool = False) -> None:
        if cut:  # a dense frame of the same stream comes next: charged at its start_frame
            for b, state in self._streams.items():
                if "bank" not in state:
                    continue
                if streams is None:
                    hit = torch.ones(b, dtype=torch.bool, device=state["bank"].device)
                else:
                    per = max(1, b // max(1, batch or b))
                    rows = [r for s in streams for r in range(s * per, (s + 1) * per) if r < b]
                    hit = _rows_mask(b, rows, state["bank"].device)
                state["dense"] = state["dense"] | hit
        super().reset_state(streams, batch, cut)
        if not cut and streams is not None:
            for b, state in self._streams.items():
                if "bank" not in state:
                    continue
                per = max(1, b // max(1, batch or b))
                rows = [r for s in streams for r in range(s * per, (s + 1) * per) if r < b]
                if rows:
                    hit = _rows_mask(b, rows, state["bank"].device)
                    state["bank"] = state["bank"].masked_fill(hit, 0.0)
                    state["dense"] = state["dense"] & ~hit

    def select(self, error, reference_norm=None, forced=None) -> Selection:
        _check_inputs(error, reference_norm, forced, need_reference=True)
        b, n = error.shape
        self._slot(b, n, error.device)
        controller = self._controller(b, error.device)
        score = forced_scores(relative_error(error, reference_norm), forced)
        tau = controller["log_tau"].exp().to(score.dtype)
        low, peak = self._low_peak(n)
        kept = controller.setdefault("allowance", {})
        allowance = kept.get(n)
        if allowance is None:
            allowance = ((self.target + self.gain * controller["bank"]) * n).round().long().clamp(low, peak)
            kept[n] = allowance
        r = (score > tau[:, None]).sum(dim=1).clamp(low, peak)
        r = _bucketed(torch.minimum(r, allowance), low, peak, self.buckets)
        width = int(r.max()) if b else 0  # host sync
        _values, index = torch.topk(score, width, dim=1, largest=True, sorted=True)
        mask = None
        if b > 1 and bool((r < width).any()):
            mask = torch.arange(width, device=r.device)[None, :] < r[:, None]
        controller["spent"] = controller["spent"] + r.double()
        controller["offered"] = controller["offered"] + float(n)
        return Selection(index, mask)

    def __repr__(self) -> str:
        return super().__repr__()[:-1].replace("SteeredThreshold", "BudgetedThreshold", 1) + (
            f", gain={self.gain:g}, bank={self.bank:g})"
        )


class _Wrapper(StatefulPolicy):
    """A stateful policy around another (``self.policy``): it takes the wrapped policy's
    relative/data-dependent nature and token counts, and passes frames and resets on to it."""

    policy: Policy

    @property
    def relative(self) -> bool:
        return getattr(self.policy, "relative", False)

    @property
    def data_dependent(self) -> bool:
        return self.policy.data_dependent

    def start_frame(self) -> None:
        super().start_frame()
        if isinstance(self.policy, StatefulPolicy):
            self.policy.start_frame()

    def reset_state(self, streams=None, batch=None, cut: bool = False) -> None:
        super().reset_state(streams, batch, cut)
        if isinstance(self.policy, StatefulPolicy):
            self.policy.reset_state(streams, batch, cut)

    def _new_state(self, b, n, device) -> dict:
        return {}

    def _restart(self, state, rows) -> None:
        pass

    def tokens_per_frame(self, n: int):
        return self.policy.tokens_per_frame(n)

    def mean_tokens_per_frame(self, n: int):
        return self.policy.mean_tokens_per_frame(n)

    def peak_tokens_per_frame(self, n: int):
        return self.policy.peak_tokens_per_frame(n)


class Keyframes(_Wrapper):
    """Every ``k``-th frame updates every token (a keyframe); ``policy`` picks in between.

    A keyframe is a dense refresh run through the sparse path (every token selected, so every
    reference and buffer is exact again) and is announced to the wrapped policy as a refresh
    (``reset_state(cut=True)``: :class:`BudgetedThreshold` charges it to its budget, so the
    frames in between spend less). Keyframes are counted on the batch's clock: ``k`` frames
    after the last reset or dense frame of the whole batch (a scene cut or ``refresh_every``
    restarts the count). Counts: the wrapped policy's average and peak, N on keyframes (the
    FLOP counter prices the wrapped policy; the harness measures the tokens really updated).
    """

    def __init__(self, policy, k: int):
        super().__init__()
        self.policy = as_policy(policy)
        self.k = _check_int("k", k, 2)
        self._since = -1  # the stream's first frame is dense: the first keyframe is k after it
        self._key = False

    def start_frame(self) -> None:
        StatefulPolicy.start_frame(self)  # the clock moves before the wrapped policy's frame starts
        self._since += 1
        self._key = self._since >= self.k
        if self._key:
            self._since = 0
            if isinstance(self.policy, StatefulPolicy):
                self.policy.reset_state(cut=True)
        if isinstance(self.policy, StatefulPolicy):
            self.policy.start_frame()

    def reset_state(self, streams=None, batch=None, cut: bool = False) -> None:
        super().reset_state(streams, batch, cut)
        if streams is None:
            self._since = -1  # the dense frame itself comes next: k frames after it

    def select(self, error, reference_norm=None, forced=None) -> Selection:
        _check_inputs(error, reference_norm, forced, need_reference=self.relative)
        b, n = error.shape
        self._slot(b, n, error.device)
        if self._key:
            return Selection(torch.arange(n, device=error.device).expand(b, n).contiguous(), None)
        return self.policy.select(error, reference_norm, forced)

    def _extra_state(self) -> dict:
        inner = self.policy.state_dict() if isinstance(self.policy, StatefulPolicy) else None
        return {"since": self._since, "key": self._key, "inner": inner}

    def _check_extra(self, state: dict) -> list[str]:
        problems = []
        since, key = state.get("since"), state.get("key")
        if isinstance(since, bool) or not isinstance(since, int) or not -1 <= since < self.k:
            problems.append(f"'since' must be an int in [-1, {self.k - 1}], got {since!r}")
        if not isinstance(key, bool):
            problems.append(f"'key' must be a bool, got {type(key).__name__}")
        inner = state.get("inner")
        if isinstance(self.policy, StatefulPolicy):
            problems += [f"inner {self.policy!r}: {p}" for p in self.policy.check_state_dict(inner)]
        elif inner is not None:
            problems.append(f"state for a stateful inner policy, this one wraps {self.policy!r}")
        return problems

    def _load_extra(self, state: dict, device) -> None:
        self._since, self._key = state["since"], state["key"]
        if isinstance(self.policy, StatefulPolicy):
            self.policy.load_state_dict(state["inner"], device)

    def __repr__(self) -> str:
        return f"Keyframes({self.policy!r}, k={self.k})"


class AttentionWeighted(_Wrapper):
    """A policy whose per-token error is weighted by the attention the token receives downstream.

    A token's error matters in proportion to how much the next attention reads it. After
    :meth:`attach`, a forward pre-hook on each attention module of the eventful model takes the
    q and k it is given (the buffered values the model keeps anyway) and computes, per batch
    row, the attention each key token receives from ``queries`` query rows (the first, i.e. the
    class token, and ``queries - 1`` evenly spaced others), averaged over heads and rows:
    ``a`` (B, N), summing to 1. The i-th gate of a frame (the region that computes the i-th
    attention's q, k, v) then hands ``policy`` the error ``e * (N a) ** gamma`` with ``a`` from
    the previous frame: tokens that are attended get picked first; gates after the last
    attention, and every gate before the first frame's attention has run, use ``e`` as is.
    The cost is ``queries x N x d`` multiply-adds per head and attention module.

    Args:
        policy: the wrapped policy (``SteeredThreshold``, ``TopK``, ...).
        gamma: the exponent of the weight (0: no weighting), >= 0.
        queries: query rows sampled per attention module, >= 1.
    """

    def __init__(self, policy, gamma: float = 0.5, queries: int = 16):
        super().__init__()
        self.policy = as_policy(policy)
        if (
            isinstance(gamma, bool)
            or not isinstance(gamma, numbers.Real)
            or not 0.0 <= float(gamma) < math.inf
        ):
            raise ValueError(f"gamma must be a finite real number >= 0, got {gamma!r}")
        self.gamma = float(gamma)
        self.queries = _check_int("queries", queries, 1)
        self._weights: list = []  # per attention module, this frame's (B, N) weight
        self._handles: list = []
        self._rows: dict = {}  # the sampled query rows, per token count and device

    def attach(self, emodel) -> AttentionWeighted:
        """Hook the attention modules of ``emodel`` (an EventfulModel, or any object with
        ``attention_modules()``, in graph order) and set this policy on every gate. Returns self."""
        self.detach()
        modules = list(emodel.attention_modules().values())
        if not modules:
            raise ValueError("AttentionWeighted: the model has no attention modules to read weights from")
        self._weights = [None] * len(modules)
        for i, module in enumerate(modules):
            self._handles.append(module.register_forward_pre_hook(self._hook(i)))
        emodel.set_policy(self)
        return self

    def state_dict(self) -> dict:
        raise ValueError(
            f"{self!r} weighs tokens by attention read through hooks on the live model: its state "
            "cannot go into a stream file. deepcopy and pickle of the eventful model keep it; for "
            "stream files use a policy without hooks"
        )

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, i: int):
        def hook(_module, args):
            q, k = args[0], args[1]  # (B, H, N, d)
            n = k.shape[2]
            rows = self._rows.get((n, q.device))
            if rows is None:
                rows = torch.linspace(0, n - 1, self.queries, device=q.device).round().long().unique()
                self._rows[n, q.device] = rows
            logits = torch.matmul(q.index_select(2, rows), k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
            received = logits.softmax(dim=-1).mean(dim=(1, 2))  # (B, N)
            self._weights[i] = (received * n).clamp_min(_WEIGHT_FLOOR).pow(self.gamma)

        return hook

    def select(self, error, reference_norm=None, forced=None) -> Selection:
        _check_inputs(error, reference_norm, forced, need_reference=self.relative)
        slot = self._cursor if self._hooked else 0
        self._slot(*error.shape, error.device)
        weight = self._weights[slot] if slot < len(self._weights) else None
        if weight is not None and weight.shape == error.shape and self.gamma:
            error = error * weight.to(error.dtype)
        return self.policy.select(error, reference_norm, forced)

    def __deepcopy__(self, memo):
        new = super().__deepcopy__(memo)
        new._weights, new._handles = [], []
        return new

    def __repr__(self) -> str:
        return f"AttentionWeighted({self.policy!r}, gamma={self.gamma:g}, queries={self.queries})"


_WEIGHT_FLOOR = 1e-3  # no token's weight reaches 0: an unattended token still updates when it changes a lot
