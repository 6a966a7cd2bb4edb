"""Run Dynamo's planner regression models on sequences fed from Rust (parity tests).

The models are the real ones: ``dynamo/planner/core/perf_model/{base,prefill,decode,agg}.py``
and ``dynamo/common/forward_pass_metrics.py`` read out of the ``ai-dynamo`` wheel at run time
(see ``upstream.py`` for how the wheel is found). Only ``msgspec``, ``numpy`` and
``scikit-learn`` are needed: empty package shells stand in for ``dynamo``,
``dynamo.common``, ``dynamo.planner``, ``dynamo.planner.core`` and
``dynamo.planner.core.perf_model`` so that their ``__init__`` files (which import the whole
planner) never run.

    $PY contract-tests/python/planner.py < cases.jsonl > results.jsonl

Input: one CASE per line; output: one RESULT per line, in the same order.

CASE   {"name": str, "model": "prefill"|"decode"|"agg", "max_samples": int,
        "bucket_size": int, "min_observations": int, "events": [EVENT...]}
EVENT  ["obs", wall_time, num_prefill_requests, sum_prefill_tokens, num_decode_requests,
        sum_decode_kv_tokens]       feeds one ForwardPassMetrics to add_observation()
       ["check", [QUERY...]]        records the model's state and runs the queries
QUERY  ["ttft", queued_prefill_tokens, max_num_batched_tokens, kv_hit_rate]      prefill
       ["ttft", queued_prefill_tokens, max_num_batched_tokens, current_decode_kv,
        kv_hit_rate]                                                               agg
       ["itl", scheduled_decode_kv, queued_decode_kv]                        decode, agg
       ["prefill_rps", ttft_sla, isl, max_num_batched_tokens]                    prefill
       ["decode_rps", itl, context_length, osl, max_kv_tokens, max_num_seqs,
        accept_length]                                                            decode
       ["agg_rps", isl, osl, max_num_batched_tokens, ttft_sla, itl_sla, max_kv_tokens,
        max_num_seqs, kv_hit_rate, accept_length]                                    agg
RESULT {"name": str, "checks": [STATE...]}
STATE  {"n": num_observations, "sufficient": has_sufficient_data(),
        "samples": [[x..., wall_time]...] in _gather_observations() order,
        "bounds": [[min, max] per axis], "fit": "ok"|"too_few"|"rejected"|"error",
        "coef": [...] and "intercept" (fit "ok" only; coef after the decode clamp),
        "avgs": {moving-average name: value}, "max_observed_kv" (decode),
        "estimates": [null | float | [float...] | "error" per QUERY]}

Every float, both ways, is ``"f64:"`` + 16 hex digits of its IEEE-754 bits (exact; NaN and
infinities included). Ints are JSON integers; ``null`` is None.
"""

from __future__ import annotations

import json
import linecache
import logging
import struct
import sys
import types
import zipfile

import upstream

PACKAGES = [
    "dynamo",
    "dynamo.common",
    "dynamo.planner",
    "dynamo.planner.core",
    "dynamo.planner.core.perf_model",
]
# Loaded in this order (each imports only the ones before it).
MODULES = [
    ("dynamo.common.forward_pass_metrics", "dynamo/common/forward_pass_metrics.py"),
    ("dynamo.planner.core.perf_model.base", "dynamo/planner/core/perf_model/base.py"),
    ("dynamo.planner.core.perf_model.prefill", "dynamo/planner/core/perf_model/prefill.py"),
    ("dynamo.planner.core.perf_model.decode", "dynamo/planner/core/perf_model/decode.py"),
    ("dynamo.planner.core.perf_model.agg", "dynamo/planner/core/perf_model/agg.py"),
]


def load_models() -> dict[str, types.ModuleType]:
    whl = upstream.wheel_path("dynamo")
    for name in PACKAGES:
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = []  # a package, so submodules resolve through sys.modules
            sys.modules[name] = pkg
    loaded = {}
    with zipfile.ZipFile(whl) as z:
        for name, member in MODULES:
            source = z.read(member).decode("utf-8")
            filename = f"{whl}/{member}"
            mod = types.ModuleType(name)
            mod.__file__ = filename
            mod.__package__ = name.rpartition(".")[0]
            sys.modules[name] = mod
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            exec(compile(source, filename, "exec"), mod.__dict__)
            parent, _, leaf = name.rpartition(".")
            setattr(sys.modules[parent], leaf, mod)
            loaded[name] = mod
    return loaded


