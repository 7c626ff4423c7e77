//! Write Weir plugins in Rust: a plain function plus one attribute macro.
//!
//! ```ignore
//! use weir_sdk::{Event, Outcome};
//!
//! #[weir_sdk::transform]
//! fn handle(mut event: Event) -> Outcome {
//!     event.set_header("x-seen", "yes");
//!     Outcome::Keep(event)
//! }
//! ```
//!
//! A filter is `#[weir_sdk::filter] fn keep(event: &Event) -> bool`. Either function may take a
//! second parameter `&C` where `C: serde::de::DeserializeOwned`: the plugin's `config` from the
//! gateway config is parsed into it once per instance, and a config that does not parse is
//! refused with serde's message. A transform may return `Result<Outcome, E>`; `Err(e)` becomes
//! `Outcome::Reject(e.to_string())`.
//!
//! On the host (`cargo test`) the function stays a plain function: call it with events built by
//! [`Event::new`]. The macro adds the WebAssembly glue only when building for `wasm32`.

pub mod json;
pub mod log;

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Display;

pub use weir_sdk_macros::{filter, transform};

/// Version of this SDK, recorded in every plugin it builds.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Version of the WIT package (`weir:plugin`) this SDK implements.
pub const WIT_VERSION: &str = "0.1.0";

/// One write that entered the gateway. See `wit/plugin.wit` for what the host does with each field.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// Unique, deterministic id (becomes `Nats-Msg-Id`); changes to it are ignored by the host.
    pub id: String,
    /// `http` or `postgres`; read-only.
    pub source: String,
    /// Collection or `schema.table`.
    pub entity: String,
    /// `insert`, `update`, `delete`, `upsert`, `read`, `truncate` or a custom word.
    pub op: String,
    /// Record key, if known.
    pub key: Option<String>,
    /// RFC 3339 time of the write; read-only.
    pub time: String,
    /// NATS subject the event will be published to.
    pub subject: String,
    /// Message headers, in order.
    pub headers: Vec<(String, String)>,
    /// Payload: JSON text.
    pub data: Vec<u8>,
    /// Previous row as JSON text, when known.
    pub old: Option<Vec<u8>>,
    /// Commit LSN for PostgreSQL; read-only.
    pub position: Option<String>,
}

/// What a transform decided for one event.
#[allow(clippy::large_enum_variant)] // `Keep` is the common case; boxing it would cost an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Publish nothing.
    Drop,
    /// Publish this (possibly modified) event.
    Keep(Event),
    /// Publish each of these events, in order.
    Split(Vec<Event>),
    /// Refuse the event with a reason (HTTP answers 422; otherwise the route's `on_error`).
    Reject(String),
}

/// Turns what a transform function returns into an [`Outcome`].
pub trait IntoOutcome {
    /// The outcome to hand to the host.
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for Outcome {
    fn into_outcome(self) -> Outcome {
        self
    }
}

impl<E: Display> IntoOutcome for Result<Outcome, E> {
    fn into_outcome(self) -> Outcome {
        self.unwrap_or_else(|error| Outcome::Reject(error.to_string()))
    }
}

/// Why the JSON of an event could not be read or written.
#[derive(Debug)]
pub struct DataError(String);

impl Display for DataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DataError {}

impl Event {
    /// An event as the host would send it for `op` on `entity` with `data`, for tests.
    /// The subject is the HTTP default `weir.{entity}.{op}`.
    pub fn new(entity: &str, op: &str, data: serde_json::Value) -> Self {
        Event {
            id: "test-1".into(),
            source: "http".into(),
            entity: entity.into(),
            op: op.into(),
            key: None,
            time: "2026-01-01T00:00:00Z".into(),
            subject: format!("weir.{entity}.{op}"),
            headers: Vec::new(),
            data: data.to_string().into_bytes(),
            old: None,
            position: None,
        }
    }

    /// The payload parsed into `T` (for example `serde_json::Value` or a struct of yours).
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, DataError> {
        serde_json::from_slice(&self.data).map_err(|e| DataError(format!("event data is not the expected JSON: {e}")))
    }

    /// The payload as a JSON value.
    pub fn data_json(&self) -> Result<serde_json::Value, DataError> {
        self.data_as()
    }

    /// Replaces the payload with `value` serialized as JSON.
    pub fn set_data<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), DataError> {
        self.data = serde_json::to_vec(value).map_err(|e| DataError(format!("cannot serialize event data: {e}")))?;
        Ok(())
    }

