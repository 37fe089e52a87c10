"""evtrace.advice: transform warns, once and with its reasons, when the rewrite saves little."""

import warnings

import pytest
from torch import nn

import evtrace
from evtrace.advice import savings, top_reasons
from evtrace.graph.errors import LowSavingsWarning
from tests.passes_models import WIDTH, Attention, NoLinear, PatchTokens, TokenMLP, image


def transform_warnings(model, policy):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emodel = evtrace.transform(model.eval(), image(), policy=policy)
    return emodel, [str(w.message) for w in caught if issubclass(w.category, LowSavingsWarning)]


def test_no_warning_when_the_rewrite_pays():
    emodel, found = transform_warnings(Attention(), evtrace.TopK(4))
    assert found == []
    assert savings(emodel.plan, evtrace.TopK(4)) > 1.2


def test_a_model_with_nothing_to_gate_warns_with_the_reason():
    _, found = transform_warnings(NoLinear(), evtrace.TopK(4))
    assert len(found) == 1
    assert "no token-wise region is gated" in found[0]
    assert "region: no linear inside: gating would cost more than it saves" in found[0]


def test_attention_sites_that_all_stay_dense_are_named():
    emodel, found = transform_warnings(Attention(q_from_input=True), evtrace.TopK(4))
    assert len(found) == 1 and "none of its 1 attention sites is delta-updated" in found[0]
    assert "attention: q, k or v is not produced by a gated region" in top_reasons(emodel.plan)


def test_a_budget_that_saves_little_warns_but_all_does_not():
    _, found = transform_warnings(TokenMLP(), evtrace.TopK(15))  # 15 of 16 tokens
    assert len(found) == 1 and "fewer steady-state FLOPs at TopK(r=15) (under 1.2x)" in found[0]
    _, found = transform_warnings(TokenMLP(), evtrace.All())
    assert found == []
    with pytest.warns(LowSavingsWarning):
        evtrace.transform(TokenMLP().eval(), image(), policy=16)


def test_attention_dense_when_asked_for_is_not_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emodel = evtrace.transform(Attention().eval(), image(), policy=evtrace.TopK(4), attention="dense")
    assert not [w for w in caught if issubclass(w.category, LowSavingsWarning)]
    assert emodel.plan.attention == evtrace.AttentionMode.DENSE


class _Block(nn.Module):
    """An attention block on tokens; ``scaled_late`` multiplies the logits by a scale computed from
    the traced shape, which the rewrite does not understand: that site stays dense."""

    def __init__(self, scaled_late: bool):
        super().__init__()
        self.scaled_late = scaled_late
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, t):
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        if self.scaled_late:
            logits = (q @ k.transpose(-2, -1)) * (c // 2) ** -0.5
        else:
            logits = (q * (WIDTH // 2) ** -0.5) @ k.transpose(-2, -1)
        y = logits.softmax(dim=-1) @ v
        return t + self.proj(y.transpose(1, 2).reshape(b, n, c))


class _Sites(nn.Module):
    def __init__(self, delta: int, total: int = 4):
        super().__init__()
        self.embed = PatchTokens()
        self.blocks = nn.Sequential(*[_Block(scaled_late=i >= delta) for i in range(total)])

    def forward(self, x):
        return self.blocks(self.embed(x))


class _Head(nn.Module):
    """A wide token MLP (two gated linears) and a head of ``head`` small linears on the pooled
    features (linears that do not act on tokens)."""

    def __init__(self, head: int):
        super().__init__()
        self.embed = PatchTokens()
        self.fc1 = nn.Linear(WIDTH, 16 * WIDTH)
        self.fc2 = nn.Linear(16 * WIDTH, WIDTH)
        self.head = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(head)])

    def forward(self, x):
        t = self.embed(x)
        t = t + self.fc2(self.fc1(t).relu())
        return self.head(t.mean(1))


def test_fewer_than_half_of_the_sites_delta_updated_warns_whatever_the_ratio():
    emodel, found = transform_warnings(_Sites(delta=1), evtrace.TopK(4))
    assert savings(emodel.plan, evtrace.TopK(4)) > 1.2  # the FLOPs alone would not warn
    assert len(found) == 1
    assert "saves little: only 1 of its 4 attention sites are delta-updated" in found[0]
    assert "attention: logits are multiplied by a tensor at" in found[0]
    _, found = transform_warnings(_Sites(delta=2), evtrace.TopK(4))  # half: no warning
    assert found == []


def test_fewer_than_half_of_the_linears_gated_warns_whatever_the_ratio():
    emodel, found = transform_warnings(_Head(head=3), evtrace.TopK(4))
    assert savings(emodel.plan, evtrace.TopK(4)) > 1.2
    assert len(found) == 1
    assert "saves little: only 2 of its 5 linears are gated" in found[0]
    assert "linear: does not act on tokens" in found[0]
    _, found = transform_warnings(_Head(head=2), evtrace.TopK(4))  # 2 of 4: no warning
    assert found == []
