#!/usr/bin/env bash
# Draining a backlog (docs/benchmarks.md, issue "draining a backlog"):
# EVENTS order-created events are written to the outbox and relayed into
# the log by `serve --roles relay`; then `serve --roles mail` alone starts
# on the whole backlog, right away (no ANALYZE in between: the tables'
# statistics are as a bulk load leaves them). Prints the time from the
# mail process's start to its first mail, mails/s, its peak RSS (VmHWM) and
# how many WARN lines it logged.
#
#   examples/backlog.sh [eml|smtp-sink|smtp://host:port]   # default eml
#
# EVENTS (default 1000000), MAX_DB_CONNECTIONS and MAIL_ARGS (passed to the
# mail process), MAIL_LOG (a path to keep the mail process's log at),
# PG_ADMIN_URL (default postgres://postgres@127.0.0.1:5432/postgres).
# smtp-sink is Postfix's (apt-get install postfix; no daemon needed).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
target=${1:-eml}
EVENTS=${EVENTS:-1000000}
PG=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
base=${PG%/*}
db=bench_backlog
url="$base/$db"
work=$(mktemp -d -t outbox-relay-backlog.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
bin=./target/release/outbox-relay
cargo build --release --quiet --bin outbox-relay

psql -q "$PG" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
DATABASE_URL=$url $bin migrate >/dev/null
echo "writing $EVENTS events" >&2
psql -q "$url" -c "INSERT INTO outbox (topic, key, payload)
  SELECT 'order-created', 'u' || g, jsonb_build_object('order_id', g, 'user_id', 1 + g % 5000,
         'amount', 100 + g, 'email', 'c' || g || '@example.com')
    FROM generate_series(1, $EVENTS) g"
echo "relaying them into the log" >&2
DATABASE_URL=$url $bin serve --roles relay --no-migrate >"$work/relay.log" 2>&1 &
relay=$!
pids+=("$relay")
until [ "$(psql -tAq "$url" -c "SELECT sum(log_end_offset) FROM partition_heads WHERE topic = 'order-created'")" -ge "$EVENTS" ]; do
  sleep 0.5
done
kill -TERM "$relay"
wait "$relay" || true

case $target in
  eml) smtp_url="file://$work/mail" ;;
  smtp-sink)
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    user=$(id -un); [ "$user" = root ] && user=nobody
    smtp-sink -u "$user" "127.0.0.1:$port" 256 &
    pids+=("$!")
    sleep 0.5
    smtp_url="smtp://127.0.0.1:$port"
    ;;
  *) smtp_url=$target ;;
esac

echo "draining into $smtp_url" >&2
started=$(psql -tAq "$url" -c "SELECT extract(epoch FROM clock_timestamp())")
DATABASE_URL=$url SMTP_URL=$smtp_url RUST_LOG=${RUST_LOG:-info} \
  $bin serve --roles mail --no-migrate ${MAX_DB_CONNECTIONS:+--max-db-connections $MAX_DB_CONNECTIONS} ${MAIL_ARGS:-} \
  >"$work/mail.log" 2>&1 &
mail=$!
pids+=("$mail")
peak=0
deadline=$((SECONDS + 1800))
while :; do
  sleep 1
  kill -0 "$mail" 2>/dev/null || { echo "the mail process exited:" >&2; tail -5 "$work/mail.log" >&2; exit 1; }
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$mail/status")
  sent=$(psql -tAq "$url" -c "SELECT count(*) FROM mail_deliveries WHERE status = 'sent'")
  printf '%6ds  %8d sent  RSS peak %6.1f MiB\n' "$((SECONDS))" "$sent" "$(echo "$hwm / 1024" | bc -l)" >&2
  [ "$sent" -ge "$EVENTS" ] && break
  [ "$SECONDS" -lt "$deadline" ] || { echo "not drained within 30 min" >&2; exit 1; }
done
peak=$(awk '/VmHWM/ {print $2}' "/proc/$mail/status")
kill -TERM "$mail"
wait "$mail" || true
[ -n "${MAIL_LOG:-}" ] && cp "$work/mail.log" "$MAIL_LOG"
psql -tAq "$url" -F ' ' -c "
  SELECT extract(epoch FROM min(sent_at)) - $started, extract(epoch FROM max(sent_at)) - $started, count(*)
    FROM mail_deliveries WHERE status = 'sent'" | {
  read -r first last count
  python3 - "$first" "$last" "$count" "$peak" "$(grep -c ' WARN ' "$work/mail.log" || true)" "$smtp_url" <<'EOF'
import sys
first, last, count, peak_kib, warns, target = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
print(f"backlog of {count:,} into {target.split(':')[0]}: first mail {first:.2f} s after the start, "
      f"all in {last:.1f} s ({count / last:,.0f} mails/s; {count / max(last - first, 1e-9):,.0f} from the first), "
      f"peak RSS {peak_kib / 1024:.1f} MiB, {warns} WARN lines")
EOF
}
psql -q "$PG" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
