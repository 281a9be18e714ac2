#!/usr/bin/env python3
"""Reads a topic through the Kafka protocol with kafka-python (PyPI), which
nobody here wrote: every partition assigned from the beginning, until
--count records came (or --timeout seconds passed). Prints one JSON line
per record: {"partition", "offset", "key", "value", "headers", "timestamp",
"timestamp_type"}, then {"end_offsets": {...}, "for_time": {...}} for the
--time (ms) given.
"""
import argparse
import json
import sys
import time

from kafka import KafkaConsumer, TopicPartition


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--time", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()

    consumer = KafkaConsumer(
        bootstrap_servers=args.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="kafka-python-reader",
    )
    partitions = sorted(consumer.partitions_for_topic(args.topic) or [])
    assigned = [TopicPartition(args.topic, p) for p in partitions]
    consumer.assign(assigned)
    consumer.seek_to_beginning(*assigned)
    seen = 0
    deadline = time.monotonic() + args.timeout
    while seen < args.count and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            for r in records:
                seen += 1
                print(json.dumps({
                    "partition": r.partition,
                    "offset": r.offset,
                    "key": r.key.decode() if r.key is not None else None,
                    "value": json.loads(r.value),
                    "headers": {k: (v.decode() if v is not None else None) for k, v in r.headers},
                    "timestamp": r.timestamp,
                    "timestamp_type": r.timestamp_type,
                }))
    ends = consumer.end_offsets(assigned)
    for_time = consumer.offsets_for_times({tp: args.time for tp in assigned})
    print(json.dumps({
        "end_offsets": {str(tp.partition): o for tp, o in ends.items()},
        "for_time": {str(tp.partition): (o.offset if o is not None else None) for tp, o in for_time.items()},
    }))
    consumer.close()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
