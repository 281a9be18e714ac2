"""An aiosmtpd SMTP server for the integration tests.

aiosmtpd's Mailbox handler stores every accepted message in a Maildir; the
options below only choose how it answers, to exercise the mail worker:

  --reject RCPT          answer 550 to RCPT TO for this address (repeatable)
  --tempfail-seconds S   answer 451 to DATA for the first S seconds
  --tempfail-first N     answer 451 to the first N DATA commands
  --hang                 never answer DATA (a server that stopped responding)
  --delay-ms MS          wait MS before accepting each message
  --discard              accept messages without storing them (benchmarks)

Prints "READY <port>" once listening; runs until killed.
"""

import argparse
import asyncio
import sys
import time

from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox


class TestHandler(Mailbox):
    def __init__(self, maildir, rejected, tempfail_seconds, tempfail_first, hang, delay_ms, discard):
        super().__init__(maildir)
        self.discard = discard
        self.tempfail_left = tempfail_first
        self.hang = hang
        self.rejected = {r.lower() for r in rejected}
        self.tempfail_until = time.monotonic() + tempfail_seconds
        self.delay = delay_ms / 1000.0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower() in self.rejected:
            return "550 5.1.1 <%s>: mailbox unavailable" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.hang:
            await asyncio.sleep(3600)
        if self.tempfail_left > 0:
            self.tempfail_left -= 1
            return "451 4.3.0 temporarily unavailable, try again later"
        if time.monotonic() < self.tempfail_until:
            return "451 4.3.0 temporarily unavailable, try again later"
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.discard:
            return "250 OK"
        return await super().handle_DATA(server, session, envelope)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--maildir", required=True)
    parser.add_argument("--reject", action="append", default=[])
    parser.add_argument("--tempfail-seconds", type=float, default=0.0)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--discard", action="store_true")
    parser.add_argument("--tempfail-first", type=int, default=0)
    parser.add_argument("--hang", action="store_true")
    args = parser.parse_args()
    handler = TestHandler(
        args.maildir, args.reject, args.tempfail_seconds, args.tempfail_first, args.hang, args.delay_ms, args.discard
    )
    controller = Controller(handler, hostname="127.0.0.1", port=args.port)
    controller.start()
    print("READY %d" % args.port, flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()


if __name__ == "__main__":
    sys.exit(main())
