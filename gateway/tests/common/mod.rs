//! Shared test helpers: building the plugins once per test process and a runtime whose compile
//! cache is shared by every test, so each plugin is compiled by Cranelift once per machine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use weir::plugin::{PluginRuntime, RuntimeOptions};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("gateway has a parent").to_path_buf()
}

pub fn cache_dir() -> PathBuf {
    repo_root().join("target").join("weir-test-cache")
}

/// Builds every plugin and fixture (a no-op when up to date) and returns the directory of the
/// components. Tests never skip for want of an artifact: they build it.
pub fn plugins_dir() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let plugins = repo_root().join("plugins");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--target", "wasm32-wasip2", "--quiet"])
            .current_dir(&plugins)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the plugins failed; run `cargo xtask plugins` to see why");
        plugins.join("target/wasm32-wasip2/release")
    })
}

/// Path of the component built from crate `name` (e.g. `noop`, `fixture-panic`).
pub fn plugin_path(name: &str) -> PathBuf {
    plugins_dir().join(format!("{}.wasm", name.replace('-', "_")))
}

pub fn plugin_bytes(name: &str) -> Vec<u8> {
    std::fs::read(plugin_path(name)).expect("plugin was built")
}

pub fn runtime() -> PluginRuntime {
    PluginRuntime::new(RuntimeOptions { cache_dir: Some(cache_dir()) }).expect("runtime starts")
}

/// An event like the HTTP source makes, with `data` as given.
pub fn event(id: &str, data: serde_json::Value) -> weir::event::Event {
    weir::event::Event {
        id: id.to_string(),
        source: "http".into(),
        entity: "orders".into(),
        op: "insert".into(),
        key: Some(id.to_string()),
        time: "2026-01-01T00:00:00Z".into(),
        subject: "weir.orders.insert".into(),
        headers: vec![("x-test".into(), "1".into())],
        data: data.to_string().into_bytes(),
        old: None,
        position: None,
    }
}

/// Resident set size of this process in bytes (Linux).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("number");
    kib * 1024
}
/// The largest resident set process `pid` has had, in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The median of `values` (sorted in place), for benchmarks measured in rounds.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// `low–high` of `values`, for benchmark tables.
pub fn range(values: &[f64]) -> String {
    let low = values.iter().copied().fold(f64::INFINITY, f64::min);
    let high = values.iter().copied().fold(0.0, f64::max);
    format!("{low:.0}–{high:.0}")
}

/// CPU seconds (user + system) process `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |index: usize| fields.get(index).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

pub mod netns;
pub mod pg;
pub mod services;
