#!/usr/bin/env python3
"""Runs a command and, while it runs, watches the outbox-relay `serve` it
starts and that process's Postgres backends: prints one JSON line with the
serve process's peak RSS (VmHWM) and the CPU seconds both spent.

    pipeline_probe.py <database name prefix> <report file> -- <command...>

Backends are the `postgres: user <db> ...` processes of databases whose name
starts with the prefix. The figures go to <report file>; the command's
output passes through untouched. A process's CPU is read from /proc/<pid>/stat every
50 ms; the last reading before it exits counts (at most 50 ms of it lost).
Postgres' own background processes (WAL writer, checkpointer) are not
counted: they are not per connection and their share is small at this load.
"""

import json
import os
import subprocess
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the line, 12 and 13 after ")".
    return (int(fields[11]) + int(fields[12])) / TICKS


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


def main():
    prefix, report = sys.argv[1], sys.argv[2]
    command = sys.argv[sys.argv.index("--") + 1:]
    child = subprocess.Popen(command)
    serve_cpu, backend_cpu, peak = {}, {}, 0
    while child.poll() is None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                line = cmdline(entry)
                if "outbox-relay serve" in line:
                    serve_cpu[entry] = cpu_seconds(entry)
                    peak = max(peak, peak_rss_kib(entry))
                elif line.startswith("postgres: ") and f" {prefix}" in line:
                    backend_cpu[entry] = cpu_seconds(entry)
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
        time.sleep(0.05)
    with open(report, "w") as f:
        json.dump({
            "serve_cpu_s": round(sum(serve_cpu.values()), 3),
            "backends_cpu_s": round(sum(backend_cpu.values()), 3),
            "serve_peak_rss_mib": round(peak / 1024, 1),
            "exit": child.returncode,
        }, f)
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
