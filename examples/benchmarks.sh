#!/usr/bin/env bash
# Every benchmark in docs/benchmarks.md in one run, each figure printed next
# to its ceiling or peer measured in the same run, with the ratio and the
# target of issue 30 ("cheaper per order than a job queue").
#
#   examples/benchmarks.sh [path to the peers folder, default ../shared/peers]
#
# Needs: the system Postgres at $PG_ADMIN_URL (default
# postgres://postgres@127.0.0.1:5432/postgres, durable commits), node >= 20,
# python3, Postfix's smtp-sink and smtp-source (apt-get install postfix; no
# daemon needed). Run it on an otherwise idle machine; about 20 minutes.
# SCENARIOS=writer,pipeline,capacity,relay,mail,roles picks some (default:
# all). The scenarios:
#   pipeline  order -> mail at each of RATES (default "200 500") orders/s for
#             15 s, Graphile Worker then ours, the same load generator and
#             SMTP sink: latency, and CPU per order in the load's window
#             (Graphile: its worker and its database's backends, as its
#             harness meters them; ours: serve and its database's backends)
#   capacity  the same load stepped up through CAPACITY_RATES for each, until
#             a step's p99 is over 50 ms or a mail is missing: the highest
#             step that held
#   writer    POST /orders with 16 clients (api role only) beside add_job and
#             raw SQL
#   relay     a ROWS-row backlog (default 1,000,000) beside one INSERT ...
#             SELECT per batch
#   mail      MAILS mails (default 20,000) into smtp-sink beside smtp-source
#   roles     the pipeline at 200/s with every role on (webhook sink to a
#             local receiver, Kafka protocol listener, console, and the Kafka
#             mirror pointed at a closed port): peak RSS of serve
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
PG=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
peers_src=$(cd "${1:-$repo/../shared/peers}" && pwd)
scenarios=",${SCENARIOS:-writer,pipeline,capacity,relay,mail,roles},"
ROWS=${ROWS:-1000000}
MAILS=${MAILS:-20000}
RATES=${RATES:-200 500}
CAPACITY_RATES=${CAPACITY_RATES:-200 300 400 500 600 700 800 1000 1200}
work=$(mktemp -d -t outbox-relay-bench.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
has() { [[ $scenarios == *,$1,* ]]; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cargo build --release --quiet --bin outbox-relay --examples
# The peers install node_modules and a venv beside themselves: use a copy.
cp -r "$peers_src" "$work/peers"
P=$work/peers
results=$work/results
mkdir -p "$results"

# Graphile Worker's latency phase at $1 orders/s (and its writer phase with
# $2 = writer) into graphile_$1.json.
graphile() {
  local phases=latency
  [ "${2:-}" = writer ] && phases=latency,writer
  LATENCY_RATE=$1 PHASES=$phases "$P/graphile/run" 2>>"$work/graphile.err" | tail -1 >"$results/graphile_$1.json"
}
# Our pipeline at $1 orders/s, probed, into pipeline_$1.json and probe_$1.json.
ours() {
  LATENCY_RATE=$1 python3 examples/pipeline_probe.py peer_ours_ "$results/probe_$1.json" -- \
    "$P/outbox-relay/run" 2>>"$work/pipeline.err" | tail -1 >"$results/pipeline_$1.json"
}

if has pipeline || has writer; then
  for rate in $RATES; do
    echo "== order -> mail at $rate orders/s: Graphile Worker, then outbox-relay" >&2
    if [ "$rate" = 200 ] && has writer; then graphile "$rate" writer; else graphile "$rate"; fi
    ours "$rate"
  done
fi
if has capacity; then
  # A step holds if every mail came and the p99 is at most 50 ms.
  holds() { python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
r = r.get("latency", r)
sys.exit(0 if r["missing"] == 0 and r.get("errors", 0) == 0 and r["latency_ms"]["p99"] <= 50 else 1)' "$1"; }
  for peer in graphile ours; do
    for rate in $CAPACITY_RATES; do
      echo "== capacity: $peer at $rate orders/s" >&2
      [ -s "$results/${peer/ours/pipeline}_$rate.json" ] || $peer "$rate"
      holds "$results/${peer/ours/pipeline}_$rate.json" || break
      echo "$rate" >"$results/capacity_$peer.txt"
    done
  done
fi
if has writer; then
  echo "== outbox-relay: POST /orders, 16 clients, api role only" >&2
  ROLES=api WRITER_SECONDS=15 "$P/outbox-relay/run" 2>"$work/writer.err" | tail -1 >"$results/writer.json"
fi
if has relay; then
  echo "== relay: $ROWS-row backlog and idle latency" >&2
  ./target/release/examples/relay_bench "$PG" "$ROWS" >"$results/relay.txt"
fi
if has mail; then
  echo "== mail: $MAILS mails into smtp-sink, and smtp-source's own rate" >&2
  port=$(free_port)
  user=$(id -un); [ "$user" = root ] && user=nobody
  smtp-sink -u "$user" "127.0.0.1:$port" 256 &
  pids+=($!)
  sleep 0.5
  start=$(date +%s.%N)
  smtp-source -s 32 -m "$MAILS" -l 1200 "127.0.0.1:$port"
  end=$(date +%s.%N)
  python3 -c "print($MAILS / ($end - $start))" >"$results/smtp_source.txt"
  ./target/release/examples/mail_bench "$PG" "smtp://127.0.0.1:$port" "$MAILS" 32 200 >"$results/mail.txt"
fi
if has roles; then
  echo "== every role on, 200 orders/s: peak RSS" >&2
  receiver_port=$(free_port)
  node examples/webhook_bench_receiver.mjs "$receiver_port" >"$work/receiver.out" &
  pids+=($!)
  for _ in $(seq 1 50); do grep -q READY "$work/receiver.out" 2>/dev/null && break; sleep 0.1; done
  ROLES=api,relay,mail,webhook,kafka-api,console,kafka WEBHOOK_SINKS=bench \
    WEBHOOK_BENCH_URL="http://127.0.0.1:$receiver_port/" \
    WEBHOOK_BENCH_SECRET="whsec_$(printf 'outbox-relay-benchmark-secret!!' | base64)" \
    KAFKA_LISTEN="127.0.0.1:$(free_port)" KAFKA_BROKERS="127.0.0.1:$(free_port)" \
    LATENCY_RATE=200 python3 examples/pipeline_probe.py peer_ours_ "$results/probe_roles.json" -- \
    "$P/outbox-relay/run" 2>>"$work/roles.err" | tail -1 >"$results/pipeline_roles.json"
fi

python3 - "$results" <<'EOF'
import json, os, re, sys
d = sys.argv[1]
def load(name):
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return None
    text = open(p).read()
    if not name.endswith(".json"):
        return text
    return json.loads(text) if text.strip() else None
rows = []
def row(figure, ours, peer, ratio, target):
    rows.append((figure, ours, peer, ratio, target))
def graphile_ms_per_job(g):
    # As Graphile's harness meters it: its worker and its database's backends
    # over the load's window (cores x seconds), per order.
    c = g["cpu_cores"]
    return (c["node_worker"] + c["pg_backends"]) * c["wall_s"] * 1000 / g["orders"]
def ours_ms_per_order(probe):
    return (probe["serve_cpu_s"] + probe["backends_cpu_s"]) * 1000 / probe["window_mails"]
rates = sorted({int(m.group(1)) for n in os.listdir(d) for m in [re.match(r"pipeline_(\d+)\.json$", n)] if m})
for rate in rates:
    g, pipe, probe = load(f"graphile_{rate}.json"), load(f"pipeline_{rate}.json"), load(f"probe_{rate}.json")
    if not (g and pipe and probe and "window_mails" in probe and rate in (200, 500)):
        continue
    gl = g["latency"]
    ours, theirs = ours_ms_per_order(probe), graphile_ms_per_job(gl)
    row(f"CPU per order at {rate}/s", f"{ours:.2f} ms", f"Graphile {theirs:.2f} ms per job", f"{ours/theirs:.2f}x", "<= 0.75x")
    if rate == 200:
        ol, glat = pipe["latency_ms"], gl["latency_ms"]
        row("order -> SMTP at 200/s, p50", f"{ol['p50']:.2f} ms", f"Graphile {glat['p50']:.2f} ms", f"{ol['p50']/glat['p50']:.2f}x", "<= 0.80x")
        row("order -> SMTP at 200/s, p99", f"{ol['p99']:.2f} ms", f"Graphile {glat['p99']:.2f} ms", f"{ol['p99']/glat['p99']:.2f}x", "<= 0.60x")
cap_g, cap_o = load("capacity_graphile.txt"), load("capacity_ours.txt")
if cap_g is not None or cap_o is not None:
    og, oo = int(cap_g or 0), int(cap_o or 0)
    ratio = f"{oo/og:.2f}x" if og else "-"
    row("capacity: highest step, p99 <= 50 ms", f"{oo:,}/s", f"Graphile {og:,}/s", ratio, ">= 1.50x")
relay = load("relay.txt")
if relay:
    m = re.search(r"per (\d+) rows:\s+[\d.]+ s\s+(\d+) rows/s", relay)
    r = re.search(r"relay \((\d+) batches\):\s+[\d.]+ s\s+(\d+) events/s", relay)
    if m and r:
        row("relay, backlog, events/s", f"{int(r.group(2)):,}", f"one statement per {m.group(1)} rows: {int(m.group(2)):,}", f"{int(r.group(2))/int(m.group(2)):.2f}x", ">= 1.00x")
mail, source = load("mail.txt"), load("smtp_source.txt")
if mail and source:
    m = re.search(r"= (\d+) mails/s", mail)
    src = float(source)
    if m:
        ours = int(m.group(1))
        row("mails/s into smtp-sink", f"{ours:,}", f"smtp-source {src:,.0f}", f"{ours/src:.2f}x", ">= 0.80x")
roles = load("probe_roles.json")
if roles:
    row("peak RSS of serve, every role on", f"{roles['serve_peak_rss_mib']:.1f} MiB", "", "", "<= 50 MiB")
probe = load("probe_200.json")
if probe:
    row("peak RSS of serve, api,relay,mail", f"{probe['serve_peak_rss_mib']:.1f} MiB", "", "", "")
g, writer = load("graphile_200.json"), load("writer.json")
if g and writer and "writer" in g:
    ours = writer["writer"]["orders_per_s"]
    add_job, raw = g["writer"]["add_job"]["orders_per_s"], g["writer"]["outbox_insert"]["orders_per_s"]
    row("writer, 16 clients, orders/s", f"{ours:,.0f}", f"add_job {add_job:,.0f}", f"{ours/add_job:.2f}x", ">= 2.5x (issue 'performance')")
    row("", "", f"raw SQL {raw:,.0f}", f"{ours/raw:.2f}x", ">= 0.80x (issue 'performance')")
header = ("figure", "ours", "same-run peer or ceiling", "ratio", "target")
widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(5)]
for r in [header] + rows:
    print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
print()
for rate in rates:
    g, pipe = load(f"graphile_{rate}.json"), load(f"pipeline_{rate}.json")
    if g and pipe:
        gl = g["latency"]
        print(f"--- {rate}/s: ours p50 {pipe['latency_ms']['p50']} p99 {pipe['latency_ms']['p99']} ms, missing {pipe['missing']}; "
              f"Graphile p50 {gl['latency_ms']['p50']} p99 {gl['latency_ms']['p99']} ms, missing {gl['missing']}, "
              f"rest of machine {gl['cpu_cores']['rest_of_machine']} cores")
for name in ("relay.txt", "mail.txt"):
    text = load(name)
    if text:
        print(f"--- {name}\n{text}")
EOF
