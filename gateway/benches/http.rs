//! HTTP → no-op plugin → JetStream, beside a bare forwarder, in one run.
//!
//! `cargo xtask bench` (or `cargo bench -p weir --bench http`) starts a private nats-server, the
//! real `weir` binary (route with the no-op plugin) and a bare forwarder: a minimal hyper
//! handler that publishes the body to JetStream with the same ack window and answers 202 after
//! the PubAck — no plugins, no parsing. The forwarder runs in a process of its own (this bench
//! binary started again with `WEIR_BENCH_ROLE=bare-forwarder`), with the same allocator as
//! `weir`, so that neither shares a runtime with the load generator. It prints a table: single-event
//! throughput for both, NDJSON batch throughput, and p50/p99 latency at half of each one's
//! maximum rate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use common::{median, range};

use common::services::{Gateway, Nats};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONNECTIONS: usize = 32;
const MEASURE: Duration = Duration::from_secs(5);
const ROUNDS: usize = 3;

const BODY: &str = r#"{"id":123456,"status":"paid","total":129.87,"customer":{"id":42,"name":"Ann Example"}}"#;

/// Serves the bare forwarder until killed; prints its address on stdout.
async fn serve_bare_forwarder(nats_url: String) {
    use axum::routing::post;
    let client = async_nats::connect(nats_url).await.unwrap();
    let context = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .max_ack_inflight(1024)
        .backpressure_on_inflight(true)
        .build(client);
    let context = Arc::new(context);
    let app = axum::Router::new().route(
        "/v1/events/{entity}",
        post(move |body: axum::body::Bytes| {
            let context = context.clone();
            async move {
                match context.publish("bare.events", body).await {
                    Ok(ack) => match ack.await {
                        Ok(_) => axum::http::StatusCode::ACCEPTED,
                        Err(_) => axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    },
                    Err(_) => axum::http::StatusCode::SERVICE_UNAVAILABLE,
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap());
    axum::serve(listener, app).await.unwrap();
}

/// Starts this binary again as the bare forwarder; the child is killed when dropped.
struct BareForwarder {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl BareForwarder {
    fn start(nats_url: &str) -> BareForwarder {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .env("WEIR_BENCH_ROLE", "bare-forwarder")
            .env("WEIR_BENCH_NATS", nats_url)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        BareForwarder { child, addr: line.trim().parse().unwrap() }
    }
}

impl Drop for BareForwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Closed loop: `CONNECTIONS` clients posting back to back for `MEASURE`; requests per second.
async fn max_rate(client: &reqwest::Client, url: &str) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + MEASURE;
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (client, url, done) = (client.clone(), url.to_string(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let response = client.post(&url).header("content-type", "application/json").body(BODY).send().await;
                if response.is_ok_and(|r| r.status().as_u16() == 202) {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / MEASURE.as_secs_f64()
}

/// `CONNECTIONS` workers together sending `rate` requests per second on a fixed schedule for
/// `MEASURE`; (p50, p99) latency in milliseconds, measured from each request's scheduled time (so
/// a slow answer that delays the next request counts against the server, not hidden).
async fn latency_at(client: &reqwest::Client, url: &str, rate: f64) -> (f64, f64) {
    let interval = Duration::from_secs_f64(CONNECTIONS as f64 / rate.max(1.0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CONNECTIONS {
        let (client, url) = (client.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut scheduled = started + interval.mul_f64(worker as f64 / CONNECTIONS as f64);
            while scheduled < started + MEASURE {
                tokio::time::sleep_until(scheduled.into()).await;
                let response = client.post(&url).header("content-type", "application/json").body(BODY).send().await;
                if response.is_ok_and(|r| r.status().as_u16() == 202) {
                    latencies.push(scheduled.elapsed().as_secs_f64() * 1000.0);
                }
                scheduled += interval;
            }
            latencies
        }));
    }
    let mut latencies: Vec<f64> = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    (at(0.5), at(0.99))
}

async fn batch_rate(client: &reqwest::Client, url: &str) -> f64 {
    let lines: String =
        (0..1000).map(|i| format!("{{\"entity\":\"orders\",\"key\":\"{i}\",\"data\":{BODY}}}\n")).collect();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + MEASURE;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, url, done, lines) = (client.clone(), url.to_string(), done.clone(), lines.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let response =
                    client.post(&url).header("content-type", "application/x-ndjson").body(lines.clone()).send().await;
                if response.is_ok_and(|r| r.status().as_u16() == 202) {
                    done.fetch_add(1000, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / MEASURE.as_secs_f64()
}

#[tokio::main]
async fn main() {
    if std::env::var("WEIR_BENCH_ROLE").is_ok_and(|role| role == "bare-forwarder") {
        return serve_bare_forwarder(std::env::var("WEIR_BENCH_NATS").unwrap()).await;
    }
    let nats = Nats::start();
    let config = format!(
        r#"
[nats]
url = "{}"
[jetstream]
stream = "BENCH"
subjects = ["weir.>", "bare.>"]
storage = "file"
[http]
listen = "127.0.0.1:0"
max_body = "4MiB"
max_in_flight = 4096
[plugins]
dir = "{{plugins}}"
[plugins.noop]
[[routes]]
plugins = ["noop"]
"#,
        nats.url()
    );
    let gateway = Gateway::start(&config);
    let bare_forwarder = BareForwarder::start(&nats.url());
    let bare = bare_forwarder.addr;
    let client = reqwest::Client::builder().pool_max_idle_per_host(CONNECTIONS).build().unwrap();
    let weir_url = gateway.url("/v1/events/orders");
    let bare_url = format!("http://{bare}/v1/events/orders");

    // Warm up both (connections, plugin instances, stream).
    for url in [&weir_url, &bare_url] {
        for _ in 0..200 {
            client.post(url).header("content-type", "application/json").body(BODY).send().await.unwrap();
        }
    }
    // This machine's run-to-run noise is ±30 %: the maximum rates are measured in interleaved
    // rounds and compared by their medians.
    let (mut bare_rates, mut weir_rates, mut batch_rates) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        bare_rates.push(max_rate(&client, &bare_url).await);
        weir_rates.push(max_rate(&client, &weir_url).await);
        batch_rates.push(batch_rate(&client, &gateway.url("/v1/batch")).await);
    }
    let ranges = [&bare_rates, &weir_rates, &batch_rates].map(|rates| range(rates));
    let (bare_max, weir_max, batch) = (median(&mut bare_rates), median(&mut weir_rates), median(&mut batch_rates));
    let (bare_p50, bare_p99) = latency_at(&client, &bare_url, bare_max / 2.0).await;
    let (weir_p50, weir_p99) = latency_at(&client, &weir_url, weir_max / 2.0).await;

    println!(
        "single-event body: {} bytes; {CONNECTIONS} keep-alive connections; {}s per measurement; max rates: median of {ROUNDS} interleaved rounds\n",
        BODY.len(),
        MEASURE.as_secs()
    );
    println!("| path | max events/s (median) | rounds | p50 ms at half load | p99 ms at half load |");
    println!("|---|---:|---|---:|---:|");
    println!("| bare forwarder (hyper → JetStream) | {bare_max:.0} | {} | {bare_p50:.2} | {bare_p99:.2} |", ranges[0]);
    println!("| weir single event (noop plugin) | {weir_max:.0} | {} | {weir_p50:.2} | {weir_p99:.2} |", ranges[1]);
    println!("| weir NDJSON batch of 1000 (noop plugin) | {batch:.0} | {} | – | – |", ranges[2]);
    println!("\nweir / bare forwarder, single event: {:.2}×", weir_max / bare_max);
}
