//! The no-op transform: keeps every event as it came. Used to measure the runtime's own cost.

use weir_sdk::{Event, Outcome};

/// Keeps the event unchanged.
#[weir_sdk::transform]
pub fn handle(event: Event) -> Outcome {
    Outcome::Keep(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_event_unchanged() {
        let event = Event::new("orders", "insert", serde_json::json!({"id": 1}));
        assert_eq!(handle(event.clone()), Outcome::Keep(event));
    }
}
