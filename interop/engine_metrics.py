"""A stand-in for an engine's Prometheus endpoint, built the way SGLang builds its own:
prometheus_client in multiprocess mode (PROMETHEUS_MULTIPROC_DIR, a MultiProcessCollector
on a fresh registry), `sglang:`-prefixed counter, gauge and histogram families, plus one
unrelated family that a relay must not pass through.

Usage: engine_metrics.py
Prints {"port": N} once serving (content negotiation by prometheus_client: OpenMetrics when
the Accept header asks for it, else the text format 0.0.4), then bumps the counter every
100 ms until killed.
"""

import json
import os
import tempfile
import threading

# Must be set before prometheus_client is imported (as SGLang does).
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="fpm-prom-"))

from prometheus_client import (  # noqa: E402
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)

prompt_tokens = Counter("sglang:prompt_tokens", "Number of prefill tokens processed.", ["model_name"])
running = Gauge(
    "sglang:num_running_reqs", "The number of running requests.", ["model_name"], multiprocess_mode="mostrecent"
)
latency = Histogram(
    "sglang:e2e_request_latency_seconds",
    "Histogram of end-to-end request latency in seconds",
    ["model_name"],
    buckets=[0.1, 1.0, 10.0],
)
unrelated = Counter("unrelated_requests", "Not an engine family: must be filtered out.")

registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)

prompt_tokens.labels("m").inc(42)
running.labels("m").set(3)
latency.labels("m").observe(0.5)
unrelated.inc()

server, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
print(json.dumps({"port": server.server_port}), flush=True)

stop = threading.Event()


def bump():
    while not stop.wait(0.1):
        prompt_tokens.labels("m").inc()


threading.Thread(target=bump, daemon=True).start()
threading.Event().wait()
