//! The plugin runtime against real compiled plugins and every hostile fixture: each failure is
//! reported with its kind, is bounded in time and memory, and leaves the next events and other
//! plugins working.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{event, plugin_bytes, runtime};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use weir::plugin::{ErrorKind, Limits, LoadError, Outcome, Plugin, PluginRuntime};

fn load(runtime: &PluginRuntime, name: &str, config: &str, limits: Limits) -> Plugin {
    runtime.load(name, &plugin_bytes(name), config, limits).unwrap_or_else(|e| panic!("{name} loads: {e}"))
}

fn kinds(results: &[Result<Outcome, weir::plugin::PluginError>]) -> Vec<Option<ErrorKind>> {
    results.iter().map(|r| r.as_ref().err().map(|e| e.kind)).collect()
}

fn keep_all(plugin: &Plugin, count: usize) {
    let events: Vec<_> = (0..count).map(|i| event(&format!("ok-{i}"), json!({"seq": i + 1}))).collect();
    let results = plugin.run_blocking(events.clone());
    assert_eq!(results.len(), count);
    for (input, result) in events.iter().zip(results) {
        assert_eq!(result, Ok(Outcome::Keep(input.clone())), "event {} comes back unchanged", input.id);
    }
}

#[test]
fn noop_keeps_a_batch_in_order_on_one_reused_instance() {
    let runtime = runtime();
    let plugin = load(&runtime, "noop", "{}", Limits::default());
    for _ in 0..50 {
        keep_all(&plugin, 128);
    }
    assert_eq!(plugin.stats().instances_created.load(Ordering::Relaxed), 1, "instances are reused, never one per call");
    assert_eq!(plugin.info().world, weir::plugin::World::Transform);
    assert_eq!(plugin.info().sdk.as_ref().map(|s| s.sdk_version.as_str()), Some(weir_sdk_version()));
    assert!(plugin.run_blocking(Vec::new()).is_empty());
}

fn weir_sdk_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[test]
fn infinite_loop_is_stopped_at_its_deadline_and_the_next_events_still_work() {
    let runtime = runtime();
    let limits = Limits { timeout: Duration::from_millis(50), ..Limits::default() };
    let looping = load(&runtime, "fixture-infinite-loop", "{}", limits);
    let noop = load(&runtime, "noop", "{}", Limits::default());
    let started = Instant::now();
    let results = looping.run_blocking(vec![event("a", json!({}))]);
    let elapsed = started.elapsed();
    assert_eq!(kinds(&results), vec![Some(ErrorKind::Timeout)]);
    assert!(elapsed < Duration::from_secs(5), "a 50 ms deadline stopped the loop after {elapsed:?}");
    assert!(elapsed >= Duration::from_millis(50), "stopped before its deadline: {elapsed:?}");
    // The plugin is still usable (a fresh instance) and other plugins are unaffected.
    assert_eq!(kinds(&looping.run_blocking(vec![event("b", json!({}))])), vec![Some(ErrorKind::Timeout)]);
    keep_all(&noop, 16);
}

#[test]
fn memory_bomb_is_denied_at_its_cap_and_host_memory_stays_bounded() {
    let runtime = runtime();
    let limits = Limits { memory: 32 << 20, recycle_memory: 24 << 20, ..Limits::default() };
    let bomb = load(&runtime, "fixture-memory-bomb", "{}", limits);
    let before = common::rss_bytes();
    for round in 0..5 {
        let results = bomb.run_blocking(vec![event(&format!("bomb-{round}"), json!({}))]);
        assert_eq!(kinds(&results), vec![Some(ErrorKind::MemoryLimit)]);
        let message = &results[0].as_ref().unwrap_err().message;
        assert!(message.contains("memory_mb"), "the error says how to fix it: {message}");
    }
    let grown = common::rss_bytes().saturating_sub(before);
    assert!(grown < 96 << 20, "host RSS grew by {} MiB for a 32 MiB plugin cap", grown >> 20);
    keep_all(&load(&runtime, "noop", "{}", Limits::default()), 8);
}

#[test]
fn deep_recursion_traps_with_stack_overflow() {
    let runtime = runtime();
    let plugin = load(&runtime, "fixture-deep-recursion", "{}", Limits::default());
    for _ in 0..3 {
        assert_eq!(kinds(&plugin.run_blocking(vec![event("r", json!({}))])), vec![Some(ErrorKind::StackOverflow)]);
    }
}

