//! `route`: sets each event's subject from a template over event and data fields, with every
//! value from the event sanitized into a single safe subject token.

use serde::Deserialize;
use serde_json::Value;
use weir_sdk::{Event, Outcome};

/// Where a placeholder takes its value from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Entity,
    Op,
    Key,
    Source,
    Id,
    Data(String),
    Header(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Placeholder { text: String, field: Field },
}

/// What to do when a placeholder has no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnMissing {
    /// Reject the event, naming the placeholder.
    #[default]
    Reject,
    /// Use the `fallback` token.
    Fallback,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    subject: String,
    #[serde(default)]
    on_missing: OnMissing,
    #[serde(default = "default_fallback")]
    fallback: String,
}

fn default_fallback() -> String {
    "unknown".to_string()
}

/// The plugin's config, with the template parsed once at configure time.
#[derive(Debug, Deserialize)]
#[serde(try_from = "RawConfig")]
pub struct Config {
    parts: Vec<Part>,
    on_missing: OnMissing,
    fallback: String,
}

fn placeholder(text: &str) -> Result<Field, String> {
    let source = match text {
        "entity" => Field::Entity,
        "op" => Field::Op,
        "key" => Field::Key,
        "source" => Field::Source,
        "id" => Field::Id,
        _ => match text.split_once('.') {
            Some(("data", path)) if !path.is_empty() && !path.split('.').any(str::is_empty) => {
                Field::Data(path.to_string())
            }
            Some(("header", name)) if !name.is_empty() => Field::Header(name.to_string()),
            _ => {
                return Err(format!(
                    "unknown placeholder `{{{text}}}`; use {{entity}}, {{op}}, {{key}}, {{source}}, {{id}}, {{data.<path>}} or {{header.<name>}}"
                ));
            }
        },
    };
    Ok(source)
}

fn check_literal(literal: &str) -> Result<(), String> {
    if let Some(bad) = literal.chars().find(|c| c.is_whitespace() || *c == '*' || *c == '>' || c.is_control()) {
        return Err(format!(
            "subject template has `{}` outside a placeholder; subjects must be literal",
            bad.escape_default()
        ));
    }
    Ok(())
}

/// Parses `shop.{entity}.{data.region}` into literal and placeholder parts.
fn parse_template(template: &str) -> Result<Vec<Part>, String> {
    if template.is_empty() {
        return Err("`subject` is empty; write a template like \"shop.{entity}.{op}\"".into());
    }
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err(format!("subject template `{template}` has a `}}` without its `{{`"));
        }
        let literal = &rest[..open];
        let Some(close) = rest[open..].find('}') else {
            return Err(format!("subject template `{template}` has a `{{` without its `}}`"));
        };
        let inner = &rest[open + 1..open + close];
        if inner.contains('{') {
            return Err(format!("subject template `{template}` has nested braces"));
        }
        if !literal.is_empty() {
            check_literal(literal)?;
            parts.push(Part::Literal(literal.to_string()));
        }
        parts.push(Part::Placeholder { text: inner.to_string(), field: placeholder(inner)? });
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        check_literal(rest)?;
        parts.push(Part::Literal(rest.to_string()));
    }
    // Every placeholder yields one non-empty token, so checking the shape with a stand-in is exact.
    let shape: String = parts
        .iter()
        .map(|p| match p {
            Part::Literal(l) => l.as_str(),
            _ => "x",
        })
        .collect();
    if shape.split('.').any(str::is_empty) {
        return Err(format!("subject template `{template}` makes an empty token (a leading, trailing or double `.`)"));
    }
    Ok(parts)
}

impl TryFrom<RawConfig> for Config {
    type Error = String;

    fn try_from(raw: RawConfig) -> Result<Self, String> {
        let parts = parse_template(&raw.subject)?;
        if raw.fallback.is_empty() || weir_sdk::subject_token(&raw.fallback) != raw.fallback {
            return Err(format!(
                "`fallback` = \"{}\" is not one subject token (letters, digits, `-`, `_`)",
                raw.fallback
            ));
        }
        Ok(Config { parts, on_missing: raw.on_missing, fallback: raw.fallback })
    }
}

