"""Prometheus metrics: HTTP traffic measured here, queue and job state read from Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter("lqf_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "lqf_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PREDICTED_IMAGES = Counter("lqf_predicted_images_total", "Images classified by /predict")
PREDICT_BATCH_SIZE = Histogram("lqf_predict_batch_size", "Images per predict_batch call",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))


class MetricsMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # The route template, not the raw path: ids must not explode label cardinality.
            path = getattr(route, "path", None) or "<unmatched>"
            REQUESTS.labels(scope["method"], path, str(status)).inc()
            LATENCY.labels(scope["method"], path).observe(time.perf_counter() - start)


class RedisCollector(Collector):
    """Read at scrape time, so every api replica reports the same shared numbers."""

    def __init__(self, get_jobs, queue: str, stale_s: float):  # noqa: ANN001
        self.get_jobs, self.queue, self.stale_s = get_jobs, queue, stale_s

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily("lqf_redis_up", "1 if Redis answered this scrape")
        try:
            jobs = self.get_jobs()
            depth = jobs.queue_depth(self.queue)
            outcomes = jobs.outcome_counts()
            active = jobs.active_count()
            workers = len(jobs.alive_workers(self.stale_s))
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        g = GaugeMetricFamily("lqf_queue_depth", "Training tasks waiting in the queue")
        g.add_metric([], depth)
        yield g
        g = GaugeMetricFamily("lqf_jobs_running", "Jobs running or cancelling")
        g.add_metric([], active)
        yield g
        g = GaugeMetricFamily("lqf_workers_alive", "Workers with a recent heartbeat")
        g.add_metric([], workers)
        yield g
        c = CounterMetricFamily("lqf_job_outcomes", "Finished jobs by final status",
                                labels=["status"])
        for status in ("succeeded", "failed", "cancelled"):
            c.add_metric([status], outcomes.get(status, 0))
        yield c
