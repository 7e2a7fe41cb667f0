"""A Llama-3-8B-shaped model (32 layers, random bf16 weights built on the GPU): target-row logits
bitwise equal for batch sizes 1..64 and over 20 repeated runs, and greedy ``generate()`` giving one
output for a prompt alone and inside batches of 8 and 32. Run with the device tool on the H100.
"""
import hashlib

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

PROMPT_LEN = 32


@pytest.fixture(scope="module")
def llama8b():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    return model


def _digest(t):
    return hashlib.sha256(t.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def test_target_row_bitwise_batch_1_to_64_and_20_runs(llama8b):
    torch._dynamo.reset()
    compiled = torch.compile(llama8b, backend="deterministic", options={"strict": True})
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 128256, (PROMPT_LEN,), generator=g)
    others = torch.randint(0, 128256, (64, PROMPT_LEN), generator=g)
    digests = {}
    with torch.no_grad():
        for bs in range(1, 65):
            # The target moves around the batch: last, middle, first, three quarters in.
            row = (bs - 1, bs // 2, 0, (3 * bs) // 4)[bs % 4]
            batch = others[:bs].clone()
            batch[row] = target
            digests[bs] = _digest(compiled(batch.cuda()).logits[row])
        repeats = set()
        batch = others[:16].clone()
        batch[15] = target  # the last row
        for _ in range(20):
            repeats.add(_digest(compiled(batch.cuda()).logits[15]))
    print(f"\n8B target-row logits: {len(set(digests.values()))} distinct over batch sizes 1..64; "
          f"{len(repeats)} distinct over 20 repeated runs at batch 16")
    assert len(set(digests.values())) == 1, digests
    assert repeats == {digests[1]}


def _generate(model, prompts, new_tokens=128):
    return model.generate(
        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0,
    )[:, prompts.shape[1]:]


def test_generate_same_output_alone_and_in_batches_8_32(llama8b):
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 128256, (1, PROMPT_LEN), generator=g)
    others = torch.randint(0, 128256, (31, PROMPT_LEN), generator=g)
    # The prompt last in the batch of 8, in the middle of the batch of 32.
    batches = {1: prompt, 8: torch.cat([others[:7], prompt]), 32: torch.cat([others[:20], prompt, others[20:]])}
    rows = {1: 0, 8: 7, 32: 20}

    outs = {"eager": {}, "deterministic": {}}
    with torch.no_grad():
        for bs, batch in batches.items():
            outs["eager"][bs] = _generate(llama8b, batch.cuda())[rows[bs]]
        torch._dynamo.reset()
        plain_forward = llama8b.forward
        llama8b.forward = torch.compile(plain_forward, backend="deterministic", options={"strict": True})
        try:
            for bs, batch in batches.items():
                outs["deterministic"][bs] = _generate(llama8b, batch.cuda())[rows[bs]]
        finally:
            llama8b.forward = plain_forward
    distinct = {way: len({tuple(t.tolist()) for t in o.values()}) for way, o in outs.items()}
    print(f"\n8B greedy generate, 128 new tokens, batch sizes 1/8/32: distinct outputs {distinct}")
    for way, o in outs.items():
        for bs, t in o.items():
            print(f"  {way:<14} batch {bs:>2}: first 16 tokens {t[:16].tolist()}")
    assert distinct["deterministic"] == 1
