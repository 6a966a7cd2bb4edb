"""The Python package against real parts: our relay and Dynamo 1.6.1's FpmEventRelay over a
private nats-server, Dynamo's FpmEventSubscriber, SGLang's and Dynamo's own msgspec structs,
pyzmq subscribers."""

from __future__ import annotations

import subprocess
import time

import msgspec
import pytest
import zmq

import fpm
from fpm.sglang import _FpmPublisherThread as SglangPublisher
from fpm.vllm import _FpmPublisherThread as VllmPublisher


def iterations(emitter, dynamo, n):
    """n iterations the way an engine's scheduler drives the emitter (CPU clock: stream 0)."""
    for i in range(n):
        emitter.begin_iteration()
        emitter.segment_start(0)
        emitter.segment_end(0)
        r = emitter.submit(
            dynamo.ScheduledRequestMetrics(num_prefill_requests=1, sum_prefill_tokens=i, num_decode_requests=2),
            dynamo.QueuedRequestMetrics(num_prefill_requests=i),
        )
        assert r is None, r


def wait_published(emitter, n, timeout=30.0):
    """Until the relay's SUB has joined and the held iterations went out (as an engine that
    runs longer than the relay takes to connect)."""
    deadline = time.time() + timeout
    while emitter.stats()["published"] < n:
        assert time.time() < deadline, emitter.stats()
        time.sleep(0.02)


def check_stream(decoded, n, worker="py-worker"):
    assert [d.counter_id for d in decoded] == list(range(n))
    assert all(d.worker_id == worker and d.dp_rank == 0 and d.version == 1 for d in decoded)
    assert [d.scheduled_requests.sum_prefill_tokens for d in decoded] == list(range(n))
    assert [d.queued_requests.num_prefill_requests for d in decoded] == list(range(n))
    assert all(d.scheduled_requests.num_decode_requests == 2 for d in decoded)
    assert all(d.wall_time >= 0.0 for d in decoded)


def test_emitter_through_our_relay_to_dynamos_subscriber(nats_url, fpm_bin, peer, tmp_ipc, dynamo):
    n = 200
    sub = peer("subscribe", "--count", str(n), "--timeout", "60")
    sub.wait_ready()
    base = f"ipc://{tmp_ipc}/eng"
    relay = subprocess.Popen(
        [str(fpm_bin), "relay", "-q", "--zmq-endpoint", base + ".0", "--nats-url", nats_url, "--metrics-addr", "off"]
    )
    try:
        e = fpm.Emitter(base, "py-worker", 0, clock="cpu")
        assert e.endpoint == base + ".0" and e.clock == "cpu"
        iterations(e, dynamo, n)
        wait_published(e, n)
        stats = e.shutdown(5.0)
        got = [l for l in sub.lines(90) if "hex" in l]
    finally:
        relay.terminate()
        relay.wait(10)
    assert stats["published"] == n and stats["submitted"] == n, stats
    assert sum(stats["dropped"].values()) == 0, stats
    check_stream([dynamo.decode(bytes.fromhex(l["hex"])) for l in got], n)


def test_emitter_through_dynamos_relay(nats_url, peer, tmp_ipc, dynamo):
    n = 100
    base = f"ipc://{tmp_ipc}/dyn"
    relay = peer("dynamo-relay", "--zmq-endpoint", base + ".0", "--count", str(n), "--timeout", "60")
    e = fpm.Emitter(base, "py-worker", 0, clock="cpu")
    relay.wait_ready()
    iterations(e, dynamo, n)
    wait_published(e, n)
    stats = e.shutdown(5.0)
    got = [l for l in relay.lines(90) if "hex" in l]
    assert stats["published"] == n, stats
    check_stream([dynamo.decode(bytes.fromhex(l["hex"])) for l in got], n)


def sub_socket(endpoint):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(endpoint)
    return s


