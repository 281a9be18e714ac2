//! outbox-relay: a transactional outbox relay on Postgres.
//!
//! The platform follows the data's path: a writer's [`outbox`] row →
//! the [`relay`] → the event [`log`] → consumer [`group`]s, whose
//! [`group::delivery`] policy every consumer with side effects shares. The
//! [`app`] is what is built on it: the order API (a writer), the mail
//! worker and the webhook sink (consumers), and replay. The [`builder`]
//! builds a process's roles from checked settings (`serve`, `demo` and the
//! tests start pipelines there). Around them: roles as [`service`]s under
//! one supervisor, [`db`] connections, [`migrate`], the [`embedded`]
//! default cluster, [`http`], [`metrics`] and the [`cli`]. The [`kafka`]
//! mirror copies the log into a Kafka cluster. `docs/architecture.md` draws
//! the layers.
//!
//! The guarantees the code keeps are numbered in `docs/invariants.md`;
//! comments and tests cite them by number.

pub mod app;
pub mod builder;
pub mod cli;
pub(crate) mod clip;
pub mod console;
pub mod db;
pub mod embedded;
pub mod group;
pub mod http;
pub(crate) mod json;
pub mod kafka;
pub mod kafka_api;
pub mod log;
pub mod metrics;
pub mod migrate;
pub mod outbox;
pub mod relay;
pub mod service;
pub mod shutdown;
pub mod trace_context;

/// This machine's name (`/etc/hostname`), or `localhost`: what a process
/// calls itself in its ids.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Every SQL statement of the modules that own the tables, by name
/// (`module::CONSTANT`): tests/it/sql.rs prepares each against a migrated
/// database, so a renamed column fails the tests rather than production.
#[doc(hidden)]
pub fn sql_statements() -> Vec<(&'static str, String)> {
    [
        outbox::statements(),
        relay::statements(),
        console::statements(),
        log::topics::statements(),
        log::read::statements(),
        log::storage::statements(),
        group::membership::statements(),
        group::progress::statements(),
        group::admin::statements(),
        group::dead_letters::statements(),
        app::order::statements(),
        app::api::statements(),
        app::mail::statements(),
        app::replay::statements(),
        kafka::status::statements(),
        kafka_api::statements(),
    ]
    .concat()
}
