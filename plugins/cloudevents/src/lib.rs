//! `cloudevents`: wraps each event's data in a CloudEvents 1.0 structured-mode JSON envelope.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use weir_sdk::{Event, Outcome};

/// The plugin's config; every key is optional.
#[derive(Debug, Deserialize)]
#[serde(try_from = "RawConfig")]
pub struct Config {
    /// The `source` attribute; `{entity}` and `{source}` are replaced. Default `/weir/{entity}`.
    pub source: String,
    /// Prefix of the `type` attribute, which is `{type_prefix}.{entity}.{op}`. Default `weir`.
    pub type_prefix: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_source")]
    source: String,
    #[serde(default = "default_type_prefix")]
    type_prefix: String,
}

impl TryFrom<RawConfig> for Config {
    type Error = String;

    fn try_from(raw: RawConfig) -> Result<Self, String> {
        // CloudEvents requires `source` and `type` to be non-empty; a blank prefix would make
        // types like `.orders.insert`.
        if raw.source.trim().is_empty() {
            return Err(
                "`source` is empty; leave it out for \"/weir/{entity}\" or set a URI like \"urn:shop:{entity}\"".into(),
            );
        }
        if raw.type_prefix.trim().is_empty() {
            return Err("`type_prefix` is empty; leave it out for \"weir\" or set one like \"com.shop\"".into());
        }
        Ok(Config { source: raw.source, type_prefix: raw.type_prefix })
    }
}

fn default_source() -> String {
    "/weir/{entity}".to_string()
}

fn default_type_prefix() -> String {
    "weir".to_string()
}

impl Default for Config {
    fn default() -> Self {
        Config { source: default_source(), type_prefix: default_type_prefix() }
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648), for data that is not JSON.
fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Replaces `data` with the envelope and sets `content-type: application/cloudevents+json`.
#[weir_sdk::transform]
pub fn handle(mut event: Event, config: &Config) -> Result<Outcome, String> {
    let mut envelope = Map::new();
    envelope.insert("specversion".into(), json!("1.0"));
    envelope.insert("id".into(), json!(event.id));
    let source = config.source.replace("{entity}", &event.entity).replace("{source}", &event.source);
    envelope.insert("source".into(), json!(source));
    envelope.insert("type".into(), json!(format!("{}.{}.{}", config.type_prefix, event.entity, event.op)));
    if let Some(key) = &event.key {
        envelope.insert("subject".into(), json!(key));
    }
    envelope.insert("time".into(), json!(event.time));
    match serde_json::from_slice::<Value>(&event.data) {
        Ok(data) => {
            envelope.insert("datacontenttype".into(), json!("application/json"));
            envelope.insert("data".into(), data);
        }
        Err(_) => {
            envelope.insert("datacontenttype".into(), json!("application/octet-stream"));
            envelope.insert("data_base64".into(), json!(base64(&event.data)));
        }
    }
    event.set_data(&Value::Object(envelope)).map_err(|e| e.to_string())?;
    event.set_header("content-type", "application/cloudevents+json");
    Ok(Outcome::Keep(event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrap(event: Event, config: &Config) -> (Value, Event) {
        let Ok(Outcome::Keep(out)) = handle(event, config) else { panic!("expected keep") };
        (out.data_json().unwrap(), out)
    }

    #[test]
    fn wraps_json_data() {
        let mut event = Event::new("orders", "insert", json!({"id": 1}));
        event.key = Some("1".into());
        let (envelope, out) = wrap(event, &Config::default());
        assert_eq!(
            envelope,
            json!({"specversion": "1.0", "id": "test-1", "source": "/weir/orders", "type": "weir.orders.insert",
                   "subject": "1", "time": "2026-01-01T00:00:00Z", "datacontenttype": "application/json", "data": {"id": 1}})
        );
        assert_eq!(out.header("Content-Type"), Some("application/cloudevents+json"));
    }

    #[test]
    fn binary_data_goes_to_data_base64() {
        let mut event = Event::new("files", "insert", json!({}));
        event.data = b"\x00\xffhi".to_vec();
        let (envelope, _) = wrap(event, &Config::default());
        assert_eq!(envelope["data_base64"], "AP9oaQ==");
        assert!(envelope.get("data").is_none());
        assert!(envelope.get("subject").is_none(), "no key, no subject");
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, output) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), output);
        }
    }

    #[test]
    fn config_changes_source_and_type_and_refuses_unknown_keys() {
        let config: Config =
            weir_sdk::parse_config(r#"{"source":"urn:shop:{source}:{entity}","type_prefix":"com.shop"}"#).unwrap();
        let (envelope, _) = wrap(Event::new("orders", "update", json!({})), &config);
        assert_eq!(envelope["source"], "urn:shop:http:orders");
        assert_eq!(envelope["type"], "com.shop.orders.update");
        assert!(weir_sdk::parse_config::<Config>(r#"{"sauce":"x"}"#).unwrap_err().contains("unknown field"));
        assert!(weir_sdk::parse_config::<Config>(r#"{"source":""}"#).unwrap_err().contains("`source` is empty"));
        assert!(weir_sdk::parse_config::<Config>(r#"{"type_prefix":" "}"#).unwrap_err().contains("`type_prefix`"));
        let defaults: Config = weir_sdk::parse_config("").unwrap();
        assert_eq!((defaults.source, defaults.type_prefix), ("/weir/{entity}".to_string(), "weir".to_string()));
    }
}
