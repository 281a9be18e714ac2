//! Every SQL statement the crate runs is prepared against the migrated
//! schema, so a renamed table or column fails here rather than in production.

use std::collections::HashSet;

use crate::harness::TestDb;

#[tokio::test]
async fn every_statement_prepares_against_the_schema() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let statements = outbox_relay::sql_statements();
    // A module whose list went missing would pass silently otherwise.
    assert!(
        statements.len() >= 40,
        "only {} statements listed",
        statements.len()
    );
    let mut names = HashSet::new();
    for (name, _) in &statements {
        assert!(names.insert(*name), "{name} is listed twice");
    }
    // All failures at once: a renamed column usually breaks several.
    let mut failures = Vec::new();
    for (name, sql) in &statements {
        if let Err(e) = client.prepare(sql).await {
            let error = e.as_db_error().map_or(e.to_string(), |db| db.to_string());
            failures.push(format!("{name}: {error}\n{sql}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} statements do not prepare:\n\n{}",
        failures.len(),
        statements.len(),
        failures.join("\n\n")
    );
}
