//! The integration tests: one binary, a module per part of the pipeline.
//! Each test gets its own database in a private Postgres cluster.

mod api;
mod backlog;
mod cli;
mod console;
mod console_browser;
mod faults;
mod first_hour;
mod groups;
mod harness;
mod kafka;
mod kafka_api;
mod kafka_clients;
mod kafka_groups;
mod kafka_js;
mod kafka_python;
mod kafka_security;
mod kafka_status;
mod log;
mod mail;
mod metrics;
mod migrate;
mod observability;
mod odd_rows;
mod project;
mod relay;
mod replay;
mod smtp;
mod sql;
mod webhook;
