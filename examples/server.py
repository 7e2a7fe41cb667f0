"""A deterministic LLM server in a few lines: what ``detcompile serve`` does, spelled out.

    pip install -e ".[serve]"
    python examples/server.py                 # the embedded demo model, http://127.0.0.1:30000
    curl -s localhost:30000/generate -d '{"text": "Hello", "sampling_params": {"max_new_tokens": 16}}'

Any Hugging Face causal LM works: pass ``Engine("/path/to/checkpoint")`` instead of the demo model.
"""
import logging
import os

import uvicorn

from detcompile.engine import Engine
from detcompile.models import demo_model, tiny_tokenizer
from detcompile.server import Server, create_app

logging.basicConfig(level=logging.INFO)  # one line per request: id, tokens, latency

# The engine owns the model, the paged KV cache and the compiled batch-invariant forward.
engine = Engine(demo_model(), tokenizer=tiny_tokenizer(), max_num_seqs=32, deterministic=True)

# Server wraps it: the engine thread, request validation, admission (503 past the queue bound),
# the reproducibility fingerprint. create_app gives the FastAPI app with /generate, /v1/*, /metrics.
server = Server(engine, model_name="detcompile-demo", max_queue=256, api_key=None)
app = create_app(server)
print("fingerprint:", server.fingerprint)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", 30000)))
