//! Command implementations of the `weir` binary; `main.rs` only parses arguments and calls here.

pub mod cases;
pub mod events;
pub mod scaffold;

use crate::plugin::{CompileCache, Limits, PluginRuntime, RuntimeOptions, inspect};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

/// Weir: a WebAssembly-extensible event gateway from HTTP and PostgreSQL writes to NATS.
#[derive(Debug, Parser)]
#[command(name = "weir", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Run {
        /// Config file.
        #[arg(long, short, default_value = "weir.toml")]
        config: PathBuf,
        /// On SIGINT/SIGTERM, how long in-flight requests may take to finish.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
    },
    /// Check the config, plugins, NATS connection and stream; exit 1 listing every problem.
    Check {
        /// Config file.
        #[arg(long, short, default_value = "weir.toml")]
        config: PathBuf,
    },
    /// Print messages published on a subject (NATS wildcards allowed), to watch the gateway work.
    Tail {
        /// Config file (for the NATS connection).
        #[arg(long, short, default_value = "weir.toml")]
        config: PathBuf,
        /// Subject to subscribe to.
        #[arg(default_value = "weir.>")]
        subject: String,
    },
    /// Build, inspect and try plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

/// `weir plugin …`
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Run a plugin over events and print one NDJSON outcome per input event.
    Test(TestArgs),
    /// Show a plugin's world, WIT and SDK versions, imports, exports and size.
    Inspect {
        /// The plugin's .wasm file.
        wasm: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write a new plugin project that builds with one command.
    New(scaffold::NewArgs),
}

/// `weir plugin test`
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// The plugin's .wasm file.
    pub wasm: PathBuf,
    /// The plugin's config as JSON text (as `config` in its section of the gateway config); with
    /// `--cases`, the config of cases (and files) that set none.
    #[arg(long, default_value = "{}")]
    pub config: String,
    /// NDJSON events, one `{"entity","op","key","data",...}` per line; `-` for stdin.
    #[arg(long, default_value = "-", conflicts_with = "cases")]
    pub input: String,
    /// Golden cases (TOML) to check instead of printing outcomes; fails on any mismatch.
    #[arg(long)]
    pub cases: Option<PathBuf>,
    /// Events per plugin call.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Time limit per call, in milliseconds.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Memory limit per instance, in MiB.
    #[arg(long)]
    pub memory_mb: Option<usize>,
}

impl TestArgs {
    fn limits(&self) -> Limits {
        Limits::with_overrides(self.timeout_ms, self.memory_mb)
    }
}

/// Runs a parsed command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run { config, drain_timeout } => crate::run::run(&config, drain_timeout).map(|()| 0),
        Command::Check { config } => Ok(crate::run::check(&config)),
        Command::Tail { config, subject } => tail(&config, &subject).map(|()| 0),
        Command::Plugin(PluginCommand::Test(args)) => plugin_test(&args),
        Command::Plugin(PluginCommand::Inspect { wasm, json }) => plugin_inspect(&wasm, json),
        Command::Plugin(PluginCommand::New(args)) => scaffold::new_project(&args).map(|()| 0),
    }
}

/// `weir tail`: prints each message as `subject  headers` and the payload on the next line.
fn tail(config_path: &std::path::Path, subject: &str) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let config = crate::config::Config::load(config_path)?;
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    tokio.block_on(async {
        let client = crate::sink::connect_client(&config).await?;
        let mut subscription = client
            .subscribe(subject.to_string())
            .await
            .map_err(|e| anyhow::anyhow!("cannot subscribe to {subject}: {e}"))?;
        eprintln!("watching {subject} (Ctrl-C to stop)");
        let mut out = std::io::stdout();
        while let Some(message) = subscription.next().await {
            let headers: Vec<String> = message
                .headers
                .iter()
                .flat_map(|headers| headers.iter())
                .flat_map(|(name, values)| values.iter().map(move |v| format!("{name}={}", v.as_str())))
                .collect();
            use std::io::Write as _;
            let printed = writeln!(
                out,
                "{}  {}\n{}",
                message.subject,
                headers.join(" "),
                String::from_utf8_lossy(&message.payload)
            )
            .and_then(|()| out.flush());
            // The reader went away (`weir tail … | head`): stop quietly.
            if printed.is_err() {
                break;
            }
        }
        Ok(())
    })
}