def fh(x: float) -> str:
    return "f64:" + struct.pack(">d", float(x)).hex()


def arg(v):
    if isinstance(v, str) and v.startswith("f64:"):
        return struct.unpack(">d", bytes.fromhex(v[4:]))[0]
    return v  # int or None


def out(v):
    if v is None:
        return None
    if isinstance(v, tuple):
        return [fh(x) for x in v]
    return fh(v)


def main() -> int:
    logging.disable(logging.CRITICAL)  # the models warn on rejected fits / unreachable SLAs
    mods = load_models()
    fpm_mod = mods["dynamo.common.forward_pass_metrics"]
    classes = {
        "prefill": mods["dynamo.planner.core.perf_model.prefill"].PrefillRegressionModel,
        "decode": mods["dynamo.planner.core.perf_model.decode"].DecodeRegressionModel,
        "agg": mods["dynamo.planner.core.perf_model.agg"].AggRegressionModel,
    }
    avg_names = {
        "prefill": ["_avg_isl", "_avg_num_prefill"],
        "decode": ["_avg_decode_len", "_avg_num_decode"],
        "agg": ["_avg_isl", "_avg_decode_len", "_avg_prefill_tokens", "_avg_num_prefill", "_avg_num_decode"],
    }
    for line in sys.stdin:
        if not line.strip():
            continue
        case = json.loads(line)
        kind = case["model"]
        model = classes[kind](
            case["max_samples"],
            min_observations=case["min_observations"],
            bucket_count=case["bucket_size"],
        )
        checks = []
        for ev in case["events"]:
            if ev[0] == "obs":
                _, wt, npr, spt, ndr, sdkv = ev
                fpm = fpm_mod.ForwardPassMetrics(
                    wall_time=arg(wt),
                    scheduled_requests=fpm_mod.ScheduledRequestMetrics(
                        num_prefill_requests=npr,
                        sum_prefill_tokens=spt,
                        num_decode_requests=ndr,
                        sum_decode_kv_tokens=sdkv,
                    ),
                )
                model.add_observation(fpm)
                continue
            state = {
                "n": model.num_observations,
                "sufficient": model.has_sufficient_data(),
                "samples": [
                    [fh(v) for v in model._to_vals(x)] + [fh(wt)]
                    for x, wt in model._gather_observations()
                ],
                "bounds": [[fh(lo), fh(hi)] for lo, hi in zip(model._axis_min, model._axis_max)],
            }
            try:
                if model._ensure_fitted():
                    state["fit"] = "ok"
                    state["coef"] = [fh(c) for c in model._model.coef_]
                    state["intercept"] = fh(model._model.intercept_)
                elif len(model._gather_observations()) < model.min_observations:
                    state["fit"] = "too_few"
                else:
                    state["fit"] = "rejected"
            except ValueError:  # sklearn refuses NaN/inf targets and empty inputs
                state["fit"] = "error"
            state["avgs"] = {n: fh(getattr(model, n).value) for n in avg_names[kind]}
            if kind == "decode":
                state["max_observed_kv"] = fh(model._max_observed_kv)
            estimates = []
            for q in ev[1]:
                name, args = q[0], [arg(a) for a in q[1:]]
                fn = {
                    "ttft": "estimate_next_ttft",
                    "itl": "estimate_next_itl",
                    "prefill_rps": "find_best_engine_prefill_rps",
                    "decode_rps": "find_best_engine_decode_rps",
                    "agg_rps": "find_best_engine_agg_rps",
                }[name]
                try:
                    estimates.append(out(getattr(model, fn)(*args)))
                except ValueError:
                    estimates.append("error")
            state["estimates"] = estimates
            checks.append(state)
        print(json.dumps({"name": case["name"], "checks": checks}, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
