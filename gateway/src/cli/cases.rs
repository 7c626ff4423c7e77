//! Golden behaviour cases for `weir plugin test --cases`: a TOML file of inputs and expected
//! outcomes, run against the real compiled plugin, with a readable diff for each failure.
//!
//! ```toml
//! config = { fields = ["email"] }          # default config of every case
//!
//! [[case]]
//! name = "removes email"
//! input = { entity = "users", data = { email = "a@b.c", name = "Ann" } }
//! expect = { outcome = "keep", data = { name = "Ann" } }
//! ```
//!
//! `expect.outcome` is `keep`, `drop`, `split`, `reject` or `config_error`. `keep` may check
//! `data`, `old` (exact JSON), `subject`, `key`, `entity`, `op` and `headers` (each listed
//! header present with that value, or a repeated header with its values in order, as an
//! array); `split` has `events = [ … ]` with the same keys; `reject` may check
//! `reason_contains`; `config_error` may check `message_contains`.

use super::events::{InputEvent, event_json, outcome_json};
use crate::plugin::{Limits, LoadError, Outcome, PluginError, PluginRuntime};
use anyhow::Context as _;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CasesFile {
    #[serde(default)]
    config: Option<toml::Value>,
    #[serde(default, rename = "case")]
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    config: Option<toml::Value>,
    input: toml::Value,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "outcome", rename_all = "snake_case")]
