"""passes.pipeline: the declared order, the runner's checks and timings, the cleanup."""

import pytest
import torch

import evtrace
import evtrace.graph.errors
from evtrace.graph.meta import PLAN, SPACES
from passes.cleanup import Cleanup
from passes.context import PassContext
from passes.pipeline import ANALYSIS, PIPELINE, PipelineError, check_order, run_passes
from tests.passes_models import Attention, TokenMLP, image

NAMES = [
    "canonicalize",
    "token_flow",
    "time_steps",
    "attention_sites",
    "regions",
    "plan",
    "fold_shapes",
    "sparse_regions",
    "delta_attention",
    "pack_linears",
    "cleanup",
]


def test_every_pass_is_declared_in_order():
    assert [p.name for p in PIPELINE] == NAMES
    assert ANALYSIS == PIPELINE[:6] and ANALYSIS[-1].name == "plan"
    check_order(PIPELINE)
    for p in PIPELINE:
        assert isinstance(p.reads, frozenset) and isinstance(p.writes, frozenset)


def test_a_pass_before_what_it_reads_is_refused():
    reordered = (PIPELINE[0], PIPELINE[4], PIPELINE[1])  # regions before token_flow
    with pytest.raises(
        PipelineError,
        match=r"pass 'regions' reads \['evtrace.attention', 'evtrace.role', "
        r"'evtrace.tokens'\], which no earlier pass writes",
    ):
        check_order(reordered)


class Forgetful:
    name = "forgetful"
    reads = frozenset()
    writes = frozenset({SPACES})

    def run(self, gm, ctx):
        pass


def test_a_pass_that_does_not_write_its_record_is_caught():
    gm = torch.fx.symbolic_trace(TokenMLP().eval())
    with pytest.raises(PipelineError, match="pass 'forgetful' declares the records"):
        run_passes(PassContext(gm), (Forgetful(),))


def test_the_runner_times_every_pass_and_inspect_runs_the_analysis_prefix():
    model, x = TokenMLP().eval(), image()
    emodel = evtrace.transform(model, x, policy=evtrace.TopK(4))
    assert list(emodel.report().seconds) == ["trace"] + NAMES
    report = evtrace.inspect(model, x)
    assert list(report.seconds) == ["trace"] + NAMES[:6]
    assert "analysis time: trace" in str(report)
    assert PLAN not in (p.name for p in PIPELINE)


def test_cleanup_hands_out_copies_of_the_outputs():
    gm = torch.fx.symbolic_trace(TokenMLP().eval())
    Cleanup().run(gm, PassContext(gm))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert output.args[0].op == "call_method" and output.args[0].target == "clone"


def test_a_region_whose_rewrite_fails_stays_dense_and_the_model_stays_exact(monkeypatch):
    import passes.sparse_regions as sparse_regions

    real = sparse_regions.rewrite_region

    def fail_on_the_mlp(gm, region, *args):
        if region.name == "fc1..fc2":
            raise RuntimeError("a construct this pass cannot rewrite")
        return real(gm, region, *args)

    monkeypatch.setattr(sparse_regions, "rewrite_region", fail_on_the_mlp)
    model, x = TokenMLP().eval(), image()
    with pytest.warns(evtrace.graph.errors.LowSavingsWarning, match="no token-wise region is gated"):
        emodel = evtrace.transform(model, x, policy=evtrace.TopK(4))
    (region,) = emodel.report().regions
    assert not region.gated
    assert (
        region.reason == "kept dense: its rewrite failed (RuntimeError: a construct this pass cannot rewrite)"
    )
    with torch.no_grad():
        for seed in (1, 2):
            frame = image(seed)
            assert torch.equal(emodel(frame), model(frame))


def test_replaced_attention_leaves_no_dead_op_behind():
    torch.manual_seed(0)
    model = Attention(fused=True).eval()
    emodel = evtrace.transform(model, image(), policy=evtrace.TopK(4), frontend="export")
    called = [str(n.target) for n in emodel.graph_module.graph.nodes if n.op == "call_function"]
    assert not [c for c in called if "scaled_dot_product_attention" in c], called
    assert list(emodel.attention_modules())
