#!/usr/bin/env python3
"""A webhook receiver for the tests: every request's signature and timestamp
are checked with the standardwebhooks package (PyPI), which nobody here
wrote. Each request is logged as one JSON line on stdout:
{"id", "verified", "status", "key", "partition", "offset", "traceparent",
"replay"}.

Behaviour, by option:
  --fail-seconds N     answer 503 (Retry-After: 1) for the first N seconds
  --reject-key K       answer 400 with a body to the event with key K
  --slow-first N       hold the first N requests for --slow-ms before answering
  --slow-ms MS         (default 3000)
Prints READY on stdout once it listens.
"""
import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--fail-seconds", type=float, default=0.0)
    parser.add_argument("--reject-key", default=None)
    parser.add_argument("--slow-first", type=int, default=0)
    parser.add_argument("--slow-ms", type=float, default=3000.0)
    args = parser.parse_args()

    webhook = Webhook(args.secret)
    started = time.monotonic()
    lock = threading.Lock()
    state = {"requests": 0}

    def log(entry):
        with lock:
            sys.stdout.write(json.dumps(entry) + "\n")
            sys.stdout.flush()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass

        def answer(self, status, body=b"", headers=()):
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            with lock:
                state["requests"] += 1
                number = state["requests"]
            entry = {"id": self.headers.get("webhook-id"),
                     "traceparent": self.headers.get("traceparent"),
                     "replay": self.headers.get("outbox-relay-replay")}
            try:
                webhook.verify(body, dict(self.headers.items()))
                entry["verified"] = True
            except WebhookVerificationError as e:
                entry.update(verified=False, error=str(e))
                log(dict(entry, status=401))
                return self.answer(401, b"bad signature")
            event = json.loads(body)
            entry.update(key=event.get("key"), partition=event.get("partition"),
                         offset=event.get("offset"))
            if time.monotonic() - started < args.fail_seconds:
                log(dict(entry, status=503))
                return self.answer(503, b"busy", [("Retry-After", "1")])
            if args.reject_key is not None and event.get("key") == args.reject_key:
                log(dict(entry, status=400))
                return self.answer(400, b"order rejected by the receiver")
            if number <= args.slow_first:
                time.sleep(args.slow_ms / 1000.0)
            log(dict(entry, status=200))
            return self.answer(200, b"ok")

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            # A client that went away (a sink killed, or one that stopped
            # waiting) is part of the tests, not an error to print.
            if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", args.port), Handler)
    print("READY", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
