//! The reference application built on the platform (outbox, relay, log,
//! groups): the seed's order service and its confirmation mails.
//!
//! * [`order`]: the order domain and its one-transaction write of the order
//!   with its `OrderCreated` outbox row.
//! * [`api`]: the HTTP order API over it.
//! * [`mail`]: the mail worker, a consumer of `order-created` in group
//!   `mail-service`.
//! * [`replay`]: mailing a range of `order-created` again, under a run of
//!   its own.
//! * [`webhook`]: the webhook sink, a consumer that pushes events to a URL,
//!   signed (Standard Webhooks); its delivery policy is the group layer's.

pub mod api;
pub mod mail;
pub mod order;
pub mod replay;
pub mod webhook;
