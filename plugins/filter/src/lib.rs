//! `filter`: keeps the events whose op, entity and data fields match configured conditions.

use serde::Deserialize;
use serde_json::Value;
use weir_sdk::Event;

/// How a condition compares a field with its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compare {
    /// Equal (JSON equality; a number equals the same number however written).
    Eq,
    /// Not equal (also true when the field is missing).
    Ne,
    /// Greater than: numbers numerically, strings lexically.
    Gt,
    /// Greater than or equal.
    Gte,
    /// Less than.
    Lt,
    /// Less than or equal.
    Lte,
    /// One of a list of values.
    In,
    /// None of a list of values (also true when the field is missing).
    NotIn,
    /// The field is present (even if null).
    Exists,
    /// The field is absent.
    Missing,
    /// A substring of a string field, or an element of an array field.
    Contains,
    /// A prefix of a string field.
    Prefix,
}

/// One condition on a data field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// Dotted path into the event's data, e.g. `customer.country`.
    pub field: String,
    /// The comparison.
    pub op: Compare,
    /// What to compare with (not used by `exists` and `missing`).
    #[serde(default)]
    pub value: Option<Value>,
}

/// Whether every condition or any one must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every condition must hold.
    #[default]
    All,
    /// At least one condition must hold.
    Any,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    ops: Vec<String>,
    #[serde(default)]
    entities: Vec<String>,
    #[serde(default, rename = "where")]
    conditions: Vec<Condition>,
    #[serde(default, rename = "match")]
    mode: Mode,
}

/// The plugin's config: `ops`, `entities` (`*` suffix globs), `where` (conditions), `match`.
#[derive(Debug, Deserialize)]
#[serde(try_from = "RawConfig")]
pub struct Config {
    ops: Vec<String>,
    entities: Vec<String>,
    conditions: Vec<Condition>,
    mode: Mode,
}

impl TryFrom<RawConfig> for Config {
    type Error = String;

    fn try_from(raw: RawConfig) -> Result<Self, String> {
        if raw.ops.is_empty() && raw.entities.is_empty() && raw.conditions.is_empty() {
            return Err("nothing to filter on: set `ops`, `entities` or `where`".into());
        }
        for condition in &raw.conditions {
            let field = &condition.field;
            if field.is_empty() || field.split('.').any(str::is_empty) {
                return Err(format!("condition field `{field}` is not a dotted path like `customer.country`"));
            }
            match (condition.op, &condition.value) {
                (Compare::Exists | Compare::Missing, Some(_)) => {
                    let op = if condition.op == Compare::Exists { "exists" } else { "missing" };
                    return Err(format!("condition on `{field}`: `{op}` takes no `value`"));
                }
                (Compare::Exists | Compare::Missing, None) => {}
                (_, None) => return Err(format!("condition on `{field}` needs a `value`")),
                (Compare::In | Compare::NotIn, Some(value)) if !value.is_array() => {
                    return Err(format!("condition on `{field}`: `in` and `not_in` need a list as `value`"));
                }
                (Compare::Prefix, Some(value)) if !value.is_string() => {
                    return Err(format!("condition on `{field}`: `prefix` needs a string `value`"));
                }
                (Compare::Gt | Compare::Gte | Compare::Lt | Compare::Lte, Some(value))
                    if !(value.is_number() || value.is_string()) =>
                {
                    return Err(format!(
                        "condition on `{field}`: `gt`, `gte`, `lt` and `lte` need a number or a string"
                    ));
                }
                _ => {}
            }
        }
        // Only a trailing `*` is a glob; anywhere else it would silently match nothing.
        if let Some(bad) = raw.entities.iter().find(|e| e.is_empty() || e.trim_end_matches('*').contains('*')) {
            return Err(format!("entity pattern `{bad}` is not a name or a prefix glob like `orders*`"));
        }
        Ok(Config { ops: raw.ops, entities: raw.entities, conditions: raw.conditions, mode: raw.mode })
    }
}

fn entity_matches(pattern: &str, entity: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => entity.starts_with(prefix),
        None => pattern == entity,
    }
}

fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn order(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

impl Condition {
    /// Whether the condition holds for `data` (`None` when the event's data is not JSON).
    fn holds(&self, data: Option<&Value>) -> bool {
        // Data that is not JSON has no fields: only `missing` can hold (not even `ne`).
        let Some(data) = data else { return self.op == Compare::Missing };
        let field = weir_sdk::json::get(data, &self.field);
        let value = self.value.as_ref().unwrap_or(&Value::Null);
        let listed = || value.as_array().is_some_and(|list| field.is_some_and(|f| list.iter().any(|v| same(f, v))));
        match self.op {
            Compare::Exists => field.is_some(),
            Compare::Missing => field.is_none(),
            Compare::Eq => field.is_some_and(|f| same(f, value)),
            Compare::Ne => !field.is_some_and(|f| same(f, value)),
            Compare::Gt => field.and_then(|f| order(f, value)).is_some_and(|o| o.is_gt()),
            Compare::Gte => field.and_then(|f| order(f, value)).is_some_and(|o| o.is_ge()),
            Compare::Lt => field.and_then(|f| order(f, value)).is_some_and(|o| o.is_lt()),
            Compare::Lte => field.and_then(|f| order(f, value)).is_some_and(|o| o.is_le()),
            Compare::In => listed(),
            Compare::NotIn => !listed(),
            Compare::Contains => match (field, value) {
                (Some(Value::String(text)), Value::String(needle)) => text.contains(needle.as_str()),
                (Some(Value::Array(items)), needle) => items.iter().any(|item| same(item, needle)),
                _ => false,
            },
            Compare::Prefix => match (field, value) {
                (Some(Value::String(text)), Value::String(prefix)) => text.starts_with(prefix.as_str()),
                _ => false,
            },
        }
    }
}

/// Keeps the event when its op and entity are allowed and the `where` conditions hold.
#[weir_sdk::filter]
pub fn keep(event: &Event, config: &Config) -> bool {
    if !config.ops.is_empty() && !config.ops.iter().any(|op| op == &event.op) {
        return false;
    }
    if !config.entities.is_empty() && !config.entities.iter().any(|p| entity_matches(p, &event.entity)) {
        return false;
    }
    if config.conditions.is_empty() {
        return true;
    }
    let data = event.data_json().ok();
    let mut results = config.conditions.iter().map(|c| c.holds(data.as_ref()));
    match config.mode {
        Mode::All => results.all(|held| held),
        Mode::Any => results.any(|held| held),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(json: Value) -> Config {
        weir_sdk::parse_config(&json.to_string()).unwrap()
    }

    fn keeps(config_json: Value, op: &str, data: Value) -> bool {
        keep(&Event::new("orders", op, data), &config(config_json))
    }

    #[test]
    fn ops_and_entities_are_allowed_lists() {
        let cfg = json!({"ops": ["insert", "update"], "entities": ["orders*"]});
        assert!(keeps(cfg.clone(), "insert", json!({})));
        assert!(!keeps(cfg.clone(), "delete", json!({})));
        let mut event = Event::new("users", "insert", json!({}));
        assert!(!keep(&event, &config(cfg.clone())));
        event.entity = "orders_archive".into();
        assert!(keep(&event, &config(cfg)));
    }

    #[test]
    fn comparisons() {
        let data = json!({"status": "paid", "total": 120, "tags": ["vip"], "customer": {"country": "DE"}});
        let check = |op: &str, field: &str, value: Value| {
            keeps(json!({"where": [{"field": field, "op": op, "value": value}]}), "insert", data.clone())
        };
        assert!(check("eq", "status", json!("paid")));
        assert!(check("eq", "total", json!(120.0)));
        assert!(check("ne", "status", json!("open")));
        assert!(check("ne", "nope", json!(1)));
        assert!(check("gt", "total", json!(100)));
        assert!(!check("lt", "total", json!(100)));
        assert!(check("gte", "total", json!(120)));
        assert!(check("lte", "status", json!("zzz")));
        assert!(check("in", "customer.country", json!(["DE", "AT"])));
        assert!(check("not_in", "customer.country", json!(["FR"])));
        assert!(check("contains", "tags", json!("vip")));
        assert!(check("contains", "status", json!("ai")));
        assert!(check("prefix", "status", json!("pa")));
        assert!(!check("gt", "status", json!(1)), "a string is not greater than a number");
        assert!(keeps(json!({"where": [{"field": "total", "op": "exists"}]}), "insert", data.clone()));
        assert!(keeps(json!({"where": [{"field": "x.y", "op": "missing"}]}), "insert", data.clone()));
    }

    #[test]
    fn all_or_any() {
        let conditions = json!([{"field": "a", "op": "eq", "value": 1}, {"field": "b", "op": "eq", "value": 2}]);
        assert!(!keeps(json!({"where": conditions}), "insert", json!({"a": 1, "b": 3})));
        assert!(keeps(json!({"where": conditions, "match": "any"}), "insert", json!({"a": 1, "b": 3})));
    }

    #[test]
    fn non_json_data_has_no_fields() {
        let mut event = Event::new("orders", "insert", json!({}));
        event.data = b"not json".to_vec();
        assert!(!keep(&event, &config(json!({"where": [{"field": "a", "op": "exists"}]}))));
        assert!(keep(&event, &config(json!({"where": [{"field": "a", "op": "missing"}]}))));
        assert!(!keep(&event, &config(json!({"where": [{"field": "a", "op": "ne", "value": 1}]}))));
        assert!(!keep(&event, &config(json!({"where": [{"field": "a", "op": "not_in", "value": [1]}]}))));
    }

    #[test]
    fn bad_configs_are_refused() {
        let refuse = |json: Value| weir_sdk::parse_config::<Config>(&json.to_string()).unwrap_err();
        assert!(refuse(json!({})).contains("nothing to filter on"));
        assert!(refuse(json!({"where": [{"field": "a", "op": "eq"}]})).contains("needs a `value`"));
        assert!(refuse(json!({"where": [{"field": "a", "op": "in", "value": 1}]})).contains("need a list"));
        assert!(refuse(json!({"where": [{"field": "a", "op": "exists", "value": 1}]})).contains("takes no `value`"));
        assert!(refuse(json!({"where": [{"field": "a..b", "op": "exists"}]})).contains("dotted path"));
        assert!(refuse(json!({"where": [{"field": "a", "op": "gt", "value": [1]}]})).contains("number or a string"));
        assert!(refuse(json!({"entities": ["ord*ers"]})).contains("prefix glob"));
        assert!(refuse(json!({"where": [{"field": "a", "op": "like", "value": 1}]})).contains("unknown variant"));
        assert!(refuse(json!({"ops": ["insert"], "extra": 1})).contains("unknown field"));
    }
}
