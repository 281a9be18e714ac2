#!/usr/bin/env python3
"""A consumer group member with kafka-python (PyPI), which nobody here
wrote: subscribes to --topic in --group, commits after every poll, and
prints one JSON line per record read ({"partition", "offset", "key"}) and
one per assignment ({"assigned": [partitions]}), until killed.
"""
import argparse
import json
import sys

from kafka import KafkaConsumer, ConsumerRebalanceListener


def say(line):
    print(json.dumps(line), flush=True)


class Tell(ConsumerRebalanceListener):
    def __init__(self):
        self.consumer = None

    def on_partitions_revoked(self, revoked):
        pass

    def on_partitions_assigned(self, assigned):
        say({"assigned": sorted(tp.partition for tp in self.consumer.assignment())})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--session-ms", type=int, default=6000)
    args = parser.parse_args()

    consumer = KafkaConsumer(
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        client_id="kafka-python-member",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=args.session_ms,
        heartbeat_interval_ms=500,
    )
    tell = Tell()
    tell.consumer = consumer
    consumer.subscribe([args.topic], listener=tell)
    while True:
        batches = consumer.poll(timeout_ms=200)
        for records in batches.values():
            for r in records:
                say({
                    "partition": r.partition,
                    "offset": r.offset,
                    "key": r.key.decode() if r.key is not None else None,
                })
        if batches:
            consumer.commit()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
