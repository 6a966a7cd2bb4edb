"""A pyzmq SUB that decodes every message with Dynamo's own decode() (ai-dynamo==1.6.1, the
module loaded from the wheel). Used by fpm-emitter's interop test.

Prints "ready" once connected, then one JSON summary line when it has seen --iterations
non-heartbeat messages followed by at least one heartbeat (or at --timeout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "contract-tests", "python"))

import zmq  # noqa: E402

import upstream  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=30)
    args = ap.parse_args()

    fpm = upstream.load("dynamo")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 200)
    sub.connect(args.endpoint)
    print("ready", flush=True)

    received = iterations = heartbeats = heartbeats_after = 0
    decode_failures = counter_gaps = bad_frames = 0
    worker_ids: set[str] = set()
    last = None
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            frames = sub.recv_multipart()
        except zmq.Again:
            continue
        received += 1
        if len(frames) != 3 or frames[0] != b"" or len(frames[1]) != 8:
            bad_frames += 1
            continue
        counter = int.from_bytes(frames[1], "big")
        if last is not None and counter != last + 1:
            counter_gaps += 1
        last = counter
        m = fpm.decode(frames[2])
        if m is None or m.counter_id != counter:
            decode_failures += 1
            continue
        worker_ids.add(m.worker_id)
        is_heartbeat = m.wall_time == 0.0 and m.scheduled_requests == fpm.ScheduledRequestMetrics()
        if is_heartbeat:
            heartbeats += 1
            if iterations >= args.iterations:
                heartbeats_after += 1
                break
        else:
            iterations += 1
    print(json.dumps({
        "received": received, "iterations": iterations, "heartbeats": heartbeats,
        "heartbeats_after": heartbeats_after, "decode_failures": decode_failures,
        "counter_gaps": counter_gaps, "bad_frames": bad_frames, "worker_ids": sorted(worker_ids),
    }), flush=True)
    sub.close(0)
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
