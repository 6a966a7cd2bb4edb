"""Upstream peers for interop tests: Dynamo 1.6.1's runtime, SGLang's and vLLM-style publishers.

Run with the contract venv's python (target/fpm-venv/bin/python, made by
contract-tests/setup.sh). The pure-Python upstream modules are loaded straight out of their
wheels with contract-tests/python/upstream.py; nothing upstream is copied here.

Every subcommand prints JSON lines on stdout (flushed line by line) and exits on its own
within its timeout. Subcommands that talk to Dynamo's runtime need, from the caller:
DYN_FILE_KV=<dir>, NATS_SERVER=nats://127.0.0.1:<port> and DYN_LOG=error.

  subscribe      Dynamo's FpmEventSubscriber in recv mode; one line per payload.
  track          register_model + FpmEventSubscriber tracking mode; prints the stats it sees.
  sglang-publish the real sglang _FpmPublisherThread publishing K messages on ipc://...
  vllm-publish   a pyzmq PUB bound like Dynamo's vLLM scheduler (tcp://*:{base+rank}).
  dynamo-relay   Dynamo's own FpmEventRelay + a recv-mode subscriber in one process.
  sglang-publish-cost  time SGLang's _FpmPublisherThread.publish() (scheduler-side cost).
  dynamo-relay-only   Dynamo's own FpmEventRelay alone, until SIGTERM (for `fpm bench --peer dynamo`).

Output lines:
  {"ready": true}                                      subscriber is subscribed at the server
  {"hex": "...", "decoded": {...} | null}              one received payload (subscribe, dynamo-relay)
  {"worker_id": "..."}                                 track: the registered worker id
  {"stats": [{"worker_id", "dp_rank", "counter_id", "hex"}...]}   track: whenever the stats change
  {"sent": K, ...}                                     publishers, at the end
  {"summary": {...}}                                   last line of every subcommand
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "contract-tests" / "python"))

import upstream  # noqa: E402

SUBJECT_TOPIC = "forward-pass-metrics"


def emit(obj) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def finish(code: int = 0) -> None:
    """Exit now: the Dynamo runtime's background threads must not keep the process alive."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def subject(ns: str, component: str, endpoint: str) -> str:
    return f"namespace.{ns}.component.{component}.endpoint.{endpoint}.{SUBJECT_TOPIC}"


def to_builtins(dyn, payload: bytes):
    import msgspec

    m = dyn.decode(payload)
    return None if m is None else msgspec.to_builtins(m)


def write_ready(path: str | None) -> None:
    emit({"ready": True})
    if path:
        tmp = path + ".tmp"
        Path(tmp).write_text("ready")
        os.replace(tmp, path)


async def wait_subscribed(subj: str, deadline: float) -> bool:
    """True once some connection has a subscription on `subj` at the NATS server.

    A request to a subject nobody subscribes to fails at once with "no responders"; once the
    subscriber is in place the request times out instead (the subscriber never replies, and
    drops the probe: its body is not an envelope).
    """
    import nats
    from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

    nc = await nats.connect(os.environ["NATS_SERVER"], name="dynamo-peer-probe")
    try:
        while time.time() < deadline:
            try:
                await nc.request(subj, b"\xc1probe", timeout=0.2)
                return True
            except NatsTimeout:
                return True
            except NoRespondersError:
                await asyncio.sleep(0.02)
        return False
    finally:
        await nc.close()


def start_recv_thread(sub) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def loop():
        while True:
            b = sub.recv()
            q.put(b)
            if b is None:
                return

    threading.Thread(target=loop, daemon=True, name="fpm-recv").start()
    return q


async def print_received(q: queue.Queue, dyn, count: int, deadline: float) -> int:
    n = 0
    while n < count and time.time() < deadline:
        try:
            b = q.get(timeout=min(0.1, max(0.0, deadline - time.time())))
        except queue.Empty:
            await asyncio.sleep(0)
            continue
        if b is None:
            break
        b = bytes(b)
        emit({"hex": b.hex(), "decoded": to_builtins(dyn, b)})
        n += 1
    return n


def runtime(loop):
    from dynamo.runtime import DistributedRuntime

    return DistributedRuntime(loop, "file", "tcp", event_plane="nats")


async def cmd_subscribe(a) -> None:
    from dynamo.llm import FpmEventSubscriber

    dyn = upstream.load("dynamo")
    deadline = time.time() + a.timeout
    rt = runtime(asyncio.get_running_loop())
    ep = rt.endpoint(f"{a.namespace}.{a.component}.{a.endpoint}")
    sub = FpmEventSubscriber(ep)
    q = start_recv_thread(sub)
    ok = await wait_subscribed(subject(a.namespace, a.component, a.endpoint), deadline)
    if not ok:
        emit({"summary": {"received": 0, "error": "subscription never appeared at the server"}})
        finish(1)
    write_ready(a.ready_file)
    n = await print_received(q, dyn, a.count, deadline)
    emit({"summary": {"received": n, "timed_out": n < a.count}})
    finish(0)


