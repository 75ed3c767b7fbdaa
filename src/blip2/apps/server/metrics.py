"""/metrics in Prometheus' text format (``GET /metrics?format=prometheus``, or ``Accept: text/plain``):
response counts, request latency, batch occupancy, queue length, time to the first token.

A ``Histogram`` counts observations under fixed upper bounds, as Prometheus histograms do (cumulative
``_bucket{le=...}`` lines, ``_sum``, ``_count``)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Mapping, Sequence


class Histogram:
    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = sorted(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def lines(self, name: str, labels: str = "") -> list[str]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        out, running = [], 0
        sep = "," if labels else ""
        for bound, n in zip([*map(_number, self.bounds), "+Inf"], counts):
            running += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {_number(total)}", f"{name}_count{braces} {running}"]
        return out


LATENCY_BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # seconds


def _number(x: float) -> str:
    return repr(float(x)) if x != int(x) else str(int(x))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(responses: Mapping[str, int], latency: Mapping[str, Histogram],
                    gauges: Mapping[str, tuple[str, float]], histograms: Mapping[str, tuple[str, Histogram]],
                    counters: Mapping[str, tuple[str, float]]) -> str:
    """The exposition text: ``responses`` ("METHOD PATH STATUS" -> count, the Guard's labels), ``latency`` (path ->
    seconds per request), then named gauges, histograms and counters (name -> (help, value))."""
    out = ["# HELP blip2_responses_total HTTP responses by method, path and status.",
           "# TYPE blip2_responses_total counter"]
    for key, n in sorted(responses.items()):
        method, path, status = key.split(" ")
        out.append(f'blip2_responses_total{{method="{method}",path="{_label(path)}",status="{status}"}} {n}')
    out += ["# HELP blip2_request_seconds Time from a request's arrival to its response's end, by path.",
            "# TYPE blip2_request_seconds histogram"]
    for path, hist in sorted(latency.items()):
        out += hist.lines("blip2_request_seconds", f'path="{_label(path)}"')
    out += _simple("gauge", gauges.items()) + _simple("counter", counters.items())
    for name, (help_text, hist) in histograms.items():
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *hist.lines(name)]
    return "\n".join(out) + "\n"


def _simple(kind: str, items: Iterable[tuple[str, tuple[str, float]]]) -> list[str]:
    out = []
    for name, (help_text, value) in items:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]
    return out
