"""Hostile traffic against ``blip2 serve`` on loopback: bad requests of every kind mixed into a stream of good ones.

    python benchmarks/stress.py [--good 300] [--bad 300] [--concurrency 12] [--max-seconds 150]

Two phases: the bundled captioning model (caption and VQA), then the bundled retrieval model (match). Each
starts ``python -m blip2 serve --port 0`` on 127.0.0.1 (one torch thread), sends every distinct good request alone,
then the storm (a fixed number of requests, shuffled with a fixed seed, ``--concurrency`` at a time, plus
connections that trickle their headers and malformed HTTP), then the good requests alone again. It checks that
every good request got 200 and the answer it gets alone, that every bad one got its 4xx as JSON, that the server's RSS
stayed within ``--rss-bound-mb`` of its size before the storm, that the trickling connections were closed, and
that the server is healthy afterwards (/health, an empty queue, no traceback in its log). It prints the
figures; the exit code is 0 when every check holds. The whole run stops by itself after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # hostile.py: the files the tests send too

from blip2.demo import DEFAULT_MODEL, DEFAULT_RETRIEVAL_MODEL, world  # noqa: E402
from hostile import bilevel_png, encoded, eps, flat_png, truncated_png  # noqa: E402

MAX_UPLOAD_MB = 2
RUNNING: list[subprocess.Popen] = []  # the servers to kill if the time runs out


@dataclass
class Job:
    kind: str  # what it is, for the report
    path: str
    expect: int  # the status it must get
    fields: dict[str, Any] = field(default_factory=dict)
    image: bytes | None = None
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None  # a raw body instead of the form

    @property
    def good(self) -> bool:
        return self.expect == 200 and self.method == "POST"


def scenes(n: int, seed: int = 5) -> list[Any]:
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng) for _ in range(n)]


def good_generation() -> list[Job]:
    jobs = []
    for k, scene in enumerate(scenes(6)):
        png = encoded(world.render(scene), "PNG")
        jobs.append(Job("caption", "/v1/caption", 200, image=png))
        question = world.questions(scene)[k % 2]["question"]
        jobs.append(Job("ask", "/v1/ask", 200, {"question": question}, image=encoded(world.render(scene), "JPEG")))
    big = world.render(scenes(1, seed=9)[0]).resize((3000, 3000))  # 9 M pixels in a small file
    jobs.append(Job("caption-large-png", "/v1/caption", 200, image=encoded(big, "PNG")))
    jobs.append(Job("caption-large-jpeg", "/v1/caption", 200, image=encoded(big, "JPEG", quality=90)))
    return jobs


def bad_images(path: str, fields: dict[str, Any]) -> list[Job]:
    """Uploads no model should see, on ``path``."""
    return [
        Job("image-40000000x1", path, 413, fields, bilevel_png(40_000_000, 1)),
        Job("image-aspect-500", path, 413, fields, bilevel_png(10_000, 20)),
        Job("image-bomb-header", path, 413, fields, bilevel_png(50_000, 50_000, idat=b"x")),
        Job("image-eps", path, 415, fields, eps()),
        Job("image-not-an-image", path, 415, fields, b"GIF89a but not really" * 10),
        Job("image-truncated", path, 400, fields, truncated_png()),
        Job("image-empty", path, 400, fields, b""),
        Job("image-missing", path, 400, fields),
        Job("image-url", path, 400, {**fields, "image": "http://127.0.0.1:1/x.png"}),
        Job("body-over-limit", path, 413, fields, b"\x89PNG" + bytes(MAX_UPLOAD_MB * 1024 * 1024 + 1000)),
        Job("cross-origin", path, 403, fields, flat_png(32, 32), headers={"Origin": "http://evil.example"}),
        Job("multipart-malformed", path, 400, content=b"--x\r\nnot a part",
            headers={"content-type": "multipart/form-data; boundary=x"}),
        Job("json-body", path, 400, content=b'{"image": "x"}', headers={"content-type": "application/json"}),
    ]


def bad_generation() -> list[Job]:
    image = encoded(world.render(scenes(1, seed=3)[0]), "PNG")
    return [
        Job("prompt-image-token", "/v1/caption", 422, {"prompt": "a <image> of"}, image),
        Job("question-image-token", "/v1/ask", 422, {"question": "what is <image>?"}, image),
        Job("question-past-positions", "/v1/ask", 422, {"question": "how many red shapes " * 15}, image),
        Job("question-over-1000-chars", "/v1/ask", 422, {"question": "red " * 300}, image),
        Job("question-missing", "/v1/ask", 400, {}, image),
        Job("match-on-captioner", "/v1/match", 400, {"text": "a red circle"}, image),
        Job("unknown-path", "/v2/caption", 404, {}, image),
        Job("invented-method", "/health", 405, method="BREW"),
        Job("head", "/health", 200, method="HEAD"),
        *bad_images("/v1/caption", {}),
    ]


def good_match() -> list[Job]:
    texts = [world.caption(s) for s in scenes(8, seed=11)]
    return [Job("match", "/v1/match", 200, {"text": [texts[k], texts[(k + 3) % 8]]},
                encoded(world.render(scene), "PNG")) for k, scene in enumerate(scenes(8, seed=11))]


def bad_match() -> list[Job]:
    image = encoded(world.render(scenes(1, seed=3)[0]), "PNG")
    return [
        Job("text-past-positions", "/v1/match", 422, {"text": ["a red circle", "a large red circle " * 16]}, image),
        Job("text-over-1000-chars", "/v1/match", 422, {"text": ["red " * 300]}, image),
        Job("texts-over-64", "/v1/match", 422, {"text": ["red"] * 65}, image),
        Job("text-missing", "/v1/match", 400, {}, image),
        Job("caption-on-retrieval", "/v1/caption", 400, {}, image),
        *bad_images("/v1/match", {"text": "a red circle"}),
    ]


class Server:
    """``python -m blip2 serve`` on 127.0.0.1 with a free port; its log goes to a temporary file."""

    def __init__(self, model: str, *extra: str) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="blip2-stress-", suffix=".log", delete=False)
        env = {**os.environ, "PYTHONPATH": os.path.join(HERE, "..", "src"), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blip2", "serve", "--model", model, "--device", "cpu", "--host", "127.0.0.1",
             "--port", "0", "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-connections", "64", *extra],
            stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        RUNNING.append(self.proc)
        deadline = time.monotonic() + 120
        while not (found := re.search(r"listening on (http://127\.0\.0\.1:\d+)/", self.log_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{self.log_text()}")
            time.sleep(0.05)
        self.url = found.group(1)
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)

    def log_text(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            os.unlink(self.log.name)
            RUNNING.remove(self.proc)


class RssSampler(threading.Thread):
    """The server's resident memory every 50 ms while it runs: the peak."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server, self.peak, self.stopping = server, server.rss_mb(), threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.05):
            self.peak = max(self.peak, self.server.rss_mb())


