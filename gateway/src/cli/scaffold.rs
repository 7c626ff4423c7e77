//! `weir plugin new`: writes a plugin project that builds into a component with one command.

use anyhow::Context as _;
use std::path::{Path, PathBuf};

/// `weir plugin new`
#[derive(Debug, clap::Args)]
pub struct NewArgs {
    /// Project (and crate) name: lowercase letters, digits, `-` and `_`, starting with a letter.
    pub name: String,
    /// Language of the plugin.
    #[arg(long, default_value = "rust")]
    pub lang: String,
    /// Directory to create the project in (default: `./<name>`).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Path of the Weir Rust SDK (`sdk/rust` in a Weir checkout); default: `$WEIR_SDK_PATH`, else
    /// the checkout this `weir` was built from.
    #[arg(long)]
    pub sdk_path: Option<PathBuf>,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.len() <= 64
}

fn sdk_path(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let candidate = match explicit {
        Some(path) => path.to_path_buf(),
        None => match std::env::var_os("WEIR_SDK_PATH") {
            Some(path) => PathBuf::from(path),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/rust"),
        },
    };
    let canonical = candidate.canonicalize().ok().filter(|p| p.join("Cargo.toml").is_file());
    canonical.ok_or_else(|| {
        anyhow::anyhow!(
            "cannot find the Weir Rust SDK at {}; pass --sdk-path <weir checkout>/sdk/rust or set WEIR_SDK_PATH",
            candidate.display()
        )
    })
}

/// Creates the project; refuses to touch an existing non-empty directory.
pub fn new_project(args: &NewArgs) -> anyhow::Result<()> {
    if args.lang != "rust" {
        anyhow::bail!("--lang {}: only `rust` plugins can be scaffolded so far", args.lang);
    }
    if !valid_name(&args.name) {
        anyhow::bail!(
            "plugin name `{}` is not valid: use lowercase letters, digits, `-` and `_`, starting with a letter",
            args.name
        );
    }
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from(&args.name));
    if dir.exists() && std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        anyhow::bail!("{} already exists and is not empty; choose another --dir", dir.display());
    }
    let sdk = sdk_path(args.sdk_path.as_deref())?;
    let name = &args.name;
    let artifact = name.replace('-', "_");
    let sdk_literal = toml::Value::String(sdk.display().to_string()).to_string();
    let files: [(&str, String); 6] = [
        ("Cargo.toml", CARGO_TOML.replace("{name}", name).replace("{sdk}", &sdk_literal)),
        ("src/lib.rs", LIB_RS.replace("{name}", name)),
        ("README.md", README_MD.replace("{name}", name).replace("{artifact}", &artifact)),
        ("cases.toml", CASES_TOML.replace("{name}", name)),
        ("events.ndjson", EVENTS_NDJSON.to_string()),
        (".gitignore", "/target\n".to_string()),
    ];
    for (relative, content) in files {
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, content).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "created plugin `{name}` in {}\n\nbuild it:  cd {} && cargo build --release --target wasm32-wasip2\ntry it:    weir plugin test target/wasm32-wasip2/release/{artifact}.wasm --input events.ndjson\ncheck it:  weir plugin test target/wasm32-wasip2/release/{artifact}.wasm --cases cases.toml",
        dir.display(),
        dir.display()
    );
    Ok(())
}

const CARGO_TOML: &str = r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# cdylib: the WebAssembly component; rlib: native `cargo test` of the plugin logic.
crate-type = ["cdylib", "rlib"]

[dependencies]
weir-sdk = { path = {sdk} }
serde = { version = "1", features = ["derive"] }
serde_json = "1"

[profile.release]
opt-level = 3
lto = true
codegen-units = 1
strip = true
panic = "abort"

# A project of its own, even when created inside another Cargo workspace.
[workspace]
"#;

const LIB_RS: &str = r#"//! The `{name}` Weir plugin: adds a field to each event's JSON data.

use serde::Deserialize;
use weir_sdk::{Event, Outcome};

/// The plugin's config: `config = { field = "tagged_by", value = "{name}" }` in the gateway config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of the field to add.
    #[serde(default = "default_field")]
    pub field: String,
    /// Its value.
    #[serde(default = "default_value")]
    pub value: String,
}

fn default_field() -> String {
    "tagged_by".to_string()
}

fn default_value() -> String {
    "{name}".to_string()
}

/// Adds `config.field` to the event's data; events whose data is not a JSON object are rejected.
#[weir_sdk::transform]
pub fn handle(mut event: Event, config: &Config) -> Result<Outcome, String> {
    let mut data = event.data_json().map_err(|e| e.to_string())?;
    let Some(object) = data.as_object_mut() else {
        return Ok(Outcome::Reject("data must be a JSON object".to_string()));
    };
    object.insert(config.field.clone(), config.value.clone().into());
    event.set_data(&data).map_err(|e| e.to_string())?;
    Ok(Outcome::Keep(event))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> Config {
        Config { field: default_field(), value: default_value() }
    }

    #[test]
    fn adds_the_field() {
        let event = Event::new("orders", "insert", json!({"id": 1}));
        let Ok(Outcome::Keep(out)) = handle(event, &config()) else { panic!("expected keep") };
        assert_eq!(out.data_json().unwrap(), json!({"id": 1, "tagged_by": "{name}"}));
    }

    #[test]
    fn rejects_data_that_is_not_an_object() {
        let event = Event::new("orders", "insert", json!([1, 2]));
        assert!(matches!(handle(event, &config()), Ok(Outcome::Reject(_))));
    }
}
"#;

const README_MD: &str = r#"# {name}

A [Weir](https://example.invalid/weir) plugin: adds a field to each event's JSON data.

## Build

```sh
cargo build --release --target wasm32-wasip2
```

(Once per machine: `rustup target add wasm32-wasip2`.) The component is
`target/wasm32-wasip2/release/{artifact}.wasm`.

## Try it

```sh
weir plugin test target/wasm32-wasip2/release/{artifact}.wasm --input events.ndjson
weir plugin test target/wasm32-wasip2/release/{artifact}.wasm --cases cases.toml
cargo test            # the plugin logic, natively
```

## Use it

Copy the `.wasm` file into the gateway's plugin directory and add to `weir.toml`:

```toml
[plugins.{name}]
config = { field = "tagged_by", value = "{name}" }
```
"#;

const CASES_TOML: &str = r#"# Behaviour cases: `weir plugin test <wasm> --cases cases.toml`
config = { field = "tagged_by", value = "{name}" }

[[case]]
name = "adds the field"
input = { entity = "orders", data = { id = 1 } }
expect = { outcome = "keep", data = { id = 1, tagged_by = "{name}" } }

[[case]]
name = "rejects data that is not an object"
input = { entity = "orders", data = [1, 2] }
expect = { outcome = "reject", reason_contains = "JSON object" }

[[case]]
name = "refuses unknown config keys"
config = { colour = "blue" }
input = { entity = "orders", data = {} }
expect = { outcome = "config_error", message_contains = "unknown field" }
"#;

const EVENTS_NDJSON: &str = r#"{"entity":"orders","op":"insert","key":"1","data":{"id":1,"total":12.5}}
{"entity":"orders","op":"update","key":"1","data":{"id":1,"total":20}}
{"entity":"orders","op":"insert","key":"2","data":"not an object"}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("my-plugin_2"));
        assert!(!valid_name("My"));
        assert!(!valid_name("2x"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
    }
}
