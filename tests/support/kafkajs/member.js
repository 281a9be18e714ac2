#!/usr/bin/env node
// A consumer group member with KafkaJS (npm), which nobody here wrote:
// subscribes to --topic in --group from the earliest offset, commits as it
// reads, and prints one JSON line per record ({partition, offset, key,
// value, headers, timestamp}) and one per assignment ({assigned: [...]}).
// SIGTERM disconnects (last commit, leave) and exits; --time T prints
// {"for_time": {partition: offset}} for T (ms) first. With --sasl
// user:password and --ca cert.pem it connects over TLS with SASL/PLAIN.
// --create-topic NAME asks to create a topic instead (an API outbox-relay
// does not serve), printing {"created": NAME} or the error.
'use strict';
const fs = require('fs');
const { Kafka, logLevel } = require('kafkajs');

function arg(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at >= 0 ? process.argv[at + 1] : fallback;
}
const say = (line) => process.stdout.write(JSON.stringify(line) + '\n');

async function main() {
  const topic = arg('topic');
  const secured = {};
  const sasl = arg('sasl');
  if (sasl !== undefined) {
    const [username, ...rest] = sasl.split(':');
    secured.ssl = { ca: [fs.readFileSync(arg('ca'))] };
    secured.sasl = { mechanism: 'plain', username, password: rest.join(':') };
  }
  const kafka = new Kafka({
    clientId: 'kafkajs-member',
    brokers: [arg('bootstrap')],
    // Its own log is noise here (a rebalance is logged as an error); what
    // the tests need it prints itself.
    logLevel: logLevel.NOTHING,
    retry: { retries: 3 },
    ...secured,
  });
  const create = arg('create-topic');
  if (create !== undefined) {
    const admin = kafka.admin();
    await admin.connect();
    await admin.createTopics({ topics: [{ topic: create, numPartitions: 1 }] });
    say({ created: create });
    await admin.disconnect();
    return;
  }
  const time = arg('time');
  if (time !== undefined) {
    const admin = kafka.admin();
    await admin.connect();
    const found = await admin.fetchTopicOffsetsByTimestamp(topic, Number(time));
    say({ for_time: Object.fromEntries(found.map((p) => [p.partition, Number(p.offset)])) });
    await admin.disconnect();
  }
  const consumer = kafka.consumer({
    groupId: arg('group'),
    sessionTimeout: 6000,
    heartbeatInterval: 500,
    retry: { retries: 3 },
  });
  consumer.on(consumer.events.GROUP_JOIN, (e) => {
    say({ assigned: (e.payload.memberAssignment[topic] || []).slice().sort((a, b) => a - b) });
  });
  consumer.on(consumer.events.CRASH, (e) => {
    say({ error: String(e.payload.error && e.payload.error.type || e.payload.error) });
  });
  await consumer.connect();
  await consumer.subscribe({ topics: [topic], fromBeginning: true });
  await consumer.run({
    autoCommitInterval: 100,
    eachMessage: async ({ partition, message }) => {
      const headers = {};
      for (const [k, v] of Object.entries(message.headers || {})) {
        headers[k] = v === null || v === undefined ? null : v.toString();
      }
      say({
        partition,
        offset: Number(message.offset),
        key: message.key === null ? null : message.key.toString(),
        value: JSON.parse(message.value.toString()),
        headers,
        timestamp: Number(message.timestamp),
      });
    },
  });
  const stop = async () => {
    await consumer.disconnect();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((e) => {
  say({ error: `${e && e.name}: ${e && e.message}` });
  process.exit(1);
});
