"""fpm.planner against Dynamo 1.6.1's own regression models (read out of the ai-dynamo wheel
by contract-tests/python/planner.py), and fpm.Subscriber against our relay and a raw NATS
publisher."""

from __future__ import annotations

import inspect
import logging
import math
import random
import socket
import subprocess
import time
from urllib.parse import urlparse

import msgspec
import pytest

import fpm
import planner as upstream_planner  # contract-tests/python/planner.py (conftest puts it on the path)
from fpm.planner import AggRegressionModel, DecodeRegressionModel, PrefillRegressionModel

SEQUENCES = 250  # per model
TOL = 1e-9


@pytest.fixture(scope="module")
def dyn():
    """Dynamo's classes and its ForwardPassMetrics module, upstream's warnings silenced."""
    mods = upstream_planner.load_models()
    logging.disable(logging.CRITICAL)  # rejected fits and unreachable SLAs log warnings
    yield {
        "fpm": mods["dynamo.common.forward_pass_metrics"],
        "prefill": mods["dynamo.planner.core.perf_model.prefill"].PrefillRegressionModel,
        "decode": mods["dynamo.planner.core.perf_model.decode"].DecodeRegressionModel,
        "agg": mods["dynamo.planner.core.perf_model.agg"].AggRegressionModel,
    }
    logging.disable(logging.NOTSET)


def params(f):
    """Names, kinds and defaults (annotations aside: ours accept more than Dynamo's struct)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]


OURS = {"prefill": PrefillRegressionModel, "decode": DecodeRegressionModel, "agg": AggRegressionModel}
PROPS = {
    "prefill": ["avg_isl"],
    "decode": ["avg_decode_length"],
    "agg": ["avg_isl", "avg_decode_length", "avg_prefill_tokens"],
}


# ---------------------------------------------------------------- the API is upstream's


@pytest.mark.parametrize("kind", ["prefill", "decode", "agg"])
def test_same_public_api_as_dynamo(dyn, kind):
    up, ours = dyn[kind], OURS[kind]
    public = {n for n in dir(up) if not n.startswith("_")}
    assert public <= set(dir(ours)), public - set(dir(ours))
    assert params(ours) == params(up)
    for name in public:
        a = inspect.getattr_static(up, name)
        b = inspect.getattr_static(ours, name)
        assert isinstance(b, type(a)), (name, a, b)
        if callable(a):
            assert params(b) == params(a), name
    # Instance attributes upstream sets in __init__ and callers read.
    u, o = up(32, 3, 9), ours(32, 3, 9)
    assert (o.max_num_fpm_samples, o.min_observations) == (u.max_num_fpm_samples, u.min_observations) == (32, 3)


# ---------------------------------------------------------------- parity on random sequences


def rel(a: float, b: float) -> float:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


def unit(r):
    return r.random()


def kv_rate(r):
    k = r.randrange(10)
    if k <= 3:
        return None
    if k == 4:
        return math.nan
    if k == 5:
        return r.choice([-0.5, 0.0, 0.95, 1.0, 1.5])
    return unit(r)


def maybe(r, p_none, f):
    return None if r.randrange(100) < p_none else f()


def gen_query(r, kind):
    """(method, args): budgets keep upstream's per-chunk sklearn predictions to a few hundred."""
    mbt = r.choice([0, 256, 512, 1024, 2048, 8192])
    k = r.randrange(10)
    if kind == "prefill":
        if k <= 4:
            return "estimate_next_ttft", (r.randrange(20 * max(mbt, 1)) - 100, mbt, kv_rate(r))
        isl = -unit(r) * 10 if r.randrange(10) == 0 else unit(r) * 20000
        return "find_best_engine_prefill_rps", (
            unit(r) * 500,
            isl,
            maybe(r, 30, lambda: r.choice([0, 64, 512, 2048, 8192])),
        )
    if (kind == "decode" and k <= 4) or (kind == "agg" and k <= 3):
        return "estimate_next_itl", (r.randrange(2_000_000), r.randrange(100_000))
    if kind == "decode":
        return "find_best_engine_decode_rps", (
            0.0 if r.randrange(20) == 0 else unit(r) * 80,
            0.0 if r.randrange(20) == 0 else 1 + unit(r) * 8000,
            1 + unit(r) * 2000,
            maybe(r, 40, lambda: r.randrange(3_000_000)),
            maybe(r, 50, lambda: r.randrange(600)),
            r.choice([1.0, 1.0, 0.5, 1.7, 3.0]),
        )
    if k <= 7:
        return "estimate_next_ttft", (r.randrange(20 * max(mbt, 1)) - 100, mbt, r.randrange(2_000_000), kv_rate(r))
    return "find_best_engine_agg_rps", (
        0.0 if r.randrange(20) == 0 else 1 + unit(r) * 8000,
        1 + unit(r) * 2000,
        r.choice([32, 64, 256, 1024]),
        unit(r) * 2000,
        unit(r) * 100,
        maybe(r, 40, lambda: r.randrange(3_000_000)),
        maybe(r, 50, lambda: r.randrange(600)),
        kv_rate(r),
        r.choice([1.0, 1.0, 0.5, 1.7, 3.0]),
    )


