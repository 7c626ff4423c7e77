//! Per-event cost through the plugin runtime, beside the same plugin logic called natively.
//!
//! `cargo xtask bench` (or `cargo bench -p weir --bench runtime`) prints a table: for the no-op
//! plugin and `redact` on a ~1 KB JSON event, at batch sizes 1, 16 and 128, the median time per
//! event in WebAssembly, natively, and the difference (the runtime's overhead per event).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::json;
use std::time::{Duration, Instant};
use weir::event::Event;
use weir::plugin::{Limits, PluginRuntime, RuntimeOptions};

const REDACT_CONFIG: &str =
    r#"{"fields":["customer.email","customer.phone","payment.card_number"],"action":"mask","keep_last":4}"#;

fn order_json() -> serde_json::Value {
    let items: Vec<_> = (0..6)
        .map(|i| json!({"sku": format!("SKU-{i:05}"), "name": format!("Product number {i}"), "qty": i + 1, "price": 9.99 + i as f64}))
        .collect();
    json!({
        "id": 123456, "status": "paid", "currency": "EUR", "total": 129.87, "created_at": "2026-11-22T10:00:00Z",
        "customer": {"id": 42, "name": "Ann Example", "email": "ann@example.com", "phone": "+49 30 1234567",
                     "address": {"street": "Example Street 1", "city": "Berlin", "zip": "10115", "country": "DE"}},
        "payment": {"method": "card", "card_number": "4111111111111111", "expiry": "12/29"},
        "items": items,
        "notes": "Leave at the door, please. Ring twice."
    })
}

fn host_event(i: usize, data: &[u8]) -> Event {
    Event {
        id: format!("bench-{i}"),
        source: "http".into(),
        entity: "orders".into(),
        op: "insert".into(),
        key: Some(i.to_string()),
        time: "2026-11-22T10:00:00Z".into(),
        subject: "weir.orders.insert".into(),
        headers: vec![("traceparent".into(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into())],
        data: data.to_vec(),
        old: None,
        position: None,
    }
}

fn sdk_event(event: &Event) -> weir_sdk::Event {
    weir_sdk::Event {
        id: event.id.clone(),
        source: event.source.clone(),
        entity: event.entity.clone(),
        op: event.op.clone(),
        key: event.key.clone(),
        time: event.time.clone(),
        subject: event.subject.clone(),
        headers: event.headers.clone(),
        data: event.data.clone(),
        old: event.old.clone(),
        position: event.position.clone(),
    }
}

/// Median nanoseconds per event of `run_batch`, which processes `batch` events per call. The
/// batch of inputs is built outside the timed region.
fn measure<T>(batch: usize, mut make: impl FnMut() -> T, mut run_batch: impl FnMut(T)) -> f64 {
    let per_sample = (20_000 / batch).max(20);
    for _ in 0..per_sample {
        run_batch(make());
    }
    let mut samples = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while samples.len() < 15 || (Instant::now() < deadline && samples.len() < 60) {
        let inputs: Vec<T> = (0..per_sample).map(|_| make()).collect();
        let started = Instant::now();
        for input in inputs {
            run_batch(input);
        }
        samples.push(started.elapsed().as_nanos() as f64 / (per_sample * batch) as f64);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let plugins = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/target/wasm32-wasip2/release");
    let cache = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/weir-test-cache");
    let runtime = match PluginRuntime::new(RuntimeOptions { cache_dir: Some(cache) }) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error:#}");
            std::process::exit(1);
        }
    };
    let data = order_json().to_string().into_bytes();
    println!("event size: {} bytes of JSON data\n", data.len());
    println!("| plugin | batch | wasm ns/event | native ns/event | overhead ns/event |");
    println!("|---|---:|---:|---:|---:|");

    let redact_config: redact::Config = match weir_sdk::parse_config(REDACT_CONFIG) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            std::process::exit(1);
        }
    };
    for (name, config) in [("noop", "{}"), ("redact", REDACT_CONFIG)] {
        let path = plugins.join(format!("{name}.wasm"));
        let plugin = match runtime.load_file(name, &path, config, Limits::default()) {
            Ok(plugin) => plugin,
            Err(error) => {
                eprintln!("{name}: {error} (run `cargo xtask plugins` first)");
                std::process::exit(1);
            }
        };
        for batch in [1usize, 16, 128] {
            let make = || (0..batch).map(|i| host_event(i, &data)).collect::<Vec<_>>();
            let wasm = measure(batch, make, |events| {
                let results = plugin.run_blocking(events);
                assert!(results.iter().all(Result::is_ok));
            });
            let make_native = || (0..batch).map(|i| sdk_event(&host_event(i, &data))).collect::<Vec<_>>();
            let native = measure(batch, make_native, |events| {
                for event in events {
                    let outcome = match name {
                        "noop" => noop::handle(event),
                        _ => weir_sdk::IntoOutcome::into_outcome(redact::handle(event, &redact_config)),
                    };
                    std::hint::black_box(outcome);
                }
            });
            println!("| {name} | {batch} | {wasm:.0} | {native:.0} | {:.0} |", wasm - native);
        }
    }
}
