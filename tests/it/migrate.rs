//! Migrations: idempotent, and safe when several processes start at once.

use crate::harness::*;

#[tokio::test]
async fn migrating_twice_changes_nothing() {
    let db = TestDb::empty().await;
    let mut client = db.client().await;
    let first = outbox_relay::migrate::run(&mut client).await.unwrap();
    let all: Vec<i32> = outbox_relay::migrate::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(first, all);
    let schema_before = count(
        &client,
        "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace",
    )
    .await;
    let second = outbox_relay::migrate::run(&mut client).await.unwrap();
    assert!(second.is_empty());
    let schema_after = count(
        &client,
        "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace",
    )
    .await;
    assert_eq!(schema_before, schema_after);
    assert_eq!(count(&client, "SELECT count(*) FROM topics").await, 1);
    assert_eq!(
        outbox_relay::migrate::current_version(&client)
            .await
            .unwrap(),
        outbox_relay::migrate::latest_version()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_apply_once() {
    let db = TestDb::empty().await;
    let runs = (0..6).map(|_| {
        let url = db.url.clone();
        tokio::spawn(async move { outbox_relay::migrate::apply_all(&url).await })
    });
    let results = futures_util::future::join_all(runs).await;
    let applied: Vec<Vec<i32>> = results.into_iter().map(|r| r.unwrap().unwrap()).collect();
    assert_eq!(
        applied.iter().filter(|a| !a.is_empty()).count(),
        1,
        "exactly one run applies: {applied:?}"
    );
    let client = db.client().await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM schema_migrations").await,
        outbox_relay::migrate::MIGRATIONS.len() as i64
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM partition_heads").await,
        8
    );
}