#[test]
fn panics_become_traps_and_a_fresh_instance_serves_the_next_call() {
    let runtime = runtime();
    let plugin = load(&runtime, "fixture-panic", "{}", Limits::default());
    let results = plugin.run_blocking(vec![event("p1", json!({})), event("p2", json!({}))]);
    assert_eq!(kinds(&results), vec![Some(ErrorKind::Trap), Some(ErrorKind::Trap)]);
    let message = &results[0].as_ref().unwrap_err().message;
    assert!(message.contains("unreachable"), "{message}");
    assert!(plugin.stats().failed_calls.load(Ordering::Relaxed) >= 3, "batch call plus one per event");
}

#[test]
fn one_poison_event_does_not_fail_its_neighbours() {
    let runtime = runtime();
    let plugin = load(&runtime, "fixture-panic-every-10th", "{}", Limits::default());
    let events: Vec<_> = (1..=100).map(|seq| event(&format!("e{seq}"), json!({"seq": seq}))).collect();
    let results = plugin.run_blocking(events.clone());
    assert_eq!(results.len(), 100);
    for (input, result) in events.iter().zip(&results) {
        let seq: u64 = input.id[1..].parse().unwrap();
        if seq.is_multiple_of(10) {
            assert_eq!(result.as_ref().err().map(|e| e.kind), Some(ErrorKind::Trap), "seq {seq} fails");
        } else {
            assert_eq!(result, &Ok(Outcome::Keep(input.clone())), "seq {seq} passes, in order");
        }
    }
}

#[test]
fn oversized_outputs_are_refused_per_event() {
    let runtime = runtime();
    // Building 100 000 events takes the guest a while; the generous deadline makes sure it is the
    // output cap, not the clock, that refuses them.
    let limits = Limits { timeout: Duration::from_secs(10), ..Limits::default() };
    let plugin = load(&runtime, "fixture-oversized-output", "{}", limits);
    let results = plugin.run_blocking(vec![
        event("bytes", json!({"mode": "bytes"})),
        event("fine", json!({"mode": "none"})),
        event("count", json!({"mode": "count"})),
    ]);
    assert_eq!(kinds(&results), vec![Some(ErrorKind::OutputLimit), None, Some(ErrorKind::OutputLimit)]);
    let message = &results[2].as_ref().unwrap_err().message;
    assert!(message.contains("100000") && message.contains("max_outputs"), "{message}");
}

#[test]
fn outputs_pointing_at_the_same_bytes_are_measured_before_they_are_copied() {
    let runtime = runtime();
    let plugin = load(&runtime, "fixture-aliased-output", "{}", Limits::default());
    let with_entity =
        |entity: &str| weir::event::Event { entity: entity.to_string(), ..event(entity, json!({"n": 1})) };
    let inputs = vec![
        with_entity("data"),
        with_entity("headers"),
        with_entity("entity"),
        with_entity("fine"),
        with_entity("reason"),
    ];
    let peak_before = common::peak_rss_kib(std::process::id());
    // Each of the first three would be 1.6 GB copied out of a plugin that holds 17 MiB (where
    // wasmtime's own bound on what one call's results copy, 128 MiB, would stop it).
    let results = plugin.run_blocking(inputs.clone());
    let grown_mib = common::peak_rss_kib(std::process::id()).saturating_sub(peak_before) / 1024;
    assert_eq!(
        kinds(&results),
        vec![Some(ErrorKind::OutputLimit), Some(ErrorKind::OutputLimit), Some(ErrorKind::OutputLimit), None, None]
    );
    let message = &results[0].as_ref().unwrap_err().message;
    assert!(message.contains("max_output_bytes"), "{message}");
    assert_eq!(results[3], Ok(Outcome::Keep(inputs[3].clone())), "the well-formed neighbour is kept");
    // A reject is not a failure: a reason too long to copy is named by its length instead.
    match &results[4] {
        Ok(Outcome::Reject(reason)) => assert!(reason.contains("16777216 bytes"), "{reason}"),
        other => panic!("a reject with a 16 MiB reason: {other:?}"),
    }
    // Measured while lifting: the call stands (no trap, no re-run of each event on its own).
    assert_eq!(plugin.stats().failed_calls.load(Ordering::Relaxed), 0);
    assert!(grown_mib < 256, "the host's peak memory grew by {grown_mib} MiB");
}

