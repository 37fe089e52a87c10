"""passes.pipeline: the declared order, the runner's checks and timings, the cleanup."""

import dataclasses

import pytest
import torch
from torch import nn

import evtrace
import evtrace.graph.errors
from evtrace.graph.meta import OP, SPACES, TOKENS, Role, RoleRecord, set_role, token_layout
from evtrace.graph.tracer import trace
from passes.cleanup import Cleanup
from passes.context import PassContext, PassOptions
from passes.pipeline import ANALYSIS, PIPELINE, PipelineError, check_order, run_passes, settle
from tests.passes_models import WIDTH, Attention, PatchTokens, TokenMLP, image


class Block(nn.Module):
    """One attention block on tokens (explicit softmax attention, residual)."""

    def __init__(self, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.scale = (WIDTH // heads) ** -0.5

    def forward(self, t):
        b, n, c = t.shape
        qkv = self.qkv(t).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return t + self.proj(y.transpose(1, 2).reshape(b, n, c))


class TwoSites(nn.Module):
    """Patch tokens and two attention blocks: two sites."""

    def __init__(self):
        super().__init__()
        self.embed = PatchTokens()
        self.first = Block()
        self.second = Block()

    def forward(self, x):
        return self.second(self.first(self.embed(x)))


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
    assert list(report.passes) == NAMES[:6]


def test_each_pass_reports_what_it_did_on_the_analysis_line():
    torch.manual_seed(0)
    model, x = Attention().eval(), image()
    passes = evtrace.transform(model, x, policy=evtrace.TopK(4)).report().passes
    assert list(passes) == NAMES
    # one token space; one attention site; two regions (qkv, proj) both gated; the site delta-updated
    assert passes["token_flow"] == "1 token spaces"
    assert passes["time_steps"] == "no per-step sub-model"
    assert passes["attention_sites"] == "1 sites"
    assert passes["regions"] == "2 regions"
    assert passes["plan"] == "2 regions gated, 0 regions dense, 1 sites delta-updated, 0 sites dense"
    assert passes["sparse_regions"] == "2 regions rewritten"
    assert passes["delta_attention"] == "1 sites rewritten"
    assert passes["pack_linears"] == "2 sparse linear calls packed"
    line = next(
        x
        for x in str(evtrace.transform(model, x, policy=evtrace.TopK(4)).report()).splitlines()
        if x.startswith("analysis: ")
    )
    assert "delta_attention: 1 sites rewritten" in line
    off = evtrace.transform(model, x, policy=evtrace.TopK(4), pack_weights=False).report().passes
    assert off["pack_linears"] == "off"


class Sneaky:
    """Reads token layouts and writes roles without declaring either."""

    name = "sneaky"
    reads = frozenset({OP})
    writes = frozenset()

    def __init__(self, write: bool = False):
        self.write = write

    def run(self, gm, ctx):
        for node in gm.graph.nodes:
            if self.write:
                set_role(node, RoleRecord(Role.UNKNOWN))
            else:
                token_layout(node)


def _traced(model):
    return PassContext(trace(model, (image(),)))


def test_an_undeclared_read_or_write_of_node_metadata_fails_the_run():
    model = TokenMLP().eval()
    with pytest.raises(PipelineError, match=r"pass 'sneaky' reads \['evtrace.tokens'\] without declaring it"):
        run_passes(_traced(model), (*ANALYSIS[:2], Sneaky()))
    with pytest.raises(PipelineError, match=r"pass 'sneaky' writes \['evtrace.role'\] without declaring it"):
        run_passes(_traced(model), (*ANALYSIS[:2], Sneaky(write=True)))
    declared = Sneaky()
    declared.reads = frozenset({OP, TOKENS})
    run_passes(_traced(model), (*ANALYSIS[:2], declared))  # declared: runs


def test_every_pass_declares_the_metadata_it_touches_on_real_models():
    # the runner checks it; these build every pass of the pipeline on three graph shapes
    for model, frontend in ((TokenMLP(), "fx"), (Attention(), "fx"), (Attention(fused=True), "export")):
        evtrace.transform(model.eval(), image(), policy=evtrace.TopK(4), frontend=frontend)


def test_pass_options_are_fields_of_the_pass():
    options = PassOptions(repair_rows=3, attention=evtrace.AttentionMode.PAPER, keep_dense=(("a", "b"),))
    planning = next(p for p in PIPELINE if p.name == "plan").configured(options)
    assert (planning.repair_rows, planning.mode, planning.keep_dense) == (3, options.attention, (("a", "b"),))
    delta = next(p for p in PIPELINE if p.name == "delta_attention").configured(options)
    assert delta.repair_rows == 3
    assert (
        next(p for p in PIPELINE if p.name == "pack_linears")
        .configured(PassOptions(pack_linears=False))
        .enabled
        is False
    )


def test_delta_attention_joins_sites_to_the_plan_by_name(monkeypatch):
    """With the plan's sites in the other order, each site still gets its own plan entry: the one
    kept dense stays dense, the other is rewritten."""
    import passes.plan as plan_pass

    real = plan_pass.build_plan

    def reversed_sites(*args, **kwargs):
        plan = real(*args, **kwargs)
        return dataclasses.replace(plan, sites=plan.sites[::-1])

    monkeypatch.setattr(plan_pass, "build_plan", reversed_sites)
    torch.manual_seed(0)
    model = TwoSites().eval()
    names = [s.name for s in evtrace.inspect(model, image()).sites]
    assert len(names) == 2
    gm = trace(model, (image(),))
    keep = ((names[0], "kept dense: by the test"),)
    ctx = run_passes(PassContext(gm, PassOptions(policy=evtrace.TopK(4), keep_dense=keep)), PIPELINE)
    (module,) = [m for m in ctx.gm.modules() if hasattr(m, "site_name")]
    assert module.site_name == names[1]
    assert ctx.results["delta_attention"].rewrote == (names[1],)


def test_settle_puts_nodes_in_order_in_place_and_finds_cycles():
    gm = torch.fx.symbolic_trace(TokenMLP().eval())
    nodes = list(gm.graph.nodes)
    output = nodes[-1]
    first_op = next(n for n in nodes if n.op == "call_module")
    output.prepend(first_op)  # now after its users: out of order
    with pytest.raises(RuntimeError, match="used before it has been defined"):
        gm.graph.lint()
    settle(gm)
    assert set(gm.graph.nodes) == set(nodes)  # the same Node objects: records keep them
    x = image()
    assert torch.equal(gm(x), TokenMLP.__call__(gm, x))
    a, b = [n for n in gm.graph.nodes if n.op == "call_module"][:2]
    a.args = (b,)  # a reads b, which reads a
    with pytest.raises(PipelineError, match="the rewritten graph has a cycle through"):
        settle(gm)


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
