#!/usr/bin/env python3
"""A consumer group member with kafka-python (PyPI), which nobody here
wrote: subscribes to --topic in --group, commits after every poll, and
prints one JSON line per record read ({"partition", "offset", "key"}) and
one per assignment ({"assigned": [partitions]}), until killed (SIGKILL:
nothing more) or stopped (SIGTERM: it leaves the group and exits). With
--sasl user:password and --ca cert.pem it connects over SASL_SSL (PLAIN); an
error it cannot go on from is printed as {"error": ...}, exit status 1;
the client's own error log lines as {"log": ...}. --create-topic NAME asks
to create a topic instead (an API outbox-relay does not serve), printing
{"created": NAME} or the error.
"""
import argparse
import json
import logging
import signal
import sys

from kafka import KafkaConsumer, ConsumerRebalanceListener
from kafka.admin import KafkaAdminClient, NewTopic


def say(line):
    print(json.dumps(line), flush=True)


class Tell(ConsumerRebalanceListener):
    def __init__(self):
        self.consumer = None

    def on_partitions_revoked(self, revoked):
        pass

    def on_partitions_assigned(self, assigned):
        say({"assigned": sorted(tp.partition for tp in self.consumer.assignment())})


class LogLines(logging.Handler):
    def emit(self, record):
        say({"log": record.getMessage()})


def main():
    logging.getLogger("kafka").addHandler(LogLines(level=logging.ERROR))
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--session-ms", type=int, default=6000)
    parser.add_argument("--sasl")
    parser.add_argument("--ca")
    parser.add_argument("--create-topic")
    parser.add_argument("--instance", help="group.instance.id: a static member")
    args = parser.parse_args()

    if args.create_topic:
        admin = KafkaAdminClient(bootstrap_servers=args.bootstrap, client_id="kafka-python-admin")
        admin.create_topics([NewTopic(args.create_topic, 1, 1)])
        say({"created": args.create_topic})
        return

    secured = {}
    if args.sasl:
        user, password = args.sasl.split(":", 1)
        secured = dict(
            security_protocol="SASL_SSL",
            sasl_mechanism="PLAIN",
            sasl_plain_username=user,
            sasl_plain_password=password,
            ssl_cafile=args.ca,
        )
    consumer = KafkaConsumer(
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        client_id="kafka-python-member",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=args.session_ms,
        heartbeat_interval_ms=500,
        group_instance_id=args.instance,
        **secured,
    )
    tell = Tell()
    tell.consumer = consumer
    consumer.subscribe([args.topic], listener=tell)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    while not stopping:
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
    consumer.close()  # everything read is committed: leave the group


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # what the client raised, for the test to read
        say({"error": f"{type(e).__name__}: {e}"})
        sys.exit(1)
