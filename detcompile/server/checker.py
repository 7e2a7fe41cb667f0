"""``detcompile check-server``: is a running server deterministic under batching, caching and
re-scoring? It sends the same prompts in varying batch compositions and counts, per prompt, the
distinct answers (output token ids and their logprobs, bit for bit): ``Unique samples: 1`` is
deterministic. Exit code 0 when every count is 1, 1 when one is larger, 2 when the server fails.

Modes (the reference system's determinism client has the first three):

- ``single``: one prompt, batch sizes n_start .. n_start + n_trials - 1;
- ``mixed``: two short prompts and a long one mixed in random proportions;
- ``prefix``: prefixes of different lengths of one long text, the prefix cache flushed first;
- ``radix``: a long prompt computed cold (after ``/flush_cache``) and warm (from the prefix cache),
  alone and beside prompts that share part of it;
- ``p_vs_d``: generate (decode) then re-score prompt + output in one prefill (``/generate`` with
  ``return_logprob`` and ``logprob_start_len``): the output tokens' logprobs must be the same bits;
- ``load`` (not part of ``all``): ``--n-requests`` different requests (mixed prompt and output
  lengths, sampled with seeds) sent one at a time, then all at once over ``--concurrency`` clients:
  every answer must equal its serial one; prints throughput and p50/p99 latency.

Each trial sends its batch either as one list request or split over concurrent requests, so the
engine sees both whole and interleaved batches. Only the standard library is used (urllib).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import random
import time
import urllib.error
import urllib.request

PROMPT_1 = "Describe how a lighthouse keeper spends a long winter night: "
PROMPT_2 = "Write the first twenty prime numbers, separated by commas, and nothing else."
_WORDS = ("river", "copper", "lantern", "orbit", "meadow", "signal", "harbor", "quartz", "ember", "valley",
          "cipher", "glacier", "market", "thunder", "willow", "engine", "anchor", "prism", "canyon", "ledger")


def long_text(n_chars: int, seed: int = 7) -> str:
    """A deterministic pseudo-English text of exactly ``n_chars`` characters."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 12))).capitalize() + ". "
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n_chars]


class CheckError(RuntimeError):
    pass


