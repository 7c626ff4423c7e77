//! Developer tasks for Weir, run as `cargo xtask <task>`:
//!
//! - `plugins`: install the `wasm32-wasip2` target if missing and build every plugin and test
//!   fixture in `plugins/` into `plugins/target/wasm32-wasip2/release/`.
//! - `test`: install `nats-server` and iproute2 if missing (Debian packages); make sure PostgreSQL runs with
//!   `wal_level = logical` and has role `root` and database `test` (installing the Debian package,
//!   starting the cluster and restarting it for `wal_level` as needed); `plugins`; then every
//!   test: the plugins' native unit tests and the host workspace (runtime, CLI, gateway and
//!   PostgreSQL change capture end to end).
//! - `quickstart`: start a local JetStream `nats-server` when none answers on 127.0.0.1:4222
//!   (installing it if missing), build plugins and `weir`, run the quick-start config.
//! - `bench`: the same set-up as `test`, then the benchmarks (plugin runtime, HTTP, PostgreSQL
//!   change capture), each printing a table.
//! - `instructions [batch]`: a release `weir` under valgrind's callgrind, loaded with single-event
//!   requests (or NDJSON batches); prints its user-space instructions per event (a count the
//!   machine's load does not move, unlike the bench's rates).

mod instructions;

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let task = std::env::args().nth(1).unwrap_or_default();
    let extra: Vec<String> = std::env::args().skip(2).collect();
    let result = match task.as_str() {
        "plugins" => build_plugins(),
        "test" => ensure_nats_server()
            .and_then(|()| ensure_postgres())
            .and_then(|()| ensure_iproute2())
            .and_then(|()| build_plugins())
            .and_then(|()| test(&extra)),
        "bench" => ensure_nats_server()
            .and_then(|()| ensure_postgres())
            .and_then(|()| build_plugins())
            .and_then(|()| bench(&extra)),
        "quickstart" => quickstart(),
        "instructions" => build_plugins().and_then(|()| count_instructions(&extra)),
        _ => {
            eprintln!("usage: cargo xtask <quickstart|plugins|test|bench|instructions> [args for cargo test/bench]");
            std::process::exit(2);
        }
    };
    if let Err(error) = result {
        eprintln!("xtask {task}: {error:#}");
        std::process::exit(1);
    }
}

/// The workspace root: from the `CARGO_MANIFEST_DIR` that `cargo run` (the `cargo xtask` alias)
/// sets, so a checkout sharing a target dir with another, whose `xtask` binary cargo may not copy
/// out again, still works on its own files; the compile-time path otherwise.
fn root() -> PathBuf {
    let manifest_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// A cargo command without the package variables `cargo run` gave xtask: build scripts that
/// read them (ring's) would otherwise rebuild whenever a build alternates between xtask and a
/// plain `cargo` call.
fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || ["CARGO_CRATE_NAME", "CARGO_BIN_NAME", "CARGO_PRIMARY_PACKAGE"].contains(&name.as_ref())
        {
            command.env_remove(name.as_ref());
        }
    }
    command
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

fn nats_server_installed() -> bool {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
        .iter()
        .any(|p| Path::new(p).exists())
        || Command::new("nats-server").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// The gateway tests start private `nats-server` instances; install the Debian package if the
/// binary is missing.
fn ensure_nats_server() -> anyhow::Result<()> {
    ensure_package("nats-server", "nats-server", nats_server_installed)
}

/// The silent-network tests make network namespaces with iproute2's `ip` (in Debian's base
/// system, but not in every minimal image).
fn ensure_iproute2() -> anyhow::Result<()> {
    ensure_package("iproute2", "`ip`", || Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success()))
}

/// Installs the Debian `package` unless `present` already holds; fails if it still does not.
fn ensure_package(package: &str, what: &str, present: impl Fn() -> bool) -> anyhow::Result<()> {
    if present() {
        return Ok(());
    }
    apt_install(package)?;
    if !present() {
        bail!("{what} is still missing after installing the Debian package {package}");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `command` run as the `postgres` OS user (the cluster owner, which peer auth admits).
fn as_postgres(program: &str) -> Command {
    let mut command = if is_root() { Command::new("runuser") } else { Command::new("sudo") };
    if is_root() {
        command.args(["-u", "postgres", "--", program]);
    } else {
        command.args(["-u", "postgres", program]);
    }
    command
}

/// One value from `psql` as the cluster owner, or `None` when the server does not answer.
fn postgres_query(sql: &str, database: &str) -> Option<String> {
    let output = as_postgres("psql").args(["-XAtq", "-d", database, "-c", sql]).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// `(version, name, status)` of each cluster `pg_lsclusters` lists.
fn clusters() -> Vec<(String, String, String)> {
    let Ok(output) = Command::new("pg_lsclusters").arg("--no-header").output() else { return Vec::new() };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 4).then(|| (fields[0].to_string(), fields[1].to_string(), fields[3].to_string()))
        })
        .collect()
}

