#!/usr/bin/env python3
"""Where a running pipeline's Postgres CPU goes, by role: samples the
backends of the databases whose name starts with a prefix (as the peer
harness creates them), classifies each by `pg_stat_activity`, and prints
each class's CPU per order over a window, with the `serve` process's own.

    backend_cpu.py <database name prefix> <orders per second> [window seconds]

Start it just before the load (it waits for the database, then 6 s of
warm-up), for example beside the peer harness at 200 orders/s:

    python3 examples/backend_cpu.py peer_ours_ 200 &
    LATENCY_RATE=200 ../shared/peers/outbox-relay/run

A backend is classified by its session's application name (the relay
sets `outbox-relay`) or by the statements seen on it while sampling
(every 50 ms), since the pools' connections carry no name. CPU is read
from /proc, so run it on the database's machine, as root or as the
`postgres` user. Needs psycopg2.
"""

import collections
import os
import subprocess
import sys
import time

import psycopg2

TICKS = os.sysconf("SC_CLK_TCK")
WARMUP_SECONDS = 6


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS


def classify(application, backend_type, query):
    if backend_type != "client backend":
        return backend_type
    if application == "outbox-relay":
        return "relay"
    if query.startswith("LISTEN"):
        return "LISTEN connections"
    if "INSERT INTO orders" in query:
        return "order API"
    if "mail_deliveries" in query:
        return "mail ledger"
    if "group_partitions" in query or "group_members" in query or "FROM event_log" in query:
        return "group reads, commits, heartbeats"
    return "other"


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: backend_cpu.py <database name prefix> <orders per second> [window seconds]")
    prefix, rate = sys.argv[1], float(sys.argv[2])
    window = float(sys.argv[3]) if len(sys.argv) > 3 else 8.0
    conn = psycopg2.connect(os.environ.get("PG_ADMIN_DSN", "host=127.0.0.1 user=postgres dbname=postgres"))
    conn.autocommit = True
    cur = conn.cursor()
    like = prefix.replace("_", "\\_") + "%"
    deadline = time.time() + 120
    while True:
        cur.execute("SELECT 1 FROM pg_database WHERE datname LIKE %s", (like,))
        if cur.fetchall():
            break
        if time.time() > deadline:
            sys.exit(f"no database named {prefix}… appeared within 120 s")
        time.sleep(0.2)
    time.sleep(WARMUP_SECONDS)

    # A connection's class can only become more specific: the first
    # statement seen on a pooled connection may be a shared one.
    classes, start = {}, {}

    def sample():
        cur.execute(
            "SELECT pid, application_name, backend_type, ltrim(regexp_replace(query, '\\s+', ' ', 'g'))"
            "  FROM pg_stat_activity WHERE datname LIKE %s",
            (like,),
        )
        for pid, application, backend_type, query in cur.fetchall():
            seen = classify(application, backend_type, query or "")
            if classes.get(pid) in (None, "other"):
                classes[pid] = seen
            if pid not in start:
                start[pid] = cpu_seconds(pid)

    serve_pids = subprocess.run(["pgrep", "-f", "outbox-relay serve"], capture_output=True, text=True).stdout.split()
    serve = int(serve_pids[0]) if serve_pids else None
    serve_start = cpu_seconds(serve) if serve else None
    began = time.time()
    while time.time() - began < window:
        sample()
        time.sleep(0.05)
    elapsed = time.time() - began

    per_class = collections.Counter()
    for pid, cls in classes.items():
        now, then = cpu_seconds(pid), start.get(pid)
        if now is not None and then is not None:
            per_class[cls] += now - then
    orders = rate * elapsed
    print(f"window {elapsed:.1f} s, about {orders:.0f} orders at {rate:g}/s")
    if serve is not None and serve_start is not None:
        serve_now = cpu_seconds(serve)
        if serve_now is not None:
            print(f"  {'serve (the process)':34s} {1000 * (serve_now - serve_start) / orders:.3f} ms per order")
    total = sum(per_class.values())
    for cls, seconds in per_class.most_common():
        share = 100 * seconds / total if total else 0
        print(f"  {cls:34s} {1000 * seconds / orders:.3f} ms per order ({share:.0f}% of the backends)")
    print(f"  {'backends in all':34s} {1000 * total / orders:.3f} ms per order")


if __name__ == "__main__":
    main()