def test_sglang_adapter_driven_like_sglangs_scheduler(tmp_ipc, sglang):
    endpoint = f"ipc://{tmp_ipc}/sgl.0"
    pub = SglangPublisher(endpoint, "sgl-worker", 0)
    sub = sub_socket(endpoint)
    time.sleep(0.2)
    # The scheduler loop: busy iterations with SGLang's own structs, timed by SGLang.
    pub.set_idle(False)
    n = 300
    for i in range(n):
        pub.publish(
            sglang.ForwardPassMetrics(
                worker_id="sgl-worker",
                dp_rank=0,
                wall_time=0.001 * (i + 1),
                scheduled_requests=sglang.ScheduledRequestMetrics(num_decode_requests=i, var_decode_kv_tokens=0.5),
                queued_requests=sglang.QueuedRequestMetrics(num_prefill_requests=i % 7),
            )
        )
    # Then idle: heartbeats (all zero) once per interval.
    pub.set_idle(True)
    got = []
    deadline = time.time() + 10
    while time.time() < deadline:
        topic, counter, payload = sub.recv_multipart()
        m = sglang.decode(payload)
        assert topic == b"" and int.from_bytes(counter, "big") == m.counter_id
        got.append(m)
        if len(got) > n:
            break
    stats = pub.stats()
    pub.shutdown()
    assert [m.counter_id for m in got[:n]] == list(range(n))
    assert [m.wall_time for m in got[:n]] == [0.001 * (i + 1) for i in range(n)]
    assert [m.scheduled_requests.num_decode_requests for m in got[:n]] == list(range(n))
    assert all(m.scheduled_requests.var_decode_kv_tokens == 0.5 for m in got[:n])
    beat = got[n]
    assert beat.worker_id == "sgl-worker" and beat.wall_time == 0.0
    assert beat.scheduled_requests == sglang.ScheduledRequestMetrics()
    assert stats["published"] == n and stats["heartbeats"] >= 1, stats
    assert sum(stats["dropped"].values()) == 0, stats


def test_vllm_adapter_paused_then_resumed(tmp_ipc, dynamo):
    endpoint = f"ipc://{tmp_ipc}/vllm.0"
    pub = VllmPublisher(endpoint, "vllm-worker", 0, start_paused=True)
    sub = sub_socket(endpoint)
    time.sleep(0.2)
    pub.publish(dynamo.ForwardPassMetrics(wall_time=9.0))  # ignored while paused
    pub.resume()
    for i in range(5):
        pub.publish(dynamo.ForwardPassMetrics(wall_time=0.01 * (i + 1)))
    got = [dynamo.decode(sub.recv_multipart()[2]) for _ in range(5)]
    assert [m.wall_time for m in got] == [0.01 * (i + 1) for i in range(5)]
    assert [m.counter_id for m in got] == list(range(5))
    assert all(m.worker_id == "vllm-worker" for m in got)
    # Nothing published for an interval: a heartbeat, as upstream.
    beat = dynamo.decode(sub.recv_multipart()[2])
    assert beat.wall_time == 0.0 and beat.counter_id == 5
    pub.shutdown()
    pub.shutdown()  # idempotent, as upstream


def test_keyword_values_and_dicts(tmp_ipc, dynamo):
    endpoint = f"ipc://{tmp_ipc}/kw"
    e = fpm.Emitter(endpoint, "w", 3, clock="cpu")
    sub = sub_socket(e.endpoint)
    time.sleep(0.2)
    assert e.endpoint == endpoint + ".3"
    e.submit({"num_decode_requests": 4, "var_decode_kv_tokens": 2}, None)
    e.submit(queued={"sum_decode_kv_tokens": 9})
    a = dynamo.decode(sub.recv_multipart()[2])
    b = dynamo.decode(sub.recv_multipart()[2])
    assert a.dp_rank == 3 and a.scheduled_requests.num_decode_requests == 4
    assert a.scheduled_requests.var_decode_kv_tokens == 2.0, "an int is accepted for a float"
    assert b.queued_requests.sum_decode_kv_tokens == 9
    e.shutdown()


