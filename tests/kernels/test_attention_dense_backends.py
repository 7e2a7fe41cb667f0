"""The compile backend's attention through FA3 / FlashInfer (kernels/attention_dense_backends.py).

CPU: the mask -> causal runs -> paged layout translation, checked with a reference "library" that
computes each ragged sequence in float64 from the pages (bottom-right causal, as FA3 and FlashInfer
align it): results match SDPA, and a row's result does not depend on padding or neighbours. The
option's plumbing (the SDPA rewrite passes the backend to the op; the CPU refuses it). GPU (marked,
skipped without the package): the real libraries, bitwise alone = padded batch = row-by-row decode."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detcompile.kernels import attention_dense_backends as dense
from detcompile.kernels._common import UnsupportedError

MIN = torch.finfo(torch.float32).min


def hf_mask(lengths, L, left=True, dtype=torch.float32):
    """HF's 4-D additive mask [B, 1, L, L]: causal plus padding (left or right)."""
    B = len(lengths)
    vis = torch.ones(L, L, dtype=torch.bool).tril().expand(B, 1, L, L).clone()
    for b, n in enumerate(lengths):
        pad = torch.zeros(L, dtype=torch.bool)
        if left:
            pad[:L - n] = True
        else:
            pad[n:] = True
        vis[b, 0, :, pad] = False
    return torch.zeros(B, 1, L, L, dtype=dtype).masked_fill(~vis, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------
# Mask -> runs -> layout.
# ----------------------------------------------------------------------------------------------


def test_causal_no_mask_is_one_run_per_batch_row():
    lo, hi = dense.visible_keys((3, 2, 5, 8), 5, None, True)
    runs = dense.causal_runs(lo, hi)
    assert runs["b"].tolist() == [0, 1, 2] and runs["q0"].tolist() == [0, 0, 0]
    assert runs["n"].tolist() == [5, 5, 5] and runs["kv"].tolist() == [5, 5, 5] and runs["lo"].tolist() == [0, 0, 0]


def test_left_padding_moves_the_runs_key_start():
    m = hf_mask([5, 3], 5)  # row 1: two pad tokens in front
    lo, hi = dense.visible_keys((2, 1, 5, 4), 5, m, False)
    runs = dense.causal_runs(lo, hi)
    real = [i for i in range(len(runs["b"])) if runs["b"][i] == 1 and runs["lo"][i] == 2]
    assert len(real) == 1 and runs["q0"][real[0]] == 2 and runs["n"][real[0]] == 3 and runs["kv"][real[0]] == 3


def test_decode_query_is_a_run_of_one_over_its_keys():
    m = torch.zeros(2, 1, 1, 7)
    m[1, ..., :3] = MIN  # left padding of 3
    lo, hi = dense.visible_keys((2, 4, 1, 8), 7, m, False)
    runs = dense.causal_runs(lo, hi)
    assert runs["lo"].tolist() == [0, 3] and runs["kv"].tolist() == [7, 4] and runs["n"].tolist() == [1, 1]


def test_right_padding_pad_rows_are_runs_of_one():
    m = hf_mask([4], 6, left=False)  # rows 4, 5 see keys 0..3
    runs = dense.causal_runs(*dense.visible_keys((1, 1, 6, 4), 6, m, False))
    assert runs["n"].tolist() == [4, 1, 1] and runs["kv"].tolist() == [4, 4, 4]


def test_non_causal_rows_each_see_every_key():
    runs = dense.causal_runs(*dense.visible_keys((1, 1, 3, 4), 5, None, False))
    assert runs["n"].tolist() == [1, 1, 1] and runs["kv"].tolist() == [5, 5, 5]


def test_rows_that_see_nothing_are_in_no_run():
    m = torch.full((1, 1, 3, 3), MIN)
    m[0, 0, 2, :] = 0
    runs = dense.causal_runs(*dense.visible_keys((1, 1, 3, 4), 3, m, False))
    assert runs["q0"].tolist() == [2] and runs["n"].tolist() == [1]


@pytest.mark.parametrize("case", ["gap", "heads", "bias"])
def test_masks_the_libraries_cannot_apply_are_refused(case):
    m = hf_mask([4], 4)
    if case == "gap":
        m[0, 0, 3, 1] = MIN
    elif case == "heads":
        m = torch.cat([m, hf_mask([3], 4)], dim=1)
    else:
        m = m.masked_fill(m == 0, -0.5)  # an ALiBi-like bias on visible keys
    with pytest.raises(UnsupportedError, match="attention_backend='triton'"):
        dense.visible_keys((1, 2, 4, 8), 4, m, False)


def test_a_sliding_window_mask_is_refused_not_copied_per_row():
    L, w = 64, 8
    i = torch.arange(L)
    vis = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - w)
    m = torch.zeros(1, 1, L, L).masked_fill(~vis, MIN)
    q = torch.randn(1, 1, L, 8)
    with pytest.raises(UnsupportedError, match="sliding window"):
        run_dense(q, q, q, m)


