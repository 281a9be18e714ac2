#!/usr/bin/env bash
# Webhook sink throughput (docs/benchmarks.md): EVENTS order-created events
# in the log, then `serve --roles webhook` delivers them to a local
# receiver (tests/support/webhook_receiver.py --bare: answers 200 at once);
# beside it, the same receiver's ceiling under wrk sending the same body
# over 32 keep-alive connections, in the same run.
#
#   examples/webhook_bench.sh
#
# EVENTS (default 50000), PG_ADMIN_URL (default
# postgres://postgres@127.0.0.1:5432/postgres), BIN (default: this tree's
# release build, built first; another tree's binary to compare). Needs wrk
# (apt-get install wrk) and node.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
EVENTS=${EVENTS:-50000}
PG=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
db=bench_webhook
url="${PG%/*}/$db"
work=$(mktemp -d -t outbox-relay-webhook.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
bin=${BIN:-./target/release/outbox-relay}
[ -n "${BIN:-}" ] || cargo build --release --quiet --bin outbox-relay
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
secret="whsec_$(head -c 24 /dev/urandom | base64)"
node examples/webhook_bench_receiver.mjs "$port" >/dev/null &
pids+=("$!")
sleep 1

# The ceiling: wrk posting an event-sized body.
cat >"$work/post.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"topic":"order-created","partition":3,"offset":12345,"key":"u12345","created_at":"2026-12-07T08:00:00Z","headers":{},"payload":{"order_id":12345,"user_id":1,"amount":12445,"email":"c12345@example.com"}}'
EOF
ceiling=$(wrk -t2 -c32 -d10s -s "$work/post.lua" "http://127.0.0.1:$port/hooks" | awk '/Requests\/sec/ {print $2}')

psql -q "$PG" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
DATABASE_URL=$url $bin migrate >/dev/null
psql -q "$url" -c "INSERT INTO outbox (topic, key, payload)
  SELECT 'order-created', 'u' || g, jsonb_build_object('order_id', g, 'user_id', 1 + g % 5000,
         'amount', 100 + g, 'email', 'c' || g || '@example.com')
    FROM generate_series(1, $EVENTS) g"
DATABASE_URL=$url $bin serve --roles relay --no-migrate >/dev/null 2>&1 &
relay=$!
until [ "$(psql -tAq "$url" -c "SELECT sum(log_end_offset) FROM partition_heads WHERE topic = 'order-created'")" -ge "$EVENTS" ]; do
  sleep 0.5
done
kill -TERM "$relay"; wait "$relay" || true

caught_up="SELECT coalesce(sum(p.committed_offset), 0) FROM group_partitions p WHERE p.group_id = 'webhook-bench'"
start=$(date +%s.%N)
DATABASE_URL=$url WEBHOOK_SINKS=bench WEBHOOK_BENCH_URL="http://127.0.0.1:$port/hooks" \
  WEBHOOK_BENCH_SECRET="$secret" WEBHOOK_BENCH_CONCURRENCY=${CONCURRENCY:-64} RUST_LOG=warn $bin serve --roles webhook --no-migrate >"$work/sink.log" 2>&1 &
pids+=("$!")
sink=$!
pg_before=$(ps -C postgres -o times= | awk '{s+=$1} END {print s+0}')
until [ "$(psql -tAq "$url" -c "$caught_up")" -ge "$EVENTS" ]; do
  sleep 0.2
done
end=$(date +%s.%N)
if [ -n "${CPU:-}" ]; then
  echo "CPU s: sink $(ps -p "$sink" -o times=), receiver $(ps -p "${pids[0]}" -o times=), postgres $(( $(ps -C postgres -o times= | awk '{s+=$1} END {print s+0}') - pg_before ))" >&2
fi
python3 - "$EVENTS" "$start" "$end" "$ceiling" <<'EOF'
import sys
events, start, end, ceiling = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
rate = events / (end - start)
print(f"webhook sink: {events:,} deliveries in {end - start:.1f} s = {rate:,.0f}/s; "
      f"the receiver under wrk (32 connections): {ceiling:,.0f}/s; ratio {rate / ceiling:.2f}")
EOF
psql -q "$PG" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