fn pg_ctlcluster(version: &str, name: &str, action: &str) -> anyhow::Result<()> {
    let mut command = if is_root() { Command::new("pg_ctlcluster") } else { Command::new("sudo") };
    if !is_root() {
        command.arg("pg_ctlcluster");
    }
    command.args(["--skip-systemctl-redirect", version, name, action]);
    run(command, &format!("pg_ctlcluster {version} {name} {action}"))
}

/// PostgreSQL for the change-capture tests: installed, running, `wal_level = logical`, and the
/// role `root` (matching the test user, admitted by peer auth over the Unix socket) with its
/// database `test`. Each step is skipped when already true, so this is quick on a set-up machine.
fn ensure_postgres() -> anyhow::Result<()> {
    if clusters().is_empty() {
        apt_install("postgresql")?;
    }
    let Some((version, name, status)) = clusters().into_iter().next() else {
        bail!("no PostgreSQL cluster after installing postgresql; create one with `pg_createcluster <version> main`");
    };
    if status != "online" {
        pg_ctlcluster(&version, &name, "start")?;
    }
    if postgres_query("show wal_level", "postgres").as_deref() != Some("logical") {
        eprintln!("xtask: setting wal_level = logical (needs a restart of PostgreSQL {version}/{name})");
        postgres_query("ALTER SYSTEM SET wal_level = logical", "postgres")
            .context("cannot run ALTER SYSTEM SET wal_level = logical")?;
        pg_ctlcluster(&version, &name, "restart")?;
        if postgres_query("show wal_level", "postgres").as_deref() != Some("logical") {
            bail!("wal_level is still not `logical` after restarting PostgreSQL {version}/{name}");
        }
    }
    if postgres_query("SELECT 1 FROM pg_roles WHERE rolname = 'root'", "postgres").as_deref() != Some("1") {
        postgres_query("CREATE ROLE root SUPERUSER LOGIN", "postgres").context("cannot create role root")?;
    }
    if postgres_query("SELECT 1 FROM pg_database WHERE datname = 'test'", "postgres").as_deref() != Some("1") {
        postgres_query("CREATE DATABASE test OWNER root", "postgres").context("cannot create database test")?;
    }
    Ok(())
}

fn apt_install(package: &str) -> anyhow::Result<()> {
    let root = is_root();
    let apt = |args: &[&str]| {
        let mut command = if root { Command::new("apt-get") } else { Command::new("sudo") };
        if !root {
            command.arg("apt-get");
        }
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    run(apt(&["update", "-q"]), "apt-get update")?;
    run(apt(&["install", "-y", "-q", package]), &format!("apt-get install {package}"))
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

/// Passed and failed test counts over every `cargo test` run.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    /// Counts a libtest summary line: `test result: ok. 5 passed; 0 failed; …`.
    fn count(&mut self, line: &str) {
        let Some(summary) = line.split_once("test result: ").map(|(_, rest)| rest) else { return };
        for part in summary.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(number)) = (words.next(), words.next()) else { continue };
            let number: u64 = number.trim_start_matches("ok.").trim_start_matches("FAILED.").parse().unwrap_or(0);
            match kind {
                "passed" => self.passed += number,
                "failed" => self.failed += number,
                _ => {}
            }
        }
    }
}

/// Runs a `cargo test`, passing its output through while counting its results.
fn run_tests(mut command: Command, what: &str, tally: &mut Tally) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: {what}");
    let mut child =
        command.stdout(std::process::Stdio::piped()).spawn().with_context(|| format!("cannot start: {what}"))?;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading test output")?;
            println!("{line}");
            tally.count(&line);
        }
    }
    let status = child.wait().with_context(|| format!("waiting for: {what}"))?;
    if !status.success() {
        println!("tests: {} passed, {} failed", tally.passed, tally.failed.max(1));
        bail!("failed ({status}): {what}");
    }
    Ok(())
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    let mut tally = Tally::default();
    let mut plugins = cargo();
    plugins.args(["test"]).current_dir(root().join("plugins")).env_remove("CARGO_TARGET_DIR");
    run_tests(plugins, "cargo test in plugins/ (plugin logic, natively)", &mut tally)?;
    let mut host = cargo();
    host.args(["test", "--workspace"]).args(extra).current_dir(root());
    run_tests(host, "cargo test --workspace (runtime, SDK, CLI through the real binary)", &mut tally)?;
    // One closing line over everything, so a reader (or CI) sees the whole count at the end.
    println!("tests: {} passed, {} failed", tally.passed, tally.failed);
    Ok(())
}

