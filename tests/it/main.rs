//! The integration tests: one binary, a module per part of the pipeline.
//! Each test gets its own database in a private Postgres cluster.

mod api;
mod cli;
mod event_log;
mod harness;
mod migrate;
mod relay;