#[test]
fn a_batch_of_large_events_is_run_in_one_call_whatever_its_total_size() {
    let runtime = runtime();
    // Over wasmtime's default of 128 MiB copied per call's results, in one batch.
    let limits =
        Limits { memory: 512 << 20, recycle_memory: 384 << 20, timeout: Duration::from_secs(20), ..Limits::default() };
    let plugin = load(&runtime, "noop", "{}", limits);
    let text = "x".repeat(900 << 10);
    let events: Vec<_> = (0..150).map(|i| event(&format!("big-{i}"), json!({ "text": text }))).collect();
    let results = plugin.run_blocking(events.clone());
    for (input, result) in events.iter().zip(&results) {
        assert!(matches!(result, Ok(Outcome::Keep(kept)) if kept == input), "{} comes back unchanged", input.id);
    }
    assert_eq!(
        plugin.stats().failed_calls.load(Ordering::Relaxed),
        0,
        "one call, not a failed batch re-run event by event"
    );
}

#[test]
fn invalid_subjects_are_plugin_errors() {
    let runtime = runtime();
    let plugin = load(&runtime, "fixture-invalid-subject", "{}", Limits::default());
    let subjects = ["orders.*", "a..b", "has space", "weir.>", "", "tab\tbed"];
    let events: Vec<_> = subjects.iter().map(|s| event(s, json!({"subject": s}))).collect();
    for (subject, kind) in subjects.iter().zip(kinds(&plugin.run_blocking(events))) {
        assert_eq!(kind, Some(ErrorKind::InvalidSubject), "subject {subject:?}");
    }
    let good = plugin.run_blocking(vec![event("ok", json!({"subject": "shop.orders.created"}))]);
    let Ok(Outcome::Keep(kept)) = &good[0] else { panic!("valid subject kept: {good:?}") };
    assert_eq!(kept.subject, "shop.orders.created");
}

#[test]
fn headers_nats_cannot_carry_are_plugin_errors() {
    let runtime = runtime();
    let plugin = load(&runtime, "noop", "{}", Limits::default());
    let headers =
        [("x-ok", "fine"), ("x-crlf", "a\r\nInjected: 1"), ("has space", "v"), ("colon:name", "v"), ("", "v")];
    let events: Vec<_> = headers
        .iter()
        .map(|(name, value)| {
            let mut e = event(name, json!({}));
            e.headers = vec![(name.to_string(), value.to_string())];
            e
        })
        .collect();
    let results = plugin.run_blocking(events);
    assert!(
        matches!(&results[0], Ok(Outcome::Keep(kept)) if kept.headers == [("x-ok".to_string(), "fine".to_string())])
    );
    for (result, (name, _)) in results.iter().zip(headers).skip(1) {
        let error = result.as_ref().expect_err(name);
        assert_eq!(error.kind, ErrorKind::InvalidOutput, "header {name:?}");
        assert!(error.message.contains("NATS cannot carry"), "{}", error.message);
    }
}

#[test]
fn files_environment_and_sockets_are_not_reachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let target = listener.local_addr().unwrap().to_string();
    let runtime = runtime();
    let plugin = load(&runtime, "fixture-file-and-socket", "{}", Limits::default());
    let results = plugin.run_blocking(vec![event("fs", json!({"connect": target}))]);
    let Ok(Outcome::Keep(out)) = &results[0] else { panic!("plugin runs and reports: {results:?}") };
    let report: serde_json::Value = serde_json::from_slice(&out.data).unwrap();
    for attempt in ["file", "dir", "socket"] {
        assert!(report[attempt].as_str().unwrap().starts_with("error"), "{attempt} must fail: {report}");
    }
    assert_eq!(report["env"], 0, "no environment variables are passed");
    assert!(listener.accept().is_err(), "nothing connected to the listener");
}

#[test]
fn a_plugin_that_imports_what_the_host_does_not_offer_is_refused_at_load() {
    let runtime = runtime();
    let error = runtime.load("foreign", &plugin_bytes("fixture-foreign-import"), "{}", Limits::default()).err();
    let Some(LoadError::UnknownImport { name }) = &error else { panic!("refused at load: {error:?}") };
    assert_eq!(name, "weir:fixture/backdoor");
    assert!(error.unwrap().to_string().contains("Weir does not offer"));
}

