#!/usr/bin/env bash
# Issue 15: `fpm sim --rate max` into a running `fpm relay` on a private nats-server; prints the
# sim table, the relay's counters and what a NATS subscriber received. Needs a release build
# (`cargo build --release -p fpm-cli`) and the contract venv (`bash contract-tests/setup.sh`).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
FPM=${FPM:-target/release/fpm}
D=$(mktemp -d)
PORT=14222; MPORT=19191
nats-server -a 127.0.0.1 -p $PORT >$D/nats.log 2>&1 & NATS=$!
sleep 0.5
$FPM relay --ipc-base ipc://$D/fpm --dp-ranks 0 --nats-url nats://127.0.0.1:$PORT --metrics-addr 127.0.0.1:$MPORT -q >$D/relay.log 2>&1 & RELAY=$!
PY=target/fpm-venv/bin/python
$PY - $PORT >$D/sub.txt 2>&1 <<'PYEOF' & SUB=$!
import asyncio, sys, nats
async def main():
    nc = await nats.connect(f"nats://127.0.0.1:{sys.argv[1]}")
    n = 0
    async def cb(m):
        nonlocal n; n += 1
    await nc.subscribe(">", cb=cb, pending_msgs_limit=10_000_000, pending_bytes_limit=-1)
    last, quiet = -1, 0
    while quiet < 30:
        await asyncio.sleep(0.1)
        quiet = quiet + 1 if n == last else 0
        last = n
    print(n)
asyncio.run(main())
PYEOF
sleep 1.5
$FPM sim --endpoint ipc://$D/fpm --rate max --duration 6 2>&1 | tail -25 > $D/sim.txt
sleep 1
curl -s 127.0.0.1:$MPORT/metrics | grep -E "^fpm_relay_(received|published|dropped_messages)" | grep -v "^#" > $D/metrics.txt
wait $SUB
kill $RELAY; wait $RELAY 2>/dev/null; kill $NATS
echo "== sim"; cat $D/sim.txt; echo "== relay"; cat $D/metrics.txt; echo "== NATS subscriber"; cat $D/sub.txt