fn bench(extra: &[String]) -> anyhow::Result<()> {
    let mut bench = cargo();
    bench
        .args(["bench", "-p", "weir", "--bench", "runtime", "--bench", "http", "--bench", "postgres", "--"])
        .args(extra)
        .current_dir(root());
    run(bench, "cargo bench -p weir --bench runtime --bench http --bench postgres")
}

/// What answers on a local NATS port.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NatsAt {
    Nothing,
    WithoutJetStream,
    WithJetStream,
}

/// Asks the server on `port` by its first line (`INFO {…}`), which says whether JetStream is on:
/// Debian's `nats-server` package starts a service on 4222 without it.
fn nats_at(port: u16) -> NatsAt {
    use std::io::BufRead as _;
    let timeout = std::time::Duration::from_millis(500);
    let Ok(stream) = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout) else {
        return NatsAt::Nothing;
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    let mut info = String::new();
    match std::io::BufReader::new(stream).read_line(&mut info) {
        Ok(_) if info.replace(' ', "").contains("\"jetstream\":true") => NatsAt::WithJetStream,
        _ => NatsAt::WithoutJetStream,
    }
}

/// The workspace's target directory (`CARGO_TARGET_DIR` when set).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_relative() => root().join(dir),
        Some(dir) => dir,
        None => root().join("target"),
    }
}

/// A NATS server with JetStream on the loopback: the one on 4222 if it has JetStream, else one
/// started here (on 4222 when free, else the next free port). Returns its port.
fn nats_with_jetstream() -> anyhow::Result<u16> {
    if nats_at(4222) == NatsAt::Nothing {
        ensure_nats_server()?;
    }
    let port = match nats_at(4222) {
        NatsAt::WithJetStream => return Ok(4222),
        NatsAt::Nothing => 4222,
        NatsAt::WithoutJetStream => {
            let port =
                (4223..4300).find(|&port| nats_at(port) == NatsAt::Nothing).context("no free port in 4223–4299")?;
            eprintln!(
                "xtask: the NATS server on 127.0.0.1:4222 has no JetStream (Debian's nats-server service?); starting one with JetStream on {port}"
            );
            port
        }
    };
    let store = target_dir().join("quickstart-nats");
    std::fs::create_dir_all(&store)?;
    let log_path = target_dir().join("quickstart-nats.log");
    let log = std::fs::File::create(&log_path)?;
    let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("nats-server");
    eprintln!("xtask: starting nats-server with JetStream on 127.0.0.1:{port} (log: {})", log_path.display());
    Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&store)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start nats-server")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while nats_at(port) != NatsAt::WithJetStream {
        if std::time::Instant::now() > deadline {
            bail!("nats-server did not start with JetStream on {port}; see {}", log_path.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(port)
}

fn count_instructions(extra: &[String]) -> anyhow::Result<()> {
    let load = match extra {
        [] => instructions::Load::Single,
        [mode] if mode == "batch" => instructions::Load::Batch,
        _ => bail!("usage: cargo xtask instructions [batch]"),
    };
    let port = nats_with_jetstream()?;
    let mut build = cargo();
    build.args(["build", "--release", "-p", "weir", "--bin", "weir"]).current_dir(root());
    run(build, "cargo build --release -p weir --bin weir")?;
    instructions::count(
        &target_dir().join("release/weir"),
        &root().join("plugins/target/wasm32-wasip2/release"),
        port,
        &target_dir().join("weir-instructions"),
        load,
    )
}

fn quickstart() -> anyhow::Result<()> {
    let port = nats_with_jetstream()?;
    let nats_url = format!("nats://127.0.0.1:{port}");
    build_plugins()?;
    let mut build = cargo();
    build.args(["build", "-p", "weir"]).current_dir(root());
    run(build, "cargo build -p weir")?;
    let weir = target_dir().join("debug/weir");
    let config = root().join("examples/quickstart/weir.toml");
    // The config reads NATS_URL (default 4222); `weir tail` needs it too when it is not 4222.
    let env = if port == 4222 { String::new() } else { format!("NATS_URL={nats_url} ") };
    let shown = weir.strip_prefix(root()).map_or_else(|_| weir.display().to_string(), |p| p.display().to_string());
    eprintln!(
        "\nxtask: weir is starting. In another terminal:\n\n  watch:  {env}{shown} tail --config examples/quickstart/weir.toml 'weir.>'\n  send:   curl -i http://127.0.0.1:8080/v1/events/orders -H 'Content-Type: application/json' -H 'Idempotency-Key: order-1001' -d '{{\"id\":1001,\"region\":\"eu\",\"customer\":{{\"email\":\"ann@example.com\"}},\"card\":{{\"number\":\"4111111111111111\"}}}}'\n"
    );
    let mut gateway = Command::new(weir);
    gateway.args(["run", "--config"]).arg(config).env("NATS_URL", &nats_url).current_dir(root());
    run(gateway, "weir run --config examples/quickstart/weir.toml")
}
