"""Serving throughput and latency: continuous batching against the micro-batching scheduler.

`blip2 serve` runs an OPT-125m-sized random BLIP-2 (benchmarks/common.py's "opt-125m" preset, with a word-level
tokenizer over its whole vocabulary) on loopback, once per scheduler (`--scheduler micro`, then `continuous`),
with the same options. Clients stream chat completions through the OpenAI API: each client holds chats of 1 to 3
questions about one image of a small pool (so images come back), each answer capped at 4 to 64 tokens (the
random model runs to its cap). The same seeded load runs at several concurrencies; each level is bounded in
requests and time (by default the time limit ends it: clients stay busy until then, and throughput is that of a
loaded server, not of its last few chats). Reported: generated tokens/s, requests/s, p50/p95 latency and time to
the first token.

    python benchmarks/bench_serve.py              # writes the table between the bench-serve markers
    python benchmarks/bench_serve.py --quick      # a shorter run, nothing written
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CACHE, Table, checkpoint, machine, write_results  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
PRESET = "opt-125m"
MAX_TOKENS = 64
ROWS = 16


def with_processor(directory: str) -> str:
    """Add processor files to the preset's checkpoint: 224-px images, 32 query tokens, and a word-level tokenizer
    whose ids cover the vocabulary (``w<id>``), with OPT's special ids and ``<image>`` at the config's index."""
    if os.path.exists(os.path.join(directory, "processor_config.json")):
        return directory
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import Blip2Processor, BlipImageProcessor, PreTrainedTokenizerFast

    config = json.load(open(os.path.join(directory, "config.json")))
    image_id, vocab_size = config["image_token_index"], config["text_config"]["vocab_size"]
    special = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<image>": image_id}
    vocab = {**{f"w{i}": i for i in range(vocab_size) if i not in special.values()}, **special}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 224, "width": 224}),
                               tokenizer=tokenizer, num_query_tokens=config["num_query_tokens"])
    processor.save_pretrained(directory)
    return directory


def images(n: int) -> list[str]:
    out = []
    for k in range(n):
        rng = np.random.RandomState(k)
        buf = io.BytesIO()
        Image.fromarray(rng.randint(0, 256, (224, 224, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def start_server(model: str, scheduler: str, log: str) -> tuple[subprocess.Popen, str]:
    """`blip2 serve` in a process of its own (its log in the file ``log``); returns once /health answers."""
    import httpx

    cmd = [sys.executable, "-m", "blip2", "serve", "--model", model, "--device", "cpu", "--port", "0",
           "--scheduler", scheduler, "--max-new-tokens", str(MAX_TOKENS), "--max-batch-size", str(ROWS),
           "--max-queue", "512", "--timeout", "600", "--max-wait-ms", "10"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stderr=out, stdout=out, env={**os.environ, "PYTHONPATH": SRC})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"listening on (http://[^/ ]+)", open(log).read())
        try:
            if found and httpx.get(found.group(1) + "/health", timeout=5).status_code == 200:
                return proc, found.group(1)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"blip2 serve ({scheduler}) did not start; its log: {log}")


async def one_chat(client, url: str, image: str, questions: list[tuple[str, int]], record: list) -> None:
    """One chat: each question streamed, its answer kept in the history of the next."""
    messages: list[dict] = []
    for k, (question, max_tokens) in enumerate(questions):
        content = [{"type": "text", "text": question}]
        if k == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": image}})
        messages.append({"role": "user", "content": content})
        body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        start, first, text, tokens = time.perf_counter(), None, "", 0
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    piece = choice["delta"].get("content")
                    if piece:
                        first = first or time.perf_counter()
                        text += piece
        end = time.perf_counter()
        record.append((end - start, (first or end) - start, tokens))
        messages.append({"role": "assistant", "content": text})


def workload(seed: int, chats: int, pool: list[str]) -> list[tuple[str, list[tuple[str, int]]]]:
    rng = random.Random(seed)
    return [(rng.choice(pool), [(f"w{rng.randint(4, 40000)} w{rng.randint(4, 40000)}?", rng.randint(4, MAX_TOKENS))
                                for _ in range(rng.randint(1, 3))]) for _ in range(chats)]


async def run_level(url: str, concurrency: int, chats: list, time_limit: float) -> dict[str, float]:
    import httpx

    record: list = []
    queue = list(chats)
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()

        async def worker() -> None:
            while queue and time.perf_counter() - start < time_limit:
                image, questions = queue.pop(0)
                await one_chat(client, url, image, questions, record)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    latency = sorted(r[0] for r in record)
    ttft = sorted(r[1] for r in record)
    p95 = lambda xs: xs[min(len(xs) - 1, int(0.95 * len(xs)))]  # noqa: E731
    return {"requests": len(record), "tokens_s": sum(r[2] for r in record) / wall, "req_s": len(record) / wall,
            "p50": statistics.median(latency), "p95": p95(latency), "ttft50": statistics.median(ttft),
            "ttft95": p95(ttft), "wall": wall}


def notes(n_chats: int, time_limit: float) -> list[str]:
    return [
        f"`python benchmarks/bench_serve.py`. {machine()}.",
        f"`blip2 serve --device cpu --scheduler S --max-batch-size {ROWS} --max-new-tokens {MAX_TOKENS}` (fast: auto), "
        f"the {PRESET} preset (random weights, fp32). Each level draws {n_chats} seeded chats (1 to 3 questions about "
        f"one of 6 images, each answer capped at 4 to {MAX_TOKENS} tokens, the history kept), streamed by as many "
        f"clients as the concurrency; clients start chats from the list during the first {time_limit:g} s, so a "
        "faster scheduler serves more requests; tokens/s and requests/s are over the level's whole wall time. "
        "Latency is a request's, TTFT to its first text.",
        "micro: a batch forms within 10 ms and runs until its longest answer ends; continuous: requests join and "
        "leave the decoding batch at every step, the image cache skips the vision encoder for known images and the "
        "prefix cache skips prefilling what a finished row already read (an image's queries, a chat's history).",
    ]


def main() -> None:
    from blip2.fast import kernels

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer chats, one concurrency; nothing written")
    p.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    p.add_argument("--chats", type=int, default=128,
                   help="chats per concurrency level (default: 128, more than a level's time limit lets either "
                        "scheduler start, so that every client stays busy until then)")
    p.add_argument("--time-limit", type=float, default=30.0,
                   help="seconds per level and scheduler in which chats start (default: 30)")
    args = p.parse_args()
    kernels.load()  # as the servers do (--fast auto), so that the notes say whether they load
    levels = [8] if args.quick else args.concurrency
    n_chats = 8 if args.quick else args.chats
    model = with_processor(checkpoint(PRESET))
    pool = images(6)
    table = Table(f"Serving {PRESET}-sized BLIP-2 on CPU: OpenAI chat completions, streamed",
                  ["concurrency", "scheduler", "requests", "tokens/s", "requests/s", "p50 latency s", "p95 latency s",
                   "p50 TTFT s", "p95 TTFT s", "throughput vs micro"])
    results: dict[tuple[int, str], dict[str, float]] = {}
    for scheduler in ("micro", "continuous"):
        proc, url = start_server(model, scheduler, os.path.join(CACHE, f"serve-{scheduler}.log"))
        try:
            asyncio.run(run_level(url, 2, workload(99, 2, pool), 30))  # warm-up
            for c in levels:
                results[c, scheduler] = asyncio.run(run_level(url, c, workload(c, n_chats, pool), args.time_limit))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    for c in levels:
        for scheduler in ("micro", "continuous"):
            r = results[c, scheduler]
            speedup = r["tokens_s"] / results[c, "micro"]["tokens_s"]
            table.add(c, scheduler, r["requests"], f"{r['tokens_s']:.1f}", f"{r['req_s']:.2f}", f"{r['p50']:.2f}",
                      f"{r['p95']:.2f}", f"{r['ttft50']:.2f}", f"{r['ttft95']:.2f}", f"{speedup:.2f}x")
    table.notes = notes(n_chats, args.time_limit)
    if not args.quick:
        write_results(table.markdown(), "<!-- bench-serve:start -->", "<!-- bench-serve:end -->")


if __name__ == "__main__":
    main()
