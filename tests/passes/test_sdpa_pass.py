import torch
import torch.nn.functional as F

from detcompile.passes import PassContext, Report
from detcompile.passes.sdpa import sdpa_pass


def _dynamo_graph(fn, *inputs):
    """The Dynamo (torch-level) graph of fn, as the backend receives it."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(*inputs)
    return graphs[0]


def _calls(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_sdpa_replaced_with_arguments_kept(gen):
    q = torch.randn(2, 4, 6, 8, generator=gen)
    k = torch.randn(2, 2, 6, 8, generator=gen)
    v = torch.randn(2, 2, 6, 8, generator=gen)
    mask = torch.rand(2, 1, 6, 6, generator=gen) > 0.3
    mask[..., 0] = True

    def fn(q, k, v, mask):
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
        b = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return a, b

    gm = _dynamo_graph(fn, q, k, v, mask)
    assert F.scaled_dot_product_attention in _calls(gm) or torch._C._nn.scaled_dot_product_attention in _calls(gm)
    report = Report()
    sdpa_pass(gm, PassContext(None, report))
    gm.recompile()
    calls = _calls(gm)
    assert calls.count(torch.ops.detcompile.attention.default) == 2
    assert F.scaled_dot_product_attention not in calls and torch._C._nn.scaled_dot_product_attention not in calls
    assert len(report.rewrites) == 2
    for o, r in zip(gm(q, k, v, mask), fn(q, k, v, mask)):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_sdpa_with_dropout_is_left_and_reported(gen):
    q = torch.randn(1, 2, 4, 8, generator=gen)
    gm = _dynamo_graph(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5), q)
    report = Report()
    sdpa_pass(gm, PassContext(None, report))
    assert not report.rewrites and len(report.leftovers) == 1
    assert "dropout" in report.leftovers[0].reason


def test_single_kv_head_broadcast_becomes_gqa(gen):
    # Falcon calls SDPA with one K/V head for all query heads; torch broadcasts it.
    q = torch.randn(2, 4, 6, 8, generator=gen)
    kv = torch.randn(2, 1, 6, 8, generator=gen)
    fn = lambda q, kv: F.scaled_dot_product_attention(q, kv, kv, is_causal=True)  # noqa: E731
    gm = _dynamo_graph(fn, q, kv)
    sdpa_pass(gm, PassContext(None, Report()))
    gm.recompile()
    (node,) = [n for n in gm.graph.nodes if n.target == torch.ops.detcompile.attention.default]
    assert node.kwargs["enable_gqa"] is True
    out = gm(q, kv)
    out = out[0] if isinstance(out, tuple) else out  # Dynamo graphs return a tuple
    torch.testing.assert_close(out, fn(q, kv), rtol=1e-5, atol=1e-5)