async def cmd_track(a) -> None:
    from dynamo.llm import (
        FpmEventSubscriber,
        ModelInput,
        ModelType,
        WorkerType,
        register_model,
    )

    dyn = upstream.load("dynamo")
    deadline = time.time() + a.timeout
    rt = runtime(asyncio.get_running_loop())
    ep = rt.endpoint(f"{a.namespace}.{a.component}.{a.endpoint}")
    await register_model(
        ModelInput.Tensor, ModelType.TensorBased, ep, "test-model", worker_type=WorkerType.Aggregated
    )
    wid = str(ep.connection_id())
    emit({"worker_id": wid})
    sub = FpmEventSubscriber(ep)
    sub.start_tracking()
    if not await wait_subscribed(subject(a.namespace, a.component, a.endpoint), deadline):
        emit({"summary": {"error": "subscription never appeared at the server"}})
        finish(1)
    write_ready(a.ready_file)
    last = None
    done = False
    while time.time() < deadline:
        st = sub.get_recent_stats()
        rows = []
        for (w, dp), raw in sorted(st.items()):
            raw = bytes(raw)
            m = dyn.decode(raw)
            rows.append(
                {
                    "worker_id": w,
                    "dp_rank": dp,
                    "counter_id": None if m is None else m.counter_id,
                    "hex": raw.hex(),
                }
            )
        if rows != last:
            emit({"stats": rows})
            last = rows
        ok = [r for r in rows if a.until_counter is None or (r["counter_id"] or 0) >= a.until_counter]
        if len(rows) >= a.count_workers and len(ok) >= a.count_workers:
            done = True
            break
        await asyncio.sleep(0.05)
    emit({"summary": {"keys": len(last or []), "done": done, "worker_id": wid}})
    finish(0)


def cmd_sglang_publish(a) -> None:
    sgl = upstream.load("sglang")
    pub = sgl._FpmPublisherThread(a.endpoint, a.worker_id, a.dp_rank)
    time.sleep(a.delay)  # slow joiner: let the relay's SUB (re)connect to the new PUB
    for i in range(a.count):
        sched = sgl.ScheduledRequestMetrics(
            num_prefill_requests=1, sum_prefill_tokens=100 + i, num_decode_requests=i % 7,
            sum_decode_kv_tokens=1000 + 10 * i,
        )
        pub.publish(sgl.ForwardPassMetrics(
            worker_id=a.worker_id, dp_rank=a.dp_rank, wall_time=0.001 * (i + 1), scheduled_requests=sched,
        ))
        if a.interval:
            time.sleep(a.interval)
    # The thread sends asynchronously and shutdown() closes with linger=0: let it drain first.
    t_end = time.time() + 5
    while not pub._queue.empty() and time.time() < t_end:
        time.sleep(0.01)
    time.sleep(0.3)
    pub.shutdown()
    emit({"sent": a.count, "summary": {"sent": a.count}})


def cmd_sglang_publish_cost(a) -> None:
    """Scheduler-side cost of SGLang's `_FpmPublisherThread.publish()` (the queue hand-over),
    in batches of 1,000 calls with the queue drained between batches (so every call is a real
    enqueue, not a full-queue early return). Median of the batches, ns per call; also the
    cost of building the ForwardPassMetrics and publishing it."""
    import statistics
    import tempfile

    sgl = upstream.load("sglang")
    with tempfile.TemporaryDirectory() as d:
        pub = sgl._FpmPublisherThread(f"ipc://{d}/cost", "bench-worker", 0)
        sched = sgl.ScheduledRequestMetrics(num_decode_requests=8, sum_decode_kv_tokens=9000)
        queued = sgl.QueuedRequestMetrics()
        m = sgl.ForwardPassMetrics(worker_id="bench-worker", dp_rank=0, wall_time=0.01,
                                   scheduled_requests=sched, queued_requests=queued)

        def drain() -> None:
            while not pub._queue.empty():
                time.sleep(0.001)

        def batches(build: bool) -> float:
            res = []
            for _ in range(a.batches):
                drain()
                t0 = time.perf_counter_ns()
                if build:
                    for _ in range(1000):
                        pub.publish(sgl.ForwardPassMetrics(
                            worker_id="bench-worker", dp_rank=0, wall_time=0.01,
                            scheduled_requests=sched, queued_requests=queued))
                else:
                    for _ in range(1000):
                        pub.publish(m)
                res.append((time.perf_counter_ns() - t0) / 1000)
            return statistics.median(res)

        publish_ns = batches(False)
        build_ns = batches(True)
        drain()
        pub.shutdown()
    emit({"publish_ns": round(publish_ns, 1), "build_and_publish_ns": round(build_ns, 1)})


def cmd_vllm_publish(a) -> None:
    import zmq

    dyn = upstream.load("dynamo")
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUB)
    s.setsockopt(zmq.SNDHWM, 100_000)
    s.bind(f"tcp://*:{a.port_base + a.dp_rank}")
    time.sleep(a.delay)
    for i in range(a.count):
        counter = a.first_counter + i  # Dynamo's scheduler counts from 1
        m = dyn.ForwardPassMetrics(
            worker_id=a.worker_id, dp_rank=a.dp_rank, counter_id=counter, wall_time=0.002 * (i + 1),
            scheduled_requests=dyn.ScheduledRequestMetrics(num_decode_requests=i, sum_decode_kv_tokens=500 + i),
        )
        s.send_multipart([b"", counter.to_bytes(8, "big"), dyn.encode(m)])
        if a.interval:
            time.sleep(a.interval)
    time.sleep(0.3)
    s.close(linger=2000)
    ctx.term()
    emit({"sent": a.count, "summary": {"sent": a.count}})


