#!/usr/bin/env bash
# Every benchmark in docs/benchmarks.md in one run, each figure printed next
# to its ceiling or peer measured in the same run, with the ratio.
#
#   examples/benchmarks.sh [path to the peers folder, default ../shared/peers]
#
# Needs: the system Postgres at $PG_ADMIN_URL (default
# postgres://postgres@127.0.0.1:5432/postgres, durable commits), node >= 20,
# python3, Postfix's smtp-sink and smtp-source (apt-get install postfix; no
# daemon needed). Run it on an otherwise idle machine; about 10 minutes.
# SCENARIOS=writer,pipeline,relay,mail picks some (default: all).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
PG=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
peers_src=$(cd "${1:-$repo/../shared/peers}" && pwd)
scenarios=",${SCENARIOS:-writer,pipeline,relay,mail},"
ROWS=${ROWS:-1000000}
MAILS=${MAILS:-20000}
work=$(mktemp -d -t outbox-relay-bench.XXXXXX)
sink_pid=
cleanup() {
  [ -n "$sink_pid" ] && kill "$sink_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --release --quiet --bin outbox-relay --examples
# The peers install node_modules and a venv beside themselves: use a copy.
cp -r "$peers_src" "$work/peers"
P=$work/peers
results=$work/results
mkdir -p "$results"

if [[ $scenarios == *,writer,* || $scenarios == *,pipeline,* ]]; then
  echo "== Graphile Worker: latency at 200 orders/s, writer with 16 clients" >&2
  PHASES=latency,writer "$P/graphile/run" 2>"$work/graphile.err" | tail -1 >"$results/graphile.json"
fi
if [[ $scenarios == *,pipeline,* ]]; then
  echo "== outbox-relay: order -> SMTP at 200 orders/s (CPU and peak RSS probed)" >&2
  python3 examples/pipeline_probe.py peer_ours_ "$results/probe.json" -- \
    "$P/outbox-relay/run" 2>"$work/pipeline.err" | tail -1 >"$results/pipeline.json"
fi
if [[ $scenarios == *,writer,* ]]; then
  echo "== outbox-relay: POST /orders, 16 clients, api role only" >&2
  ROLES=api WRITER_SECONDS=15 "$P/outbox-relay/run" 2>"$work/writer.err" | tail -1 >"$results/writer.json"
fi
if [[ $scenarios == *,relay,* ]]; then
  echo "== relay: $ROWS-row backlog and idle latency" >&2
  ./target/release/examples/relay_bench "$PG" "$ROWS" >"$results/relay.txt"
fi
if [[ $scenarios == *,mail,* ]]; then
  echo "== mail: $MAILS mails into smtp-sink, and smtp-source's own rate" >&2
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  user=$(id -un); [ "$user" = root ] && user=nobody
  smtp-sink -u "$user" "127.0.0.1:$port" 256 &
  sink_pid=$!
  sleep 0.5
  start=$(date +%s.%N)
  smtp-source -s 32 -m "$MAILS" -l 1200 "127.0.0.1:$port"
  end=$(date +%s.%N)
  python3 -c "print($MAILS / ($end - $start))" >"$results/smtp_source.txt"
  ./target/release/examples/mail_bench "$PG" "smtp://127.0.0.1:$port" "$MAILS" 32 200 >"$results/mail.txt"
fi

python3 - "$results" <<'EOF'
import json, os, re, sys
d = sys.argv[1]
def load(name):
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return None
    text = open(p).read()
    return json.loads(text) if name.endswith(".json") and text.strip() else text
g, pipe, probe, writer = (load(n) for n in ("graphile.json", "pipeline.json", "probe.json", "writer.json"))
relay, mail, source = load("relay.txt"), load("mail.txt"), load("smtp_source.txt")
rows = []
def row(figure, ours, peer, ratio, target):
    rows.append((figure, ours, peer, ratio, target))
if g and pipe:
    gl, ol = g["latency"]["latency_ms"], pipe["latency_ms"]
    row("order -> SMTP at 200/s, p50", f"{ol['p50']:.2f} ms", f"Graphile {gl['p50']:.2f} ms", f"{ol['p50']/gl['p50']:.2f}x", "<= 2x")
    row("order -> SMTP at 200/s, p99", f"{ol['p99']:.2f} ms", f"Graphile {gl['p99']:.2f} ms", f"{ol['p99']/gl['p99']:.2f}x", "<= 1x")
if probe and pipe:
    cpu = probe["serve_cpu_s"] + probe["backends_cpu_s"]
    per = cpu * 1000 / pipe["orders"]
    row("CPU per order (serve + its backends)", f"{per:.2f} ms", f"serve {probe['serve_cpu_s']:.1f} s + Postgres {probe['backends_cpu_s']:.1f} s / {pipe['orders']} orders", "", "<= 2.5 ms")
    row("peak RSS of serve", f"{probe['serve_peak_rss_mib']:.1f} MiB", "", "", "<= 100 MiB")
if g and writer:
    ours = writer["writer"]["orders_per_s"]
    add_job, raw = g["writer"]["add_job"]["orders_per_s"], g["writer"]["outbox_insert"]["orders_per_s"]
    row("writer, 16 clients, orders/s", f"{ours:,.0f}", f"add_job {add_job:,.0f}", f"{ours/add_job:.2f}x", ">= 2.5x")
    row("", "", f"raw SQL {raw:,.0f}", f"{ours/raw:.2f}x", ">= 0.80x")
if relay:
    m = re.search(r"per (\d+) rows:\s+[\d.]+ s\s+(\d+) rows/s", relay)
    r = re.search(r"relay \((\d+) batches\):\s+[\d.]+ s\s+(\d+) events/s", relay)
    if m and r:
        row("relay, backlog, events/s", f"{int(r.group(2)):,}", f"one statement per {m.group(1)} rows: {int(m.group(2)):,}", f"{int(r.group(2))/int(m.group(2)):.2f}x", ">= 0.80x and >= 100,000")
if mail and source:
    m = re.search(r"= (\d+) mails/s", mail)
    src = float(source)
    if m:
        ours = int(m.group(1))
        row("mails/s into smtp-sink", f"{ours:,}", f"smtp-source {src:,.0f}", f"{ours/src:.2f}x", ">= 4,000 and >= 0.35x")
widths = [max(len(str(r[i])) for r in rows + [("figure", "ours", "same-run peer or ceiling", "ratio", "target")]) for i in range(5)]
for r in [("figure", "ours", "same-run peer or ceiling", "ratio", "target")] + rows:
    print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
print()
for name in ("relay.txt", "mail.txt"):
    text = load(name)
    if text:
        print(f"--- {name}\n{text}")
EOF