fn value_of(field: &Field, event: &Event, data: &mut Option<Option<Value>>) -> Option<String> {
    match field {
        Field::Entity => Some(event.entity.clone()),
        Field::Op => Some(event.op.clone()),
        Field::Key => event.key.clone(),
        Field::Source => Some(event.source.clone()),
        Field::Id => Some(event.id.clone()),
        Field::Header(name) => event.header(name).map(str::to_string),
        Field::Data(path) => {
            // Parse the data once, and only when a template needs it.
            let data = data.get_or_insert_with(|| event.data_json().ok());
            match weir_sdk::json::get(data.as_ref()?, path)? {
                Value::Null | Value::Object(_) | Value::Array(_) => None,
                value => Some(weir_sdk::json::to_text(value)),
            }
        }
    }
}

/// Sets the subject from the template; a placeholder without a value rejects the event (or
/// uses the fallback token, per config).
#[weir_sdk::transform]
pub fn handle(mut event: Event, config: &Config) -> Outcome {
    let mut subject = String::new();
    let mut data = None;
    for part in &config.parts {
        match part {
            Part::Literal(literal) => subject.push_str(literal),
            Part::Placeholder { text, field } => match value_of(field, &event, &mut data) {
                Some(value) if !value.is_empty() => subject.push_str(&weir_sdk::subject_token(&value)),
                _ if config.on_missing == OnMissing::Fallback => subject.push_str(&config.fallback),
                _ => return Outcome::Reject(format!("cannot route: `{{{text}}}` has no value in this event")),
            },
        }
    }
    event.subject = subject;
    Outcome::Keep(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(json: Value) -> Config {
        weir_sdk::parse_config(&json.to_string()).unwrap()
    }

    fn route(template: &str, event: Event) -> Outcome {
        handle(event, &config(json!({"subject": template})))
    }

    #[test]
    fn fills_placeholders_from_event_data_and_headers() {
        let mut event = Event::new("orders", "insert", json!({"region": "eu-west", "shop": {"id": 7}}));
        event.key = Some("k1".into());
        event.set_header("x-tenant", "acme");
        let Outcome::Keep(out) =
            route("shop.{header.x-tenant}.{data.region}.{data.shop.id}.{entity}.{op}.{key}", event)
        else {
            panic!()
        };
        assert_eq!(out.subject, "shop.acme.eu-west.7.orders.insert.k1");
    }

    #[test]
    fn values_cannot_inject_tokens_or_wildcards() {
        let event = Event::new("public.orders", "insert", json!({"region": "eu.west *>"}));
        let Outcome::Keep(out) = route("x.{entity}.{data.region}", event) else { panic!() };
        assert_eq!(out.subject, "x.public_orders.eu_west___");
    }

    #[test]
    fn missing_values_reject_or_fall_back() {
        let event = Event::new("orders", "insert", json!({}));
        assert_eq!(
            route("x.{data.region}", event.clone()),
            Outcome::Reject("cannot route: `{data.region}` has no value in this event".into())
        );
        let fallback = config(json!({"subject": "x.{data.region}", "on_missing": "fallback", "fallback": "none"}));
        let Outcome::Keep(out) = handle(event, &fallback) else { panic!() };
        assert_eq!(out.subject, "x.none");
    }

    #[test]
    fn bad_templates_are_refused() {
        let refuse = |json: Value| weir_sdk::parse_config::<Config>(&json.to_string()).unwrap_err();
        assert!(refuse(json!({"subject": ""})).contains("empty"));
        assert!(refuse(json!({"subject": "a.*.{op}"})).contains("outside a placeholder"));
        assert!(refuse(json!({"subject": "a b.{op}"})).contains("outside a placeholder"));
        assert!(refuse(json!({"subject": "a..{op}"})).contains("empty token"));
        assert!(refuse(json!({"subject": "{op}."})).contains("empty token"));
        assert!(refuse(json!({"subject": "a.{op"})).contains("without its"));
        assert!(refuse(json!({"subject": "a.op}"})).contains("without its"));
        assert!(refuse(json!({"subject": "a.{colour}"})).contains("unknown placeholder"));
        assert!(refuse(json!({"subject": "a.{data.}"})).contains("unknown placeholder"));
        assert!(refuse(json!({"subject": "a", "fallback": "a.b"})).contains("not one subject token"));
        assert!(refuse(json!({"subject": "a", "x": 1})).contains("unknown field"));
    }
}
