//! `redact`: removes or masks configured JSON fields in an event's `data` and `old`.

use serde::Deserialize;
use serde_json::Value;
use weir_sdk::{Event, Outcome};

/// What to do with a matched field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Delete the field.
    #[default]
    Remove,
    /// Replace the value with the mask (strings may keep their last characters).
    Mask,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    fields: Vec<String>,
    #[serde(default)]
    action: Action,
    #[serde(default = "default_mask")]
    mask: String,
    #[serde(default)]
    keep_last: usize,
}

fn default_mask() -> String {
    "****".to_string()
}

/// The plugin's config, validated: `fields` (dotted paths, `*` matches every key or element),
/// `action` (`remove` | `mask`), `mask`, `keep_last`.
#[derive(Debug, Deserialize)]
#[serde(try_from = "RawConfig")]
pub struct Config {
    paths: Vec<Vec<String>>,
    action: Action,
    mask: String,
    keep_last: usize,
}

impl TryFrom<RawConfig> for Config {
    type Error = String;

    fn try_from(raw: RawConfig) -> Result<Self, String> {
        if raw.fields.is_empty() {
            return Err(
                "`fields` is empty: list the JSON fields to redact, e.g. fields = [\"email\", \"card.number\"]".into(),
            );
        }
        let mut paths = Vec::with_capacity(raw.fields.len());
        for field in &raw.fields {
            let segments: Vec<String> = field.split('.').map(str::to_string).collect();
            if segments.iter().any(String::is_empty) {
                return Err(format!("field `{field}` has an empty segment; write paths like `customer.email`"));
            }
            paths.push(segments);
        }
        if raw.action == Action::Remove && raw.keep_last > 0 {
            return Err("`keep_last` only applies to action = \"mask\"".into());
        }
        Ok(Config { paths, action: raw.action, mask: raw.mask, keep_last: raw.keep_last })
    }
}

impl Config {
    fn masked(&self, value: &Value) -> Value {
        match value {
            // A string no longer than `keep_last` is masked whole: keeping its "last" characters
            // would publish all of it.
            Value::String(text) if self.keep_last > 0 && text.chars().count() > self.keep_last => {
                let skip = text.chars().count() - self.keep_last;
                let kept: String = text.chars().skip(skip).collect();
                Value::String(format!("{}{kept}", self.mask))
            }
            _ => Value::String(self.mask.clone()),
        }
    }

    /// Applies every path to `value`; returns whether anything changed.
    fn apply(&self, value: &mut Value) -> bool {
        let mut changed = false;
        for path in &self.paths {
            changed |= self.apply_path(value, path);
        }
        changed
    }

    fn apply_path(&self, value: &mut Value, path: &[String]) -> bool {
        let Some((first, rest)) = path.split_first() else { return false };
        let last = rest.is_empty();
        match value {
            Value::Object(map) if first == "*" => {
                let keys: Vec<String> = map.keys().cloned().collect();
                // Every key is visited (no short-circuit): each may hold a field to redact.
                let mut changed = false;
                for key in &keys {
                    changed |= self.apply_key(map, key, rest, last);
                }
                changed
            }
            Value::Object(map) => self.apply_key(map, first, rest, last),
            Value::Array(items) if first == "*" => {
                if last {
                    return self.redact_all(items);
                }
                let mut changed = false;
                for item in items.iter_mut() {
                    changed |= self.apply_path(item, rest);
                }
                changed
            }
            Value::Array(items) => match first.parse::<usize>().ok().filter(|i| *i < items.len()) {
                Some(index) if last => {
                    if self.action == Action::Remove {
                        items.remove(index);
                    } else {
                        items[index] = self.masked(&items[index]);
                    }
                    true
                }
                Some(index) => self.apply_path(&mut items[index], rest),
                None => false,
            },
            _ => false,
        }
    }

    fn redact_all(&self, items: &mut Vec<Value>) -> bool {
        if items.is_empty() {
            return false;
        }
        if self.action == Action::Remove {
            items.clear();
        } else {
            for item in items.iter_mut() {
                *item = self.masked(item);
            }
        }
        true
    }

    fn apply_key(&self, map: &mut serde_json::Map<String, Value>, key: &str, rest: &[String], last: bool) -> bool {
        if !last {
            return map.get_mut(key).is_some_and(|child| self.apply_path(child, rest));
        }
        match self.action {
            Action::Remove => map.remove(key).is_some(),
            Action::Mask => match map.get_mut(key) {
                Some(slot) => {
                    *slot = self.masked(slot);
                    true
                }
                None => false,
            },
        }
    }
}

