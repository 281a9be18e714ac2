use super::*;
use futures_util::FutureExt;

#[test]
fn payloads_name_partitions_and_their_ends_by_topic() {
    let text = payload(&[
        ("other", 0, 1),
        ("order-created", 5, 12),
        ("order-created", 3, 40),
    ]);
    assert_eq!(text, "order-created\t3:40,5:12\nother\t0:1");
    assert_eq!(
        parse_payload(&text),
        Some(vec![
            ("order-created", 3, Some(40)),
            ("order-created", 5, Some(12)),
            ("other", 0, Some(1))
        ])
    );
    // An older relay's payload names partitions without ends.
    assert_eq!(
        parse_payload("order-created\t3,5"),
        Some(vec![("order-created", 3, None), ("order-created", 5, None)])
    );
    assert_eq!(parse_payload(""), None);
    assert_eq!(parse_payload("garbage"), None);
    assert_eq!(parse_payload("t\t1:x"), None);
    // Too long with ends: the partitions only; longer still, nothing.
    let many: Vec<_> = (0..1000).map(|p| ("order-created", p, 1_000_000)).collect();
    let text = payload(&many);
    assert!(text.starts_with("order-created\t0,1,2,"), "{text}");
    assert!(parse_payload(&text)
        .unwrap()
        .iter()
        .all(|(_, _, end)| end.is_none()));
    let more: Vec<_> = (0..5000).map(|p| ("order-created", p, 1_000_000)).collect();
    assert!(payload(&more).is_empty(), "too long: wakes everyone");
}

/// Whether `past(next)` returns without waiting.
fn wakes(appends: &mut PartitionAppends, next: i64) -> bool {
    appends.past(next).now_or_never().is_some()
}

#[test]
fn a_worker_wakes_only_for_ends_past_where_it_reads_next() {
    let (appends, _dropped) = Appends::new();
    let listener = &appends.inner;
    let mut worker = appends.subscribe("t", 1);
    let mut other = appends.subscribe("t", 2);
    assert!(!wakes(&mut worker, 0), "nothing announced yet");

    listener.notified("t\t1:10");
    assert!(!wakes(&mut other, 0), "another partition's append");
    assert!(!wakes(&mut worker, 10), "already read up to the end");
    listener.notified("t\t1:10");
    assert!(
        !wakes(&mut worker, 0),
        "the same end again (NOTIFY after in-process)"
    );
    listener.notified("t\t1:12");
    assert!(wakes(&mut worker, 10), "a higher end than read");
    assert!(!wakes(&mut worker, 10), "each announcement wakes once");

    // A late notification of an older batch, arriving before the
    // worker looks, does not hide the newer end.
    listener.notified("t\t1:13");
    listener.notified("t\t1:12");
    assert!(wakes(&mut worker, 12));
    listener.notified("t\t1:11");
    assert!(!wakes(&mut worker, 13));

    // No end given: wake, whatever was read.
    listener.notified("t\t1");
    assert!(wakes(&mut worker, 1_000));
    listener.notified("");
    assert!(
        wakes(&mut worker, 1_000),
        "an empty payload names every partition"
    );
    assert!(wakes(&mut other, 1_000));
    assert!(!wakes(&mut worker, 1_000));
}

fn records(offsets: std::ops::Range<i64>) -> Arc<[Record]> {
    offsets
        .map(|offset| Record {
            topic: "t".into(),
            partition: 0,
            offset,
            key: None,
            created_at: chrono::Utc::now(),
            appended_at: chrono::Utc::now(),
            headers: serde_json::json!({}),
            payload: serde_json::json!({"offset": offset}),
        })
        .collect()
}

/// What `past(next)` returns without waiting: the offsets handed over,
/// none for a read; None when it waits.
fn handed(appends: &mut PartitionAppends, next: i64) -> Option<Vec<i64>> {
    match appends.past(next).now_or_never()? {
        Wake::Handed(records) => Some(records.iter().map(|r| r.offset).collect()),
        Wake::Read => Some(Vec::new()),
    }
}

#[test]
fn handed_records_do_only_for_a_worker_at_their_first_offset() {
    let (appends, _dropped) = Appends::new();
    let listener = &appends.inner;
    let mut at_start = appends.subscribe("t", 0);
    let mut behind = appends.subscribe("t", 0);
    listener.announce([("t", 0, Some(7), Some(records(5..7)))]);
    assert_eq!(handed(&mut at_start, 5), Some(vec![5, 6]));
    assert_eq!(
        handed(&mut behind, 3),
        Some(vec![]),
        "a worker behind them reads (3 and 4 are not handed)"
    );
    // The batch's NOTIFY (the same end, no records) wakes nobody.
    listener.notified("t\t0:7");
    assert_eq!(handed(&mut at_start, 7), None);
    // A higher end without records (another process's relay): read.
    listener.notified("t\t0:9");
    assert_eq!(handed(&mut at_start, 7), Some(vec![]));
    // A late announcement of an older batch brings no records back.
    listener.announce([("t", 0, Some(8), Some(records(7..8)))]);
    assert_eq!(handed(&mut at_start, 7), None);
    listener.announce([("t", 0, Some(10), Some(records(9..10)))]);
    assert_eq!(handed(&mut at_start, 9), Some(vec![9]));
    // A reconnect forgets them with the ends.
    listener.announce_everywhere();
    assert_eq!(handed(&mut at_start, 10), Some(vec![]));
}

#[test]
fn a_reconnect_wakes_everyone_and_forgets_the_ends() {
    let (appends, _dropped) = Appends::new();
    let listener = &appends.inner;
    let mut worker = appends.subscribe("t", 0);
    // An end that no longer holds (a stray NOTIFY, a restored log).
    listener.notified("t\t0:1000");
    assert!(wakes(&mut worker, 5));
    listener.announce_everywhere();
    assert!(wakes(&mut worker, 5));
    listener.notified("t\t0:6");
    assert!(wakes(&mut worker, 5), "the real end wakes again");

    // A worker subscribing later starts from what is announced now.
    let mut later = appends.subscribe("t", 0);
    listener.notified("t\t0:6");
    assert!(!wakes(&mut later, 6));
}

#[test]
fn a_relay_in_this_process_wakes_the_listeners_of_its_database_only() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // Unreachable: the LISTEN connections never connect, which is
        // what this test needs (only in-process announcements come).
        let ours = listen("postgres://nobody@127.0.0.1:1/ours").expect("listen");
        let theirs = listen("postgres://nobody@127.0.0.1:1/theirs").expect("listen");
        let (mut ours, mut theirs) = (ours.subscribe("t", 0), theirs.subscribe("t", 0));
        appended_here("postgres://nobody@127.0.0.1:1/ours", &[("t", 0, 5, None)]);
        assert!(wakes(&mut ours, 4));
        assert!(!wakes(&mut theirs, 0), "another database's relay");
    });
}
