#!/usr/bin/env python3
"""Regenerate the committed golden vectors in contract-tests/vectors/ from the upstream wheels.

    $(contract-tests/setup.sh) contract-tests/python/make_golden.py [--check]

Writes dynamo.jsonl, sglang.jsonl (all boundary cases except the 60,000-byte worker_id, plus
200 random messages, seed GEN_SEED), extras-dynamo.jsonl, extras-sglang.jsonl,
welford.jsonl (50 cases) and schema.json. With --check nothing is written; the exit status
is 1 if any committed file differs from what the upstream modules produce now.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import fpmcontract as fc

GEN_SEED = 20250601
GEN_COUNT = 200
WELFORD_SEED = 424242
WELFORD_COUNT = 50
MAX_FILE_BYTES = 1_000_000

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def jsonl(rows) -> str:
    return "".join(fc.dump(r) + "\n" for r in rows)


def render() -> dict[str, str]:
    files: dict[str, str] = {}
    for name in ("dynamo", "sglang"):
        mod = fc.get_module(name)
        files[f"{name}.jsonl"] = jsonl(fc.gen_vectors(mod, GEN_SEED, GEN_COUNT, include_huge=False))
        files[f"extras-{name}.jsonl"] = jsonl(fc.extras_vectors(mod))
    files["welford.jsonl"] = jsonl(fc.welford_results(fc.get_module("dynamo"), WELFORD_SEED, WELFORD_COUNT))
    files["schema.json"] = fc.schema_json(fc.schema_all()) + "\n"
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = ap.parse_args()
    try:
        files = render()
    except fc.upstream.UpstreamMissing as e:
        print(f"make_golden: {e}", file=sys.stderr)
        return 2

    # both upstream modules must agree byte for byte (only the "source" label differs)
    for kind in ("", "extras-"):
        a = [json.loads(l) for l in files[f"{kind}dynamo.jsonl"].split("\n") if l]
        b = [json.loads(l) for l in files[f"{kind}sglang.jsonl"].split("\n") if l]
        for x, y in zip(a, b):
            if x["msgpack"] != y["msgpack"] or x["value"] != y["value"]:
                print(f"note: dynamo and sglang differ on {x['name']}", file=sys.stderr)

    sgl_welford = jsonl(fc.welford_results(fc.get_module("sglang"), WELFORD_SEED, WELFORD_COUNT))
    if sgl_welford != files["welford.jsonl"]:
        print("note: dynamo and sglang WelfordAccumulator results differ", file=sys.stderr)

    status = 0
    for name, text in files.items():
        data = text.encode("utf-8")
        if len(data) > MAX_FILE_BYTES:
            print(f"make_golden: {name} is {len(data)} bytes (limit {MAX_FILE_BYTES})", file=sys.stderr)
            status = 1
        path = VECTORS / name
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                print(f"make_golden: {path} is out of date", file=sys.stderr)
                status = 1
        else:
            VECTORS.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            print(f"{path} ({len(data)} bytes, {text.count(chr(10))} lines)")
    return status


if __name__ == "__main__":
    sys.exit(main())