def test_layout_pages_hold_each_groups_keys_and_page_zero_stays_spare():
    runs = {"b": np.array([0, 0, 1]), "lo": np.array([0, 0, 2]), "q0": np.array([0, 5, 2]), "n": np.array([5, 1, 3]),
            "kv": np.array([5, 6, 3])}
    lay = dense.paged_layout(runs, page=4)
    # group (0, 0): 6 keys -> 2 pages (1, 2); group (1, 2): 3 keys -> 1 page (3)
    assert lay["num_pages"] == 4
    assert lay["table"].tolist() == [[1, 2], [1, 2], [3, 0]]
    assert lay["cu_seqlens_q"].tolist() == [0, 5, 6, 9]
    assert list(zip(lay["src_b"], lay["src_pos"], lay["slot"]))[:2] == [(0, 0, 4), (0, 1, 5)]
    assert (lay["src_b"][-3:] == 1).all() and lay["src_pos"][-3:].tolist() == [2, 3, 4]
    assert lay["slot"][-3:].tolist() == [12, 13, 14]


# ----------------------------------------------------------------------------------------------
# The whole path with a reference library.
# ----------------------------------------------------------------------------------------------


class ReferenceLibrary:
    """What FA3 / FlashInfer compute from the layout: each ragged sequence's queries are its last
    keys (bottom-right causal); float64 math, one query at a time over its own keys."""

    def extra_inputs(self, host, ragged):
        cu = torch.zeros(host["q_lens"].shape[0] + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(host["q_lens"].to(torch.int64), 0)
        return {"cu_seqlens_q": cu}

    def plan(self, host, ragged, key=None):
        return None

    def attend(self, q, k_cache, v_cache, ctx, scale, softcap, window, sinks):
        page = k_cache.shape[1]
        out = torch.zeros(q.shape, dtype=torch.float64)
        cu = ctx.extra["cu_seqlens_q"].tolist()
        group = q.shape[1] // k_cache.shape[2]
        for r in range(len(cu) - 1):
            n, kv = cu[r + 1] - cu[r], int(ctx.kv_lens[r])
            pages = ctx.block_table[r, :-(-kv // page)]
            ks = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:kv].double().repeat_interleave(group, 1)
            vs = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:kv].double().repeat_interleave(group, 1)
            for j in range(n):
                see = kv - n + j + 1
                s = torch.einsum("hd,khd->hk", q[cu[r] + j].double(), ks[:see]) * scale
                if softcap:
                    s = softcap * torch.tanh(s / softcap)
                out[cu[r] + j] = torch.einsum("hk,khd->hd", s.softmax(-1), vs[:see])
        return out.to(q.dtype)


def run_dense(q, k, v, mask=None, causal=False, softcap=0.0, page=4):
    return dense.dense_attention("fa3", q, k, v, mask, causal, None, softcap, backend=(ReferenceLibrary(), page))


def sdpa_reference(q, k, v, mask, causal):
    g = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(g, 1),
                                         v.double().repeat_interleave(g, 1),
                                         attn_mask=None if mask is None else mask.double(), is_causal=causal)
    return out.nan_to_num(0.0)


@pytest.mark.parametrize("left", [True, False])
def test_padded_batch_matches_sdpa_and_each_prompt_alone(left):
    g = torch.Generator().manual_seed(0)
    lengths, L, Hq, Hkv, D = [7, 4, 1], 7, 4, 2, 8
    q, k, v = (torch.randn(3, h, L, D, generator=g) for h in (Hq, Hkv, Hkv))
    m = hf_mask(lengths, L, left=left)
    out = run_dense(q, k, v, m)
    ref = sdpa_reference(q, k, v, m, False)
    for b, n in enumerate(lengths):
        rows = slice(L - n, L) if left else slice(0, n)
        assert torch.allclose(out[b, :, rows].double(), ref[b, :, rows], atol=1e-5)
        alone = run_dense(q[b:b + 1, :, rows], k[b:b + 1, :, rows], v[b:b + 1, :, rows], None, True)
        assert torch.equal(out[b, :, rows], alone[0])  # padding and neighbours change no bit


