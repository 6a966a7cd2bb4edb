"""Cost of one publish on the engine's scheduler thread, ours against SGLang 0.5.23's own
``_FpmPublisherThread.publish()``, in the same run, same message, same machine.

Usage: target/fpm-venv/bin/python fpm-py/bench_publish.py [--n 200000]

Each publisher binds its own ipc socket with a SUB reading it, so that messages go somewhere
(ours holds messages until a first subscriber). Timed: ``n`` calls back to back on this thread,
best of 5 rounds, ns per call; drained between rounds so that no round hits a full queue.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "contract-tests" / "python"))
import upstream  # noqa: E402

import fpm  # noqa: E402
from fpm.sglang import _FpmPublisherThread as Ours  # noqa: E402


def drain(sub, want, timeout=30.0):
    got, deadline = 0, time.time() + timeout
    while got < want and time.time() < deadline:
        try:
            sub.recv_multipart(flags=0)
            got += 1
        except zmq.Again:
            pass
    return got


def timed(publish, msg, sub, n, rounds=5):
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter_ns()
        for _ in range(n):
            publish(msg)
        best = min(best, (time.perf_counter_ns() - t) / n)
        drain(sub, n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=5000)
    a = ap.parse_args()
    sg = upstream.load("sglang")
    msg = sg.ForwardPassMetrics(
        worker_id="bench",
        wall_time=0.0123,
        scheduled_requests=sg.ScheduledRequestMetrics(num_prefill_requests=2, sum_prefill_tokens=4096, num_decode_requests=64, sum_decode_kv_tokens=65536, var_decode_kv_tokens=12.5),
        queued_requests=sg.QueuedRequestMetrics(num_prefill_requests=3, sum_prefill_tokens=9000),
    )
    ctx = zmq.Context.instance()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fpmb-", dir="/tmp") as d:
        for name, cls in (("fpm (fpm.sglang._FpmPublisherThread)", Ours), ("SGLang 0.5.23 _FpmPublisherThread", sg._FpmPublisherThread)):
            ep = f"ipc://{d}/{len(rows)}"
            pub = cls(ep, "bench", 0, max_queue_size=max(10_000, a.n))
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.setsockopt(zmq.RCVTIMEO, 1000)
            sub.setsockopt(zmq.RCVHWM, 0)
            sub.connect(ep)
            time.sleep(0.3)
            ns = timed(pub.publish, msg, sub, a.n)
            pub.shutdown()
            sub.close(0)
            rows.append((name, ns))
        e = fpm.Emitter(f"ipc://{d}/e", "bench", 0, clock="cpu", queue_size=max(10_000, a.n))
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RCVTIMEO, 1000)
        sub.connect(e.endpoint)
        time.sleep(0.3)
        s, q = msg.scheduled_requests, msg.queued_requests
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter_ns()
            for _ in range(a.n):
                e.submit(s, q)
            best = min(best, (time.perf_counter_ns() - t) / a.n)
            drain(sub, a.n)
        e.shutdown()
        rows.append(("fpm Emitter.submit(scheduled, queued)", best))
    print(f"| publisher, one call on the scheduler thread ({a.n} calls, best of 5) | ns per call |")
    print("| --- | ---: |")
    for name, ns in rows:
        print(f"| {name} | {ns:.0f} |")
    print(f"\nSGLang / fpm: {rows[1][1] / rows[0][1]:.1f}x")


if __name__ == "__main__":
    main()
