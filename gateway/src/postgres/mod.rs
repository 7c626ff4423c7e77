//! PostgreSQL change capture: every committed row change, from a logical replication slot
//! (`pgoutput`), through the routes' plugin chains into JetStream, with the slot confirmed only
//! past what JetStream has stored. See `docs/postgres.md`.
//!
//! - [`pgoutput`]: our decoder of the row messages.
//! - [`values`]: column values (text format) to JSON by type.
//! - [`setup`]: the control connection: publication, slot, types, and the checks `weir check` runs.
//! - [`source`]: the replication loop.

pub mod pgoutput;
pub mod setup;
pub mod source;
pub mod values;

mod connection;
mod keepalive;
mod tls;

pub use tls::close_tunnels;

pub use source::{PostgresSource, now_pg_micros};

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};

/// What the source reports to `/readyz` and `/metrics`.
#[derive(Debug, Default)]
pub struct SourceStatus {
    /// The replication stream is up.
    pub connected: AtomicBool,
    /// Storing in JetStream is failing; reading from the slot is paused.
    pub paused: AtomicBool,
    /// The last position confirmed to the server (every change before it is stored).
    pub confirmed_lsn: AtomicU64,
    /// The server's WAL end, as it last said (with data or a keepalive).
    pub server_lsn: AtomicU64,
    /// The commit time (microseconds since PostgreSQL's epoch, 2000-01-01) of the transaction
    /// being read while the stream is behind; 0 once the server has nothing more to send.
    pub reading_commit_micros: AtomicI64,
    /// The source's own NATS connection, once made (it publishes apart from HTTP's).
    pub nats: std::sync::OnceLock<async_nats::Client>,
}

impl SourceStatus {
    /// Whether the source's own NATS connection is up (not yet made counts as down).
    pub fn nats_connected(&self) -> bool {
        self.nats.get().is_some_and(|client| client.connection_state() == async_nats::connection::State::Connected)
    }
}
