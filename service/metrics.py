"""Prometheus metrics (base units, no per-request labels). With several worker processes set
``PROMETHEUS_MULTIPROC_DIR`` (the ``ocd serve`` command does) and ``/metrics`` aggregates them."""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUESTS = Counter("ocd_requests_total", "Requests answered", ["model", "endpoint", "code"])
REQUEST_DURATION = Histogram(
    "ocd_request_duration_seconds", "Request latency, end to end", ["model", "endpoint"], buckets=LATENCY
)
QUEUE_DURATION = Histogram(
    "ocd_queue_duration_seconds", "Time a request waited for its batch", ["model"], buckets=LATENCY
)
BATCH_SIZE = Histogram("ocd_batch_size", "Requests per executed batch", ["model"], buckets=BATCH)
QUEUE_DEPTH = Gauge("ocd_queue_depth", "Requests waiting", ["model"], multiprocess_mode="livesum")
IN_PROGRESS = Gauge(
    "ocd_requests_in_progress", "Inference requests admitted and not answered", multiprocess_mode="livesum"
)
WAITING = Gauge("ocd_requests_waiting", "Inference requests waiting for admission", multiprocess_mode="livesum")
INFERENCE = Histogram(
    "ocd_inference_duration_seconds", "Per-batch inference time by stage", ["model", "stage"], buckets=LATENCY
)
ABANDONED = Counter(
    "ocd_batches_abandoned_total",
    "Batches stopped in inference: every request in them was past its deadline",
    ["model"],
)
MODEL_INFO = Gauge(
    "ocd_model_info",
    "Loaded models (value 1)",
    ["model", "version", "modality", "task", "denoiser", "device", "backend"],
    multiprocess_mode="liveall",
)


def render() -> tuple[bytes, str]:
    """The exposition text: this process's registry, or all workers' in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
