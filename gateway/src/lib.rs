//! Weir: a WebAssembly-extensible event gateway. Write events (HTTP requests, PostgreSQL row
//! changes) run through chains of sandboxed WebAssembly plugins and are published to NATS.
//!
//! The `weir` binary is a thin CLI over this library: [`plugin`] is the sandboxed runtime,
//! [`event`] the event type plugins see, [`subject`] the NATS subject rules, and [`cli`] the
//! command implementations.

pub mod cli;
pub mod event;
pub mod plugin;
pub mod subject;
