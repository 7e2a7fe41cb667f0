"""The deterministic serving engine: paged KV cache, continuous batching, chunked prefill, prefix
cache, CUDA graphs, counter-based seeded sampling and logprob scoring equal to sampling.

Read it top to bottom: ``sequence`` -> ``block_manager`` -> ``scheduler`` -> ``attention`` ->
``model_runner`` -> ``sampler`` -> ``engine``."""
from .engine import CompletionOutput, Engine, RequestOutput
from .hf_generate import generate, patch_generate
from .sampling_params import SamplingParams

__all__ = ["Engine", "SamplingParams", "RequestOutput", "CompletionOutput", "generate", "patch_generate"]