/// Redacts the configured fields in `data` and `old`; data that is not JSON is rejected.
#[weir_sdk::transform]
pub fn handle(mut event: Event, config: &Config) -> Result<Outcome, String> {
    let mut data: Value =
        serde_json::from_slice(&event.data).map_err(|e| format!("cannot redact: event data is not JSON ({e})"))?;
    if config.apply(&mut data) {
        event.set_data(&data).map_err(|e| e.to_string())?;
    }
    if let Some(old) = &event.old {
        let mut old: Value =
            serde_json::from_slice(old).map_err(|e| format!("cannot redact: event old data is not JSON ({e})"))?;
        if config.apply(&mut old) {
            event.old = Some(serde_json::to_vec(&old).map_err(|e| e.to_string())?);
        }
    }
    Ok(Outcome::Keep(event))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(json: &str) -> Config {
        weir_sdk::parse_config(json).unwrap()
    }

    fn run(config_json: &str, data: Value) -> Value {
        match handle(Event::new("users", "insert", data), &config(config_json)).unwrap() {
            Outcome::Keep(event) => event.data_json().unwrap(),
            other => panic!("expected keep, got {other:?}"),
        }
    }

    #[test]
    fn removes_fields_by_path() {
        let out = run(
            r#"{"fields":["email","card.number"]}"#,
            json!({"email":"a@b","name":"Ann","card":{"number":"4111","exp":"1/29"}}),
        );
        assert_eq!(out, json!({"name":"Ann","card":{"exp":"1/29"}}));
    }

    #[test]
    fn masks_and_keeps_the_last_characters() {
        let out = run(
            r#"{"fields":["card","pin"],"action":"mask","keep_last":4}"#,
            json!({"card":"4111111111111111","pin":1234}),
        );
        assert_eq!(out, json!({"card":"****1111","pin":"****"}));
        let short = run(r#"{"fields":["pin"],"action":"mask","keep_last":4}"#, json!({"pin":"1234"}));
        assert_eq!(short, json!({"pin":"****"}), "a value no longer than keep_last is masked whole");
    }

    #[test]
    fn wildcards_match_every_key_and_element() {
        let out = run(
            r#"{"fields":["items.*.sku","tags.*"],"action":"mask","mask":"x"}"#,
            json!({"items":[{"sku":"a","n":1},{"sku":"b"}],"tags":["p","q"]}),
        );
        assert_eq!(out, json!({"items":[{"sku":"x","n":1},{"sku":"x"}],"tags":["x","x"]}));
    }

    #[test]
    fn missing_fields_leave_the_event_unchanged() {
        let event = Event::new("users", "insert", json!({"name":"Ann"}));
        assert_eq!(handle(event.clone(), &config(r#"{"fields":["email"]}"#)), Ok(Outcome::Keep(event)));
    }

    #[test]
    fn old_row_is_redacted_too() {
        let mut event = Event::new("users", "update", json!({"email":"new@x"}));
        event.old = Some(br#"{"email":"old@x","id":1}"#.to_vec());
        let Ok(Outcome::Keep(out)) = handle(event, &config(r#"{"fields":["email"]}"#)) else { panic!() };
        assert_eq!(out.old_json().unwrap(), Some(json!({"id":1})));
        assert_eq!(out.data_json().unwrap(), json!({}));
    }

    #[test]
    fn non_json_data_is_rejected() {
        let mut event = Event::new("users", "insert", json!({}));
        event.data = b"plain text".to_vec();
        let outcome = weir_sdk::IntoOutcome::into_outcome(handle(event, &config(r#"{"fields":["a"]}"#)));
        assert!(matches!(outcome, Outcome::Reject(reason) if reason.contains("not JSON")));
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(weir_sdk::parse_config::<Config>(r#"{"fields":[]}"#).unwrap_err().contains("`fields` is empty"));
        assert!(weir_sdk::parse_config::<Config>(r#"{"fields":["a..b"]}"#).unwrap_err().contains("empty segment"));
        assert!(
            weir_sdk::parse_config::<Config>(r#"{"fields":["a"],"keep_last":2}"#).unwrap_err().contains("keep_last")
        );
        assert!(
            weir_sdk::parse_config::<Config>(r#"{"fields":["a"],"colour":1}"#).unwrap_err().contains("unknown field")
        );
        assert!(weir_sdk::parse_config::<Config>(r#"{}"#).unwrap_err().contains("missing field `fields`"));
    }
}
