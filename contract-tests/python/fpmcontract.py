#!/usr/bin/env python3
"""Python side of the fpm wire-contract tests (see README.md next to this file).

Runs against the real upstream modules (loaded from their wheels by upstream.py) and needs
only the standard library and msgspec.

Subcommands:
  schema                              field lists + struct config of both upstream modules
  gen     --module M --seed S --count N   boundary + random vectors encoded by M (expect ok)
  check   --module M  < vectors.jsonl     re-encode / decode vectors produced elsewhere (Rust)
  extras  --module M                      decoder-semantics vectors, outcome recorded from M
  bench   --module M --iterations N       msgspec encode / encode_into / decode timing of one message
  welford --module M --seed S --count N   WelfordAccumulator reference results
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import struct
import sys
import time
from typing import Any, Callable, Iterable, Iterator

import msgspec

import upstream

I64_MIN = -(2**63)
I64_MAX = 2**63 - 1
MAX_PAYLOAD = 64 * 1024

# ---------------------------------------------------------------------------------------
# The schema-version-1 layout. VALUE JSON follows it; load_module() verifies that the
# upstream classes still have exactly this layout, so a changed upstream fails loudly, and the
# Rust test `helper_layout_is_the_field_table` checks it (`layout` command) against
# fpm_schema::SCHEMA, the field table the Rust codec is generated from.

SCHED_FIELDS = [
    ("num_prefill_requests", "int"),
    ("sum_prefill_tokens", "int"),
    ("var_prefill_length", "float"),
    ("sum_prefill_kv_tokens", "int"),
    ("num_decode_requests", "int"),
    ("sum_decode_kv_tokens", "int"),
    ("var_decode_kv_tokens", "float"),
]
QUEUED_FIELDS = [
    ("num_prefill_requests", "int"),
    ("sum_prefill_tokens", "int"),
    ("var_prefill_length", "float"),
    ("num_decode_requests", "int"),
    ("sum_decode_kv_tokens", "int"),
    ("var_decode_kv_tokens", "float"),
]
TOP_FIELDS = [
    ("version", "int"),
    ("worker_id", "str"),
    ("dp_rank", "int"),
    ("counter_id", "int"),
    ("wall_time", "float"),
    ("scheduled_requests", "ScheduledRequestMetrics"),
    ("queued_requests", "QueuedRequestMetrics"),
]
NESTED = {"scheduled_requests": SCHED_FIELDS, "queued_requests": QUEUED_FIELDS}
LAYOUT = {
    "ForwardPassMetrics": TOP_FIELDS,
    "ScheduledRequestMetrics": SCHED_FIELDS,
    "QueuedRequestMetrics": QUEUED_FIELDS,
}
CLASS_OF = {"scheduled_requests": "ScheduledRequestMetrics", "queued_requests": "QueuedRequestMetrics"}


def _leaf_paths() -> list[tuple[str, str]]:
    out = []
    for name, ty in TOP_FIELDS:
        if name in NESTED:
            out += [(f"{name}.{n}", t) for n, t in NESTED[name]]
        else:
            out.append((name, ty))
    return out


LEAVES = _leaf_paths()  # [(dotted path, "int"|"float"|"str")], declaration order
INT_PATHS = [p for p, t in LEAVES if t == "int" and p != "version"]  # the 11 free int fields
FLOAT_PATHS = [p for p, t in LEAVES if t == "float"]  # the 5 float fields
LEAF_TYPE = dict(LEAVES)


def load_module(name: str):
    mod = upstream.load(name)
    # Upstream logs a warning on every rejected message; vectors record that outcome anyway.
    logging.getLogger(mod.__name__).disabled = True
    for cls, fields in LAYOUT.items():
        got = [(f[0], f[1]) for f in struct_fields(getattr(mod, cls))]
        if got != fields:
            raise SystemExit(
                f"{name}: upstream {cls} layout changed: {got} != {fields}; "
                f"update the contract (fpmcontract.py, Rust fpm-schema) deliberately"
            )
    if mod.FPM_VERSION != 1:
        raise SystemExit(f"{name}: upstream FPM_VERSION is {mod.FPM_VERSION}, contract is for 1")
    return mod


def raw_decoder(mod):
    """The module's own typed msgspec decoder (what its decode() wraps)."""
    d = getattr(mod, "_decoder", None)
    return d if d is not None else msgspec.msgpack.Decoder(mod.ForwardPassMetrics)


# ---------------------------------------------------------------------------------------
# Values: a "flat" dict {dotted path: python value} is the internal form.


def f64_hex(x: float) -> str:
    return "f64:" + struct.pack(">d", x).hex()


_F64_RE = re.compile(r"^f64:[0-9a-f]{16}$")


def hex_f64(s: str) -> float:
    if not isinstance(s, str) or not _F64_RE.match(s):
        raise ValueError(f"float must be 'f64:' + 16 lowercase hex digits, got {s!r}")
    return struct.unpack(">d", bytes.fromhex(s[4:]))[0]


def bits_of(x: float) -> int:
    return struct.unpack(">Q", struct.pack(">d", x))[0]


def from_bits(b: int) -> float:
    return struct.unpack(">d", struct.pack(">Q", b))[0]


def default_flat() -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for path, ty in LEAVES:
        flat[path] = {"int": 0, "float": 0.0, "str": ""}[ty]
    flat["version"] = 1
    return flat


def flat_from_struct(obj) -> dict[str, Any]:
    flat = {}
    for path, _ in LEAVES:
        cur = obj
        for part in path.split("."):
            cur = getattr(cur, part)
        flat[path] = cur
    return flat


def build_struct(mod, flat: dict[str, Any]):
    nested = {}
    for top, fields in NESTED.items():
        cls = getattr(mod, CLASS_OF[top])
        nested[top] = cls(**{n: flat[f"{top}.{n}"] for n, _ in fields})
    top_kwargs = {n: (nested[n] if n in NESTED else flat[n]) for n, _ in TOP_FIELDS}
    return mod.ForwardPassMetrics(**top_kwargs)