async def cmd_dynamo_relay(a) -> None:
    from dynamo.llm import FpmEventRelay, FpmEventSubscriber

    dyn = upstream.load("dynamo")
    deadline = time.time() + a.timeout
    rt = runtime(asyncio.get_running_loop())
    ep = rt.endpoint(f"{a.namespace}.{a.component}.{a.endpoint}")
    relays = [FpmEventRelay(ep, z) for z in a.zmq_endpoint]
    sub = FpmEventSubscriber(ep)
    q = start_recv_thread(sub)
    if not await wait_subscribed(subject(a.namespace, a.component, a.endpoint), deadline):
        emit({"summary": {"received": 0, "error": "subscription never appeared at the server"}})
        finish(1)
    await asyncio.sleep(0.5)  # the relay's own ZMQ SUB must have joined before the caller sends
    write_ready(a.ready_file)
    n = await print_received(q, dyn, a.count, deadline)
    for r in relays:
        r.shutdown()
    emit({"summary": {"received": n, "timed_out": n < a.count}})
    finish(0)


async def cmd_dynamo_relay_only(a) -> None:
    from dynamo.llm import FpmEventRelay

    rt = runtime(asyncio.get_running_loop())
    ep = rt.endpoint(f"{a.namespace}.{a.component}.{a.endpoint}")
    relays = [FpmEventRelay(ep, z) for z in a.zmq_endpoint]
    write_ready(a.ready_file)
    emit({"ready": True})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal as _signal
    for sig in (_signal.SIGTERM, _signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), timeout=a.timeout)
    except asyncio.TimeoutError:
        pass
    for r in relays:
        r.shutdown()
    emit({"summary": {"relays": len(relays)}})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = p.add_subparsers(dest="cmd", required=True)

    def names(x):
        x.add_argument("--namespace", default="dynamo")
        x.add_argument("--component", default="backend")
        x.add_argument("--endpoint", default="generate")
        x.add_argument("--timeout", type=float, default=30.0, help="exit after this many seconds")
        x.add_argument("--ready-file", help="written once the subscriber is subscribed at the server")

    s = sp.add_parser("subscribe")
    names(s)
    s.add_argument("--count", type=int, required=True, help="exit after this many payloads")

    t = sp.add_parser("track")
    names(t)
    t.add_argument("--count-workers", type=int, default=1,
                   help="exit once this many (worker_id, dp_rank) keys are tracked")
    t.add_argument("--until-counter", type=int, default=None,
                   help="... and each of them has counter_id >= this")

    g = sp.add_parser("sglang-publish")
    g.add_argument("--endpoint", required=True, help="ipc://... (the PUB binds it)")
    g.add_argument("--worker-id", required=True)
    g.add_argument("--dp-rank", type=int, default=0)
    g.add_argument("--count", type=int, required=True)
    g.add_argument("--interval", type=float, default=0.0)
    g.add_argument("--delay", type=float, default=1.0, help="slow-joiner delay before the first message")

    v = sp.add_parser("vllm-publish")
    v.add_argument("--port-base", type=int, required=True)
    v.add_argument("--dp-rank", type=int, default=0)
    v.add_argument("--worker-id", required=True)
    v.add_argument("--count", type=int, required=True)
    v.add_argument("--interval", type=float, default=0.0)
    v.add_argument("--delay", type=float, default=1.0, help="slow-joiner delay before the first message")
    v.add_argument("--first-counter", type=int, default=1)

    r = sp.add_parser("dynamo-relay")
    names(r)
    r.add_argument("--zmq-endpoint", action="append", required=True)
    r.add_argument("--count", type=int, required=True)

    pc = sp.add_parser("sglang-publish-cost")
    pc.add_argument("--batches", type=int, default=20)

    ro = sp.add_parser("dynamo-relay-only")
    names(ro)
    ro.add_argument("--zmq-endpoint", action="append", required=True)

    a = p.parse_args()
    if a.cmd == "subscribe":
        asyncio.run(cmd_subscribe(a))
    elif a.cmd == "track":
        asyncio.run(cmd_track(a))
    elif a.cmd == "sglang-publish":
        cmd_sglang_publish(a)
    elif a.cmd == "vllm-publish":
        cmd_vllm_publish(a)
    elif a.cmd == "dynamo-relay":
        asyncio.run(cmd_dynamo_relay(a))
    elif a.cmd == "sglang-publish-cost":
        cmd_sglang_publish_cost(a)
    elif a.cmd == "dynamo-relay-only":
        asyncio.run(cmd_dynamo_relay_only(a))
    finish(0)


if __name__ == "__main__":
    main()
