//! Kafka clients written in other languages, each in a process of its
//! own, for the kafka-api tests: kafka-python (tests/support/
//! kafka_python_member.py) and KafkaJS (tests/support/kafkajs/member.js).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::kafka_api::TOPIC;

/// A member written in another language, in a process of its own
/// (kafka-python, KafkaJS), printing a JSON line per record and per
/// assignment; the lines are collected.
pub(crate) struct ScriptMember {
    pub child: tokio::process::Child,
    pub lines: Arc<Mutex<Vec<Value>>>,
}

impl ScriptMember {
    /// tests/support/kafka_python_member.py in `group`.
    pub(crate) fn python(bootstrap: &str, group: &str) -> ScriptMember {
        ScriptMember::python_with(bootstrap, group, &[])
    }

    /// The same, with more of its arguments (`--instance ID`: static).
    pub(crate) fn python_with(bootstrap: &str, group: &str, extra: &[&str]) -> ScriptMember {
        let mut command = tokio::process::Command::new("python3");
        command
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/kafka_python_member.py"
            ))
            .args(["--bootstrap", bootstrap, "--topic", TOPIC, "--group", group])
            .args(extra);
        ScriptMember::command(
            command,
            "python3 tests/support/kafka_python_member.py (pip install kafka-python)",
        )
    }

    /// tests/support/kafkajs/member.js with these arguments.
    pub(crate) fn kafkajs(args: &[&str]) -> ScriptMember {
        let mut command = tokio::process::Command::new("node");
        command
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/kafkajs/member.js"
            ))
            .args(args);
        ScriptMember::command(
            command,
            "node tests/support/kafkajs/member.js (npm ci in tests/support/kafkajs)",
        )
    }

    pub(crate) fn command(mut command: tokio::process::Command, what: &str) -> ScriptMember {
        use tokio::io::AsyncBufReadExt;
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect(what);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let collected = lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                collected
                    .lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).unwrap());
            }
        });
        ScriptMember { child, lines }
    }

    /// Asks the member to stop (SIGTERM: a last commit and a leave).
    pub(crate) async fn stop(mut self) {
        let pid = self.child.id().unwrap().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the member to stop on SIGTERM")
            .unwrap();
    }

    pub(crate) fn reads(&self) -> Vec<(i32, i64)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.get("offset").is_some())
            .map(|l| {
                (
                    l["partition"].as_i64().unwrap() as i32,
                    l["offset"].as_i64().unwrap(),
                )
            })
            .collect()
    }

    pub(crate) fn assignment(&self) -> Vec<i32> {
        let lines = self.lines.lock().unwrap();
        let last = lines.iter().rev().find_map(|l| l.get("assigned"));
        last.and_then(Value::as_array)
            .map(|a| a.iter().map(|p| p.as_i64().unwrap() as i32).collect())
            .unwrap_or_default()
    }
}

/// A reset of the stopped `group` to `time`, made with the functions of
/// `groups reset-offsets --to-datetime`, is where the member `start`
/// makes reads next: each partition from its planned offset to the log
/// end (`all` holds every record), each record once.
pub(crate) async fn assert_reads_from_a_reset(
    db: &crate::harness::TestDb,
    group: &str,
    time: chrono::DateTime<chrono::Utc>,
    all: &crate::kafka_api::Expected,
    start: impl FnOnce() -> ScriptMember,
) {
    use outbox_relay::group::admin::{execute_reset, plan_reset, ResetTo};
    let mut client = db.client().await;
    let planned = plan_reset(&client, group, TOPIC, None, &ResetTo::Datetime(time))
        .await
        .unwrap();
    execute_reset(&mut client, group, &planned).await.unwrap();
    let from: std::collections::HashMap<i32, i64> = planned
        .iter()
        .map(|p| (p.partition, p.new_offset))
        .collect();
    let want: std::collections::HashSet<(i32, i64)> = all
        .keys()
        .filter(|(partition, offset)| from.get(partition).is_some_and(|f| offset >= f))
        .copied()
        .collect();
    assert!(!want.is_empty());
    let member = start();
    crate::harness::eventually(
        "the records from the reset on",
        Duration::from_secs(90),
        || async { (member.reads().len() >= want.len()).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let read = member.reads();
    let unique: std::collections::HashSet<(i32, i64)> = read.iter().copied().collect();
    assert_eq!(read.len(), unique.len(), "each record once");
    assert_eq!(unique, want, "from the planned offsets to the log end");
    member.stop().await;
}

/// Members started again once everything in `before` was read and
/// committed read only what came since (`all` holds every record), each
/// record once; then they stop.
pub(crate) async fn assert_resumed_from_commits(
    members: Vec<ScriptMember>,
    before: &crate::kafka_api::Expected,
    all: &crate::kafka_api::Expected,
) {
    let new = all.len() - before.len();
    let read = || {
        members
            .iter()
            .flat_map(ScriptMember::reads)
            .collect::<Vec<_>>()
    };
    crate::harness::eventually(
        "the records that came since",
        Duration::from_secs(60),
        || async { (read().len() >= new).then_some(()) },
    )
    .await;
    // A moment for a record read twice to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut again = std::collections::HashSet::new();
    for at in read() {
        assert!(
            !before.contains_key(&at),
            "{at:?} was read before the restart"
        );
        assert!(all.contains_key(&at) && again.insert(at), "{at:?}");
    }
    assert_eq!(again.len(), new);
    for member in members {
        member.stop().await;
    }
}

/// Both members own partitions, and none owns one the other does.
pub(crate) fn assert_partitions_shared(a: &ScriptMember, b: &ScriptMember) {
    let (had_a, had_b) = (a.assignment(), b.assignment());
    assert!(
        !had_a.is_empty() && !had_b.is_empty(),
        "{had_a:?} {had_b:?}"
    );
    assert!(
        had_a.iter().all(|p| !had_b.contains(p)),
        "one owner per partition"
    );
}
