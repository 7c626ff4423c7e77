//! `weir plugin test|inspect|new` through the real binary, as a plugin author uses them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{plugin_path, repo_root};
use serde_json::Value;
use std::io::Write;
use std::process::{Command, Output, Stdio};

fn weir(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
    command.args(args).env("WEIR_CACHE_DIR", common::cache_dir()).env("WEIR_LOG", "info");
    command
}

fn run(args: &[&str]) -> Output {
    weir(args).output().expect("weir runs")
}

fn run_with_stdin(args: &[&str], stdin: &str) -> Output {
    let mut child = weir(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn lines(output: &Output) -> Vec<Value> {
    text(&output.stdout).lines().map(|l| serde_json::from_str(l).expect("NDJSON line")).collect()
}

fn assert_one_line_error(output: &Output, needle: &str) {
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "must fail: {stderr}");
    assert!(stderr.contains(needle), "stderr mentions `{needle}`: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "no backtrace: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn plugin_test_prints_one_outcome_per_input_event() {
    let wasm = plugin_path("noop");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.ndjson");
    std::fs::write(&input, "{\"entity\":\"orders\",\"key\":1,\"data\":{\"a\":1}}\n\n{\"entity\":\"users\",\"op\":\"delete\",\"key\":\"u1\"}\n").unwrap();
    let output = run(&["plugin", "test", wasm.to_str().unwrap(), "--input", input.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let lines = lines(&output);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["outcome"], "keep");
    assert_eq!(lines[0]["event"]["data"], serde_json::json!({"a": 1}));
    assert_eq!(lines[0]["event"]["subject"], "weir.orders.insert");
    assert_eq!(lines[1]["event"]["op"], "delete");
    assert_eq!(lines[1]["event"]["key"], "u1");
}

#[test]
fn plugin_test_reads_stdin_and_reports_failures_per_event() {
    let wasm = plugin_path("fixture-panic-every-10th");
    let input: String = (1..=20).map(|seq| format!("{{\"entity\":\"t\",\"data\":{{\"seq\":{seq}}}}}\n")).collect();
    let output = run_with_stdin(&["plugin", "test", wasm.to_str().unwrap(), "--batch", "7"], &input);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let outcomes: Vec<String> = lines(&output).iter().map(|l| l["outcome"].as_str().unwrap().to_string()).collect();
    let expected: Vec<&str> = (1..=20).map(|seq| if seq % 10 == 0 { "error" } else { "keep" }).collect();
    assert_eq!(outcomes, expected);
}

#[test]
fn plugin_test_names_the_bad_input_line() {
    let output =
        run_with_stdin(&["plugin", "test", plugin_path("noop").to_str().unwrap()], "{\"entity\":\"a\"}\n{oops}\n");
    assert_one_line_error(&output, "input line 2");
}

#[test]
fn plugin_test_rejects_bad_config_json_and_refused_configs() {
    let wasm = plugin_path("fixture-refuse-config");
    let output = run_with_stdin(&["plugin", "test", wasm.to_str().unwrap(), "--config", "{limit"], "");
    assert_one_line_error(&output, "--config is not valid JSON");
    let output = run_with_stdin(&["plugin", "test", wasm.to_str().unwrap(), "--config", "{\"limit\":0}"], "");
    assert_one_line_error(&output, "plugin refused its config");
}

#[test]
fn wrong_files_get_a_one_line_explanation() {
    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let text_file = dir.path().join("notes.wasm");
    std::fs::write(&text_file, "hello").unwrap();
    let cases = [
        (core, "core WebAssembly module, not a component"),
        (text_file, "not a WebAssembly file"),
        (plugin_path("fixture-wrong-world"), "not a Weir plugin"),
        (plugin_path("fixture-newer-wit"), "weir:plugin@1.0.0"),
        (plugin_path("fixture-foreign-import"), "weir:fixture/backdoor"),
    ];
    for (path, needle) in &cases {
        assert_one_line_error(&run_with_stdin(&["plugin", "test", path.to_str().unwrap()], ""), needle);
    }
    for (path, needle) in &cases[..4] {
        assert_one_line_error(&run(&["plugin", "inspect", path.to_str().unwrap()]), needle);
    }
    let missing = run(&["plugin", "inspect", "/nonexistent/plugin.wasm"]);
    assert_one_line_error(&missing, "cannot read plugin file");
}

#[test]
fn inspect_shows_world_versions_imports_and_size() {
    let wasm = plugin_path("fixture-chatty");
    let output = run(&["plugin", "inspect", wasm.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    for needle in [
        "world:    transform",
        "wit:      weir:plugin@0.1.0",
        "sdk:      weir-sdk-rust 0.1.0",
        "weir:plugin/host@0.1.0",
        "bytes",
    ] {
        assert!(stdout.contains(needle), "`{needle}` in\n{stdout}");
    }
    let json = run(&["plugin", "inspect", wasm.to_str().unwrap(), "--json"]);
    let info: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(info["world"], "transform");
    assert_eq!(info["sdk"]["wit"], "weir:plugin@0.1.0");
    assert_eq!(info["size"].as_u64(), Some(std::fs::metadata(&wasm).unwrap().len()));

    let foreign = run(&["plugin", "inspect", plugin_path("fixture-foreign-import").to_str().unwrap()]);
    assert!(!foreign.status.success());
    assert!(text(&foreign.stdout).contains("weir:fixture/backdoor  <- not offered by Weir"));
}

#[test]
fn plugin_output_reaches_the_log_tagged_with_the_plugin_name() {
    let wasm = plugin_path("fixture-chatty");
    let output = run_with_stdin(&["plugin", "test", wasm.to_str().unwrap()], "{\"entity\":\"a\",\"id\":\"e-42\"}\n");
    assert!(output.status.success());
    let stderr = text(&output.stderr);
    for needle in ["stdout line for e-42", "stderr line for e-42", "host log line for e-42"] {
        let line =
            stderr.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("`{needle}` logged:\n{stderr}"));
        assert!(line.contains("fixture_chatty"), "tagged with the plugin name: {line}");
    }
    assert!(!text(&output.stdout).contains("stdout line"), "plugin stdout never mixes into the outcomes");
}

#[test]
fn bundled_plugins_pass_their_behaviour_cases() {
    for name in ["redact", "filter", "route", "cloudevents"] {
        let cases = repo_root().join("plugins").join(name).join("cases.toml");
        let output = run(&["plugin", "test", plugin_path(name).to_str().unwrap(), "--cases", cases.to_str().unwrap()]);
        let stdout = text(&output.stdout);
        assert!(output.status.success(), "{name}:\n{stdout}{}", text(&output.stderr));
        assert!(stdout.trim_end().ends_with(" passed, 0 failed"), "{name}: {stdout}");
    }
}

/// A golden-cases file holding `text`, in a directory of its own (kept while the guard lives).
fn cases_file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("cases.toml");
    std::fs::write(&cases, text).unwrap();
    (dir, cases)
}

#[test]
fn repeated_headers_are_shown_and_checked_in_order() {
    let input = r#"{"entity":"orders","headers":{"x-tag":["a","b"],"x-one":"c"}}"#;
    let output = run_with_stdin(&["plugin", "test", plugin_path("noop").to_str().unwrap()], &format!("{input}\n"));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let lines = lines(&output);
    assert_eq!(lines[0]["event"]["headers"], serde_json::json!({"x-tag": ["a", "b"], "x-one": "c"}));
    let (_dir, cases) = cases_file(
        r#"
[[case]]
name = "both values, in order"
input = { entity = "orders", headers = { x-tag = ["a", "b"] } }
expect = { outcome = "keep", headers = { x-tag = ["a", "b"] } }

[[case]]
name = "one value of a repeated header"
input = { entity = "orders", headers = { x-tag = ["a", "b"] } }
expect = { outcome = "keep", headers = { x-tag = "b" } }
"#,
    );
    let output = run(&["plugin", "test", plugin_path("noop").to_str().unwrap(), "--cases", cases.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("FAIL one value of a repeated header"), "{stdout}");
    assert!(stdout.trim_end().ends_with("1 passed, 1 failed"), "{stdout}");
}

#[test]
fn failing_cases_show_a_readable_diff_and_fail() {
    let (_dir, cases) = cases_file(
        r#"
[[case]]
name = "expects a field the plugin does not add"
input = { entity = "orders", data = { id = 1 } }
expect = { outcome = "keep", data = { id = 1, extra = true } }

[[case]]
name = "expects a drop"
input = { entity = "orders", data = { id = 2 } }
expect = { outcome = "drop" }

[[case]]
name = "passes"
input = { entity = "orders", data = { id = 3 } }
expect = { outcome = "keep", data = { id = 3 }, subject = "weir.orders.insert" }
"#,
    );
    let output = run(&["plugin", "test", plugin_path("noop").to_str().unwrap(), "--cases", cases.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("FAIL expects a field the plugin does not add"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.trim_start().starts_with('-') && l.contains("\"extra\": true")),
        "diff marks the missing field:\n{stdout}"
    );
    assert!(stdout.contains("FAIL expects a drop") && stdout.contains("expected outcome `drop`"), "{stdout}");
    assert!(stdout.trim_end().ends_with("1 passed, 2 failed"), "{stdout}");
}

#[test]
fn golden_cases_without_a_config_take_the_command_lines() {
    let (_dir, cases) = cases_file(
        r#"
[[case]]
name = "redacts"
input = { entity = "users", data = { email = "ann@example.com" } }
expect = { outcome = "keep" }
"#,
    );
    let redact = plugin_path("redact");
    let args = ["plugin", "test", redact.to_str().unwrap(), "--cases", cases.to_str().unwrap()];
    let without = run(&args);
    assert_eq!(without.status.code(), Some(1), "redact refuses an empty config: {}", text(&without.stdout));
    let with = run(&[&args[..], &["--config", r#"{"fields":["email"]}"#]].concat());
    assert!(with.status.success(), "{}", text(&with.stdout));
}

#[test]
fn a_scaffolded_plugin_builds_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("shout");
    let output = run(&["plugin", "new", "shout", "--lang", "rust", "--dir", project.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("cargo build --release --target wasm32-wasip2"));
    // The README's one build command. The plugins' target dir already holds the SDK built with
    // the same profile, so only the new crate compiles.
    let build = Command::new(env!("CARGO"))
        .args(["build", "--release", "--target", "wasm32-wasip2", "--quiet"])
        .current_dir(&project)
        .env("CARGO_TARGET_DIR", repo_root().join("plugins/target"))
        .output()
        .unwrap();
    assert!(build.status.success(), "{}", text(&build.stderr));
    let wasm = repo_root().join("plugins/target/wasm32-wasip2/release/shout.wasm");
    let events = project.join("events.ndjson");
    let output = run(&["plugin", "test", wasm.to_str().unwrap(), "--input", events.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let outcomes = lines(&output);
    assert_eq!(outcomes.len(), 3);
    assert_eq!(outcomes[0]["event"]["data"]["tagged_by"], "shout");
    assert_eq!(outcomes[2]["outcome"], "reject");
    let cases = project.join("cases.toml");
    let output = run(&["plugin", "test", wasm.to_str().unwrap(), "--cases", cases.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stdout));
    assert!(text(&output.stdout).contains("3 passed, 0 failed"));

    let again = run(&["plugin", "new", "shout", "--dir", project.to_str().unwrap()]);
    assert_one_line_error(&again, "already exists");
    assert_one_line_error(&run(&["plugin", "new", "Bad Name"]), "is not valid");
    assert_one_line_error(
        &run(&["plugin", "new", "x", "--lang", "cobol", "--dir", dir.path().join("x").to_str().unwrap()]),
        "only `rust`",
    );
}
