//! The event: one write flowing from a source through the plugin chain to the sink.
//!
//! The same type is lowered into plugins (it is the WIT `event` record), so a batch is handed to
//! a plugin without converting it first; outputs come back through `plugin::capped`.

/// One write. Field meanings and what plugins may change: `wit/plugin.wit`, record `event`.
pub use crate::plugin::bindings::transform::weir::plugin::types::Event;

impl Event {
    /// Bytes of the fields a plugin returns (entity, op, key, subject, headers, data, old data).
    pub fn payload_size(&self) -> usize {
        self.entity.len()
            + self.op.len()
            + self.key.as_ref().map_or(0, String::len)
            + self.subject.len()
            + self.headers.iter().map(|(name, value)| name.len() + value.len()).sum::<usize>()
            + self.data.len()
            + self.old.as_ref().map_or(0, Vec::len)
    }
}
