import pytest
import torch
from torch import nn

import evtrace
from evtrace.graph.meta import MODULE_PATH, TENSOR, frontend_of
from tests.models import small_vit


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_every_tensor_node_has_shape_and_module_paths(frontend):
    model, x = small_vit()
    gm = evtrace.trace(model, x, frontend=frontend)
    assert frontend_of(gm) == frontend
    linears = [
        n.meta[MODULE_PATH]
        for n in gm.graph.nodes
        if n.meta[MODULE_PATH].endswith(("qkv", "proj", "fc1", "fc2"))
    ]
    assert "blocks.1.attn.qkv" in linears and "blocks.0.mlp.fc2" in linears
    out = [n for n in gm.graph.nodes if n.op == "output"][0]
    producer = out.args[0] if not isinstance(out.args[0], (tuple, list)) else out.args[0][0]
    assert producer.meta[TENSOR].shape == (1, 10)
    torch.testing.assert_close(gm(x), model(x))


class ShapeDependent(nn.Module):
    def forward(self, x):
        if x.shape[-1] > 3:  # Python control flow on a shape: fx fails, export specialises it
            return x * 2
        return x


def test_auto_falls_back_to_export_when_fx_fails():
    model = nn.Sequential(nn.Linear(4, 4), ShapeDependent())
    gm = evtrace.trace(model, torch.randn(2, 4), frontend="auto")
    assert frontend_of(gm) == "export"


class Untraceable(nn.Module):
    def forward(self, x):
        n = int(x.abs().sum().item() * 0) + 3  # a data-dependent Python int used as a shape
        return x.reshape(-1)[: x.numel() - n].nonzero()


def test_untraceable_model_names_each_failure_and_the_workaround():
    with pytest.raises(evtrace.TraceError) as info:
        evtrace.trace(Untraceable(), torch.randn(2, 4))
    message = str(info.value)
    assert "could not trace Untraceable" in message
    assert "fx:" in message and "export:" in message
    assert "leaf_modules" in message and "concrete_args" in message


def test_leaf_modules_are_not_traced_into():
    model, x = small_vit()
    gm = evtrace.trace(model, x, frontend="fx", leaf_modules=["blocks.0.attn"])
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "blocks.0.attn" in targets and "blocks.0.attn.qkv" not in targets


def test_bad_arguments():
    model, x = small_vit()
    with pytest.raises(ValueError, match="frontend must be one of"):
        evtrace.trace(model, x, frontend="jit")
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        evtrace.trace(model, "image.png")


class OptionalArguments(torch.nn.Module):
    """timm's Attention signature at the top level: forward(x, attn_mask=None, is_causal=False)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x, attn_mask=None, is_causal=False):
        t = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).reshape(1, 16, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        y = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal
        )
        return t + y.transpose(1, 2).reshape(1, 16, 8)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_arguments_left_at_their_default_are_fixed_at_trace_time(frontend):
    model, x = OptionalArguments().eval(), torch.randn(1, 3, 16, 16)
    gm = evtrace.trace(model, x, frontend=frontend)
    sdpa = next(n for n in gm.graph.nodes if "scaled_dot_product_attention" in str(n.target))
    assert not any(isinstance(a, torch.fx.Node) for a in list(sdpa.args[3:]) + list(sdpa.kwargs.values()))
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    report = evtrace.inspect(model, x, frontend=frontend)
    assert [s.mode for s in report.sites] == ["exact"], [s.reason for s in report.sites]