#[test]
fn wrong_files_get_one_line_explanations() {
    let runtime = runtime();
    let load = |bytes: &[u8]| runtime.load("x", bytes, "{}", Limits::default()).err().expect("refused");
    assert!(matches!(load(b"\0asm\x01\0\0\0"), LoadError::CoreModule));
    assert!(matches!(load(b"#!/bin/sh\necho hi\n"), LoadError::NotWasm));
    assert!(matches!(load(&plugin_bytes("fixture-wrong-world")), LoadError::WrongWorld { .. }));
    let newer = load(&plugin_bytes("fixture-newer-wit"));
    assert!(matches!(&newer, LoadError::UnsupportedWit { found, .. } if found == "1.0.0"), "{newer:?}");
    assert!(newer.to_string().contains("upgrade weir"));
    let mut truncated = plugin_bytes("noop");
    truncated.truncate(truncated.len() / 2);
    assert!(matches!(load(&truncated), LoadError::Invalid(_)));
    for error in [load(&truncated), load(&plugin_bytes("fixture-wrong-world"))] {
        assert_eq!(error.to_string().lines().count(), 1, "one line: {error}");
    }
}

#[test]
fn configure_may_refuse_a_config() {
    let runtime = runtime();
    let bytes = plugin_bytes("fixture-refuse-config");
    for (config, needle) in [
        ("{}", "missing field `limit`"),
        (r#"{"limit":0}"#, "greater than 0"),
        (r#"{"limit":1,"x":2}"#, "unknown field"),
    ] {
        match runtime.load("refuse", &bytes, config, Limits::default()) {
            Err(LoadError::ConfigRefused(message)) => assert!(message.contains(needle), "{config}: {message}"),
            other => panic!("{config} must be refused, got {:?}", other.err()),
        }
    }
    let plugin = runtime.load("refuse", &bytes, r#"{"limit":7}"#, Limits::default()).unwrap();
    let Ok(Outcome::Keep(out)) = &plugin.run_blocking(vec![event("c", json!({}))])[0] else { panic!() };
    assert!(out.headers.contains(&("limit".to_string(), "7".to_string())));
    // A plugin without a config type refuses a config it would silently ignore.
    let noop = runtime.load("noop", &plugin_bytes("noop"), r#"{"fields":["a"]}"#, Limits::default());
    assert!(matches!(noop, Err(LoadError::ConfigRefused(m)) if m.contains("takes no config")));
}

#[test]
fn leaky_plugins_are_recycled_at_their_memory_mark_instead_of_failing() {
    let runtime = runtime();
    let limits = Limits { memory: 24 << 20, recycle_memory: 8 << 20, ..Limits::default() };
    let plugin = load(&runtime, "fixture-leaky", "{}", limits);
    for i in 0..200 {
        let results = plugin.run_blocking(vec![event(&format!("l{i}"), json!({}))]);
        assert!(matches!(results[0], Ok(Outcome::Keep(_))), "event {i}: {:?}", results[0]);
    }
    assert!(plugin.stats().instances_recycled.load(Ordering::Relaxed) >= 5, "recycled repeatedly");
}

#[test]
fn instances_are_recycled_after_a_number_of_calls() {
    let runtime = runtime();
    let limits = Limits { recycle_after_calls: 3, ..Limits::default() };
    let plugin = load(&runtime, "noop", "{}", limits);
    for _ in 0..10 {
        keep_all(&plugin, 2);
    }
    assert_eq!(plugin.stats().instances_created.load(Ordering::Relaxed), 4, "10 calls at 3 per instance");
}

#[test]
fn one_plugin_serves_several_threads_at_once() {
    let runtime = runtime();
    let plugin = load(&runtime, "noop", "{}", Limits::default());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..50 {
                    keep_all(&plugin, 32);
                }
            });
        }
    });
    assert!(plugin.stats().instances_created.load(Ordering::Relaxed) <= 4 + 1);
}

#[test]
fn calls_past_the_concurrency_bound_wait_instead_of_adding_instances() {
    // Host memory is bounded by the instances alive at once, not by how many requests arrive.
    let runtime = runtime();
    let limits = Limits { max_concurrent_calls: 2, timeout: Duration::from_secs(5), ..Limits::default() };
    let sleepy = load(&runtime, "fixture-sleepy", "{}", limits);
    std::thread::scope(|scope| {
        let calls: Vec<_> = (0..16)
            .map(|i| {
                let sleepy = &sleepy;
                scope.spawn(move || sleepy.run_blocking(vec![event(&format!("e{i}"), json!({"sleep_ms": 20}))]))
            })
            .collect();
        for call in calls {
            assert_eq!(kinds(&call.join().unwrap()), vec![None]);
        }
    });
    // The one made at load and one more: never more than two calls ran at once.
    let created = sleepy.stats().instances_created.load(Ordering::Relaxed);
    assert!(created <= 2, "{created} instances for 16 calls at once");
}