def gen_case(r, kind, F):
    """Config, then events: ("obs", ForwardPassMetrics) or ("check", [query...]). Feature
    ranges grow in stages (re-bucketing), discrete values (ties), heartbeats, negative slopes
    (rejected fits), collinear decode batches, rare NaN/inf wall times."""
    config = (
        r.choice([1, 2, 3, 4, 5, 8, 12, 16, 32, 64, 64, 64]),
        r.choice([0, 1, 2, 3, 5, 5, 5]),
        r.choice([1, 2, 3, 4, 7, 16, 16] if kind == "prefill" else [1, 2, 4, 9, 16, 16, 25]),
    )
    n = 100 + r.randrange(300) if r.randrange(8) == 0 else 1 + r.randrange(40)
    discrete, collinear = r.randrange(4) == 0, r.randrange(8) == 0
    base = 0.001 + unit(r) * 0.01

    def slope(scale):
        return -unit(r) * scale if r.randrange(12) == 0 else unit(r) * scale

    a0, a1 = {
        "prefill": lambda: (slope(2e-5), 0.0),
        "decode": lambda: (slope(2e-4), slope(2e-7)),
        "agg": lambda: (slope(2e-5), slope(2e-7)),
    }[kind]()
    noise = r.choice([0.0, 1e-4, 1e-3, 5e-3])
    avg_len = 50 + r.randrange(4000)
    stage, events = 1, []
    for _ in range(n):
        if r.randrange(20) == 0:
            stage = min(stage + 1, 10)
        scale = 1 << (4 + stage)
        spt = r.choice([0, 128, 256, 512, 1024]) if discrete else r.randrange(scale)
        ndr = r.choice([0, 1, 8, 32]) if discrete else r.randrange(1 + min(scale, 256))
        kv = ndr * (avg_len if collinear else avg_len // 2 + r.randrange(avg_len + 1))
        if kind == "prefill":
            npr, ndr, kv = (0 if spt == 0 else 1 + r.randrange(4)), 0, 0
        elif kind == "decode":
            npr, spt = 0, 0
        else:
            npr = (spt > 0) * (1 + r.randrange(3))
        x0, x1 = {"prefill": (spt, 0), "decode": (ndr, kv), "agg": (spt, kv)}[kind]
        w = r.randrange(1000)
        wall = 0.0 if w < 100 else math.nan if w < 105 else math.inf if w < 107 else base + a0 * x0 + a1 * x1 + noise * (unit(r) - 0.5)
        events.append(
            (
                "obs",
                F.ForwardPassMetrics(
                    wall_time=wall,
                    scheduled_requests=F.ScheduledRequestMetrics(
                        num_prefill_requests=npr,
                        sum_prefill_tokens=spt,
                        num_decode_requests=ndr,
                        sum_decode_kv_tokens=kv,
                    ),
                ),
            )
        )
        if unit(r) < 3.0 / n:
            events.append(("check", [gen_query(r, kind) for _ in range(3)]))
    events.append(("check", [gen_query(r, kind) for _ in range(3)]))
    return config, events


def call(model, name, args):
    try:
        return getattr(model, name)(*args)
    except ValueError as e:  # scikit-learn refuses NaN/inf targets and empty inputs
        return ("ValueError", type(e))


def compare(a, b, what, worst):
    """Upstream's result `a` vs ours `b`: same shape (None, float, tuple, error), floats
    within TOL relative."""
    if isinstance(a, tuple) and a and a[0] == "ValueError":
        assert isinstance(b, tuple) and b and b[0] == "ValueError", (what, a, b)
        return
    if a is None or b is None:
        assert a is None and b is None, (what, a, b)
        return
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b), (what, a, b)
        for x, y in zip(a, b):
            compare(x, y, what, worst)
        return
    assert type(a) is type(b) is float, (what, a, b)
    d = rel(a, b)
    worst[0] = max(worst[0], d)
    assert d <= TOL, (what, a, b, d)


