//! outbox-relay: a transactional outbox relay on Postgres.
//!
//! The modules follow the data's path:
//! order writer ([`order`], [`http`]) → [`outbox`] → [`relay`] (using
//! [`partitioner`]) → [`event_log`] → consumer [`group`]s ([`consumer`]) →
//! [`mail`]; plus [`migrate`], [`db`], [`embedded`] and the [`cli`].

pub mod cli;
pub mod consumer;
pub mod db;
pub mod embedded;
pub mod event_log;
pub mod group;
pub mod http;
pub mod mail;
pub mod metrics;
pub mod migrate;
pub mod order;
pub mod outbox;
pub mod partitioner;
pub mod relay;
pub mod service;
pub mod shutdown;