#[test]
fn a_hanging_plugin_does_not_stall_another_running_beside_it() {
    let runtime = runtime();
    let limits = Limits { timeout: Duration::from_millis(300), ..Limits::default() };
    let looping = load(&runtime, "fixture-infinite-loop", "{}", limits);
    let noop = load(&runtime, "noop", "{}", Limits::default());
    std::thread::scope(|scope| {
        let hung = scope.spawn(|| looping.run_blocking(vec![event("h", json!({}))]));
        let started = Instant::now();
        let mut calls = 0;
        while !hung.is_finished() {
            keep_all(&noop, 4);
            calls += 1;
        }
        assert!(calls > 10, "noop kept serving while the loop ran: {calls} calls in {:?}", started.elapsed());
        assert_eq!(kinds(&hung.join().unwrap()), vec![Some(ErrorKind::Timeout)]);
    });
}

#[test]
fn compiled_plugins_are_cached_and_a_forged_cache_entry_is_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let options = || weir::plugin::RuntimeOptions { cache_dir: Some(dir.path().to_path_buf()) };
    let bytes = plugin_bytes("noop");
    {
        let runtime = PluginRuntime::new(options()).unwrap();
        runtime.load("noop", &bytes, "{}", Limits::default()).unwrap();
    }
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .collect();
    assert_eq!(entries.len(), 1, "one sealed entry for one plugin");
    let entry = &entries[0];
    let sealed = std::fs::read(entry).unwrap();

    // A restart loads the same entry (the file is not rewritten).
    let modified = std::fs::metadata(entry).unwrap().modified().unwrap();
    {
        let runtime = PluginRuntime::new(options()).unwrap();
        keep_all(&runtime.load("noop", &bytes, "{}", Limits::default()).unwrap(), 4);
    }
    assert_eq!(std::fs::metadata(entry).unwrap().modified().unwrap(), modified);

    // Forged bytes (valid-looking header, wrong seal) are ignored and replaced by a real compile.
    let mut forged = sealed.clone();
    let last = forged.len() - 1;
    forged[last] ^= 0xff;
    std::fs::write(entry, &forged).unwrap();
    {
        let runtime = PluginRuntime::new(options()).unwrap();
        keep_all(&runtime.load("noop", &bytes, "{}", Limits::default()).unwrap(), 4);
    }
    assert_eq!(std::fs::read(entry).unwrap().len(), sealed.len(), "entry rewritten by a fresh compile");
    assert_ne!(std::fs::read(entry).unwrap(), forged);

    // A genuine entry of another plugin copied under this one's name: sealed by this cache, but
    // for another name, so not loaded (the redact transform would drop fields the no-op keeps).
    {
        let runtime = PluginRuntime::new(options()).unwrap();
        runtime.load("redact", &plugin_bytes("redact"), r#"{"fields":["seq"]}"#, Limits::default()).unwrap();
    }
    let other = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "cwasm") && p != entry)
        .expect("the other plugin's entry");
    let swapped = std::fs::read(&other).unwrap();
    std::fs::write(entry, &swapped).unwrap();
    {
        let runtime = PluginRuntime::new(options()).unwrap();
        keep_all(&runtime.load("noop", &bytes, "{}", Limits::default()).unwrap(), 4);
    }
    assert_ne!(std::fs::read(entry).unwrap(), swapped, "entry rewritten by a fresh compile");

    // A key others may write is not trusted: a new one is made, and every entry recompiled.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key_path = dir.path().join("cache.key");
        let key = std::fs::read(&key_path).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let before = std::fs::read(entry).unwrap();
        {
            let runtime = PluginRuntime::new(options()).unwrap();
            keep_all(&runtime.load("noop", &bytes, "{}", Limits::default()).unwrap(), 4);
        }
        assert_ne!(std::fs::read(&key_path).unwrap(), key, "a new key");
        assert_eq!(std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_ne!(std::fs::read(entry).unwrap(), before, "sealed again under the new key");
    }
}