    /// The previous row as a JSON value, if the event has one.
    pub fn old_json(&self) -> Result<Option<serde_json::Value>, DataError> {
        self.old
            .as_deref()
            .map(|old| serde_json::from_slice(old).map_err(|e| DataError(format!("event old data is not JSON: {e}"))))
            .transpose()
    }

    /// The value of header `name` (compared without regard to case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Sets header `name` to `value`, replacing every earlier value of it.
    pub fn set_header(&mut self, name: &str, value: &str) {
        self.remove_header(name);
        self.headers.push((name.to_string(), value.to_string()));
    }

    /// Removes every value of header `name`.
    pub fn remove_header(&mut self, name: &str) {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }
}

/// Turns `text` into something safe to use as one NATS subject token: characters other than
/// ASCII letters, digits, `-` and `_` become `_`, and an empty result becomes `_`.
pub fn subject_token(text: &str) -> String {
    let token: String =
        text.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    if token.is_empty() { "_".to_string() } else { token }
}

/// Parses the JSON config the host passes to `configure`; used by the generated glue.
#[doc(hidden)]
pub fn parse_config<C: DeserializeOwned>(config: &str) -> Result<C, String> {
    let text = if config.trim().is_empty() { "{}" } else { config };
    serde_json::from_str(text).map_err(|e| format!("invalid plugin config: {e}"))
}

/// Checks that a plugin without a config type was given none; used by the generated glue.
#[doc(hidden)]
pub fn expect_no_config(config: &str) -> Result<(), String> {
    match serde_json::from_str::<serde_json::Value>(if config.trim().is_empty() { "{}" } else { config }) {
        Ok(serde_json::Value::Null) => Ok(()),
        Ok(serde_json::Value::Object(map)) if map.is_empty() => Ok(()),
        Ok(_) => Err("this plugin takes no config; remove `config` from its section".to_string()),
        Err(e) => Err(format!("invalid plugin config: {e}")),
    }
}

/// Items the macros' generated code refers to. Not part of the public API.
#[doc(hidden)]
pub mod __private {
    pub use wit_bindgen;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn data_and_headers_can_be_read_and_edited() {
        let mut event = Event::new("orders", "insert", json!({"id": 1, "customer": {"email": "a@b.c"}}));
        assert_eq!(event.subject, "weir.orders.insert");
        let mut data = event.data_json().unwrap();
        json::remove(&mut data, "customer.email");
        event.set_data(&data).unwrap();
        assert_eq!(event.data_json().unwrap(), json!({"id": 1, "customer": {}}));

        event.set_header("X-Seen", "1");
        event.set_header("x-seen", "2");
        assert_eq!(event.header("X-SEEN"), Some("2"));
        assert_eq!(event.headers.len(), 1, "set_header replaces earlier values");
        event.remove_header("x-seen");
        assert_eq!(event.header("x-seen"), None);

        #[derive(serde::Deserialize)]
        struct Order {
            id: u32,
        }
        assert_eq!(event.data_as::<Order>().unwrap().id, 1);
        event.data = b"not json".to_vec();
        assert!(event.data_json().unwrap_err().to_string().contains("not the expected JSON"));
        assert_eq!(event.old_json().unwrap(), None);
    }

    #[test]
    fn results_become_outcomes() {
        assert_eq!(Outcome::Drop.into_outcome(), Outcome::Drop);
        let failed: Result<Outcome, String> = Err("bad total".into());
        assert_eq!(failed.into_outcome(), Outcome::Reject("bad total".into()));
    }

    #[test]
    fn configs_are_parsed_or_refused() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        struct Config {
            #[allow(dead_code)]
            fields: Vec<String>,
        }
        assert!(parse_config::<Config>(r#"{"fields":["a"]}"#).is_ok());
        let error = parse_config::<Config>("{}").unwrap_err();
        assert!(error.contains("missing field `fields`"), "{error}");
        assert!(parse_config::<Config>(r#"{"fields":[],"x":1}"#).unwrap_err().contains("unknown field"));
        assert_eq!(expect_no_config("{}"), Ok(()));
        assert_eq!(expect_no_config(""), Ok(()));
        assert_eq!(expect_no_config("null"), Ok(()));
        assert!(expect_no_config(r#"{"a":1}"#).unwrap_err().contains("takes no config"));
    }

    #[test]
    fn subject_tokens_are_safe() {
        assert_eq!(subject_token("eu.west *"), "eu_west__");
        assert_eq!(subject_token(""), "_");
    }
}
