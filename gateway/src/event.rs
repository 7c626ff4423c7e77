//! The event: one write flowing from a source through the plugin chain to the sink.
//!
//! The same type is lowered into and lifted out of plugins (it is the WIT `event` record), so a
//! batch is handed to a plugin without converting it first.

/// One write. Field meanings and what plugins may change: `wit/plugin.wit`, record `event`.
pub use crate::plugin::bindings::transform::weir::plugin::types::Event;

impl Event {
    /// Bytes this event occupies as plugin output: what the per-event output cap counts.
    pub fn output_size(&self) -> usize {
        self.entity.len()
            + self.op.len()
            + self.key.as_ref().map_or(0, String::len)
            + self.subject.len()
            + self.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            + self.data.len()
            + self.old.as_ref().map_or(0, Vec::len)
    }
}
