//! The event: one write flowing from a source through the plugin chain to the sink.
//!
//! The same type is lowered into plugins (it is the WIT `event` record), so a batch is handed to
//! a plugin without converting it first; outputs come back through `plugin::capped`.

/// One write. Field meanings and what plugins may change: `wit/plugin.wit`, record `event`.
pub use crate::plugin::bindings::transform::weir::plugin::types::Event;