@pytest.mark.parametrize("kind", ["prefill", "decode", "agg"])
def test_parity_with_dynamo_on_random_sequences(dyn, kind):
    F, up_class, ours_class = dyn["fpm"], dyn[kind], OURS[kind]
    worst, estimates, nones, errors, fitted = [0.0], 0, 0, 0, 0
    for seed in range(SEQUENCES):
        r = random.Random(f"{kind}-{seed}")
        (max_samples, min_obs, buckets), events = gen_case(r, kind, F)
        up = up_class(max_samples, min_observations=min_obs, bucket_count=buckets)
        ours = ours_class(max_samples, min_observations=min_obs, bucket_count=buckets)
        for i, (ev, arg) in enumerate(events):
            what = f"{kind} seed {seed} event {i}"
            if ev == "obs":
                up.add_observation(arg)
                ours.add_observation(arg)
                assert ours.num_observations == up.num_observations, what
                assert ours.has_sufficient_data() is up.has_sufficient_data(), what
                continue
            for p in PROPS[kind]:
                compare(getattr(up, p), getattr(ours, p), f"{what} {p}", worst)
            for name, args in arg:
                a, b = call(up, name, args), call(ours, name, args)
                compare(a, b, f"{what} {name}{args}", worst)
                estimates += 1
                nones += a is None
                errors += isinstance(a, tuple) and a[0] == "ValueError"
                fitted += isinstance(a, (float, tuple)) and not (isinstance(a, tuple) and a[0] == "ValueError") and (a != (0.0, 0.0) and a != (0.0, 0.0, 0.0))
    print(f"\n{kind}: {SEQUENCES} sequences, {estimates} estimates ({fitted} from a fit, {nones} None, {errors} ValueError), worst relative difference {worst[0]:.3g}")
    # The sequences reach every outcome, so a divergence in any of them would show.
    assert fitted > estimates // 4 and nones + errors > 0, (estimates, fitted, nones, errors)


def test_parity_catches_a_difference(dyn):
    """The comparison can fail: a different config, or a shifted sample, is caught."""
    F = dyn["fpm"]
    up, ours = dyn["prefill"](64), PrefillRegressionModel(64)
    for t in (100, 200, 300, 400, 500):
        up.add_observation(F.ForwardPassMetrics(wall_time=0.01 + 1e-5 * t, scheduled_requests=F.ScheduledRequestMetrics(num_prefill_requests=1, sum_prefill_tokens=t)))
        ours.add_observation(F.ForwardPassMetrics(wall_time=0.01 + 1.0001e-5 * t, scheduled_requests=F.ScheduledRequestMetrics(num_prefill_requests=1, sum_prefill_tokens=t)))
    with pytest.raises(AssertionError):
        compare(up.estimate_next_ttft(1000, 512), ours.estimate_next_ttft(1000, 512), "shifted", [0.0])
    with pytest.raises(AssertionError):
        compare(dyn["prefill"](64).estimate_next_ttft(0, 512), ours.estimate_next_ttft(0, 512), "unfitted", [0.0])


