"""Serving counters and latency histograms, rendered in the Prometheus text format (no client library needed)."""

from __future__ import annotations

import threading
from bisect import bisect_left

_PREFIX = "evalpipe"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0, 160.0, 640.0, 2560.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS):
        self.name = name
        self.help = help_text
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip((*map(repr, self.buckets), "+Inf"), self.counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return lines


class EngineMetrics:
    """Updated by the engine thread, read by the HTTP server; one lock keeps each scrape self-consistent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.finished_requests: dict[str, int] = {}
        self.rejected_requests: dict[int, int] = {}  # by HTTP status, counted by the server
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(f"{_PREFIX}_time_to_first_token_seconds",
                              "Time from arrival to the first generated token.")
        self.itl = Histogram(f"{_PREFIX}_inter_token_latency_seconds", "Time between consecutive generated tokens.")
        self.e2e = Histogram(f"{_PREFIX}_e2e_request_latency_seconds", "Time from arrival to the end of the request.")

    def on_token(self, arrival: float, previous_token_time: float | None, num_prompt_tokens: int, now: float) -> None:
        with self._lock:
            self.generation_tokens += 1
            if previous_token_time is None:
                self.prompt_tokens += num_prompt_tokens
                self.ttft.observe(now - arrival)
            else:
                self.itl.observe(now - previous_token_time)

    def on_finish(self, reason: str, arrival: float, now: float) -> None:
        with self._lock:
            self.finished_requests[reason] = self.finished_requests.get(reason, 0) + 1
            self.e2e.observe(now - arrival)

    def on_rejected(self, status: int) -> None:
        with self._lock:
            self.rejected_requests[status] = self.rejected_requests.get(status, 0) + 1

    def render(self, num_running: int, num_waiting: int, kv_cache_usage: float, num_preemptions: int) -> str:
        p = _PREFIX
        with self._lock:
            lines = [f"# HELP {p}_requests_total Finished requests by finish reason.",
                     f"# TYPE {p}_requests_total counter"]
            lines += [f'{p}_requests_total{{finish_reason="{r}"}} {n}'
                      for r, n in sorted(self.finished_requests.items())]
            lines += [f"# HELP {p}_rejected_requests_total Requests answered with an error status.",
                      f"# TYPE {p}_rejected_requests_total counter"]
            lines += [f'{p}_rejected_requests_total{{status="{s}"}} {n}'
                      for s, n in sorted(self.rejected_requests.items())]
            for name, value, kind, help_text in (
                ("prompt_tokens_total", self.prompt_tokens, "counter",
                 "Prompt tokens of requests that started generating."),
                ("generation_tokens_total", self.generation_tokens, "counter", "Generated tokens."),
                ("num_requests_running", num_running, "gauge", "Requests in the running batch."),
                ("num_requests_waiting", num_waiting, "gauge", "Requests queued for admission."),
                ("kv_cache_usage_ratio", kv_cache_usage, "gauge", "Fraction of KV cache blocks in use."),
                ("num_preemptions_total", num_preemptions, "counter",
                 "Running requests sent back to the queue to free KV cache (recomputed later)."),
            ):
                lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} {kind}", f"{p}_{name} {value}"]
            for hist in (self.ttft, self.itl, self.e2e):
                lines += hist.render()
        return "\n".join(lines) + "\n"
