//! Weir: a WebAssembly-extensible event gateway. Write events (HTTP requests, PostgreSQL row
//! changes) run through chains of sandboxed WebAssembly plugins and are published to NATS.
//!
//! The `weir` binary is a thin CLI over this library: [`config`] reads the config file,
//! [`http`] is the HTTP source, [`pipeline`] routes events through plugin chains, [`plugin`] is
//! the sandboxed runtime, [`sink`] publishes to NATS, [`strict_json`] checks incoming JSON,
//! [`metrics`] counts it all, [`run`] wires it together, and [`cli`] holds the command
//! implementations.

pub mod cli;
pub mod config;
pub mod event;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod plugin;
pub mod postgres;
pub mod run;
pub mod sink;
pub mod strict_json;
pub mod subject;
