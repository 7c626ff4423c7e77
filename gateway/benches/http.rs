//! HTTP → no-op plugin → JetStream, beside a bare forwarder, in one run.
//!
//! `cargo xtask bench` (or `cargo bench -p weir --bench http`) starts a private nats-server, the
//! real `weir` binary (route with the no-op plugin) and a bare forwarder: a minimal hyper
//! handler that publishes the body to JetStream with the same ack window and answers 202 after
//! the PubAck — no plugins, no parsing. The forwarder runs in a process of its own (this bench
//! binary started again with `WEIR_BENCH_ROLE=bare-forwarder`), with the same allocator as
//! `weir`, so that neither shares a runtime with the load generator. A second forwarder also sets
//! the headers weir must set (a unique `Nats-Msg-Id` and four more), to show what they cost NATS.
//! It prints a table: single-event throughput for each, NDJSON batch throughput, p50/p99 latency
//! at half of each one's maximum rate, and the CPU each process spends per event.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use common::{cpu_seconds, median, range};

use common::services::{Gateway, Nats};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONNECTIONS: usize = 32;
const MEASURE: Duration = Duration::from_secs(5);
const ROUNDS: usize = 3;

/// The forwarder's ack window: weir's default `[jetstream] max_in_flight`.
const ACK_WINDOW: usize = 4096;

const BODY: &str = r#"{"id":123456,"status":"paid","total":129.87,"customer":{"id":42,"name":"Ann Example"}}"#;

