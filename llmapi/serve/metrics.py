"""Prometheus metrics of the server: request counts and latencies observed per request, the executor's
counters read at each scrape. Names follow vLLM's, under `llmapi:`."""

from __future__ import annotations

import time
from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
              20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
           0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class _ExecutorCollector:
    """Gauges and counters from LLM.get_stats(), read when /metrics is scraped (no polling thread)."""

    def __init__(self, get_stats: Callable[[], dict], num_blocks: int, queries: Callable[[], float]):
        self._get_stats, self._num_blocks, self._queries = get_stats, num_blocks, queries

    def collect(self):
        try:
            s = self._get_stats()
        except Exception:  # a dead LLM: /health says so; its gauges are left out
            return
        used = s["num_used_blocks"]
        total = max(self._num_blocks, used + s["num_free_blocks"])
        yield GaugeMetricFamily("llmapi:num_requests_running", "Requests in the executor's running batch.",
                                value=s["num_running"])
        yield GaugeMetricFamily("llmapi:num_requests_waiting", "Requests queued or preempted in the executor.",
                                value=s["num_waiting"])
        yield GaugeMetricFamily("llmapi:kv_cache_usage_perc", "Fraction of the KV-cache blocks in use (0 to 1).",
                                value=used / total if total else 0.0)
        yield GaugeMetricFamily("llmapi:kv_cache_used_blocks", "KV-cache blocks referenced by requests.", value=used)
        yield GaugeMetricFamily("llmapi:kv_cache_free_blocks",
                                "KV-cache blocks free (cached prefix blocks nobody references included).",
                                value=s["num_free_blocks"])
        hits, queries = s["num_prefix_hit_tokens"], self._queries()
        yield CounterMetricFamily("llmapi:prefix_cache_hits", "Prompt tokens taken from the prefix cache.",
                                  value=hits)
        yield GaugeMetricFamily("llmapi:prefix_cache_hit_rate",
                                "Prefix-cache hits over prompt tokens served (since start).",
                                value=hits / queries if queries else 0.0)
        yield CounterMetricFamily("llmapi:num_preemptions", "Requests preempted by the scheduler.",
                                  value=s["num_preemptions"])


class ServerMetrics:
    """The server's metrics in their own registry (several apps may live in one process, as in tests)."""

    def __init__(self, model_name: str, get_stats: Callable[[], dict], num_blocks: int):
        r = self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.requests = Counter("llmapi:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("llmapi:prompt_tokens", "Prompt tokens of finished requests.", labels,
                                     registry=r)
        self.generation_tokens = Counter("llmapi:generation_tokens", "Tokens generated.", labels, registry=r)
        self.ttft = Histogram("llmapi:time_to_first_token_seconds", "Time from arrival to the first token.",
                              labels, buckets=_LATENCY_S, registry=r)
        self.tpot = Histogram("llmapi:time_per_output_token_seconds",
                              "Per request: time after the first token over the tokens after the first.",
                              labels, buckets=_TPOT_S, registry=r)
        self.e2e = Histogram("llmapi:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             labels, buckets=_LATENCY_S, registry=r)
        self.pending = Gauge("llmapi:num_requests_pending",
                             "Requests the server has handed to the LLM and not finished (--max-pending bounds it).",
                             registry=r)
        self.rejected = Counter("llmapi:requests_rejected", "Requests answered 503 (overloaded or draining).",
                                registry=r)
        self.prompt_tokens_served = 0  # prompt tokens handed to the executor: the prefix cache's queries
        self.queries = Counter("llmapi:prefix_cache_queries", "Prompt tokens handed to the executor.", registry=r)
        r.register(_ExecutorCollector(get_stats, num_blocks, lambda: self.prompt_tokens_served))
        self._model = model_name

    def enqueued(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens_served += num_prompt_tokens
        self.queries.inc(num_prompt_tokens)

    def finished(self, timer: "RequestTimer", reasons, prompt_tokens: int, generated: int) -> None:
        m = self._model
        for reason in reasons:
            self.requests.labels(m, reason or "abort").inc()
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(generated)
        end = time.perf_counter()
        if timer.first is not None:
            self.ttft.labels(m).observe(timer.first - timer.start)
            if timer.tokens > 1:
                self.tpot.labels(m).observe((end - timer.first) / (timer.tokens - 1))
        self.e2e.labels(m).observe(end - timer.start)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Arrival, first-token time and the longest sequence's token count of one engine request."""

    __slots__ = ("start", "first", "tokens")

    def __init__(self, start: Optional[float] = None):
        self.start = time.perf_counter() if start is None else start
        self.first: Optional[float] = None
        self.tokens = 0

    def saw(self, num_tokens: int) -> None:
        if num_tokens:
            if self.first is None:
                self.first = time.perf_counter()
            self.tokens = max(self.tokens, num_tokens)
