"""Find where a stock model's output starts to depend on the batch, then check that the deterministic
backend's graph has no such node.

    python examples/audit_stock_model.py

``detcompile.audit`` runs the model's graph with one prompt alone and inside batches, records every
node's output, and reports the first node whose bits for that prompt differ (docs/audit.md). On the
stock graph that is usually the first matmul; after detcompile's passes there is none.
"""
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import detcompile


def main() -> int:
    config = AutoConfig.for_model(
        "llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    # seq_len 7 (odd): vectorised CPU kernels reach their scalar tails, where rounding can differ.
    prompt = torch.randint(3, config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))

    stock = detcompile.audit(model, prompt, batch_sizes=(1, 3, 8), rewrite=False, verbose=False)
    print("== stock aten graph ==")
    print(stock)
    rewritten = detcompile.audit(model, prompt, batch_sizes=(1, 3, 8), rewrite=True, verbose=False)
    print("\n== after detcompile's passes ==")
    print(rewritten)
    return 0 if rewritten.ok else 1


if __name__ == "__main__":
    sys.exit(main())