class Client:
    def __init__(self, url: str, api_key: str | None, timeout: float):
        self.url = url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout

    def call(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=self.headers,
                                     method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            raise CheckError(f"{path}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise CheckError(f"{path}: cannot reach {self.url}: {e}") from None


class Checker:
    def __init__(self, args, out=print):
        self.args = args
        self.out = out
        self.client = Client(args.url, args.api_key or os.environ.get("DETCOMPILE_API_KEY"), args.timeout)
        info = self.client.call("/get_model_info")
        self.info = info
        self.max_len = int(info["max_model_len"])
        self.vocab = int(info["vocab_size"])
        self.text_ok = bool(info.get("has_tokenizer", True))
        self.new = min(args.max_new_tokens, self.max_len // 4)
        # The long prompt leaves room for the output (a character is at most one token here).
        self.long_len = max(16, min(4096, self.max_len - self.new - 8))
        self.long = long_text(self.long_len)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.concurrency)
        self.rng = random.Random(1234)

    # -- sending ---------------------------------------------------------------------------------
    def prompt(self, text: str):
        """A prompt as the request carries it: the text, or token ids where the server has no tokenizer."""
        if self.text_ok:
            return text
        return [1 + (ord(c) * 2654435761 + i) % (self.vocab - 1) for i, c in enumerate(text)][: self.max_len - self.new - 8]

    def body(self, prompts: list, **extra) -> dict:
        key = "text" if self.text_ok and all(isinstance(p, str) for p in prompts) else "input_ids"
        if key == "input_ids":
            prompts = [self.prompt(p) if isinstance(p, str) else p for p in prompts]
        sp = {"temperature": self.args.temperature, "max_new_tokens": self.new, "sampling_seed": self.args.sampling_seed}
        sp.update(extra.pop("sampling_params", {}))
        return {key: prompts, "sampling_params": sp, "return_logprob": True, **extra}

    def generate(self, prompts: list, split: bool, **extra) -> list[dict]:
        """Results for ``prompts`` in order: one list request, or chunks sent concurrently."""
        if not split or len(prompts) == 1:
            return self.client.call("/generate", self.body(prompts, **extra))
        k = min(self.args.concurrency, len(prompts))
        bounds = [round(i * len(prompts) / k) for i in range(k + 1)]
        parts = [prompts[bounds[i]:bounds[i + 1]] for i in range(k)]
        futs = [self.pool.submit(self.client.call, "/generate", self.body(p, **extra)) for p in parts if p]
        return [r for f in futs for r in f.result()]

    @staticmethod
    def key(result: dict) -> str:
        lps = [e[0] for e in result["meta_info"].get("output_token_logprobs", [])]
        return json.dumps([result["output_ids"], lps])

    def trials(self):
        for t in range(self.args.n_trials):
            yield t, self.args.n_start + t, t % 2 == 1

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            self.out(msg)

    # -- modes -------------------------------------------------------------------------------------
    def single(self):
        seen: list[str] = []
        for t, b, split in self.trials():
            res = self.generate([PROMPT_1] * b, split)
            seen += [self.key(r) for r in res]
            self.log(f"Trial {t + 1} with batch size {b} ({'concurrent' if split else 'one request'}): "
                     f"{len(set(seen))} unique so far")
        return [("Prompt 1", seen)]

    def mixed(self):
        names = ["Prompt 1", "Prompt 2", "Long prompt"]
        texts = [PROMPT_1, PROMPT_2, self.long]
        seen = {n: [] for n in names}
        for t, b, split in self.trials():
            n_long = 0 if b < 3 else self.rng.randint(1, max(1, b // 3))
            n1 = self.rng.randint(1, b - n_long) if b - n_long >= 1 else 0
            which = [0] * n1 + [1] * (b - n_long - n1) + [2] * n_long
            self.rng.shuffle(which)
            res = self.generate([texts[w] for w in which], split)
            for w, r in zip(which, res):
                seen[names[w]].append(self.key(r))
            self.log(f"Trial {t + 1} with batch size {b}: prompt 1 x{which.count(0)}, prompt 2 x{which.count(1)}, "
                     f"long x{which.count(2)}")
        return [(n, seen[n]) for n in names if seen[n]]

    def prefix(self):
        lens = sorted({1, max(1, self.long_len // 4), max(1, self.long_len // 2), self.long_len})
        texts = [self.long[:n] for n in lens]
        seen = {n: [] for n in lens}
        for t, b, split in self.trials():
            self.client.call("/flush_cache", {})
            which = [self.rng.randrange(len(lens)) for _ in range(b)]
            res = self.generate([texts[w] for w in which], split)
            for w, r in zip(which, res):
                seen[lens[w]].append(self.key(r))
            self.log(f"Trial {t + 1} with batch size {b}: " + ", ".join(
                f"prefix {lens[i]} x{which.count(i)}" for i in range(len(lens))))
        return [(f"Prefix length {n}", seen[n]) for n in lens if seen[n]]

    def radix(self):
        half = self.long[: self.long_len // 2]
        texts = {"Long prompt": self.long, "Shared-prefix prompt": half + " Then what happened?"}
        seen = {n: [] for n in texts}
        for t, b, split in self.trials():
            self.client.call("/flush_cache", {})
            cold = self.generate([self.long], False)  # computed from scratch
            seen["Long prompt"].append(self.key(cold[0]))
            names = ["Long prompt"] * max(1, b // 2) + ["Shared-prefix prompt"] * max(1, b - b // 2)
            res = self.generate([texts[n] for n in names], split)  # served from the prefix cache
            for n, r in zip(names, res):
                seen[n].append(self.key(r))
            cached = sum(r["meta_info"].get("cached_tokens", 0) for r in res)
            self.log(f"Trial {t + 1}: cold long prompt, then batch of {len(names)} with {cached} cached prompt tokens")
        return [(n, seen[n]) for n in texts]

    def p_vs_d(self):
        texts = {"Prompt 1": PROMPT_1, "Prompt 2": PROMPT_2, "Long prompt": self.long[: self.long_len // 2]}
        prompts = {n: self.prompt(s) if not self.text_ok else None for n, s in texts.items()}
        seen = {n: [] for n in texts}
        for t, b, split in self.trials():
            names = [list(texts)[i % len(texts)] for i in range(max(b, len(texts)))]
            # Token ids of the prompts: generate from text once to learn them would need a tokenizer,
            # so this mode always sends token ids.
            ids = [prompts[n] if prompts[n] is not None else _ids_of(self, texts[n]) for n in names]
            gen = self.generate(ids, split)
            rescore = [p + r["output_ids"] for p, r in zip(ids, gen)]
            starts = [len(p) for p in ids]
            # One prefill per sequence: logprob_start_len is per request, so group by prompt length.
            scored: list = [None] * len(rescore)
            by_start: dict[int, list[int]] = {}
            for i, s in enumerate(starts):
                by_start.setdefault(s, []).append(i)
            for s, idx in by_start.items():
                res = self.client.call("/generate", {
                    "input_ids": [rescore[i] for i in idx], "return_logprob": True, "logprob_start_len": s,
                    "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}})
                for i, r in zip(idx, res):
                    scored[i] = r
            for n, g, sc in zip(names, gen, scored):
                decode = [e[0] for e in g["meta_info"]["output_token_logprobs"]]
                prefill = [e[0] for e in sc["meta_info"]["input_token_logprobs"]]
                seen[n].append(json.dumps(decode))
                seen[n].append(json.dumps(prefill))
            self.log(f"Trial {t + 1} with batch size {len(names)}: generated, then re-scored in prefill")
        return [(f"{n} (decode vs prefill logprobs)", seen[n]) for n in texts]

    def load(self):
        n = self.args.n_requests
        temp = self.args.temperature or 0.8
        rng = random.Random(99)
        reqs = []
        for i in range(n):
            plen = rng.randint(8, max(8, min(2048, self.long_len - self.new)))
            start = rng.randrange(0, max(1, self.long_len - plen))
            reqs.append(self.body([self.long[start:start + plen]], sampling_params={
                "temperature": temp, "sampling_seed": 1000 + i, "max_new_tokens": rng.randint(max(1, self.new // 4),
                                                                                              self.new)}))

        def send(body):
            t0 = time.perf_counter()
            r = self.client.call("/generate", body)[0]
            return r, time.perf_counter() - t0

        t0 = time.perf_counter()
        serial = [send(b) for b in reqs]
        t_serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(self.args.concurrency) as pool:
            together = list(pool.map(send, reqs))
        t_conc = time.perf_counter() - t0
        tokens = sum(r["meta_info"]["completion_tokens"] for r, _ in together)
        lat = sorted(t for _, t in together)
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
        self.out(f"[load] {n} requests, temperature {temp}: serial {t_serial:.1f} s "
                 f"({sum(r['meta_info']['completion_tokens'] for r, _ in serial) / t_serial:.1f} tok/s); "
                 f"{self.args.concurrency} concurrent clients {t_conc:.1f} s ({tokens / t_conc:.1f} tok/s), "
                 f"latency p50 {pct(0.5):.2f} s p99 {pct(0.99):.2f} s")
        same = sum(self.key(a) == self.key(b) for (a, _), (b, _) in zip(serial, together))
        self.out(f"[load] concurrent answers equal to serial: {same}/{n}")
        # One "prompt" per request: its serial and concurrent answers must be one sample.
        return [(f"Request {i}", [self.key(a), self.key(b)]) for i, ((a, _), (b, _)) in enumerate(zip(serial, together))
                if self.key(a) != self.key(b)] or [(f"All {n} requests", [self.key(serial[0][0])])]


def _ids_of(checker: Checker, text: str) -> list[int]:
    """Token ids for a text prompt: the server's tokenization, read back through a 1-token request
    with prompt logprobs (input_token_logprobs carry the ids)."""
    cache = checker.__dict__.setdefault("_ids_cache", {})
    if text not in cache:
        r = checker.client.call("/generate", {"text": text, "return_logprob": True, "logprob_start_len": 0,
                                              "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}})
        cache[text] = [e[1] for e in r["meta_info"]["input_token_logprobs"]]
    return cache[text]


MODES = ("single", "mixed", "prefix", "radix", "p_vs_d")  # "all"; "load" runs alone


def run_check(args, out=print) -> int:
    try:
        checker = Checker(args, out)
        modes = MODES if args.mode == "all" else (args.mode,)
        if not hasattr(args, "n_requests"):
            args.n_requests = 64
        worst = 0
        what = (f"{args.n_requests} requests over {args.concurrency} clients" if args.mode == "load"
                else f"{args.n_trials} trials, temperature {args.temperature}")
        out(f"check-server: {args.url}, fingerprint {checker.info.get('system_fingerprint')}, "
            f"deterministic={checker.info.get('deterministic')}, {what}, up to {checker.new} new tokens")
        for mode in modes:
            for name, samples in getattr(checker, mode)():
                k = len(set(samples))
                worst = max(worst, k)
                out(f"[{mode}] {name}: total samples: {len(samples)}, Unique samples: {k}")
        checker.pool.shutdown()
    except CheckError as e:
        out(f"check-server: error: {e}")
        return 2
    out("check-server: PASS (every prompt: Unique samples: 1)" if worst <= 1 else
        f"check-server: FAIL (up to {worst} distinct outputs for one prompt)")
    return 0 if worst <= 1 else 1