def value_json(flat: dict[str, Any]) -> dict[str, Any]:
    def conv(path):
        v = flat[path]
        return f64_hex(v) if LEAF_TYPE[path] == "float" else v

    out: dict[str, Any] = {}
    for name, _ in TOP_FIELDS:
        if name in NESTED:
            out[name] = {n: conv(f"{name}.{n}") for n, _ in NESTED[name]}
        else:
            out[name] = conv(name)
    return out


def flat_from_value_json(v: Any) -> dict[str, Any]:
    """Strict parse of a VALUE object (any key order, exact key set, exact types)."""

    def obj_keys(o, fields, where):
        if not isinstance(o, dict):
            raise ValueError(f"{where or 'value'} must be an object")
        want = [n for n, _ in fields]
        if set(o) != set(want):
            missing = [k for k in want if k not in o]
            extra = [k for k in o if k not in want]
            raise ValueError(f"{where or 'value'}: missing keys {missing}, unexpected keys {extra}")

    obj_keys(v, TOP_FIELDS, "")
    for name in NESTED:
        obj_keys(v[name], NESTED[name], name)
    flat = {}
    for path, ty in LEAVES:
        cur = v
        for part in path.split("."):
            cur = cur[part]
        if ty == "int":
            if type(cur) is not int:
                raise ValueError(f"{path}: expected JSON integer, got {cur!r}")
            if not I64_MIN <= cur <= I64_MAX:
                raise ValueError(f"{path}: {cur} outside i64")
        elif ty == "str":
            if not isinstance(cur, str):
                raise ValueError(f"{path}: expected string, got {cur!r}")
        else:
            cur = hex_f64(cur)
        flat[path] = cur
    return flat


def diff_flat(want: dict[str, Any], got: dict[str, Any]) -> str | None:
    for path, ty in LEAVES:
        a, b = want[path], got[path]
        if ty == "float":
            if not isinstance(b, float) or bits_of(a) != bits_of(b):
                shown = f64_hex(b) if isinstance(b, float) else repr(b)
                return f"{path}: want {f64_hex(a)} ({a!r}), got {shown} ({b!r})"
        elif type(a) is not type(b) or a != b:
            sa, sb = repr(a), repr(b)
            if len(sa) > 80:
                sa, sb = sa[:80] + "...", sb[:80] + "..."
            return f"{path}: want {sa}, got {sb}"
    return None


def int_out_of_i64(flat: dict[str, Any]) -> str | None:
    for path, ty in LEAVES:
        if ty == "int" and not I64_MIN <= flat[path] <= I64_MAX:
            return path
    return None


def vector(name, source, payload: bytes, expect, flat, **extra) -> dict[str, Any]:
    v: dict[str, Any] = {
        "name": name,
        "source": source,
        "msgpack": payload.hex(),
        "expect": expect,
        "value": value_json(flat) if flat is not None else None,
    }
    v.update(extra)
    return v


_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def dump(v: dict[str, Any]) -> str:
    """One compact JSON line: UTF-8 kept raw except the characters some line splitters
    (Python's str.splitlines, JavaScript) treat as line breaks, which are escaped."""
    text = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in _LINE_BREAKS.items():
        text = text.replace(ch, esc)  # these only ever occur inside JSON strings
    return text


# ---------------------------------------------------------------------------------------
# gen

INT_BOUNDARIES = [
    0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1,
    -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63),
]  # fmt: skip

FLOAT_SPECIALS = [
    0.0, -0.0, math.nan, math.inf, -math.inf,
    5e-324,                    # smallest subnormal
    2.2250738585072014e-308,   # smallest normal
    1.7976931348623157e308, -1.7976931348623157e308,
    1e-300, 0.1, 1 / 3,
    # beyond the required list
    -5e-324,
    2.225073858507201e-308,    # largest subnormal
    from_bits(0x7FF0000000000001),  # signalling NaN, payload 1
    from_bits(0xFFF8000000000000),  # negative quiet NaN
    from_bits(0x7FF800000000BEEF),  # quiet NaN with payload
    from_bits(0x7FFFFFFFFFFFFFFF),  # all-ones NaN
    1.0, -1.0, 2.0**53, 0.0123, 1234.5,
]  # fmt: skip

WORKER_IDS: list[tuple[str, str]] = [
    ("empty", ""),
    ("len1", "a"),
    ("ascii_31", "w" * 31),  # largest fixstr
    ("ascii_32", "w" * 32),  # smallest str8
    ("ascii_255", "x" * 255),  # largest str8
    ("ascii_256", "y" * 256),  # smallest str16
    ("typical", "worker-0123456789abcdef"),
    ("connection_id", "7587888283839283847"),
    ("cjk_10_chars_30_bytes", "中文工作节点标识符号"),  # 10 chars, 30 bytes: fixstr
    ("cjk_11_chars_33_bytes", "中文工作节点标识符号码"),  # 11 chars, 33 bytes: str8
    ("mixed_31_bytes", "中" * 10 + "a"),
    ("mixed_32_bytes", "中" * 10 + "ab"),
    ("cjk_255_bytes", "字" * 85),
    ("cjk_258_bytes", "字" * 86),
    ("emoji", "😀"),
    ("emoji_skin_tone", "👍🏽"),
    ("emoji_zwj_family", "👨\u200d👩\u200d👧\u200d👦"),
    ("flag", "🇯🇵"),
    ("combining_acute", "e\u0301"),
    ("stacked_combining", "a\u0300\u0301\u0302\u0303\u0304"),
    ("precomposed_latin", "éàüß"),
    ("arabic_rtl", "مرحبا"),
    ("nul", "\x00"),
    ("controls", "\x01\x1f\x7f\x80\x9f"),
    ("line_separators", "\u2028\u2029\n\r\t"),
    ("json_specials", '"\\/\b\f'),
    ("bom", "\ufeff"),
    ("around_surrogates", "\ud7ff\ue000"),
    ("noncharacters", "\ufffe\uffff"),
    ("max_codepoint", "\U0010ffff"),
]
HUGE_WORKER_ID = ("ascii_60000_bytes", "z" * 60000)


def _rot_int_flat(k: int) -> dict[str, Any]:
    flat = default_flat()
    for j, p in enumerate(INT_PATHS):
        flat[p] = INT_BOUNDARIES[(k + j) % len(INT_BOUNDARIES)]
    return flat


