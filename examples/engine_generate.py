"""Seeded generation and logprob scoring through detcompile's engine (tiny random model, CPU or GPU).

    python examples/engine_generate.py

Shows the three promises an RL loop relies on: a prompt gives the same sample alone and in a
batch, the same seed gives the same sample again, and re-scoring the sample (the trainer's side)
gives the sampler's logprobs bit for bit."""
import torch

from detcompile import Engine, SamplingParams
from detcompile.models import demo_model, tiny_tokenizer

device = "cuda" if torch.cuda.is_available() else "cpu"
model = demo_model(dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
engine = Engine(model, tokenizer=tiny_tokenizer(), max_model_len=256, max_num_seqs=16, kv_cache_bytes=64 << 20)

params = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_new_tokens=24, logprobs=0)
prompts = ["The answer is", "Once upon a time", "def main():", "1, 2, 3,"]

batch = engine.generate(prompts, params, use_tqdm=False)
alone = engine.generate(prompts[2], params, use_tqdm=False)[0]
print("sample of prompt 2:", repr(alone.text))
print("alone == in a batch of 4:", alone.token_ids == batch[2].token_ids and alone.logprobs == batch[2].logprobs)

again = engine.generate(prompts[2], params, use_tqdm=False)[0]
other = engine.generate(prompts[2], SamplingParams(**{**vars(params), "seed": 8}), use_tqdm=False)[0]
print("same seed again:", again.token_ids == alone.token_ids, "| seed 8 differs:", other.token_ids != alone.token_ids)

prompt_ids = engine.tokenizer(prompts[2])["input_ids"]
scored = engine.score(prompt_ids, alone.token_ids)
print("score(prompt, sample) == sampler logprobs, bit for bit:", scored == alone.logprobs)