async def send(client: httpx.AsyncClient, job: Job) -> tuple[int, Any, float]:
    """(status, JSON body or None, seconds)."""
    start = time.perf_counter()
    if job.content is not None:
        r = await client.request(job.method, job.path, content=job.content, headers=job.headers)
    elif job.method == "POST":
        files = {"image": ("upload", job.image, "application/octet-stream")} if job.image is not None else None
        r = await client.post(job.path, data=job.fields, files=files, headers=job.headers)
    else:
        r = await client.request(job.method, job.path, headers=job.headers)
    try:
        body = r.json() if r.content else None
    except json.JSONDecodeError:
        body = None
    return r.status_code, body, time.perf_counter() - start


def same_answer(a: Any, b: Any) -> bool:
    """Texts equal; match scores equal to 1e-5 (a batch sums in another order than one image alone)."""
    if isinstance(a, dict) and "scores" in a and isinstance(b, dict) and "scores" in b:
        pairs = list(zip(a["scores"], b["scores"]))
        return len(pairs) == len(a["scores"]) == len(b["scores"]) and all(
            x["text"] == y["text"] and abs(x["itm"] - y["itm"]) < 1e-5 and abs(x["itc"] - y["itc"]) < 1e-5
            for x, y in pairs)
    return a == b


async def alone(url: str, jobs: list[Job]) -> list[Any]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return [(await send(client, job))[1] for job in jobs]