def boundary_flats(include_huge: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "boundary/default", default_flat()
    for k in range(len(INT_BOUNDARIES)):
        flat = _rot_int_flat(k)
        flat["worker_id"] = f"int-rot-{k}"
        yield f"boundary/int/rot{k:02d}", flat
    for label, v in (("all_max", I64_MAX), ("all_min", I64_MIN), ("all_minus_one", -1)):
        flat = default_flat()
        for p in INT_PATHS:
            flat[p] = v
        yield f"boundary/int/{label}", flat
    for k in range(len(FLOAT_SPECIALS)):
        flat = default_flat()
        flat["worker_id"] = f"float-rot-{k}"
        for j, p in enumerate(FLOAT_PATHS):
            flat[p] = FLOAT_SPECIALS[(k + j) % len(FLOAT_SPECIALS)]
        yield f"boundary/float/rot{k:02d}", flat
    wids = WORKER_IDS + ([HUGE_WORKER_ID] if include_huge else [])
    for i, (label, wid) in enumerate(wids):
        flat = _rot_int_flat(i)
        flat["worker_id"] = wid
        flat["wall_time"] = 0.0123
        yield f"boundary/worker_id/{label}", flat
    flat = default_flat()
    flat["worker_id"] = "字" * 85 + "x"  # 256 bytes
    for p in INT_PATHS:
        flat[p] = I64_MIN
    for p in FLOAT_PATHS:
        flat[p] = math.nan
    yield "boundary/mixed/largest_fields", flat


_BOUNDARY_NEAR = sorted(
    {min(I64_MAX, max(I64_MIN, b + d)) for b in INT_BOUNDARIES + [-(2**15), 2**15, 2**31, -(2**32)] for d in range(-2, 3)}
)
_NON_ASCII_RANGES = [
    (0xA0, 0xFF),  # Latin-1
    (0x100, 0x24F),  # Latin extended
    (0x300, 0x36F),  # combining marks
    (0x370, 0x4FF),  # Greek, Cyrillic
    (0x600, 0x6FF),  # Arabic
    (0x3040, 0x30FF),  # kana
    (0x4E00, 0x9FFF),  # CJK
    (0xAC00, 0xD7A3),  # Hangul
    (0xE000, 0xFFFD),  # private use .. specials (after the surrogates)
    (0x1F300, 0x1FAFF),  # emoji
    (0x10000, 0x10FFFF),  # any astral
]


def rand_int(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.3:
        return rng.randint(0, 5000) if rng.random() < 0.8 else rng.randint(-300, -1)
    if r < 0.55:
        return rng.choice(_BOUNDARY_NEAR)
    if r < 0.8:
        return rng.randint(I64_MIN, I64_MAX)
    mag = rng.randint(0, 2 ** rng.randint(0, 63) - 1)  # log-uniform width
    return mag if rng.random() < 0.5 else -mag - 1


def rand_float(rng: random.Random) -> float:
    r = rng.random()
    if r < 0.25:
        return from_bits(rng.getrandbits(64))  # any double, NaN payloads included
    if r < 0.3:  # NaN with a random sign and payload (quiet or signalling)
        return from_bits((rng.getrandbits(1) << 63) | (0x7FF << 52) | rng.randint(1, 2**52 - 1))
    if r < 0.35:  # subnormal
        return from_bits((rng.getrandbits(1) << 63) | rng.randint(1, 2**52 - 1))
    if r < 0.55:
        return rng.uniform(0.0, 1.0) if rng.random() < 0.5 else rng.uniform(0.0, 1e6)
    if r < 0.75:
        return rng.choice(FLOAT_SPECIALS)
    return math.copysign(10.0 ** rng.uniform(-300, 300), rng.random() - 0.5)


def rand_str(rng: random.Random) -> str:
    n = rng.randint(0, 300)
    p_ascii = rng.random()
    out = []
    for _ in range(n):
        if rng.random() < p_ascii:
            out.append(chr(rng.randint(0x20, 0x7E)) if rng.random() < 0.97 else chr(rng.randint(0, 0x1F)))
        else:
            lo, hi = rng.choice(_NON_ASCII_RANGES)
            out.append(chr(rng.randint(lo, hi)))  # never a surrogate
    return "".join(out)


def random_flat(rng: random.Random) -> dict[str, Any]:
    flat = default_flat()
    flat["worker_id"] = rand_str(rng)
    for p in INT_PATHS:
        flat[p] = rand_int(rng)
    for p in FLOAT_PATHS:
        flat[p] = rand_float(rng)
    return flat


def gen_vectors(mod, seed: int, count: int, include_huge: bool = True) -> Iterator[dict[str, Any]]:
    dec = raw_decoder(mod)

    def make(name, flat):
        obj = build_struct(mod, flat)
        payload = mod.encode(obj)
        if len(payload) > MAX_PAYLOAD:
            raise AssertionError(f"{name}: payload {len(payload)} bytes exceeds {MAX_PAYLOAD}")
        got = flat_from_struct(obj)
        # sanity: the module decodes its own bytes back to the same value, bit for bit
        d = diff_flat(got, flat_from_struct(dec.decode(payload)))
        if d:
            raise AssertionError(f"{name}: upstream round trip differs: {d}")
        return vector(name, mod.__fpm_name__, payload, "ok", got)

    for name, flat in boundary_flats(include_huge):
        yield make(name, flat)
    rng = random.Random(seed)
    for i in range(count):
        yield make(f"random/{seed}/{i:04d}", random_flat(rng))


# ---------------------------------------------------------------------------------------
# check


def _python_decode(mod, payload: bytes):
    """(result kind, object or exception) of the module's public decode()."""
    try:
        obj = mod.decode(payload)
    except Exception as e:  # sglang's decode raises
        return "error", e
    return ("none", None) if obj is None else ("ok", obj)


def bytes_diff(what: str, ours: bytes, theirs: bytes) -> str:
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    lo = max(0, i - 8)
    return (f"{what} at byte {i} (python {len(ours)} bytes, vector {len(theirs)} bytes): "
            f"python ..{ours[lo:i + 12].hex()}.. vs vector ..{theirs[lo:i + 12].hex()}..")  # fmt: skip


def check_vectors(mod, lines: Iterable[str]) -> dict[str, Any]:
    dec = raw_decoder(mod)
    failures: list[dict[str, str]] = []
    checked = skipped = 0

    def fail(name, reason):
        failures.append({"name": name, "reason": reason})

    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name = f"line {lineno}"
        try:
            v = json.loads(line)
            name = str(v.get("name", name))
            expect = v["expect"]
            payload = bytes.fromhex(v["msgpack"])
            if v["msgpack"] != payload.hex():
                raise ValueError("msgpack must be lowercase hex")
            if expect == "error":
                skipped += 1
                continue
            if expect not in ("ok", "unsupported_version"):
                raise ValueError(f"unknown expect {expect!r}")
            flat = flat_from_value_json(v["value"])
        except Exception as e:
            checked += 1
            fail(name, f"malformed vector: {type(e).__name__}: {e}")
            continue
        checked += 1
        if (flat["version"] == 1) != (expect == "ok"):
            fail(name, f"expect {expect!r} but value.version is {flat['version']}")
            continue
        # (a) the module's encoder produces exactly these bytes
        ours = mod.encode(build_struct(mod, flat))
        if ours != payload:
            fail(name, bytes_diff("encode differs", ours, payload))
            continue
        # (b) the module's decoder reads these bytes back as the value
        kind, res = _python_decode(mod, payload)
        if expect == "ok":
            if kind != "ok":
                fail(name, f"module decode returned {kind}: {res!r}")
                continue
            obj = res
        else:
            want_kind = "none" if mod.__fpm_name__ == "dynamo" else "ok"
            if kind != want_kind:
                fail(name, f"module decode of version {flat['version']} returned {kind}, expected {want_kind}")
                continue
            obj = dec.decode(payload)
        d = diff_flat(flat, flat_from_struct(obj))
        if d:
            fail(name, f"decode differs: {d}")
    if checked == 0:
        fail("<input>", "no vectors to check")
    return {"module": mod.__fpm_name__, "checked": checked, "skipped_error_vectors": skipped,
            "failures": failures[:20], "failure_count": len(failures)}  # fmt: skip


# ---------------------------------------------------------------------------------------
# extras: hand-built msgpack, outcome recorded from the module's decoder


class Raw(bytes):
    """Bytes spliced verbatim into a hand-built msgpack message."""


def mp(x: Any) -> bytes:
    return bytes(x) if isinstance(x, Raw) else msgspec.msgpack.encode(x)


def mp_map(pairs: list[tuple[Any, Any]], form: str = "min") -> Raw:
    """A msgpack map from (key, value) pairs (duplicates allowed). form: min|map16|map32."""
    n = len(pairs)
    if form == "min" and n < 16:
        head = bytes([0x80 | n])
    elif form in ("min", "map16") and n < 65536:
        head = b"\xde" + struct.pack(">H", n)
    else:
        head = b"\xdf" + struct.pack(">I", n)
    return Raw(head + b"".join(mp(k) + mp(v) for k, v in pairs))


def f32(x: float) -> Raw:
    return Raw(b"\xca" + struct.pack(">f", x))


def f32_bits(b: int) -> Raw:
    return Raw(b"\xca" + struct.pack(">I", b))


def uint64(n: int) -> Raw:
    return Raw(b"\xcf" + struct.pack(">Q", n))


def int64(n: int) -> Raw:
    return Raw(b"\xd3" + struct.pack(">q", n))


def int8(n: int) -> Raw:
    return Raw(b"\xd0" + struct.pack(">b", n))


def str8(s: str) -> Raw:
    b = s.encode()
    return Raw(b"\xd9" + bytes([len(b)]) + b)


def str16(s: str) -> Raw:
    b = s.encode()
    return Raw(b"\xda" + struct.pack(">H", len(b)) + b)


def raw_str(b: bytes) -> Raw:
    assert len(b) < 32
    return Raw(bytes([0xA0 | len(b)]) + b)


BASE_SCHED = [
    ("num_prefill_requests", 4), ("sum_prefill_tokens", 8192), ("var_prefill_length", 1234.5),
    ("sum_prefill_kv_tokens", 2048), ("num_decode_requests", 120), ("sum_decode_kv_tokens", 250000),
    ("var_decode_kv_tokens", 98765.4321),
]  # fmt: skip
BASE_QUEUED = [
    ("num_prefill_requests", 7), ("sum_prefill_tokens", 14000), ("var_prefill_length", 555.5),
    ("num_decode_requests", 2), ("sum_decode_kv_tokens", 9000), ("var_decode_kv_tokens", 10.25),
]  # fmt: skip


def base_pairs(**override) -> list[tuple[str, Any]]:
    """Top-level (key, value) pairs of the representative message; override any of them."""
    pairs: list[tuple[str, Any]] = [
        ("version", 1), ("worker_id", "worker-0123456789abcdef"), ("dp_rank", 3),
        ("counter_id", 123456), ("wall_time", 0.0123),
        ("scheduled_requests", mp_map(BASE_SCHED)), ("queued_requests", mp_map(BASE_QUEUED)),
    ]  # fmt: skip
    out = []
    for k, v in pairs:
        if k in override:
            v = override.pop(k)
            if v is DROP:
                continue
        out.append((k, v))
    out += list(override.items())  # unknown extras appended
    return out


DROP = object()


def sched(**override) -> Raw:
    return _nested(BASE_SCHED, override)


def queued(**override) -> Raw:
    return _nested(BASE_QUEUED, override)


def _nested(base, override) -> Raw:
    out = []
    for k, v in base:
        if k in override:
            v = override.pop(k)
            if v is DROP:
                continue
        out.append((k, v))
    return mp_map(out + list(override.items()))


def msg(**override) -> Raw:
    return mp_map(base_pairs(**override))


def deep(depth: int) -> Raw:
    """Alternating array / map nesting `depth` levels deep, innermost nil."""
    b = b"\xc0"
    for i in range(depth):
        b = (b"\x91" if i % 2 else b"\x81\xa1k") + b
    return Raw(b)


def extras_cases() -> Iterator[tuple[str, bytes, str | None]]:
    """(name, payload, hint): hint is the error_field to use when the decoder's message names
    none, or FORCE_ERROR + field for a case msgspec accepts but the contract rejects."""
    base = bytes(msg())
    yield "baseline/representative", base, None
    yield "baseline/default_struct_encoding", bytes(
        mp_map([("version", 1), ("worker_id", ""), ("dp_rank", 0), ("counter_id", 0), ("wall_time", 0.0),
                ("scheduled_requests", mp_map([(k, 0.0 if k.startswith("var") else 0) for k, _ in BASE_SCHED])),
                ("queued_requests", mp_map([(k, 0.0 if k.startswith("var") else 0) for k, _ in BASE_QUEUED]))])), None  # fmt: skip

    # --- unknown keys
    decode_metrics = {
        "num_requests": 3,
        "per_request": [{"rid": "a", "kv_len": 100, "spec": [1, 2, 3]}, {"rid": "b", "kv_len": 7, "spec": []}],
        "histogram": [[0, 1], [10, 5], [100, 2]],
        "mean": 35.5,
        "enabled": True,
        "extra": None,
    }
    yield "unknown/top_timing_scope", bytes(msg(timing_scope="iteration")), None
    yield "unknown/top_decode_metrics_nested", bytes(msg(decode_metrics=decode_metrics)), None
    yield "unknown/top_extend_lengths", bytes(msg(extend_lengths=[1, 2, 3])), None
    yield "unknown/top_past_kv_lengths", bytes(msg(past_kv_lengths=[0, 512, 70000, 2**40, 2**64 - 1, -5])), None
    yield "unknown/top_all_extensions", bytes(msg(timing_scope="iteration", decode_metrics=decode_metrics,
                                                  extend_lengths=[1, 2, 3], past_kv_lengths=[4, 5, 6])), None  # fmt: skip
    yield "unknown/top_before_known_keys", bytes(
        mp_map([("timing_scope", "iteration"), ("extend_lengths", [9, 9])] + base_pairs())), None
    interleaved = []
    for i, kv in enumerate(base_pairs()):
        interleaved += [(f"x_unknown_{i}", [i, {"n": i}]), kv]
    yield "unknown/top_interleaved", bytes(mp_map(interleaved)), None
    yield "unknown/in_scheduled", bytes(msg(scheduled_requests=sched(foo=1, bar=[1, 2], baz={"q": "r"}))), None
    yield "unknown/in_queued", bytes(msg(queued_requests=queued(timing_scope="x", lst=[[], {}]))), None
    yield "unknown/value_deep_nested_depth64", bytes(msg(deep_thing=deep(64))), None
    yield "unknown/value_deep_nested_depth2000", bytes(msg(deep_thing=deep(2000))), ""
    yield "unknown/value_bin", bytes(msg(blob=b"\x00\x01\xff" * 10)), None
    yield "unknown/value_bin16", bytes(msg(blob=b"\xaa" * 300)), None
    yield "unknown/value_fixext1", bytes(msg(e=Raw(b"\xd4\x05\x00"))), None
    yield "unknown/value_ext8", bytes(msg(e=msgspec.msgpack.Ext(7, b"\x01" * 17))), None
    yield "unknown/value_ext16", bytes(msg(e=msgspec.msgpack.Ext(-100, b"\x02" * 300))), None
    yield "unknown/value_timestamp_ext", bytes(msg(ts=Raw(b"\xd6\xff\x00\x00\x00\x01"))), None
    yield "unknown/value_bad_timestamp_ext", bytes(msg(ts=Raw(b"\xd5\xff\x00\x00"))), None
    yield "unknown/value_nil", bytes(msg(n=None)), None
    yield "unknown/value_bools", bytes(msg(t=True, f=False)), None
    yield "unknown/value_float32", bytes(msg(x=f32(1.5))), None
    yield "unknown/value_nan", bytes(msg(x=math.nan)), None
    yield "unknown/value_uint64_max", bytes(msg(x=2**64 - 1)), None
    yield "unknown/value_str_invalid_utf8", bytes(msg(s=raw_str(b"\xff\xfe"))), None
    yield "unknown/value_map_with_int_keys", bytes(msg(m={1: 2, 3: [4]})), None
    yield "unknown/value_map_with_bin_key", bytes(msg(m=mp_map([(b"k", 1)]))), None
    yield "unknown/key_empty_string", bytes(msg(**{"": 1})), None
    yield "unknown/key_long_300", bytes(msg(**{"k" * 300: 1})), None
    yield "unknown/key_case_variants", bytes(msg(Version=2, WORKER_ID="x", Dp_Rank=9)), None
    yield "unknown/value_reserved_opcode_c1", bytes(msg(x=Raw(b"\xc1"))), ""

    # --- missing keys
    yield "missing/empty_map", bytes(mp_map([])), None
    yield "missing/only_worker_id", bytes(mp_map([("worker_id", "w")])), None
    yield "missing/version", bytes(msg(version=DROP)), None
    yield "missing/nested_structs", bytes(msg(scheduled_requests=DROP, queued_requests=DROP)), None
    yield "missing/nested_empty_maps", bytes(msg(scheduled_requests=mp_map([]), queued_requests=mp_map([]))), None
    yield "missing/some_nested_keys", bytes(
        msg(scheduled_requests=sched(var_prefill_length=DROP, num_decode_requests=DROP),
            queued_requests=queued(sum_prefill_tokens=DROP))), None  # fmt: skip

    # --- type coercion
    yield "coerce/int_for_float_wall_time", bytes(msg(wall_time=3)), None
    yield "coerce/int_zero_for_float", bytes(msg(wall_time=0)), None
    yield "coerce/negative_int_for_float", bytes(msg(scheduled_requests=sched(var_prefill_length=-7))), None
    yield "coerce/int64_min_for_float", bytes(msg(queued_requests=queued(var_decode_kv_tokens=-(2**63)))), None
    yield "coerce/uint64_max_for_float", bytes(msg(scheduled_requests=sched(var_decode_kv_tokens=2**64 - 1))), None
    yield "coerce/2p53_plus_1_for_float", bytes(msg(wall_time=2**53 + 1)), None
    yield "coerce/float_for_int_dp_rank", bytes(msg(dp_rank=1.0)), "dp_rank"
    yield "coerce/float_for_int_nested", bytes(msg(scheduled_requests=sched(sum_prefill_tokens=5.0))), None
    yield "coerce/float32_for_int", bytes(msg(counter_id=f32(2.0))), None
    yield "coerce/float_for_int_version", bytes(msg(version=1.0)), None
    yield "coerce/bool_for_int", bytes(msg(dp_rank=True)), None
    yield "coerce/bool_for_float", bytes(msg(wall_time=False)), None
    yield "coerce/str_for_int", bytes(msg(dp_rank="3")), None
    yield "coerce/int_for_str", bytes(msg(worker_id=5)), None
    yield "coerce/bin_for_str", bytes(msg(worker_id=b"worker")), None
    yield "coerce/nil_for_int", bytes(msg(dp_rank=None)), None
    yield "coerce/nil_for_int_nested", bytes(msg(queued_requests=queued(num_decode_requests=None))), None
    yield "coerce/nil_for_float", bytes(msg(wall_time=None)), None
    yield "coerce/nil_for_str", bytes(msg(worker_id=None)), None
    yield "coerce/nil_for_struct", bytes(msg(scheduled_requests=None)), None
    yield "coerce/int_for_struct", bytes(msg(queued_requests=0)), None
    yield "coerce/invalid_utf8_worker_id", bytes(msg(worker_id=raw_str(b"ab\xff"))), "worker_id"
    yield "coerce/cesu_surrogate_worker_id", bytes(msg(worker_id=raw_str(b"\xed\xa0\x80"))), "worker_id"
    yield "coerce/overlong_utf8_worker_id", bytes(msg(worker_id=raw_str(b"\xc0\xaf"))), "worker_id"

    # --- wrong container shapes
    yield "shape/array_top_level", mp([1, "w", 0, 0, 0.0, [0] * 7, [0] * 6]), None
    yield "shape/array_scheduled", bytes(msg(scheduled_requests=[4, 8192, 1.0, 0, 0, 0, 0.0])), None
    yield "shape/array_queued", bytes(msg(queued_requests=[])), None
    yield "shape/empty_array_top_level", mp([]), None
    yield "shape/nil_top_level", mp(None), None
    yield "shape/int_top_level", mp(1), None
    yield "shape/str_top_level", mp("version"), None
    yield "shape/empty_payload", b"", ""

    # --- versions (Rust rule: version != 1 is UnsupportedVersion)
    yield "version/2", bytes(msg(version=2)), None
    yield "version/0", bytes(msg(version=0)), None
    yield "version/minus_1", bytes(msg(version=-1)), None
    yield "version/int64_max", bytes(msg(version=2**63 - 1)), None
    yield "version/2_only_key", bytes(mp_map([("version", 2)])), None
    yield "version/2_with_unknown_schema", bytes(mp_map([("version", 2), ("worker_id", "w"), ("new_field", [1])])), None
    yield "version/2p63_out_of_i64", bytes(msg(version=2**63)), None

    # --- ints outside i64 (msgspec accepts; the Rust decoder rejects)
    yield "int_range/dp_rank_2p63", bytes(msg(dp_rank=2**63)), None
    yield "int_range/counter_id_u64_max", bytes(msg(counter_id=2**64 - 1)), None
    yield "int_range/nested_2p63", bytes(msg(scheduled_requests=sched(sum_decode_kv_tokens=2**63))), None
    yield "int_range/queued_u64_max", bytes(msg(queued_requests=queued(num_prefill_requests=2**64 - 1))), None

    # --- duplicate keys
    yield "duplicate/dp_rank_1_then_2", bytes(mp_map(base_pairs() + [("dp_rank", 2)])), None
    yield "duplicate/version_2_then_1", bytes(mp_map([("version", 2)] + base_pairs())), None
    yield "duplicate/version_1_then_2", bytes(mp_map(base_pairs() + [("version", 2)])), None
    yield "duplicate/scheduled_requests_partial_maps", bytes(
        mp_map(base_pairs(scheduled_requests=mp_map([("num_prefill_requests", 5)]))
               + [("scheduled_requests", mp_map([("sum_prefill_tokens", 7)]))])), None  # fmt: skip
    yield "duplicate/nested_key", bytes(msg(queued_requests=mp_map(BASE_QUEUED + [("num_prefill_requests", 99)]))), None
    yield "duplicate/first_value_invalid", bytes(mp_map([("worker_id", None)] + base_pairs())), None
    # msgspec keeps the last value (3); any int outside i64 is an error for the Rust decoder
    yield "duplicate/first_value_out_of_i64", bytes(mp_map([("dp_rank", 2**64 - 1)] + base_pairs())), FORCE_ERROR + "dp_rank"

    # --- map keys
    yield "key/int_key_top_level", bytes(mp_map(base_pairs() + [(1, 2)])), None
    yield "key/int_key_nested", bytes(msg(scheduled_requests=mp_map(BASE_SCHED + [(7, 7)]))), None
    yield "key/bin_key_top_level", bytes(mp_map([(b"dp_rank", 1)] + base_pairs())), None
    yield "key/nil_key_top_level", bytes(mp_map(base_pairs() + [(None, 1)])), None
    yield "key/str8_keys", bytes(mp_map([(str8(k), v) for k, v in base_pairs()])), None
    yield "key/str16_key", bytes(mp_map([(str16("dp_rank"), 9)] + base_pairs(dp_rank=DROP))), None

    # --- truncation and trailing bytes
    for cut in sorted({1, 2, 10, 40, len(base) // 2, len(base) - 9, len(base) - 1}):
        yield f"truncated/at_{cut}_of_{len(base)}", base[:cut], ""
    yield "trailing/zero_byte", base + b"\x00", ""
    yield "trailing/nil", base + b"\xc0", ""
    yield "trailing/second_message", base + base, ""

    # --- float32 for float fields
    yield "float32/wall_time_1.5", bytes(msg(wall_time=f32(1.5))), None
    yield "float32/wall_time_0.1f", bytes(msg(wall_time=f32(0.1))), None
    yield "float32/negative_zero", bytes(msg(scheduled_requests=sched(var_prefill_length=f32(-0.0)))), None
    yield "float32/inf", bytes(msg(scheduled_requests=sched(var_decode_kv_tokens=f32(math.inf)))), None
    yield "float32/minus_inf", bytes(msg(queued_requests=queued(var_prefill_length=f32(-math.inf)))), None
    yield "float32/quiet_nan", bytes(msg(queued_requests=queued(var_decode_kv_tokens=f32_bits(0x7FC00000)))), None
    yield "float32/smallest_subnormal", bytes(msg(wall_time=f32_bits(0x00000001))), None
    yield "float32/max", bytes(msg(wall_time=f32_bits(0x7F7FFFFF))), None

    # --- order and non-minimal encodings
    yield "order/top_level_reversed", bytes(mp_map(list(reversed(base_pairs())))), None
    yield "order/nested_reversed", bytes(
        msg(scheduled_requests=mp_map(list(reversed(BASE_SCHED))),
            queued_requests=mp_map(list(reversed(BASE_QUEUED))))), None  # fmt: skip
    yield "order/shuffled", bytes(mp_map([base_pairs()[i] for i in (4, 6, 1, 0, 5, 3, 2)])), None
    yield "nonminimal/map16_top", bytes(mp_map(base_pairs(), form="map16")), None
    yield "nonminimal/map32_nested", bytes(msg(scheduled_requests=mp_map(BASE_SCHED, form="map32"))), None
    yield "nonminimal/uint64_small", bytes(msg(dp_rank=uint64(5), counter_id=uint64(0))), None
    yield "nonminimal/int8_positive", bytes(msg(dp_rank=int8(5))), None
    yield "nonminimal/int64_minus_1", bytes(msg(counter_id=int64(-1))), None
    yield "nonminimal/int64_2p62", bytes(msg(counter_id=int64(2**62))), None
    yield "nonminimal/str16_worker_id", bytes(msg(worker_id=str16("w"))), None
    yield "nonminimal/str8_empty_worker_id", bytes(msg(worker_id=str8(""))), None


FORCE_ERROR = "force-error:"  # hint prefix: expect "error" whatever msgspec decides
_PATH_RE = re.compile(r"`\$([^`]*)`$")  # "... - at `$.a.b`" or "... - at `key` in `$.a`"


def error_field_of(exc: BaseException) -> str | None:
    """Dotted field path named by a msgspec error message ('' for the whole message)."""
    m = _PATH_RE.search(str(exc))
    return m.group(1).lstrip(".") if m else None


def extras_vectors(mod) -> Iterator[dict[str, Any]]:
    dec = raw_decoder(mod)
    name_of = mod.__fpm_name__
    seen = set()
    for name, payload, hint in extras_cases():
        assert name not in seen, name
        seen.add(name)
        kind, _ = _python_decode(mod, payload)
        try:
            obj = dec.decode(payload)
        except Exception as e:
            field = error_field_of(e)
            if field is None:
                field = hint if hint is not None else ""
            assert not field.startswith(FORCE_ERROR), name
            assert kind in ("error", "none"), (name, kind)
            yield vector(name, "msgpack", payload, "error", None, error_field=field,
                         python_result=kind, python_error=f"{type(e).__name__}: {e}")  # fmt: skip
            continue
        flat = flat_from_struct(obj)
        bad = int_out_of_i64(flat)
        if hint is not None and hint.startswith(FORCE_ERROR):
            bad = hint[len(FORCE_ERROR):]
        if bad is not None:
            yield vector(name, "msgpack", payload, "error", None, error_field=bad, python_result=kind)
        elif flat["version"] != 1:
            assert kind == ("none" if name_of == "dynamo" else "ok"), (name, kind)
            yield vector(name, "msgpack", payload, "unsupported_version", flat, python_result=kind)
        else:
            assert kind == "ok", (name, kind)
            yield vector(name, "msgpack", payload, "ok", flat, python_result=kind)


# ---------------------------------------------------------------------------------------
# schema


def type_name(t: Any) -> str:
    return t.__name__ if isinstance(t, type) else repr(t)


def default_repr(f) -> str:
    d = f.default
    if d is msgspec.NODEFAULT:
        if f.default_factory is not msgspec.NODEFAULT:
            return f"<factory {getattr(f.default_factory, '__name__', repr(f.default_factory))}>"
        return "<required>"
    if isinstance(d, msgspec.Struct) and d == type(d)():
        return f"{type(d).__name__}()"
    return repr(d)


def struct_fields(cls) -> list[list[str]]:
    return [[f.name, type_name(f.type), default_repr(f)] for f in msgspec.structs.fields(cls)]


def struct_config(cls) -> dict[str, Any]:
    c = cls.__struct_config__
    fields = msgspec.structs.fields(cls)
    renamed = {f.name: f.encode_name for f in fields if f.encode_name != f.name}
    tag = c.tag
    return {
        "array_like": bool(c.array_like),
        "omit_defaults": bool(c.omit_defaults),
        "rename": renamed or None,  # field -> wire name, from FieldInfo.encode_name
        "tag": tag if tag is None or isinstance(tag, (str, int)) else repr(tag),
        "forbid_unknown_fields": bool(c.forbid_unknown_fields),
    }


CLASSES = ["ForwardPassMetrics", "ScheduledRequestMetrics", "QueuedRequestMetrics"]


def schema_of(mod) -> dict[str, Any]:
    s: dict[str, Any] = {"FPM_VERSION": mod.FPM_VERSION}
    for c in CLASSES:
        s[c] = struct_fields(getattr(mod, c))
    s["struct_config"] = {c: struct_config(getattr(mod, c)) for c in CLASSES}
    dist, version = mod.__fpm_wheel__.split("-")[:2]  # wheel name minus platform tags
    s["source"] = f"{dist.replace('_', '-')}=={version}:{mod.__fpm_member__}"
    return s


def schema_json(schema: dict[str, Any]) -> str:
    """Indented JSON with each [field, type, default] triple kept on one line."""
    text = json.dumps(schema, indent=2)
    return re.sub(r'\[\s+("(?:[^"\\]|\\.)*"),\s+("(?:[^"\\]|\\.)*"),\s+("(?:[^"\\]|\\.)*")\s+\]',
                  r"[\1, \2, \3]", text)  # fmt: skip


def schema_all() -> dict[str, Any]:
    # upstream.load (not load_module): schema must report a changed layout, not refuse it
    out = {}
    for n in ("dynamo", "sglang"):
        mod = upstream.load(n)
        out[n] = schema_of(mod)
    return out


# ---------------------------------------------------------------------------------------
# bench


def bench_message(mod):
    return mod.ForwardPassMetrics(
        version=1, worker_id="worker-0123456789abcdef", dp_rank=3, counter_id=123456, wall_time=0.0123,
        scheduled_requests=mod.ScheduledRequestMetrics(**dict(BASE_SCHED)),
        queued_requests=mod.QueuedRequestMetrics(**dict(BASE_QUEUED)),
    )  # fmt: skip


def bench(mod, iterations: int, repeats: int = 5) -> dict[str, Any]:
    m = bench_message(mod)
    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder(mod.ForwardPassMetrics)
    data = enc.encode(m)
    assert data == mod.encode(m) == bytes(msg()), "bench message differs from the representative one"

    # The loops call the bound methods directly (no lambda per call) so the figure is
    # msgspec's cost plus only the unavoidable Python loop overhead.
    e = enc.encode
    ei = enc.encode_into
    d = dec.decode
    rng = range(iterations)
    buf = bytearray()  # reused: after the first call it already has the message's size

    def encode_loop() -> None:
        for _ in rng:
            e(m)

    def encode_into_loop() -> None:
        for _ in rng:
            ei(m, buf)

    def decode_loop() -> None:
        for _ in rng:
            d(data)

    def best(loop: Callable[[], None]) -> float:
        res = []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            loop()
            res.append((time.perf_counter_ns() - t0) / iterations)
        return min(res)

    encode_ns = best(encode_loop)
    encode_into_ns = best(encode_into_loop)
    assert bytes(buf) == data, "encode_into wrote other bytes"
    decode_ns = best(decode_loop)
    return {"module": mod.__fpm_name__, "encode_ns": round(encode_ns, 1), "encode_into_ns": round(encode_into_ns, 1),
            "decode_ns": round(decode_ns, 1), "hex": data.hex(),
            "bytes": len(data), "iterations": iterations, "repeats": repeats,
            "msgspec": msgspec.__version__, "python": sys.version.split()[0]}  # fmt: skip


# ---------------------------------------------------------------------------------------
# welford


def welford_lists(seed: int, count: int) -> Iterator[list[int]]:
    fixed = [[], [0], [5], [7, 7, 7], [0, 10**9], [10**9] * 200, [10**9 + (i % 3) for i in range(200)], list(range(200)),
             [-5, 5, -(10**9)], [2**53 + 1, 2**53 + 3, 2**53 + 5], [-(2**55), 2**55, 1, -1]]  # fmt: skip
    for lst in fixed[:count]:
        yield lst
    rng = random.Random(seed)
    for _ in range(max(0, count - len(fixed))):
        n = rng.randint(0, 200)
        r = rng.random()
        if r < 0.5:
            yield [rng.randint(0, 10**6) for _ in range(n)]
        elif r < 0.7:
            yield [rng.randint(0, 10**9) if rng.random() < 0.2 else rng.randint(0, 10**6) for _ in range(n)]
        elif r < 0.8:
            base = rng.randint(10**8, 10**9)
            yield [base + rng.randint(0, 10) for _ in range(n)]  # big mean, tiny variance
        elif r < 0.9:
            yield [rng.randint(-(10**6), 10**6) for _ in range(n)]
        else:
            # beyond 2**53: the int -> float conversion rounds (the sum stays inside i64)
            yield [rng.randint(-(2**55), 2**55) for _ in range(n)]


def welford_results(mod, seed: int, count: int) -> Iterator[dict[str, Any]]:
    for values in welford_lists(seed, count):
        acc = mod.WelfordAccumulator()
        for v in values:
            acc.add(v)
        n = acc.n if hasattr(acc, "n") else acc.count  # dynamo: n/s; sglang: count/total
        s = acc.s if hasattr(acc, "s") else acc.total
        yield {"values": values, "n": n, "s": s, "variance": f64_hex(acc.variance())}


# ---------------------------------------------------------------------------------------
# CLI


def get_module(name: str):
    mod = load_module(name)
    mod.__fpm_name__ = name
    return mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fpmcontract", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def with_module(p, required=True):
        p.add_argument("--module", choices=["dynamo", "sglang"], required=required,
                       default=None if required else "dynamo")  # fmt: skip
        return p

    sub.add_parser("schema", help="print both upstream modules' struct layouts as JSON")
    sub.add_parser("layout", help="print this helper's own layout (checked against fpm_schema::SCHEMA)")
    p = with_module(sub.add_parser("gen", help="print boundary + random vectors (expect ok)"))
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--count", type=int, required=True, help="number of random vectors after the boundary cases")
    p.add_argument("--no-huge", action="store_true", help="omit the 60,000-byte worker_id case")
    with_module(sub.add_parser("check", help="check vectors from stdin against the module"))
    with_module(sub.add_parser("extras", help="print decoder-semantics vectors"))
    p = with_module(sub.add_parser("bench", help="time msgspec encode/decode"), required=False)
    p.add_argument("--iterations", type=int, default=100_000)
    p = with_module(sub.add_parser("welford", help="WelfordAccumulator reference results"), required=False)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    args = ap.parse_args(argv)

    try:
        if args.cmd == "schema":
            print(schema_json(schema_all()))
            return 0
        if args.cmd == "layout":
            print(json.dumps({cls: [list(f) for f in fields] for cls, fields in LAYOUT.items()}))
            return 0
        mod = get_module(args.module)
    except upstream.UpstreamMissing as e:
        print(f"fpmcontract: {e}", file=sys.stderr)
        return 2

    out = sys.stdout
    if args.cmd == "gen":
        for v in gen_vectors(mod, args.seed, args.count, include_huge=not args.no_huge):
            out.write(dump(v) + "\n")
    elif args.cmd == "extras":
        for v in extras_vectors(mod):
            out.write(dump(v) + "\n")
    elif args.cmd == "check":
        summary = check_vectors(mod, sys.stdin)
        print(json.dumps(summary, ensure_ascii=False))
        return 1 if summary["failures"] else 0
    elif args.cmd == "bench":
        print(json.dumps(bench(mod, args.iterations)))
    elif args.cmd == "welford":
        for r in welford_results(mod, args.seed, args.count):
            out.write(json.dumps(r, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
