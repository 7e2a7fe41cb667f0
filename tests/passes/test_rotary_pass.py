"""The rotary pass: apply_rotary_pos_emb's aten ops -> one detcompile.rotary_embedding per layer (q and k),
bitwise the same results; non-matching variants left alone; symbolic sizes. Tiny models:
test_fusion_models.py."""
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from detcompile.passes.rotary import rotary_pass

from ._util import aten_graph, run_pass, targets

aten = torch.ops.aten
ROTARY = torch.ops.detcompile.rotary_embedding.default


def _inputs(gen, dtype=torch.float32, B=2, T=5, H=4, Hk=2, D=16, cos_batch=1):
    q = torch.randn(B, T, H, D, generator=gen).to(dtype).transpose(1, 2)
    k = torch.randn(B, T, Hk, D, generator=gen).to(dtype).transpose(1, 2)
    cos = torch.randn(cos_batch, 1, T, D, generator=gen).to(dtype)
    sin = torch.randn(cos_batch, 1, T, D, generator=gen).to(dtype)
    return q, k, cos, sin


def _calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == ROTARY]


def _check_rewritten(fn, inputs, rewrites, calls):
    gm = aten_graph(fn, *inputs)
    report = run_pass(gm, rotary_pass)
    assert [r.new for r in report.rewrites] == ["detcompile.rotary_embedding.default"] * rewrites
    assert len(_calls(gm)) == calls
    assert aten.neg.default not in targets(gm)
    outs, refs = gm(*inputs), fn(*inputs)
    as_list = lambda t: list(t) if isinstance(t, (tuple, list)) else [t]  # noqa: E731
    for out, ref in zip(as_list(outs), as_list(refs)):
        assert torch.equal(out, ref) and out.stride() == ref.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cos_batch", [1, 2])
def test_hf_apply_rotary_pos_emb_is_one_call(dtype, cos_batch, gen):
    # cos/sin [B, T, D] unsqueezed on dim 1 by apply_rotary_pos_emb, as the models call it.
    q, k, cos, sin = _inputs(gen, dtype, cos_batch=cos_batch)
    _check_rewritten(lambda q, k, c, s: apply_rotary_pos_emb(q, k, c, s), (q, k, cos[:, 0], sin[:, 0]), 2, 1)


@pytest.mark.parametrize("form", [
    lambda x, c, s: c * x + s * rotate_half(x),
    lambda x, c, s: rotate_half(x) * s + x * c,
    lambda x, c, s: s * rotate_half(x) + c * x,
])
def test_operand_orders(form, gen):
    q, _, cos, sin = _inputs(gen)
    _check_rewritten(form, (q, cos, sin), 1, 1)


def test_ranks_and_partial_rotary(gen):
    q, _, cos, sin = _inputs(gen, D=32)
    # x [H, T, D] with cos [T, D]; the rotated slice of a partial rotary (GPT-NeoX rotary_pct).
    _check_rewritten(lambda x, c, s: x * c + rotate_half(x) * s, (q[0], cos[0, 0], sin[0, 0]), 1, 1)

    def partial(x, c, s):
        rot, rest = x[..., :16], x[..., 16:]
        return torch.cat([rot * c + rotate_half(rot) * s, rest], dim=-1)

    _check_rewritten(partial, (q, cos[..., :16], sin[..., :16]), 1, 1)


def _interleaved(x):  # GPT-J / Cohere: rotate_every_two
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


@pytest.mark.parametrize("name, fn, make", [
    ("cos of another dtype (promotion)", lambda x, c, s: x * c + rotate_half(x) * s,
     lambda q, c, s: (q.bfloat16(), c, s)),
    ("interleaved (GPT-J)", lambda x, c, s: x * c + _interleaved(x) * s, None),
    ("halves on dim -2", lambda x, c, s: x * c + torch.cat((-x[:, :, 2:], x[:, :, :2]), -2) * s, None),
    ("uneven halves", lambda x, c, s: x * c + torch.cat((-x[..., 4:], x[..., :4]), -1)[..., :16] * s, None),
    ("negated first half", lambda x, c, s: x * c + torch.cat((x[..., 8:], -x[..., :8]), -1) * s, None),
    ("two different x", lambda x, c, s: x * c + rotate_half(x + 1) * s, None),
    ("product used twice", lambda x, c, s: (lambda p: (p + rotate_half(x) * s, p))(x * c), None),
    ("x broadcast by cos", lambda x, c, s: x[:1, :1] * c + rotate_half(x[:1, :1]) * s,
     lambda q, c, s: (q, c.expand(2, 4, 5, 16).contiguous(), s.expand(2, 4, 5, 16).contiguous())),
    ("alpha", lambda x, c, s: torch.add(x * c, rotate_half(x) * s, alpha=2), None),
])
def test_non_matching_left_alone(name, fn, make, gen):
    q, _, cos, sin = _inputs(gen)
    inputs = make(q, cos, sin) if make else (q, cos, sin)
    gm = aten_graph(fn, *inputs)
    before = targets(gm)
    report = run_pass(gm, rotary_pass)
    assert not report.rewrites and targets(gm) == before, name


def test_dynamic_token_dim_through_the_backend(gen):
    # Symbolic batch and token sizes (the engine's dynamic=True compile); head dim static, as in models.
    def attn(x, cos, sin):
        B, T, _ = x.shape
        q = x.view(B, T, 4, 16).transpose(1, 2)
        k = x[..., :32].reshape(B, T, 2, 16).transpose(1, 2)
        return apply_rotary_pos_emb(q, k, cos, sin)

    reports = []
    torch._dynamo.reset()
    compiled = torch.compile(attn, backend="deterministic", dynamic=True,
                             options={"strict": True, "report_sink": reports.append})
    for B, T in ((2, 5), (3, 9)):
        x = torch.randn(B, T, 64, generator=gen).bfloat16()
        cos, sin = (torch.randn(1, T, 16, generator=gen).bfloat16() for _ in range(2))
        for out, ref in zip(compiled(x, cos, sin), attn(x, cos, sin)):
            assert torch.equal(out, ref)
    rewrites = [r for rep in reports for r in rep.rewrites if r.pass_name == "rotary"]
    assert len(reports) == 1 and len(rewrites) == 2


def test_rotary_of_a_rotary(gen):
    # The second rotation's x is the first's output: both fused, the first computed once.
    q, _, cos, sin = _inputs(gen)

    def twice(x, c, s):
        y = x * c + rotate_half(x) * s
        return y * s + rotate_half(y) * c

    gm = aten_graph(twice, q, cos, sin)
    assert len(run_pass(gm, rotary_pass).rewrites) == 2
    assert aten.neg.default not in targets(gm) and len(_calls(gm)) == 2
    assert torch.equal(gm(q, cos, sin), twice(q, cos, sin))
