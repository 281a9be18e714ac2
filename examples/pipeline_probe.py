#!/usr/bin/env python3
"""Runs a command and, while it runs, watches the outbox-relay `serve` it
starts and that process's Postgres backends: prints one JSON line with the
serve process's peak RSS (VmHWM) and the CPU seconds both spent during the
load, the window Graphile Worker's harness measures its own worker and
backends over.

    pipeline_probe.py <database name prefix> <report file> -- <command...>

Backends are the `postgres: ...` processes of databases whose name starts
with the prefix (autovacuum workers included, as in Graphile's figure).
The figures go to <report file>; the command's output passes through
untouched.

The load window is read off the peer's SMTP sink (`sink.py`, found by its
command line): it appends one line per mail received. The window opens
with the first mail after the warm-up's (`WARMUP_MAILS`, default 50, the
peer driver's warm-up) and closes with the last mail; CPU per order is
the CPU spent in it over the mails received in it. Startup, migrations
and the warm-up are left out, as Graphile's meter leaves out its
worker's. Every process is read from /proc every 50 ms.
"""

import json
import os
import subprocess
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")
WARMUP_MAILS = int(os.environ.get("WARMUP_MAILS", "50"))


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
        return f.read().split(b"\0")


class MailLog:
    """Counts the lines of the sink's log, reading only what is new."""

    def __init__(self):
        self.path, self.offset, self.lines = None, 0, 0

    def count(self):
        if self.path is None:
            return 0
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.lines
        # Only whole lines: a line being written is counted next time.
        whole = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(whole)
        self.lines += whole.count(b"\n")
        return self.lines


def main():
    prefix, report = sys.argv[1], sys.argv[2]
    command = sys.argv[sys.argv.index("--") + 1:]
    child = subprocess.Popen(command)
    serve_cpu, backend_cpu, peak = {}, {}, 0
    mail = MailLog()
    # (mails received, serve CPU, backends' CPU) at each sample.
    samples = []
    while child.poll() is None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = cmdline(entry)
                line = b" ".join(argv).decode(errors="replace")
                if "outbox-relay serve" in line:
                    serve_cpu[entry] = cpu_seconds(entry)
                    peak = max(peak, peak_rss_kib(entry))
                elif line.startswith("postgres: ") and f" {prefix}" in line:
                    backend_cpu[entry] = cpu_seconds(entry)
                elif mail.path is None and any(a.endswith(b"sink.py") for a in argv):
                    at = next(i for i, a in enumerate(argv) if a.endswith(b"sink.py"))
                    mail.path = argv[at + 1].decode()
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError, StopIteration):
                continue
        samples.append((mail.count(), sum(serve_cpu.values()), sum(backend_cpu.values())))
        time.sleep(0.05)
    figures = {"serve_peak_rss_mib": round(peak / 1024, 1), "exit": child.returncode}
    final = samples[-1][0] if samples else 0
    opened = next((s for s in samples if s[0] > WARMUP_MAILS), None)
    closed = next((s for s in samples if s[0] == final), None)
    if opened and closed and closed[0] > opened[0]:
        figures.update({
            "window_mails": closed[0] - opened[0],
            "serve_cpu_s": round(closed[1] - opened[1], 3),
            "backends_cpu_s": round(closed[2] - opened[2], 3),
        })
    figures["serve_cpu_total_s"] = round(sum(serve_cpu.values()), 3)
    figures["backends_cpu_total_s"] = round(sum(backend_cpu.values()), 3)
    with open(report, "w") as f:
        json.dump(figures, f)
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
