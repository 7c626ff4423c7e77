//! Developer tasks for Weir, run as `cargo xtask <task>`:
//!
//! - `plugins`: install the `wasm32-wasip2` target if missing and build every plugin and test
//!   fixture in `plugins/` into `plugins/target/wasm32-wasip2/release/`.
//! - `test`: `plugins`, then every test: the host workspace and the plugins' native unit tests.
//! - `bench`: `plugins`, then the runtime benchmarks (criterion), printing a table.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let task = std::env::args().nth(1).unwrap_or_default();
    let extra: Vec<String> = std::env::args().skip(2).collect();
    let result = match task.as_str() {
        "plugins" => build_plugins(),
        "test" => build_plugins().and_then(|()| test(&extra)),
        "bench" => build_plugins().and_then(|()| bench(&extra)),
        _ => {
            eprintln!("usage: cargo xtask <plugins|test|bench> [args for cargo test/bench]");
            std::process::exit(2);
        }
    };
    if let Err(error) = result {
        eprintln!("xtask {task}: {error:#}");
        std::process::exit(1);
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn run(mut command: Command, what: &str) -> anyhow::Result<()> {
    eprintln!("xtask: {what}");
    let status = command.status().with_context(|| format!("cannot start: {what}"))?;
    if !status.success() {
        bail!("failed ({status}): {what}");
    }
    Ok(())
}

fn ensure_wasm_target() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup is needed to install the wasm32-wasip2 target")?;
    if String::from_utf8_lossy(&installed.stdout).lines().any(|t| t.trim() == "wasm32-wasip2") {
        return Ok(());
    }
    let mut add = Command::new("rustup");
    add.args(["target", "add", "wasm32-wasip2"]);
    run(add, "rustup target add wasm32-wasip2")
}

fn build_plugins() -> anyhow::Result<()> {
    ensure_wasm_target()?;
    let mut build = cargo();
    build
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .current_dir(root().join("plugins"))
        .env_remove("CARGO_TARGET_DIR");
    run(build, "build plugins and fixtures for wasm32-wasip2")
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    let mut host = cargo();
    host.args(["test", "--workspace"]).args(extra).current_dir(root());
    run(host, "cargo test --workspace (runtime, SDK, CLI through the real binary)")?;
    let mut plugins = cargo();
    plugins.args(["test"]).current_dir(root().join("plugins")).env_remove("CARGO_TARGET_DIR");
    run(plugins, "cargo test in plugins/ (plugin logic, natively)")
}

fn bench(extra: &[String]) -> anyhow::Result<()> {
    let mut bench = cargo();
    bench.args(["bench", "-p", "weir", "--bench", "runtime", "--"]).args(extra).current_dir(root());
    run(bench, "cargo bench -p weir --bench runtime")
}