fn runtime() -> anyhow::Result<PluginRuntime> {
    PluginRuntime::new(RuntimeOptions { cache_dir: CompileCache::default_dir() })
}

fn plugin_test(args: &TestArgs) -> anyhow::Result<i32> {
    serde_json::from_str::<serde_json::Value>(&args.config)
        .map_err(|e| anyhow::anyhow!("--config is not valid JSON: {e}"))?;
    let runtime = runtime()?;
    if let Some(cases) = &args.cases {
        let report = cases::run_cases(&runtime, &args.wasm, cases, &args.config, &args.limits())?;
        let mut out = std::io::stdout().lock();
        for (name, explanation) in &report.failed {
            writeln!(out, "FAIL {name}\n  {explanation}")?;
        }
        writeln!(out, "{} passed, {} failed", report.passed, report.failed.len())?;
        return Ok(if report.failed.is_empty() { 0 } else { 1 });
    }

    let name = args.wasm.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "plugin".into());
    let plugin = runtime.load_file(&name, &args.wasm, &args.config, args.limits())?;
    let text = if args.input == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("cannot read events from stdin")?;
        text
    } else {
        std::fs::read_to_string(&args.input).with_context(|| format!("cannot read {}", args.input))?
    };
    let events = events::parse_ndjson(&text, &crate::http::now_rfc3339())?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut remaining = events.into_iter().peekable();
    while remaining.peek().is_some() {
        let batch: Vec<_> = remaining.by_ref().take(args.batch.max(1)).collect();
        for result in plugin.run_blocking(batch) {
            writeln!(out, "{}", events::outcome_json(&result))?;
        }
    }
    out.flush()?;
    Ok(0)
}

/// Whether the gateway links `import`: its own host interfaces and WASI 0.2.
fn offered(import: &str) -> bool {
    const WASI: [&str; 6] =
        ["wasi:cli/", "wasi:clocks/", "wasi:filesystem/", "wasi:io/", "wasi:random/", "wasi:sockets/"];
    WASI.iter().any(|prefix| import.starts_with(prefix)) && import.contains("@0.2.")
        || import.starts_with("weir:plugin/host@")
        || import.starts_with("weir:plugin/types@")
}

fn plugin_inspect(wasm: &std::path::Path, as_json: bool) -> anyhow::Result<i32> {
    let bytes = std::fs::read(wasm).with_context(|| format!("cannot read plugin file {}", wasm.display()))?;
    let info = inspect::inspect(&bytes)?;
    let unknown: Vec<&String> = info.imports.iter().filter(|i| !offered(i)).collect();
    let mut out = std::io::stdout().lock();
    if as_json {
        let mut value = serde_json::to_value(&info)?;
        value["unknown_imports"] = serde_json::json!(unknown);
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        let sdk = match &info.sdk {
            Some(stamp) => format!("{} {} (built against {})", stamp.sdk, stamp.sdk_version, stamp.wit),
            None => "unknown (not built with a Weir SDK that stamps its version)".to_string(),
        };
        writeln!(out, "file:     {}", wasm.display())?;
        writeln!(out, "world:    {}", info.world.as_str())?;
        writeln!(out, "wit:      weir:plugin@{}", info.wit_version)?;
        writeln!(out, "sdk:      {sdk}")?;
        writeln!(out, "size:     {} bytes", info.size)?;
        writeln!(out, "sha256:   {}", info.sha256)?;
        writeln!(out, "exports:  {}", info.exports.join(", "))?;
        writeln!(out, "imports:")?;
        for import in &info.imports {
            let note = if offered(import) { "" } else { "  <- not offered by Weir: the plugin will be refused" };
            writeln!(out, "  {import}{note}")?;
        }
    }
    Ok(if unknown.is_empty() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_imports() {
        assert!(offered("wasi:cli/environment@0.2.6"));
        assert!(offered("weir:plugin/host@0.1.0"));
        assert!(!offered("weir:fixture/backdoor"));
        assert!(!offered("wasi:http/types@0.2.0"));
        assert!(!offered("wasi:cli/environment@0.3.0"));
    }
}