#[test]
fn a_plugin_that_hangs_while_starting_is_stopped_and_refused() {
    let runtime = runtime();
    let limits = Limits { timeout: Duration::from_millis(50), ..Limits::default() };
    let bytes = plugin_bytes("fixture-refuse-config");
    let started = Instant::now();
    let result = runtime.load("hang", &bytes, r#"{"limit":1,"hang_in_configure":true}"#, limits);
    assert!(started.elapsed() < Duration::from_secs(5), "stopped: {:?}", started.elapsed());
    match result {
        Err(LoadError::StartFailed(error)) => assert!(error.message.starts_with("timeout"), "{error}"),
        other => panic!("must fail to start, got {:?}", other.err()),
    }
}

#[test]
fn a_plugin_waiting_in_a_host_call_is_stopped_at_its_deadline_too() {
    // A WASI sleep runs no guest code, so the epoch deadline alone never stops it.
    let runtime = runtime();
    let limits = Limits { timeout: Duration::from_millis(50), ..Limits::default() };
    let sleepy = load(&runtime, "fixture-sleepy", "{}", limits.clone());
    let started = Instant::now();
    let results = sleepy.run_blocking(vec![event("a", json!({}))]);
    assert_eq!(kinds(&results), vec![Some(ErrorKind::Timeout)]);
    assert!(started.elapsed() < Duration::from_secs(5), "a 30 s sleep stopped after {:?}", started.elapsed());
    assert!(results[0].as_ref().unwrap_err().message.contains("timeout_ms"));
    // A wait inside the limit is no problem, and the plugin still works.
    assert_eq!(kinds(&sleepy.run_blocking(vec![event("b", json!({"sleep_ms": 1}))])), vec![None]);
    // Sleeping in `configure`: the load is refused in bounded time.
    let started = Instant::now();
    let result = runtime.load("sleepy", &plugin_bytes("fixture-sleepy"), r#"{"sleep_in_configure_ms":30000}"#, limits);
    assert!(started.elapsed() < Duration::from_secs(5), "stopped: {:?}", started.elapsed());
    match result {
        Err(LoadError::StartFailed(error)) => assert!(error.message.starts_with("timeout"), "{error}"),
        other => panic!("must fail to start, got {:?}", other.err()),
    }
}

#[test]
fn gateway_and_sdk_agree_on_subject_tokens() {
    for text in ["eu-west.1 *>", "", "ok_Token-9", "ünïcode", "a\tb"] {
        assert_eq!(weir::subject::token(text), weir_sdk::subject_token(text), "{text:?}");
    }
}

#[test]
fn filter_plugins_keep_or_drop_each_event_unchanged() {
    let runtime = runtime();
    let config = r#"{"ops":["insert"],"where":[{"field":"total","op":"gte","value":100}]}"#;
    let plugin = load(&runtime, "filter", config, Limits::default());
    assert_eq!(plugin.info().world, weir::plugin::World::Filter);
    let mut events: Vec<_> = [50, 150, 100, 99].iter().map(|t| event(&format!("t{t}"), json!({"total": t}))).collect();
    events[2].op = "delete".into();
    let results = plugin.run_blocking(events.clone());
    assert_eq!(
        results,
        vec![Ok(Outcome::Drop), Ok(Outcome::Keep(events[1].clone())), Ok(Outcome::Drop), Ok(Outcome::Drop)]
    );
}

#[test]
fn bundled_transforms_run_in_the_runtime() {
    let runtime = runtime();
    let redact = load(&runtime, "redact", r#"{"fields":["email"]}"#, Limits::default());
    let route = load(&runtime, "route", r#"{"subject":"shop.{data.region}.{op}"}"#, Limits::default());
    let input = event("r1", json!({"email": "a@b.c", "region": "eu.west"}));
    let Ok(Outcome::Keep(redacted)) = redact.run_blocking(vec![input.clone()]).remove(0) else {
        panic!("redact keeps")
    };
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&redacted.data).unwrap(), json!({"region": "eu.west"}));
    let Ok(Outcome::Keep(routed)) = route.run_blocking(vec![redacted]).remove(0) else { panic!("route keeps") };
    assert_eq!(routed.subject, "shop.eu_west.insert");
    assert_eq!((routed.id.as_str(), routed.time.as_str()), (input.id.as_str(), input.time.as_str()));
}