def test_decode_rows_equal_the_prefill_rows():
    g = torch.Generator().manual_seed(1)
    L, H, D = 9, 2, 8
    q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
    prefill = run_dense(q, k, v, None, True)
    for i in range(L):  # one query against the cache of keys 0..i, as a KV-cache decode step calls it
        step = run_dense(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1], torch.zeros(1, 1, 1, i + 1))
        assert torch.equal(step[0, :, 0], prefill[0, :, i])


def test_softcap_and_rows_without_keys():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    m = torch.zeros(1, 1, 4, 4).masked_fill(~torch.ones(4, 4, dtype=torch.bool).tril(), MIN)
    m[0, 0, 0, :] = MIN  # row 0 sees nothing: zeros, as detcompile.attention defines
    out = run_dense(q, k, v, m, softcap=2.0)
    assert torch.equal(out[0, :, 0], torch.zeros_like(out[0, :, 0]))
    s = torch.einsum("hqd,hkd->hqk", q[0].double(), k[0].double()) / 8 ** 0.5
    s = 2.0 * torch.tanh(s / 2.0) + m[0].double()
    ref = torch.einsum("hqk,hkd->hqd", s.softmax(-1), v[0].double())
    assert torch.allclose(out[0, :, 1:].double(), ref[:, 1:], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The option's plumbing.
# ----------------------------------------------------------------------------------------------


def test_option_reaches_the_op_and_the_cpu_refuses_it(monkeypatch):
    import detcompile.backend as backend_mod
    from detcompile.kernels import attention_dense_backends

    monkeypatch.setattr(attention_dense_backends, "check_installed", lambda name: None)

    def model(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    compiled = torch.compile(model, backend="deterministic", fullgraph=True, options={"attention_backend": "fa3"})
    q = torch.randn(1, 2, 4, 8)
    # the op's CPU kernel refuses only a non-triton backend: the option reached it through the rewrite
    with pytest.raises(Exception, match="runs on CUDA GPUs only"):
        compiled(q, q, q)
    assert backend_mod.Options.from_user(None, {"attention_backend": "flashinfer"}).attention_backend == "flashinfer"


# ----------------------------------------------------------------------------------------------
# GPU: the libraries themselves (skipped without them).
# ----------------------------------------------------------------------------------------------


def _library(name):
    pytest.importorskip({"fa3": "fa3_fwd_interface", "flashinfer": "flashinfer"}[name])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fa3", "flashinfer"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_alone_padded_and_decode_are_bitwise_equal(name, head_dim):
    _library(name)
    op = torch.ops.detcompile.attention
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths, L, Hq, Hkv = [300, 129, 1, 64], 300, 8, 2
    dt = torch.bfloat16
    q, k, v = (torch.randn(4, h, L, head_dim, generator=g, device="cuda", dtype=dt) for h in (Hq, Hkv, Hkv))
    m = hf_mask(lengths, L, dtype=dt).cuda()
    out = op(q, k, v, m, False, None, True, 0.0, name)
    ref = sdpa_reference(q.cpu().float(), k.cpu().float(), v.cpu().float(), m.cpu().float(), False)
    for b, n in enumerate(lengths):
        rows = slice(L - n, L)
        assert (out[b, :, rows].double().cpu() - ref[b, :, rows]).abs().max() < 2e-2
        alone = op(q[b:b + 1, :, rows], k[b:b + 1, :, rows], v[b:b + 1, :, rows], None, True, None, True, 0.0, name)
        assert torch.equal(out[b, :, rows].view(torch.int16), alone[0].view(torch.int16)), (name, b)
    b, n = 0, lengths[0]
    for i in (0, 1, 127, 128, 200, n - 1):  # decode: one query against the cache of keys 0..i
        step = op(q[b:b + 1, :, i:i + 1], k[b:b + 1, :, :i + 1], v[b:b + 1, :, :i + 1],
                  torch.zeros(1, 1, 1, i + 1, device="cuda", dtype=dt), False, None, True, 0.0, name)
        assert torch.equal(step[0, :, 0].view(torch.int16), out[b, :, i].view(torch.int16)), (name, i)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fa3", "flashinfer"])
def test_gpu_compiled_llama_rows_do_not_depend_on_the_batch(name):
    _library(name)
    from detcompile.models import tiny_model

    model = tiny_model("llama", dtype=torch.bfloat16, device="cuda", attn_implementation="sdpa",
                       hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    compiled = torch.compile(model, backend="deterministic", options={"attention_backend": name, "strict": True})
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, model.config.vocab_size, (1, 40), generator=g)
    rows = []
    for batch in (1, 3, 8):
        ids = torch.randint(0, model.config.vocab_size, (batch, 40), generator=g)
        ids[batch // 2] = target[0]
        with torch.no_grad():
            rows.append(compiled(input_ids=ids.cuda()).logits[batch // 2].float().cpu())
    assert all(torch.equal(rows[0], r) for r in rows[1:])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fa3", "flashinfer"])
def test_gpu_generate_left_padded_equals_alone(name):
    """HF generate through the compiled forward (prefill with a causal + left-padding mask, then
    KV-cache decode steps): a prompt's greedy continuation and its step scores are the same bits
    alone and left-padded among longer prompts."""
    _library(name)
    from detcompile.models import tiny_model

    torch._dynamo.reset()
    model = tiny_model("llama", dtype=torch.bfloat16, device="cuda", attn_implementation="sdpa",
                       hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    plain = model.forward
    model.forward = torch.compile(plain, backend="deterministic", options={"attention_backend": name})
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    prompt = torch.randint(1, vocab, (1, 20), generator=g)
    others = torch.randint(1, vocab, (2, 45), generator=g)

    def run(ids, mask):
        out = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        return out.sequences[:, ids.shape[1]:].cpu(), torch.stack(out.scores, 1).float().cpu()

    try:
        with torch.no_grad():
            alone_tokens, alone_scores = run(prompt, torch.ones_like(prompt))
            batch = torch.zeros(3, 45, dtype=torch.long)
            mask = torch.zeros_like(batch)
            batch[:2], mask[:2] = others, 1
            batch[2, 25:], mask[2, 25:] = prompt[0], 1  # left padding of 25
            tokens, scores = run(batch, mask)
    finally:
        model.forward = plain
    assert torch.equal(tokens[2], alone_tokens[0])
    assert torch.equal(scores[2], alone_scores[0])


@pytest.mark.parametrize("left", [True, False])
def test_flashinfer_route_of_the_layout_reads_each_querys_visible_keys(left):
    """The FlashInfer path plans every query as a request over pages: map each request's pages back
    through the key gather and check they hold exactly the query's visible keys, in order."""
    from detcompile.kernels.attention_fa3 import cu_seqlens_q
    from detcompile.kernels.attention_flashinfer import decode_route_metadata

    lengths, L, page = [9, 5, 1], 9, 4
    m = hf_mask(lengths, L, left=left)
    lo, hi = dense.visible_keys((3, 1, L, 8), L, m, False)
    runs = dense.causal_runs(lo, hi)
    lay = dense.paged_layout(runs, page)
    n = torch.from_numpy(runs["n"].astype(np.int32))
    lens = torch.from_numpy(lay["kv_lens"].astype(np.int32))
    starts = torch.from_numpy(lay["cu_seqlens_q"][:-1].astype(np.int32))
    tokens = int(n.sum())
    assert cu_seqlens_q(n, lens, tokens).tolist() == lay["cu_seqlens_q"].tolist()  # FA3's view agrees
    indptr, indices, last = decode_route_metadata(torch.from_numpy(lay["table"].astype(np.int32)), lens, starts, n,
                                                  tokens, page)
    slot_to_key = {int(s): (int(b), int(p)) for b, p, s in zip(lay["src_b"], lay["src_pos"], lay["slot"])}
    row_b = np.repeat(runs["b"], runs["n"])
    row_i = np.repeat(runs["q0"], runs["n"]) + np.arange(tokens) - np.repeat(lay["cu_seqlens_q"][:-1], runs["n"])
    for t in range(tokens):
        pages = indices[indptr[t]:indptr[t + 1]].tolist()
        count = (len(pages) - 1) * page + int(last[t])
        slots = [p * page + j for p in pages for j in range(page)][:count]
        keys = [slot_to_key.get(s_) for s_ in slots]
        b, i = int(row_b[t]), int(row_i[t])
        assert keys == [(b, pos) for pos in range(lo[b, i], hi[b, i] + 1)], (t, b, i)