def test_upstream_unit_scenario_and_inputs_besides_dynamos_struct(dyn, sglang):
    """Dynamo's struct, SGLang's struct, a dict and a plain object give the same model."""
    F = dyn["fpm"]
    models = [PrefillRegressionModel(16) for _ in range(4)]
    up = dyn["prefill"](16)

    class Obj:
        def __init__(self, wall, s):
            self.wall_time, self.scheduled_requests = wall, s

    for i, t in enumerate([512, 1024, 2048, 4096, 8192, 0]):
        wall = 0.0 if t == 0 else 0.004 + 2e-6 * t
        d = F.ForwardPassMetrics(wall_time=wall, scheduled_requests=F.ScheduledRequestMetrics(num_prefill_requests=1 if t else 0, sum_prefill_tokens=t))
        s = sglang.ForwardPassMetrics(wall_time=wall, scheduled_requests=sglang.ScheduledRequestMetrics(num_prefill_requests=1 if t else 0, sum_prefill_tokens=t))
        up.add_observation(d)
        models[0].add_observation(d)
        models[1].add_observation(s)
        models[2].add_observation({"wall_time": wall, "scheduled_requests": {"num_prefill_requests": 1 if t else 0, "sum_prefill_tokens": t}})
        models[3].add_observation(Obj(wall, d.scheduled_requests))
    want = up.estimate_next_ttft(3000, 2048, kv_hit_rate=0.25)
    assert want is not None and up.num_observations == 5
    for m in models:
        assert m.num_observations == 5 and m.avg_isl == up.avg_isl
        assert rel(m.estimate_next_ttft(3000, 2048, kv_hit_rate=0.25), want) <= TOL
    # load_benchmark_fpms = add_observation each.
    b = PrefillRegressionModel(16)
    b.load_benchmark_fpms(F.ForwardPassMetrics(wall_time=0.01 * (i + 1), scheduled_requests=F.ScheduledRequestMetrics(num_prefill_requests=1, sum_prefill_tokens=100 * (i + 1))) for i in range(6))
    assert b.num_observations == 6 and b.has_sufficient_data()


# ---------------------------------------------------------------- bad input


def test_bad_arguments_raise_clear_python_exceptions(dyn):
    F = dyn["fpm"]
    with pytest.raises(ValueError, match="max_num_fpm_samples must be 1..=1048576, got 0"):
        PrefillRegressionModel(0)
    with pytest.raises(ValueError, match="max_num_fpm_samples"):
        DecodeRegressionModel(2**40)
    with pytest.raises(ValueError, match="bucket_count must be >= 1, got 0"):
        AggRegressionModel(64, bucket_count=0)
    with pytest.raises(ValueError, match="min_observations must be >= 0, got -1"):
        AggRegressionModel(64, min_observations=-1)
    with pytest.raises(TypeError, match="max_num_fpm_samples must be an int, got str"):
        PrefillRegressionModel("64")
    with pytest.raises(OverflowError, match="max_num_fpm_samples must fit in 64 bits"):
        PrefillRegressionModel(2**64)

    m = AggRegressionModel(64)
    with pytest.raises(TypeError, match="got None"):
        m.add_observation(None)
    with pytest.raises(TypeError, match="has no field wall_time"):
        m.add_observation(42)
    with pytest.raises(TypeError, match="wall_time must be a float"):
        m.add_observation({"wall_time": "fast"})
    with pytest.raises(TypeError, match="sum_prefill_tokens must be an int"):
        m.add_observation({"wall_time": 0.1, "scheduled_requests": {"sum_prefill_tokens": 1.5}})
    with pytest.raises(TypeError, match="not iterable"):
        m.load_benchmark_fpms(3)
    assert m.num_observations == 0  # nothing half-applied
    with pytest.raises(TypeError, match="queued_prefill_tokens must be an int, got float"):
        m.estimate_next_ttft(1.5, 512, 0)
    with pytest.raises(OverflowError, match="current_decode_kv must fit in 64 bits"):
        m.estimate_next_ttft(1, 512, 2**63)
    with pytest.raises(TypeError, match="kv_hit_rate must be a number, got str"):
        m.estimate_next_ttft(1, 512, 0, kv_hit_rate="0.5")
    with pytest.raises(TypeError, match="max_num_seqs must be an int, got float"):
        m.find_best_engine_agg_rps(100, 100, 512, 100, 10, max_num_seqs=2.5)
    with pytest.raises(TypeError, match="itl must be a number, got list"):
        DecodeRegressionModel(8).find_best_engine_decode_rps([1], 100, 100)

    # A NaN wall time: upstream's scikit-learn fit raises ValueError; so do we.
    up, ours = dyn["decode"](8, min_observations=1), DecodeRegressionModel(8, min_observations=1)
    fpm_nan = F.ForwardPassMetrics(wall_time=math.nan, scheduled_requests=F.ScheduledRequestMetrics(num_decode_requests=2, sum_decode_kv_tokens=100))
    up.add_observation(fpm_nan)
    ours.add_observation(fpm_nan)
    with pytest.raises(ValueError):
        up.estimate_next_itl(0, 0)
    with pytest.raises(ValueError, match="not finite"):
        ours.estimate_next_itl(0, 0)


