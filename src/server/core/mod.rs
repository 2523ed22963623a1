//! The core: [`SseService`](service::SseService) (the typed API and the protocol of
//! opening and closing a stream), `connection` (one stream's body), `replay` (backlogs in
//! pages), `hub` and `mailbox` (this process's connections, each with a bounded queue).
//! It uses the brokers and the shared pieces, never the HTTP edge; within it, `service`
//! uses `connection`, `replay` and `hub`, which use nothing of it (a stream reports its
//! end through `connection::StreamEnded`).

pub(crate) mod connection;
pub(crate) mod hub;
pub mod idempotency;
pub mod inbox;
pub(crate) mod mailbox;
pub mod presence;
pub(crate) mod replay;
pub mod service;
