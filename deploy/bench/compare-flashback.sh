#!/usr/bin/env bash
# Runs ../shared/bench/compare.sh with Flashback as the extra target: starts `flashback up`
# on an empty data dir, lets compare.sh replay the dump into it and the peers, then stops it.
#   deploy/bench/compare-flashback.sh DUMP_DIR      (env: BENCH=path to shared/bench, FB_PORT=19201, RESULTS_CACHE=0,
#                                                    and compare.sh's CONC, QCONC, QDURATION, PEERS, WORK)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BENCH=${BENCH:-$ROOT/../shared/bench}
DUMP=${1:?usage: compare-flashback.sh DUMP_DIR}
WORK=${WORK:-/tmp/bench}
PORT=${FB_PORT:-19201}
DATA=$WORK/flashback/data
rm -rf "$WORK/flashback" && mkdir -p "$DATA"
# qload repeats identical queries over data that no longer changes: with the results cache on it
# would measure cache hits only, so it is off here (as the peers run with -search.disableCache).
# RESULTS_CACHE=256MiB turns it back on.
printf 'query:\n  results_cache_size: %s\n' "${RESULTS_CACHE:-0}" >"$WORK/flashback/config.yml"
python3 -m flashback up --config "$WORK/flashback/config.yml" --listen "127.0.0.1:$PORT" --data-dir "$DATA" \
  2>"$WORK/flashback/log" &
PID=$!
trap 'kill -TERM $PID 2>/dev/null; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -fs -o /dev/null "http://127.0.0.1:$PORT/-/ready" && break
  kill -0 $PID 2>/dev/null || { echo "flashback exited; see $WORK/flashback/log" >&2; exit 1; }
  sleep 0.2
done
WRITE_URL=http://127.0.0.1:$PORT/api/v1/write QUERY_URL=http://127.0.0.1:$PORT PID=$PID DATADIR=$DATA \
  EXTRA_NAME=flashback WORK=$WORK "$BENCH/compare.sh" "$DUMP"