# Not included: values so extreme that upstream's arithmetic overflows (more than 2**63 token
# chunks, a subnormal context length or isl: OverflowError / ZeroDivisionError upstream),
# where fpm-subscriber saturates and returns numbers.
ODD = [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e15, 1e-9]
ODD_QUERIES = {
    "prefill": [
        ("find_best_engine_prefill_rps", (100.0, 1000.0, 512)),
        ("find_best_engine_prefill_rps", (100.0, 1000.0, None)),
        ("estimate_next_ttft", (1000, 512, 0.5)),
    ],
    "decode": [("find_best_engine_decode_rps", (20.0, 1000.0, 100.0, 10**6, 64, 1.0)), ("find_best_engine_decode_rps", (20.0, 1000.0, 100.0, None, None, 1.0))],
    "agg": [
        ("find_best_engine_agg_rps", (1000.0, 200.0, 1024, 500.0, 30.0, 10**6, 64, 0.3, 1.0)),
        ("find_best_engine_agg_rps", (1000.0, 200.0, 256, 500.0, 30.0, None, None, None, 1.0)),
        ("estimate_next_ttft", (1000, 512, 20000, 0.5)),
    ],
}


def outcome(model, name, args):
    try:
        return getattr(model, name)(*args)
    except (ValueError, OverflowError, ZeroDivisionError) as e:
        return (type(e).__name__, type(e))


@pytest.mark.parametrize("kind", ["prefill", "decode", "agg"])
def test_odd_numbers_in_every_float_argument_as_upstream(dyn, kind):
    """NaN, infinities, zero, negative, huge and tiny values in each float argument of a
    fitted model: the same results, or the same exception, as upstream."""
    F = dyn["fpm"]
    up, ours = dyn[kind](64), OURS[kind](64)
    r = random.Random(kind)
    for _ in range(30):
        spt, ndr = r.randrange(1, 4096), r.randrange(1, 64)
        kv = ndr * r.randrange(100, 2000)
        f = F.ForwardPassMetrics(
            wall_time=0.003 + 2e-6 * spt + 1e-5 * ndr + 1e-7 * kv + 1e-4 * r.random(),
            scheduled_requests=F.ScheduledRequestMetrics(num_prefill_requests=1, sum_prefill_tokens=spt, num_decode_requests=ndr, sum_decode_kv_tokens=kv),
        )
        up.add_observation(f)
        ours.add_observation(f)
    assert ours.num_observations == up.num_observations == 30
    checked = 0
    for name, args in ODD_QUERIES[kind]:
        for i, v in enumerate(args):
            if not isinstance(v, float):
                continue
            for odd in ODD:
                if odd == math.inf and name.endswith("_rps") and i == len(args) - 1:
                    continue  # accept_length=inf: upstream divides by zero, we return inf/0 (see README)
                a_args = args[:i] + (odd,) + args[i + 1 :]
                a, b = outcome(up, name, a_args), outcome(ours, name, a_args)
                if isinstance(a, tuple) and isinstance(a[0], str):
                    assert b == a, (name, a_args, a, b)
                else:
                    compare(a, b, f"{name}{a_args}", [0.0])
                checked += 1
    assert checked > 20