/// Serves the bare forwarder until killed; prints its address on stdout.
async fn serve_bare_forwarder(nats_url: String, with_headers: bool) {
    use axum::routing::post;
    let client = async_nats::connect(nats_url).await.unwrap();
    let context = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .max_ack_inflight(ACK_WINDOW)
        .backpressure_on_inflight(true)
        .build(client);
    let context = Arc::new(context);
    let only_msg_id = std::env::var("WEIR_BENCH_ONLY_MSG_ID").is_ok_and(|v| v == "1");
    let app = axum::Router::new().route(
        "/v1/events/{entity}",
        post(move |body: axum::body::Bytes| {
            let context = context.clone();
            async move {
                let published = if with_headers {
                    // What weir's headers cost NATS: a unique id (deduplicated by JetStream) and
                    // the four others weir sets on a keyless single event.
                    // `WEIR_BENCH_ONLY_MSG_ID=1`: the id alone, to tell what deduplication costs
                    // NATS from what the other headers' bytes cost.
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string().as_str());
                    let others = [
                        ("Weir-Source", "http"),
                        ("Weir-Entity", "orders"),
                        ("Weir-Op", "insert"),
                        ("Content-Type", "application/json"),
                    ];
                    for (name, value) in if only_msg_id { &others[..0] } else { &others[..] } {
                        headers.insert(*name, *value);
                    }
                    context.publish_with_headers("bare.events", headers, body).await
                } else {
                    context.publish("bare.events", body).await
                };
                match published {
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
    fn start(nats_url: &str, with_headers: bool) -> BareForwarder {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .env("WEIR_BENCH_ROLE", "bare-forwarder")
            .env("WEIR_BENCH_NATS", nats_url)
            .env("WEIR_BENCH_HEADERS", if with_headers { "1" } else { "0" })
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        BareForwarder { child, addr: line.trim().parse().unwrap() }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for BareForwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU microseconds per event of the server under test, nats-server and this load generator.
#[derive(Clone, Copy, Default, Debug)]
struct CpuPerEvent {
    server: f64,
    nats: f64,
    load: f64,
}

/// Measures the CPU `pids` (server, nats-server) and this process use while `run` returns a
/// number of events.
async fn with_cpu(pids: [u32; 2], run: impl std::future::Future<Output = f64>) -> (f64, CpuPerEvent) {
    let me = std::process::id();
    let before = [cpu_seconds(pids[0]), cpu_seconds(pids[1]), cpu_seconds(me)];
    let events = run.await;
    let per_event = |pid: u32, start: f64| (cpu_seconds(pid) - start) * 1e6 / events.max(1.0);
    let cpu = CpuPerEvent {
        server: per_event(pids[0], before[0]),
        nats: per_event(pids[1], before[1]),
        load: per_event(me, before[2]),
    };
    (events / MEASURE.as_secs_f64(), cpu)
}

/// Whether a request was answered `202`; the answer's body is read, as a client that wants the
/// stored sequence numbers would (weir's answer has them; the forwarder's is empty).
async fn accepted(response: reqwest::Result<reqwest::Response>) -> bool {
    match response {
        Ok(response) if response.status().as_u16() == 202 => response.bytes().await.is_ok(),
        _ => false,
    }
}

/// Closed loop: `CONNECTIONS` clients posting back to back for `MEASURE`; requests completed.
async fn max_rate(client: &reqwest::Client, url: &str) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + MEASURE;
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (client, url, done) = (client.clone(), url.to_string(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let response = client.post(&url).header("content-type", "application/json").body(BODY).send().await;
                if accepted(response).await {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64
}

/// `CONNECTIONS` workers together sending `rate` requests per second on a fixed schedule for
/// `MEASURE`; (p50, p99) latency in milliseconds, measured from each request's scheduled time (so
/// a slow answer that delays the next request counts against the server, not hidden).
async fn latency_at(client: &reqwest::Client, url: &str, rate: f64) -> (f64, f64) {
    let latencies = latencies_at(client, url, rate).await;
    (quantile(&latencies, 0.5), quantile(&latencies, 0.99))
}

/// The `q` quantile of sorted `latencies`.
fn quantile(latencies: &[f64], q: f64) -> f64 {
    latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)]
}

/// Every request's latency (ms, sorted) at a steady `rate`, from its scheduled time.
async fn latencies_at(client: &reqwest::Client, url: &str, rate: f64) -> Vec<f64> {
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
                if accepted(response).await {
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
    latencies
}

async fn batch_rate(client: &reqwest::Client, url: &str) -> f64 {
    let keyless = std::env::var("WEIR_BENCH_KEYLESS").is_ok();
    let lines: String = (0..1000)
        .map(|i| {
            if keyless {
                format!("{{\"entity\":\"orders\",\"data\":{BODY}}}\n")
            } else {
                format!("{{\"entity\":\"orders\",\"key\":\"{i}\",\"data\":{BODY}}}\n")
            }
        })
        .collect();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + MEASURE;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, url, done, lines) = (client.clone(), url.to_string(), done.clone(), lines.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let response =
                    client.post(&url).header("content-type", "application/x-ndjson").body(lines.clone()).send().await;
                if accepted(response).await {
                    done.fetch_add(1000, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64
}

#[tokio::main]
async fn main() {
    if std::env::var("WEIR_BENCH_ROLE").is_ok_and(|role| role == "bare-forwarder") {
        let with_headers = std::env::var("WEIR_BENCH_HEADERS").is_ok_and(|v| v == "1");
        return serve_bare_forwarder(std::env::var("WEIR_BENCH_NATS").unwrap(), with_headers).await;
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
    let bare_forwarder = BareForwarder::start(&nats.url(), false);
    let headers_forwarder = BareForwarder::start(&nats.url(), true);
    let client = reqwest::Client::builder().pool_max_idle_per_host(CONNECTIONS).build().unwrap();
    let weir_url = gateway.url("/v1/events/orders");
    let bare_url = format!("http://{}/v1/events/orders", bare_forwarder.addr);
    let headers_url = format!("http://{}/v1/events/orders", headers_forwarder.addr);

    // Warm up all (connections, plugin instances, stream).
    for url in [&weir_url, &bare_url, &headers_url] {
        for _ in 0..200 {
            client.post(url).header("content-type", "application/json").body(BODY).send().await.unwrap();
        }
    }
    // For profiling: `WEIR_BENCH_SOAK=single|batch|bare|headers` loads only that path for 30 s, so
    // `perf record -p <pid>` (the pid is printed) sees one path only. With
    // `WEIR_BENCH_ONLY_MSG_ID=1`, the `headers` forwarder sets only `Nats-Msg-Id`.
    if let Ok(path) = std::env::var("WEIR_BENCH_SOAK") {
        eprintln!(
            "soaking with {path} requests: weir pid {}, bare forwarder pid {}",
            gateway.pid(),
            bare_forwarder.pid()
        );
        // `latency`: weir's and the bare forwarder's latency tails at a steady rate
        // (`WEIR_BENCH_RATE`, default 10 000/s), alternating.
        if path == "latency" {
            let rate = std::env::var("WEIR_BENCH_RATE").ok().and_then(|r| r.parse().ok()).unwrap_or(10_000.0);
            for _ in 0..3 {
                for (name, url) in [("weir", &weir_url), ("bare", &bare_url)] {
                    let latencies = latencies_at(&client, url, rate).await;
                    let slow = latencies.iter().filter(|&&ms| ms > 50.0).count();
                    eprintln!(
                        "{name}: {} requests, p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ms, {slow} over 50 ms",
                        latencies.len(),
                        quantile(&latencies, 0.5),
                        quantile(&latencies, 0.99),
                        quantile(&latencies, 0.999),
                        latencies.last().copied().unwrap_or_default()
                    );
                }
            }
            return;
        }
        for _ in 0..6 {
            let events = match path.as_str() {
                "batch" => batch_rate(&client, &gateway.url("/v1/batch")).await,
                "bare" => max_rate(&client, &bare_url).await,
                "headers" => max_rate(&client, &headers_url).await,
                _ => max_rate(&client, &weir_url).await,
            };
            eprintln!("{:.0} events/s", events / MEASURE.as_secs_f64());
        }
        return;
    }
    let nats_pid = nats.pid().unwrap_or(0);
    let paths = [
        ("bare forwarder (hyper → JetStream)", bare_forwarder.pid(), bare_url.as_str()),
        ("bare forwarder + weir's headers (not the goal's)", headers_forwarder.pid(), headers_url.as_str()),
        ("weir single event (noop plugin)", gateway.pid(), weir_url.as_str()),
    ];
    let batch_url = gateway.url("/v1/batch");
    // This machine's run-to-run noise is ±30 %: the maximum rates are measured in interleaved
    // rounds and compared by their medians.
    let mut rates: [Vec<f64>; 4] = Default::default();
    let mut cpu: [Vec<CpuPerEvent>; 4] = Default::default();
    // The stream's duplicate window holds every id stored in the last two minutes, and measured
    // alone weir's events cost `nats-server` less than in a fixed order after the others (docs/
    // benchmarks.md, thirteenth session): each single-event path goes first in one round, and
    // the batches (hundreds of thousands of ids a round) come after all of them.
    for round in 0..ROUNDS {
        for offset in 0..paths.len() {
            let index = (round + offset) % paths.len();
            let (_, pid, url) = paths[index];
            let (rate, used) = with_cpu([pid, nats_pid], max_rate(&client, url)).await;
            rates[index].push(rate);
            cpu[index].push(used);
        }
    }
    for _ in 0..ROUNDS {
        let (rate, used) = with_cpu([gateway.pid(), nats_pid], batch_rate(&client, &batch_url)).await;
        rates[3].push(rate);
        cpu[3].push(used);
    }
    // CPU per event: the median of the rounds, field by field.
    let cpu = cpu.map(|rounds| {
        let field = |get: fn(&CpuPerEvent) -> f64| median(&mut rounds.iter().map(get).collect::<Vec<_>>());
        CpuPerEvent { server: field(|c| c.server), nats: field(|c| c.nats), load: field(|c| c.load) }
    });
    let ranges = rates.each_ref().map(|rates| range(rates));
    let maxima = rates.each_mut().map(|rates| median(rates));
    let mut latencies = Vec::new();
    for (index, (_, _, url)) in paths.iter().enumerate() {
        latencies.push(latency_at(&client, url, maxima[index] / 2.0).await);
    }

    println!(
        "single-event body: {} bytes; {CONNECTIONS} keep-alive connections; {}s per measurement; max rates: median of {ROUNDS} interleaved rounds, each single-event path first in one\n",
        BODY.len(),
        MEASURE.as_secs()
    );
    println!("| path | max events/s (median) | rounds | p50 ms at half load | p99 ms at half load |");
    println!("|---|---:|---|---:|---:|");
    for (index, (name, _, _)) in paths.iter().enumerate() {
        let (p50, p99) = latencies[index];
        println!("| {name} | {:.0} | {} | {p50:.2} | {p99:.2} |", maxima[index], ranges[index]);
    }
    println!("| weir NDJSON batch of 1000 (noop plugin) | {:.0} | {} | – | – |", maxima[3], ranges[3]);
    println!("\nweir / bare forwarder, single event: {:.2}×", maxima[2] / maxima[0]);
    println!("weir / bare forwarder with weir's headers: {:.2}×", maxima[2] / maxima[1]);
    println!("\nCPU µs per event during the max-rate rounds (median; /proc user+system):\n");
    println!("| path | server | nats-server | load generator |");
    println!("|---|---:|---:|---:|");
    let names = ["bare forwarder", "bare forwarder + weir's headers", "weir single event", "weir NDJSON batch"];
    for (name, used) in names.iter().zip(cpu) {
        println!("| {name} | {:.1} | {:.1} | {:.1} |", used.server, used.nats, used.load);
    }
}