enum Expect {
    Keep(#[serde(default)] Box<ExpectEvent>),
    Drop {},
    Split {
        events: Vec<ExpectEvent>,
    },
    Reject {
        #[serde(default)]
        reason_contains: Option<String>,
    },
    ConfigError {
        #[serde(default)]
        message_contains: Option<String>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectEvent {
    data: Option<toml::Value>,
    old: Option<toml::Value>,
    subject: Option<String>,
    key: Option<String>,
    entity: Option<String>,
    op: Option<String>,
    #[serde(default)]
    headers: HashMap<String, HeaderValues>,
}

/// An expected header: one value, or a repeated header's values in order.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum HeaderValues {
    One(String),
    Many(Vec<String>),
}

impl HeaderValues {
    /// As `weir plugin test` shows it: a string, or an array when repeated.
    fn to_json(&self) -> Value {
        match self {
            HeaderValues::One(value) => Value::String(value.clone()),
            HeaderValues::Many(values) => match values.as_slice() {
                [one] => Value::String(one.clone()),
                many => Value::Array(many.iter().cloned().map(Value::String).collect()),
            },
        }
    }
}

/// What running the cases found.
#[derive(Debug, Default)]
pub struct Report {
    /// Cases whose outcome matched.
    pub passed: usize,
    /// `(case name, readable explanation)` of each mismatch.
    pub failed: Vec<(String, String)>,
}

fn to_json(value: &toml::Value) -> anyhow::Result<Value> {
    crate::config::toml_to_json(value).map_err(|why| anyhow::anyhow!("value cannot be expressed as JSON: {why}"))
}

/// Runs every case in `cases_path` against the plugin in `wasm`. A case's config is its own, else
/// the file's, else `default_config` (the command line's `--config`).
pub fn run_cases(
    runtime: &PluginRuntime,
    wasm: &Path,
    cases_path: &Path,
    default_config: &str,
    limits: &Limits,
) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(cases_path).with_context(|| format!("cannot read {}", cases_path.display()))?;
    let file: CasesFile = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", cases_path.display()))?;
    if file.cases.is_empty() {
        anyhow::bail!("{} has no [[case]] entries", cases_path.display());
    }
    let bytes = std::fs::read(wasm).with_context(|| format!("cannot read plugin file {}", wasm.display()))?;
    let name = wasm.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "plugin".into());
    // One loaded plugin per distinct config: loading compiles nothing twice (the component is
    // cached), but configuring a fresh instance per case would hide state bugs just the same.
    let mut loaded = HashMap::new();
    let mut report = Report::default();
    for (index, case) in file.cases.into_iter().enumerate() {
        let config = match case.config.as_ref().or(file.config.as_ref()) {
            Some(value) => to_json(value)?.to_string(),
            None => default_config.to_string(),
        };
        let plugin =
            loaded.entry(config.clone()).or_insert_with(|| runtime.load(&name, &bytes, &config, limits.clone()));
        let input: InputEvent = to_json(&case.input)
            .and_then(|v| serde_json::from_value(v).context("invalid input"))
            .with_context(|| format!("case `{}`", case.name))?;
        let event = input.into_event(format!("case-{}", index + 1), "2026-01-01T00:00:00Z");
        let verdict = match plugin {
            Ok(plugin) => {
                let result = plugin.run_blocking(vec![event]).pop().unwrap_or_else(|| {
                    Err(PluginError { kind: crate::plugin::ErrorKind::InvalidOutput, message: "no result".into() })
                });
                judge(&case.expect, Ok(&result))
            }
            Err(error) => judge(&case.expect, Err(error)),
        };
        match verdict {
            Ok(()) => report.passed += 1,
            Err(explanation) => report.failed.push((case.name, explanation)),
        }
    }
    Ok(report)
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

fn diff(expected: &Value, actual: &Value) -> String {
    let (expected, actual) = (pretty(expected), pretty(actual));
    let mut out = String::from("  --- expected\n  +++ actual\n");
    for change in similar::TextDiff::from_lines(&expected, &actual).iter_all_changes() {
        let sign = match change.tag() {
            similar::ChangeTag::Delete => '-',
            similar::ChangeTag::Insert => '+',
            similar::ChangeTag::Equal => ' ',
        };
        out.push_str(&format!("  {sign} {}", change.value()));
        if !change.value().ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// `Ok` when the outcome matches; otherwise a readable explanation with a diff.
fn judge(expect: &Expect, actual: Result<&Result<Outcome, PluginError>, &LoadError>) -> Result<(), String> {
    let result = match (expect, actual) {
        (Expect::ConfigError { message_contains }, Err(LoadError::ConfigRefused(message))) => {
            return match message_contains {
                Some(needle) if !message.contains(needle.as_str()) => {
                    Err(format!("config was refused, but the message\n    {message}\n  does not contain `{needle}`"))
                }
                _ => Ok(()),
            };
        }
        (Expect::ConfigError { .. }, Ok(result)) => {
            return Err(format!(
                "expected the config to be refused, but the plugin loaded and gave\n  {}",
                outcome_json(result)
            ));
        }
        (_, Err(error)) => return Err(format!("plugin did not load: {error}")),
        (_, Ok(result)) => result,
    };
    match (expect, result) {
        (Expect::Drop {}, Ok(Outcome::Drop)) => Ok(()),
        (Expect::Reject { reason_contains }, Ok(Outcome::Reject(reason))) => match reason_contains {
            Some(needle) if !reason.contains(needle.as_str()) => {
                Err(format!("rejected, but the reason\n    {reason}\n  does not contain `{needle}`"))
            }
            _ => Ok(()),
        },
        (Expect::Keep(expected), Ok(Outcome::Keep(event))) => compare_event(expected, &event_json(event)),
        (Expect::Split { events: expected }, Ok(Outcome::Split(events))) => {
            if expected.len() != events.len() {
                return Err(format!("expected {} events from the split, got {}", expected.len(), events.len()));
            }
            for (index, (expected, event)) in expected.iter().zip(events).enumerate() {
                compare_event(expected, &event_json(event)).map_err(|e| format!("split event {index}: {e}"))?;
            }
            Ok(())
        }
        (expected, actual) => {
            Err(format!("expected outcome `{}`, got\n  {}", expect_name(expected), outcome_json(actual)))
        }
    }
}

fn expect_name(expect: &Expect) -> &'static str {
    match expect {
        Expect::Keep(_) => "keep",
        Expect::Drop {} => "drop",
        Expect::Split { .. } => "split",
        Expect::Reject { .. } => "reject",
        Expect::ConfigError { .. } => "config_error",
    }
}

/// Compares the keys the case lists; the rest of the event is free.
fn compare_event(expected: &ExpectEvent, actual: &Value) -> Result<(), String> {
    let mut want = Map::new();
    let mut got = Map::new();
    let mut check = |key: &str, value: Value| {
        want.insert(key.to_string(), value);
        got.insert(key.to_string(), actual.get(key).cloned().unwrap_or(Value::Null));
    };
    for (key, value) in [("data", &expected.data), ("old", &expected.old)] {
        if let Some(value) = value {
            check(key, to_json(value).map_err(|e| e.to_string())?);
        }
    }
    for (key, value) in
        [("subject", &expected.subject), ("key", &expected.key), ("entity", &expected.entity), ("op", &expected.op)]
    {
        if let Some(value) = value {
            check(key, Value::String(value.clone()));
        }
    }
    if !expected.headers.is_empty() {
        let mut names: Vec<_> = expected.headers.keys().collect();
        names.sort();
        let want_headers: Map<String, Value> =
            names.iter().map(|name| ((*name).clone(), expected.headers[*name].to_json())).collect();
        let got_headers: Map<String, Value> = names
            .iter()
            .map(|name| ((*name).clone(), actual["headers"].get(name.as_str()).cloned().unwrap_or(Value::Null)))
            .collect();
        want.insert("headers".into(), Value::Object(want_headers));
        got.insert("headers".into(), Value::Object(got_headers));
    }
    let (want, got) = (Value::Object(want), Value::Object(got));
    if want == got { Ok(()) } else { Err(format!("event differs:\n{}", diff(&want, &got))) }
}
