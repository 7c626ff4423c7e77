//! Events as people write and read them on the command line: NDJSON input lines and outcome
//! lines with `data` as real JSON rather than bytes.

use crate::event::Event;
use crate::plugin::{Outcome, PluginError};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// One input line: `{"entity","op","key","data",...}`; everything but `entity` is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputEvent {
    /// Collection or `schema.table` (required).
    pub entity: String,
    /// Defaults to `insert`.
    #[serde(default)]
    pub op: Option<String>,
    /// String or number.
    #[serde(default)]
    pub key: Option<Value>,
    /// Defaults to `test-{line}`.
    #[serde(default)]
    pub id: Option<String>,
    /// Defaults to `http`.
    #[serde(default)]
    pub source: Option<String>,
    /// Defaults to now.
    #[serde(default)]
    pub time: Option<String>,
    /// Defaults to `weir.{entity}.{op}`.
    #[serde(default)]
    pub subject: Option<String>,
    /// Header name to value; an array gives the header once per element, in order.
    #[serde(default)]
    pub headers: Map<String, Value>,
    /// The payload; defaults to `{}`.
    #[serde(default)]
    pub data: Option<Value>,
    /// The previous row.
    #[serde(default)]
    pub old: Option<Value>,
    /// Position (LSN).
    #[serde(default)]
    pub position: Option<String>,
}

fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl InputEvent {
    /// The event the host would build; `default_id` is used when the line has no `id`.
    pub fn into_event(self, default_id: String, now: &str) -> Event {
        let mut event = Event {
            id: self.id.unwrap_or(default_id),
            source: self.source.unwrap_or_else(|| "http".to_string()),
            key: self.key.as_ref().map(text_of),
            time: self.time.unwrap_or_else(|| now.to_string()),
            subject: String::new(),
            headers: self
                .headers
                .iter()
                .flat_map(|(name, value)| match value {
                    Value::Array(values) => values.iter().map(|v| (name.clone(), text_of(v))).collect(),
                    single => vec![(name.clone(), text_of(single))],
                })
                .collect(),
            data: self.data.unwrap_or_else(|| json!({})).to_string().into_bytes(),
            old: self.old.map(|old| old.to_string().into_bytes()),
            position: self.position,
            entity: self.entity,
            op: self.op.unwrap_or_else(|| "insert".to_string()),
        };
        // The subject a route without one gives the event in the gateway, by the same template.
        event.subject = match self.subject {
            Some(subject) => subject,
            None => {
                use crate::pipeline::{DEFAULT_POSTGRES_SUBJECT, DEFAULT_SUBJECT, SubjectTemplate};
                let template = if event.source == "postgres" { DEFAULT_POSTGRES_SUBJECT } else { DEFAULT_SUBJECT };
                SubjectTemplate::parse(template).map_or_else(|_| String::new(), |template| template.render(&event))
            }
        };
        event
    }
}

/// Parses NDJSON input; blank lines are skipped, and errors name the line.
pub fn parse_ndjson(text: &str, now: &str) -> anyhow::Result<Vec<Event>> {
    let mut events = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let input: InputEvent =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("input line {}: {e}", index + 1))?;
        events.push(input.into_event(format!("test-{}", index + 1), now));
    }
    Ok(events)
}

fn bytes_to_json(bytes: &[u8], key: &str, out: &mut Map<String, Value>) {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(value) => {
            out.insert(key.to_string(), value);
        }
        Err(_) => {
            out.insert(format!("{key}_base64"), Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)));
        }
    }
}

/// Headers as an object: a name given once maps to its value, a repeated one (which the gateway
/// publishes as a repeated NATS header) to its values in order.
pub fn headers_json(headers: &[(String, String)]) -> Value {
    let mut out = Map::new();
    for (name, value) in headers {
        match out.get_mut(name) {
            None => {
                out.insert(name.clone(), json!(value));
            }
            Some(Value::Array(values)) => values.push(json!(value)),
            Some(single) => {
                let first = single.take();
                *single = Value::Array(vec![first, json!(value)]);
            }
        }
    }
    Value::Object(out)
}

/// An event as JSON: `data` and `old` embedded as JSON (or `data_base64` when not JSON).
pub fn event_json(event: &Event) -> Value {
    let mut out = Map::new();
    out.insert("id".into(), json!(event.id));
    out.insert("source".into(), json!(event.source));
    out.insert("entity".into(), json!(event.entity));
    out.insert("op".into(), json!(event.op));
    out.insert("key".into(), json!(event.key));
    out.insert("time".into(), json!(event.time));
    out.insert("subject".into(), json!(event.subject));
    out.insert("headers".into(), headers_json(&event.headers));
    bytes_to_json(&event.data, "data", &mut out);
    match &event.old {
        Some(old) => bytes_to_json(old, "old", &mut out),
        None => {
            out.insert("old".into(), Value::Null);
        }
    }
    out.insert("position".into(), json!(event.position));
    Value::Object(out)
}

/// One outcome line: `{"outcome":"keep","event":{…}}`, `{"outcome":"split","events":[…]}`,
/// `{"outcome":"drop"}`, `{"outcome":"reject","reason":…}` or
/// `{"outcome":"error","kind":…,"message":…}`.
pub fn outcome_json(result: &Result<Outcome, PluginError>) -> Value {
    match result {
        Ok(Outcome::Drop) => json!({"outcome": "drop"}),
        Ok(Outcome::Keep(event)) => json!({"outcome": "keep", "event": event_json(event)}),
        Ok(Outcome::Split(events)) => {
            json!({"outcome": "split", "events": events.iter().map(event_json).collect::<Vec<_>>()})
        }
        Ok(Outcome::Reject(reason)) => json!({"outcome": "reject", "reason": reason}),
        Err(error) => json!({"outcome": "error", "kind": error.kind.as_str(), "message": error.message}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_lines_get_defaults_and_errors_name_the_line() {
        let events = parse_ndjson(
            "{\"entity\":\"orders\",\"key\":7,\"data\":{\"a\":1}}\n\n{\"entity\":\"x\",\"op\":\"delete\"}\n",
            "T",
        )
        .unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].subject, "weir.orders.insert");
        assert_eq!(events[0].key.as_deref(), Some("7"));
        assert_eq!(events[0].id, "test-1");
        assert_eq!(events[1].id, "test-3");
        assert_eq!(events[1].data, b"{}");
        let error = parse_ndjson("{\"entity\":\"a\"}\n{\"op\":\"x\"}", "T").unwrap_err().to_string();
        assert!(error.starts_with("input line 2:"), "{error}");
        assert!(error.contains("entity"), "{error}");
        // The gateway's default subjects: change capture's by schema and table; values sanitized.
        let events = parse_ndjson(
            "{\"entity\":\"public.orders\",\"source\":\"postgres\"}\n{\"entity\":\"x\",\"op\":\"a b\"}\n",
            "t",
        )
        .unwrap();
        assert_eq!(events[0].subject, "weir.public.orders.insert");
        assert!(crate::subject::validate(&events[1].subject).is_ok(), "{}", events[1].subject);
    }

    #[test]
    fn non_json_data_is_shown_as_base64() {
        let mut event = parse_ndjson("{\"entity\":\"a\"}", "T").unwrap().remove(0);
        event.data = b"\xffnot json".to_vec();
        let shown = event_json(&event);
        assert!(shown.get("data").is_none());
        assert_eq!(shown["data_base64"], "/25vdCBqc29u");
    }
}