async def trickle_headers(url: str, n: int, limit_s: float) -> list[float]:
    """``n`` connections that send a request's headers a byte a second; the seconds until the server closed each."""
    host, port = url.removeprefix("http://").split(":")

    async def one() -> float:
        reader, writer = await asyncio.open_connection(host, int(port))
        start = time.monotonic()
        header = b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 1000
        try:
            for byte in header:
                writer.write(bytes([byte]))
                try:
                    if await asyncio.wait_for(reader.read(1024), 1.0) == b"":
                        break
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() - start > limit_s:
                    break
        except ConnectionError:
            pass
        writer.close()
        return time.monotonic() - start

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def malformed_http(url: str) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
    answer = await reader.read()
    writer.close()
    return answer


async def storm(url: str, jobs: list[Job], concurrency: int, trickles: int) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def limited(job: Job) -> tuple[int, Any, float]:
            async with gate:
                return await send(client, job)

        slow = asyncio.ensure_future(trickle_headers(url, trickles, limit_s=60))
        start = time.perf_counter()
        results = await asyncio.gather(*(limited(job) for job in jobs))
        seconds = time.perf_counter() - start
        raw = await malformed_http(url)
        closed = await slow
        return {"results": results, "seconds": seconds, "trickle_closed_s": closed, "raw": raw}


def check_storm(jobs: list[Job], distinct: list[Job], baseline: list[Any], out: dict[str, Any]) -> list[str]:
    """The failures: a good request without 200 and its answer alone, a bad one without its status and JSON."""
    failures = []
    want = {id(job): answer for job, answer in zip(distinct, baseline)}
    for job, (status, body, _) in zip(jobs, out["results"]):
        if job.good and (status != 200 or not same_answer(body, want[id(job)])):
            failures.append(f"good {job.kind}: {status} {str(body)[:200]} (alone: {str(want[id(job)])[:200]})")
        elif not job.good and status != job.expect:
            failures.append(f"bad {job.kind}: got {status}, expected {job.expect}: {str(body)[:200]}")
        elif not job.good and status != 200 and not (isinstance(body, dict) and set(body) == {"error"}):
            failures.append(f"bad {job.kind}: the error body is not {{\"error\": ...}}: {body!r}")
    if not out["raw"].startswith(b"HTTP/1.1 400") or not out["raw"].endswith(b'"}'):
        failures.append(f"malformed HTTP got {out['raw'][:120]!r}")
    return failures


def run_phase(name: str, model: str, good: list[Job], bad: list[Job], args: argparse.Namespace) -> dict[str, Any]:
    server = Server(model, "--max-new-tokens", "30")
    try:
        baseline = asyncio.run(alone(server.url, good))
        rng = random.Random(0)
        jobs = [good[k % len(good)] for k in range(args.good)] + [bad[k % len(bad)] for k in range(args.bad)]
        rng.shuffle(jobs)
        sampler = RssSampler(server)
        rss_before = server.rss_mb()
        sampler.start()
        out = asyncio.run(storm(server.url, jobs, args.concurrency, args.trickles))
        sampler.stopping.set()
        sampler.join()
        failures = check_storm(jobs, good, baseline, out)
        after = asyncio.run(alone(server.url, good))
        failures += [f"good {job.kind} alone after the storm: {b} != {a}"
                     for job, a, b in zip(good, baseline, after) if not same_answer(a, b)]
        health = httpx.get(server.url + "/health", timeout=10)
        metrics = httpx.get(server.url + "/metrics", timeout=10).json()
        rss_after = server.rss_mb()
        if health.status_code != 200 or metrics["queue_length"] or metrics["decoding"]:
            failures.append(f"unhealthy after the storm: {health.status_code} {metrics}")
        if sampler.peak - rss_before > args.rss_bound_mb:
            failures.append(f"RSS grew {sampler.peak - rss_before:.0f} MB, over {args.rss_bound_mb} MB")
        if max(out["trickle_closed_s"], default=0) > 15:
            failures.append(f"trickling connections held {max(out['trickle_closed_s']):.1f} s")
        if "Traceback" in server.log_text():
            failures.append("the server logged a traceback:\n" + server.log_text()[-3000:])
    finally:
        code = server.stop()
    if code != 0:
        failures.append(f"the server exited {code} after SIGINT")
    return report(name, jobs, out, failures, rss_before, sampler.peak, rss_after, metrics)


