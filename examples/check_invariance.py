"""Compile a Hugging Face model with the deterministic backend and check that a prompt's logits keep
their bits whatever batch it runs in.

    python examples/check_invariance.py             # a tiny random Llama (nothing is downloaded)
    python examples/check_invariance.py qwen2       # any transformers model type

With a real checkpoint, replace ``build_model`` by ``AutoModelForCausalLM.from_pretrained(path)``.
"""
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def build_model(model_type: str) -> torch.nn.Module:
    # A tiny config with random weights: the same code paths as the full model, in seconds on a CPU.
    config = AutoConfig.for_model(
        model_type, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def in_batch(prompt: torch.Tensor, batch_size: int, row: int, vocab: int, seed: int) -> torch.Tensor:
    """``prompt`` at position ``row`` of a batch of random neighbours."""
    gen = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, vocab, (batch_size, prompt.numel()), generator=gen)
    batch[row] = prompt
    return batch


def main(model_type: str = "llama") -> int:
    model = build_model(model_type)
    vocab = model.config.vocab_size
    # strict: any op that cannot be made batch-invariant is an error, not a silent fallback.
    compiled = torch.compile(model, backend="deterministic", options={"strict": True})
    prompt = torch.randint(0, vocab, (7,), generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        alone = compiled(prompt[None]).logits[0]
        eager_alone = model(prompt[None]).logits[0]
        same, eager_same = True, True
        for batch_size, row in ((3, 1), (8, 7), (17, 9)):  # the target moves through the batch
            batch = in_batch(prompt, batch_size, row, vocab, seed=batch_size)
            same &= torch.equal(compiled(batch).logits[row], alone)
            eager_same &= torch.equal(model(batch).logits[row], eager_alone)
        err = ((alone - eager_alone).abs().max() / eager_alone.abs().max()).item()

    print(f"{model_type}: deterministic backend bitwise equal across batch sizes 1, 3, 8, 17: {same}")
    print(f"{model_type}: eager bitwise equal across the same batches:                      {eager_same}")
    print(f"{model_type}: deterministic vs eager, max relative difference: {err:.2e}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