# ---------------------------------------------------------------- fpm.Subscriber


def wait_until(pred, timeout=30.0, what=""):
    deadline = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_subscriber_tracks_an_emitter_through_our_relay(nats_url, fpm_bin, tmp_ipc, dynamo):
    n = 200
    sub = fpm.Subscriber(nats_url)  # dynamo / backend / generate: the relay's defaults
    assert sub.subjects == ["namespace.dynamo.component.backend.endpoint.generate.forward-pass-metrics"]
    sub.start()
    base = f"ipc://{tmp_ipc}/eng"
    relay = subprocess.Popen(
        [str(fpm_bin), "relay", "-q", "--zmq-endpoint", base + ".0", "--nats-url", nats_url, "--metrics-addr", "off"]
    )
    try:
        e = fpm.Emitter(base, "py-worker", 0, clock="cpu")
        # Held until the relay's SUB has joined, then all go out (counter_id 0..n-1).
        for i in range(n):
            r = e.publish(
                dynamo.ForwardPassMetrics(
                    wall_time=0.001 * (i + 1),
                    scheduled_requests=dynamo.ScheduledRequestMetrics(num_prefill_requests=1, sum_prefill_tokens=i, num_decode_requests=3),
                    queued_requests=dynamo.QueuedRequestMetrics(num_prefill_requests=i % 5),
                )
            )
            assert r is None, r
        wait_until(lambda: e.stats()["published"] == n, what="published")
        stats = e.shutdown(5.0)
        assert stats["published"] == n and sum(stats["dropped"].values()) == 0, stats
        st = wait_until(lambda: sub.streams().get(("py-worker", 0), {}).get("iterations") == n and sub.streams(), what="n iterations at the subscriber")
    finally:
        relay.terminate()
        relay.wait(10)
    s = st[("py-worker", 0)]
    assert (s["received"], s["iterations"]) == (n + s["heartbeats"], n), s
    assert s["gaps"] == s["gap_messages"] == s["duplicates"] == s["restarts"] == s["missed_before_start"] == 0, s
    assert s["source"] == "dynamo/backend/generate" and s["stale"] is False
    latest = sub.latest()[("py-worker", 0)]
    # The dict has exactly the upstream struct's fields, nested ones too (the binding lists
    # them by hand: this is the check that keeps the list whole).
    assert list(latest) == list(dynamo.ForwardPassMetrics.__struct_fields__)
    assert list(latest["scheduled_requests"]) == list(dynamo.ScheduledRequestMetrics.__struct_fields__)
    assert list(latest["queued_requests"]) == list(dynamo.QueuedRequestMetrics.__struct_fields__)
    assert latest["counter_id"] >= n - 1 and latest["worker_id"] == "py-worker"
    if latest["wall_time"]:  # not a trailing heartbeat
        assert latest["counter_id"] == n - 1 and latest["scheduled_requests"]["sum_prefill_tokens"] == n - 1
        assert latest["queued_requests"]["num_prefill_requests"] == (n - 1) % 5 and latest["scheduled_requests"]["num_decode_requests"] == 3
    # Dynamo-like: the latest payload per (worker_id, dp_rank), decodable by Dynamo.
    raw = sub.get_recent_stats()
    assert list(raw) == [("py-worker", 0)]
    assert dynamo.decode(raw[("py-worker", 0)]).counter_id == latest["counter_id"]
    total = sub.stats()
    assert total["received"] == total["samples"] == s["received"] and sum(total["rejected"].values()) == 0, total
    assert total["tracked_streams"] == 1 and total["sequence"]["publishers"] == 1 and total["sequence"]["gap_messages"] == 0, total
    sub.close()
    sub.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        sub.stats()