def test_bad_arguments_raise_clear_exceptions(tmp_ipc):
    with pytest.raises(ValueError, match="ipc://PATH"):
        fpm.Emitter("bogus", "w", 0)
    with pytest.raises(ValueError, match="dp_rank"):
        fpm.Emitter(f"ipc://{tmp_ipc}/x", "w", -1)
    with pytest.raises(ValueError, match="clock"):
        fpm.Emitter(f"ipc://{tmp_ipc}/x", "w", 0, clock="gpu")
    with pytest.raises(ValueError, match="heartbeat_interval"):
        fpm.Emitter(f"ipc://{tmp_ipc}/x", "w", 0, heartbeat_interval=0)
    with pytest.raises(OSError):
        fpm.Emitter("ipc:///nonexistent-dir/x", "w", 0)
    with pytest.raises(TypeError):
        fpm.Emitter(f"ipc://{tmp_ipc}/x", 5, 0)
    e = fpm.Emitter(f"ipc://{tmp_ipc}/x", "w", 0, clock="cpu")
    with pytest.raises(OSError, match="in use"):
        fpm.Emitter(f"ipc://{tmp_ipc}/x", "w", 0, clock="cpu")
    with pytest.raises(TypeError, match="ScheduledRequestMetrics"):
        e.submit(5)
    with pytest.raises(TypeError, match="num_prefill_requests must be an int"):
        e.submit({"num_prefill_requests": "three"})
    with pytest.raises(TypeError, match="var_prefill_length must be a float"):
        e.submit(queued={"var_prefill_length": "x"})
    with pytest.raises(TypeError):
        e.segment_start("stream")
    with pytest.raises(OverflowError):
        e.segment_start(-1)
    with pytest.raises(TypeError, match="wall_time"):
        e.publish(object())
    with pytest.raises(ValueError, match="timeout"):
        e.shutdown(-1)
    # Nothing above was counted as an iteration.
    assert e.stats()["submitted"] == 0
    final = e.shutdown(1.0)
    assert final["submitted"] == 0
    # The hot path never raises into the scheduler loop: after shutdown it says so.
    assert e.submit() == "shutdown"
    assert e.publish({"wall_time": 0.1}) == "shutdown"
    with pytest.raises(RuntimeError, match="shut down"):
        e.begin_iteration()
    with pytest.raises(RuntimeError, match="already shut down"):
        e.shutdown()
    with pytest.raises(ValueError, match="queue_size"):
        fpm.Emitter(f"ipc://{tmp_ipc}/q", "w", 0, queue_size=-1)
    with pytest.raises(ValueError, match="queue capacity"):
        fpm.Emitter(f"ipc://{tmp_ipc}/q", "w", 0, queue_size=10**10)
    with pytest.raises(ValueError, match="heartbeat"):
        fpm.Emitter(f"ipc://{tmp_ipc}/q", "w", 0, heartbeat_interval=1e20)
    with pytest.raises(ValueError, match="send_hwm"):
        fpm.Emitter(f"ipc://{tmp_ipc}/q", "w", 0, send_hwm=-5)
    big = fpm.Emitter(f"ipc://{tmp_ipc}/q", "w", 0, clock="cpu")
    with pytest.raises(ValueError, match="timeout"):
        big.shutdown(1e300)
    assert big.shutdown(1e12)["submitted"] == 0, "a huge timeout is no panic"


def test_drop_reasons_match_stats(tmp_ipc):
    e = fpm.Emitter(f"ipc://{tmp_ipc}/d", "w", 0, clock="cpu")
    assert list(e.stats()["dropped"]) == fpm.drop_reasons()
    e.shutdown(0.1)


def test_wire_bytes_match_msgspec(tmp_ipc, sglang):
    """What the emitter sends is byte for byte what SGLang's msgspec encoder makes of it."""
    e = fpm.Emitter(f"ipc://{tmp_ipc}/b", "bytes-worker", 0, clock="cpu")
    sub = sub_socket(e.endpoint)
    time.sleep(0.2)
    e.publish(sglang.ForwardPassMetrics(wall_time=0.25, scheduled_requests=sglang.ScheduledRequestMetrics(sum_prefill_tokens=7)))
    payload = sub.recv_multipart()[2]
    m = sglang.decode(payload)
    assert sglang.encode(m) == payload
    assert msgspec.msgpack.decode(payload)["worker_id"] == "bytes-worker"
    e.shutdown()


def test_fields_read_are_the_upstream_structs(sglang, dynamo):
    """The fields `submit`/`publish` read (fpm-schema's table) are exactly the upstream
    msgspec structs' fields, in order, for SGLang's and Dynamo's."""
    ours = dict(fpm._native.field_names())
    for mod in (sglang, dynamo):
        for name in ("ForwardPassMetrics", "ScheduledRequestMetrics", "QueuedRequestMetrics"):
            assert list(ours[name]) == list(getattr(mod, name).__struct_fields__), (mod.__name__, name)


def test_publish_after_shutdown_is_ignored_as_upstream(tmp_ipc, sglang):
    pub = SglangPublisher(f"ipc://{tmp_ipc}/s.0", "w", 0)
    pub.shutdown()
    pub.publish(sglang.ForwardPassMetrics())
    pub.shutdown()