def report(name: str, jobs: list[Job], out: dict[str, Any], failures: list[str], rss_before: float,
           rss_peak: float, rss_after: float, metrics: dict[str, Any]) -> dict[str, Any]:
    good_s = sorted(s for job, (_, _, s) in zip(jobs, out["results"]) if job.good)
    bad_s = sorted(s for job, (_, _, s) in zip(jobs, out["results"]) if not job.good)
    statuses = Counter(str(status) for status, _, _ in out["results"])
    return {
        "phase": name, "requests": len(jobs), "good": len(good_s), "bad": len(bad_s),
        "kinds": len({job.kind for job in jobs}), "statuses": dict(sorted(statuses.items())),
        "seconds": round(out["seconds"], 2), "requests_per_s": round(len(jobs) / out["seconds"], 1),
        "good_latency_ms": {"p50": round(1000 * statistics.median(good_s)),
                            "p95": round(1000 * good_s[int(0.95 * len(good_s))]), "max": round(1000 * good_s[-1])},
        "bad_latency_ms": {"p50": round(1000 * statistics.median(bad_s)), "max": round(1000 * bad_s[-1])},
        "trickling_connections_closed_after_s": [round(s, 1) for s in sorted(out["trickle_closed_s"])],
        "rss_mb": {"before": round(rss_before), "peak": round(rss_peak), "after": round(rss_after)},
        "server": {k: metrics[k] for k in ("batches", "mean_batch_size", "max_batch_size_seen", "split_batches",
                                          "rejected_queue_full", "timeouts")},
        "failures": failures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--good", type=int, default=300, help="good requests per phase (default: 300)")
    parser.add_argument("--bad", type=int, default=300, help="bad requests per phase (default: 300)")
    parser.add_argument("--concurrency", type=int, default=12, help="requests in flight (default: 12)")
    parser.add_argument("--trickles", type=int, default=8, help="connections trickling headers (default: 8)")
    parser.add_argument("--rss-bound-mb", type=float, default=400, help="allowed RSS growth (default: 400)")
    parser.add_argument("--max-seconds", type=float, default=150, help="stop after this long (default: 150)")
    args = parser.parse_args()
    timer = threading.Timer(args.max_seconds, give_up, args=(args.max_seconds,))
    timer.daemon = True
    timer.start()
    start = time.perf_counter()
    phases = [run_phase("generation", DEFAULT_MODEL, good_generation(), bad_generation(), args),
              run_phase("match", DEFAULT_RETRIEVAL_MODEL, good_match(), bad_match(), args)]
    for phase in phases:
        print(json.dumps(phase))
    failed = sum(len(p["failures"]) for p in phases)
    print(f"stress: {'FAILED' if failed else 'passed'} in {time.perf_counter() - start:.0f} s "
          f"({failed} failures)", file=sys.stderr)
    return 1 if failed else 0


def give_up(seconds: float) -> None:
    """The run's time is up: stop the servers and exit, whatever is still waiting."""
    for proc in list(RUNNING):
        proc.kill()
    print(f"stress: stopped after {seconds:g} s (--max-seconds)", file=sys.stderr, flush=True)
    os._exit(3)


if __name__ == "__main__":
    sys.exit(main())