class RawNats:
    """A bare NATS publisher (the text protocol over a socket), to send exactly what a test needs."""

    def __init__(self, url):
        u = urlparse(url)
        self.s = socket.create_connection((u.hostname, u.port), timeout=10)
        assert self.s.recv(4096).startswith(b"INFO")
        self.s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n')

    def pub(self, subject, body):
        self.s.sendall(b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(body), body))

    def flush(self):
        self.s.sendall(b"PING\r\n")
        buf = b""
        while b"PONG" not in buf:
            buf += self.s.recv(4096)

    def close(self):
        self.s.close()


def envelope(dynamo, seq, counter, worker="w", wall=0.01, publisher_id=77):
    payload = msgspec.msgpack.encode(
        dynamo.ForwardPassMetrics(worker_id=worker, dp_rank=1, counter_id=counter, wall_time=wall)
    )
    return msgspec.msgpack.encode(
        {"publisher_id": publisher_id, "sequence": seq, "published_at": int(time.time() * 1000), "topic": "forward-pass-metrics", "payload": payload}
    )


def test_subscriber_counts_gaps_duplicates_restarts_and_rejects(nats_url, dynamo):
    subject = "namespace.ns1.component.prefill.endpoint.gen.forward-pass-metrics"
    with fpm.Subscriber(nats_url, "ns1", "prefill", "gen") as sub:
        nc = RawNats(nats_url)
        # Counters 3 (3 missed before start), 4, 5, 8 (a gap of 2), 8 (duplicate), 9, then 1:
        # the same relay going backwards is a producer restart. Then a heartbeat and garbage.
        for seq, counter in enumerate([3, 4, 5, 8, 8, 9, 1]):
            nc.pub(subject, envelope(dynamo, seq, counter))
        nc.pub(subject, envelope(dynamo, 7, 2, wall=0.0))
        nc.pub(subject, b"\x93not an envelope")
        nc.pub("namespace.ns1.component.prefill.endpoint.other.forward-pass-metrics", envelope(dynamo, 8, 3))  # not subscribed
        nc.flush()
        wait_until(lambda: sub.stats()["received"] >= 9, what="9 messages")
        time.sleep(0.2)
        total = sub.stats()
        s = sub.streams()[("w", 1)]
        nc.close()
    assert total["received"] == 9 and total["samples"] == 8 and sum(total["rejected"].values()) == 1, total
    assert s["received"] == 8 and s["iterations"] == 7 and s["heartbeats"] == 1, s
    assert (s["gaps"], s["gap_messages"], s["duplicates"], s["restarts"]) == (1, 2, 1, 1), s
    assert s["missed_before_start"] == 3 + 1, s  # the restart's first counter is 1: one more
    assert s["source"] == "ns1/prefill/gen"
    assert total["sequence"] == {"publishers": 1, "gap_messages": 0, "resets": 0, "untracked": 0}, total


def test_subscriber_misuse_and_connection_failure(nats_url):
    with pytest.raises(ValueError, match="namespace"):
        fpm.Subscriber(nats_url, "a.b")
    with pytest.raises(ValueError, match="connect_timeout"):
        fpm.Subscriber(nats_url, connect_timeout=-1)
    s = fpm.Subscriber(nats_url)
    with pytest.raises(RuntimeError, match="call start"):
        s.latest()
    s.start_tracking()
    with pytest.raises(RuntimeError, match="already started"):
        s.start()
    assert s.latest() == {} and s.get_recent_stats() == {} and s.stats()["received"] == 0
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.start()
    # Nothing listens on the port of a closed socket.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        fpm.Subscriber(f"nats://127.0.0.1:{port}").start()
    del s  # collected after close: nothing left running
