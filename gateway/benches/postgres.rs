//! PostgreSQL change capture: catch-up rate over a backlog, beside the two limits, and latency.
//!
//! `cargo xtask bench` (or `cargo bench -p weir --bench postgres`) needs the machine's
//! PostgreSQL with `wal_level = logical` (as `cargo xtask test` sets up). It prints a table:
//!
//! - catch-up: rows written while the gateway was stopped (so PostgreSQL's own write speed is not
//!   measured), read from the slot and stored in JetStream, for single-row and 100-row
//!   transactions; beside `pg_recvlogical` reading the same backlog to /dev/null (the server's
//!   decoding limit) and a bare pipelined async-nats publish of as many messages of the same
//!   size (the sink's limit), in the same run (the gateway over TCP on the loopback,
//!   `pg_recvlogical` over the Unix socket: each on its faster one); and the two limits run at
//!   once on the same cores (how much of the machine they leave, not a limit of the goal);
//! - per catch-up, the CPU each of `weir`, `nats-server` and the walsender spent per row (on two
//!   shared cores their sum, not any one limit, is what bounds the rate);
//! - a 1M-row transaction: rate and the gateway's peak memory (VmHWM);
//! - commit → stored latency (p50/p99) at a steady 2k rows/s.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use common::{cpu_seconds, median, range};

use common::pg::{Capture, connect, wait_ready};
use common::services::{Gateway, Nats};
use std::future::IntoFuture;
use std::process::Command;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BACKLOG: i64 = 100_000;

async fn stream_count(nats: &Nats) -> u64 {
    let js = async_nats::jetstream::new(nats.client().await);
    match js.get_stream("WEIR").await {
        Ok(mut stream) => stream.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Seconds between the first and the last message of the stream, by JetStream's own store
/// timestamps: the slot → PubAck rate without the gateway's start-up.
async fn stored_span(nats: &Nats) -> f64 {
    let js = async_nats::jetstream::new(nats.client().await);
    let mut stream = js.get_stream("WEIR").await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let first = stream.get_raw_message(state.first_sequence).await.unwrap();
    let last = stream.get_raw_message(state.last_sequence).await.unwrap();
    (last.time - first.time).as_seconds_f64()
}

/// Payload bytes of the stream's first message.
async fn first_message_size(nats: &Nats) -> usize {
    let js = async_nats::jetstream::new(nats.client().await);
    let mut stream = js.get_stream("WEIR").await.unwrap();
    let first = stream.info().await.unwrap().state.first_sequence;
    stream.get_raw_message(first).await.unwrap().payload.len()
}

/// The walsender serving the gateway's slot.
async fn walsender_pid(slot: &str) -> Option<u32> {
    let row = connect()
        .await
        .query_opt("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active", &[&slot])
        .await
        .ok()??;
    row.get::<_, Option<i32>>(0).and_then(|pid| u32::try_from(pid).ok())
}

/// CPU microseconds per row of each process during a catch-up, from the first row stored to
/// the last (the gateway's start-up excluded).
#[derive(Default)]
struct CpuPerRow {
    weir: f64,
    nats: f64,
    walsender: f64,
    /// Percent of the machine's CPU time left idle meanwhile: pauses between the three
    /// processes' work (a pipeline bubble) show here, not in their CPU per row.
    idle_percent: f64,
}

/// The machine's (busy, idle) CPU ticks since boot, from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal …
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (ticks.iter().take(8).sum::<u64>() - idle, idle)
}

/// Seconds from the gateway's start until the stream holds `target` messages, and the CPU each
/// process spent per row meanwhile.
async fn catch_up(nats: &Nats, config: &str, slot: &str, target: u64) -> (f64, Gateway, CpuPerRow) {
    let started = Instant::now();
    let gateway = Gateway::start(config);
    let nats_pid = nats.pid().unwrap_or(0);
    // At the first row stored: rows, CPU seconds of weir, nats-server and the walsender, the
    // walsender's pid, the machine's ticks.
    struct Mark {
        count: u64,
        weir: f64,
        nats: f64,
        walsender: f64,
        walsender_pid: Option<u32>,
        ticks: (u64, u64),
    }
    let mut first: Option<Mark> = None;
    loop {
        let count = stream_count(nats).await;
        if first.is_none() && count > 0 {
            let walsender_pid = walsender_pid(slot).await;
            first = Some(Mark {
                count,
                weir: cpu_seconds(gateway.pid()),
                nats: cpu_seconds(nats_pid),
                walsender: walsender_pid.map_or(0.0, cpu_seconds),
                walsender_pid,
                ticks: machine_ticks(),
            });
        }
        if count >= target {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "catch-up stalled\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = match first {
        Some(mark) if mark.count < target => {
            let rows = (target - mark.count) as f64 / 1e6;
            let (busy_now, idle_now) = machine_ticks();
            let busy = busy_now.saturating_sub(mark.ticks.0) as f64;
            let idle = idle_now.saturating_sub(mark.ticks.1) as f64;
            CpuPerRow {
                idle_percent: if busy + idle > 0.0 { 100.0 * idle / (busy + idle) } else { 0.0 },
                weir: (cpu_seconds(gateway.pid()) - mark.weir) / rows,
                nats: (cpu_seconds(nats_pid) - mark.nats) / rows,
                walsender: mark.walsender_pid.map_or(0.0, |pid| (cpu_seconds(pid) - mark.walsender) / rows),
            }
        }
        _ => CpuPerRow::default(),
    };
    (seconds, gateway, cpu)
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// `pg_recvlogical` reading from a second slot created at the same point as weir's, up to the
/// current WAL end; rows per second over `rows`.
async fn recvlogical(slot: &str, publication: &str, end_lsn: &str, rows: i64) -> f64 {
    let started = Instant::now();
    let mut command = Command::new("pg_recvlogical");
    command.args(["-h", "/var/run/postgresql", "-d", "test", "--slot", slot, "--start", "--endpos", end_lsn]).args([
        "-o",
        "proto_version=1",
        "-o",
        &format!("publication_names={publication}"),
        "-f",
        "/dev/null",
    ]);
    // On a blocking thread: it may run beside a publish on this runtime.
    let status = tokio::task::spawn_blocking(move || command.status().expect("pg_recvlogical runs")).await.unwrap();
    assert!(status.success());
    rows as f64 / started.elapsed().as_secs_f64()
}

/// The bare publish's ack window: weir's default `[jetstream] max_in_flight`.
const ACK_WINDOW: usize = 4096;

/// A bare pipelined JetStream publish of `count` messages of `size` bytes (ack window as weir's).
/// With `weir_headers`, each message also carries the six other headers `weir` sets on a row
/// change (`Weir-Source`, `-Entity`, `-Op`, `-Position`, `-Key`, `Content-Type`). Returns
/// messages/s and nats-server's CPU µs per message.
async fn bare_publish(nats: &Nats, count: i64, size: usize, weir_headers: bool, id_prefix: &str) -> (f64, f64) {
    let nats_cpu = cpu_seconds(nats.pid().unwrap_or(0));
    let context = async_nats::jetstream::ContextBuilder::new()
        .max_ack_inflight(ACK_WINDOW)
        .backpressure_on_inflight(true)
        .build(nats.client().await);
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    let mut acks = futures::stream::FuturesUnordered::new();
    for i in 0..count {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{id_prefix}-{i}").as_str());
        if weir_headers {
            headers.insert("Weir-Source", "postgres");
            headers.insert("Weir-Entity", "public.weir_t_bench1_a");
            headers.insert("Weir-Op", "insert");
            headers.insert("Weir-Position", "0/1A2B3C4D");
            headers.insert("Weir-Key", format!("{i}").as_str());
            headers.insert("Content-Type", "application/json");
        }
        acks.push(context.publish_with_headers("bare.x", headers, payload.clone()).await.unwrap().into_future());
        while acks.len() >= ACK_WINDOW {
            use futures::StreamExt;
            acks.next().await.unwrap().unwrap();
        }
    }
    use futures::StreamExt;
    while let Some(ack) = acks.next().await {
        ack.unwrap();
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    (rate, (cpu_seconds(nats.pid().unwrap_or(0)) - nats_cpu) * 1e6 / count as f64)
}

static GATEWAY_POSTGRES_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Picks the gateway's connection: TCP on the loopback, as to a database on another host. Over
/// the Unix socket the gateway's catch-up ran 11–40 % slower (docs/benchmarks.md, fifteenth
/// session); `pg_recvlogical` is the other way round, so it stays on the socket and the decoding
/// limit is its higher figure. `WEIR_BENCH_PG_URL` overrides. A server whose `pg_hba.conf` asks
/// TCP clients for a password (Debian's default) gets the tests' url instead, and the table says so.
async fn choose_gateway_postgres_url() {
    let tcp = std::env::var("WEIR_BENCH_PG_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 user=root dbname=test sslmode=disable".into());
    let url = match tokio_postgres::connect(&tcp, tokio_postgres::NoTls).await {
        Ok(_) => tcp,
        Err(error) => {
            let fallback = common::pg::postgres_url();
            eprintln!("cannot connect with `{tcp}` ({error}); the gateway uses `{fallback}`");
            fallback
        }
    };
    GATEWAY_POSTGRES_URL.get_or_init(|| url);
}

fn gateway_postgres_url() -> String {
    GATEWAY_POSTGRES_URL.get().cloned().unwrap_or_else(common::pg::postgres_url)
}

fn bench_config(capture: &Capture, nats: &Nats) -> String {
    let extra = std::env::var("WEIR_BENCH_PG_EXTRA").unwrap_or_default().replace("\\n", "\n");
    // `WEIR_BENCH_JS_EXTRA`: lines for `[jetstream]` (`max_in_flight`, …).
    let jetstream = std::env::var("WEIR_BENCH_JS_EXTRA").unwrap_or_default().replace("\\n", "\n");
    let url = format!("url = \"{}\"", gateway_postgres_url());
    let config = capture
        .config(nats, &extra)
        .replace(&format!("url = \"{}\"", common::pg::postgres_url()), &url)
        .replace("subjects = [\"weir.>\"]", &format!("subjects = [\"weir.>\", \"bare.>\"]\n{jetstream}"));
    assert!(config.contains(&url), "the gateway's PostgreSQL url was not replaced:\n{config}");
    config
}

/// Writes `rows` rows in transactions of `per_txn` rows (asynchronous commit: the backlog's
/// write speed is not what is measured).
async fn write_backlog(table: &str, per_txn: i64, rows: i64) {
    let client = connect().await;
    // Separate statements: a DO block may COMMIT only outside an implicit transaction.
    client.batch_execute("SET synchronous_commit = off").await.unwrap();
    client
        .batch_execute(&format!(
            "DO $$ BEGIN FOR t IN 0..{txns} - 1 LOOP
               INSERT INTO {table} SELECT g, g, 'order ' || g, now()
                 FROM generate_series(t * {per_txn} + 1, (t + 1) * {per_txn}) g;
               COMMIT;
             END LOOP; END $$;",
            txns = rows / per_txn
        ))
        .await
        .unwrap();
}

async fn current_lsn() -> String {
    connect().await.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0)
}

struct Row {
    path: String,
    rows_per_second: f64,
    note: String,
}

/// Catch-up rounds per transaction size. This machine's run-to-run noise is ±30 %, so each
/// path is measured this many times, interleaved, and compared by its median.
const ROUNDS: usize = 3;

/// For profiling: one catch-up of `rows` rows in transactions of `per_txn`, the pids printed so
/// `perf record -p` can attach (the backlog is large enough to outlast attaching).
async fn soak(rows: i64, per_txn: i64) {
    let columns = "id bigint PRIMARY KEY, n bigint, note text, at timestamptz";
    let capture = Capture::new("bench_soak", &[("a", columns)]).await;
    let nats = Nats::start();
    let config = bench_config(&capture, &nats);
    let gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    drop(gateway);
    write_backlog(&capture.table("a"), per_txn, rows).await;
    eprintln!("backlog written; starting the gateway (PostgreSQL: `{}`)", gateway_postgres_url());
    eprintln!("soak: nats-server pid {} (weir: `pgrep -n weir`)", nats.pid().unwrap_or(0));
    let started = Instant::now();
    let (seconds, gateway, cpu) = catch_up(&nats, &config, &capture.name, rows as u64).await;
    drop(gateway);
    eprintln!(
        "{rows} rows in {seconds:.1} s ({:.0} rows/s since start; first-to-last {:.0}); CPU µs per row: weir {:.1}, nats-server {:.1}, walsender {:.1}; machine idle {:.0} %",
        rows as f64 / started.elapsed().as_secs_f64(),
        (rows - 1) as f64 / stored_span(&nats).await,
        cpu.weir,
        cpu.nats,
        cpu.walsender,
        cpu.idle_percent
    );
    capture.cleanup().await;
}

#[tokio::main]
async fn main() {
    choose_gateway_postgres_url().await;
    if let Ok(rows) = std::env::var("WEIR_BENCH_PG_SOAK") {
        let per_txn = std::env::var("WEIR_BENCH_PG_TXN").map_or(1, |n| n.parse().unwrap());
        return soak(rows.parse().unwrap(), per_txn).await;
    }
    let columns = "id bigint PRIMARY KEY, n bigint, note text, at timestamptz";
    let mut table = Vec::new();
    for per_txn in [1i64, 100] {
        let capture = Capture::new(&format!("bench{per_txn}"), &[("a", columns)]).await;
        let name = capture.table("a");
        let client = connect().await;
        client.batch_execute(&format!("CREATE PUBLICATION {} FOR TABLE {name}", capture.name)).await.unwrap();
        // One slot per round for weir and one for pg_recvlogical, all at the same point, then
        // the backlog: every round reads exactly the same changes.
        let slot = |kind: &str, round: usize| format!("{}_{kind}{round}", capture.name);
        let drop_leftover = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1";
        for round in 0..ROUNDS {
            for kind in ["w", "r", "c"] {
                client.execute(drop_leftover, &[&slot(kind, round)]).await.unwrap();
                client
                    .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot(kind, round)])
                    .await
                    .unwrap();
            }
        }
        write_backlog(&name, per_txn, BACKLOG).await;
        let end = current_lsn().await;
        let (mut decode, mut weir, mut with_start_up, mut bare) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut cpus: Vec<CpuPerRow> = Vec::new();
        let (mut bare_nats_cpu, mut bare_headers, mut bare_headers_nats_cpu) = (Vec::new(), Vec::new(), Vec::new());
        let mut together = Vec::new();
        let mut size = 300;
        for round in 0..ROUNDS {
            decode.push(recvlogical(&slot("r", round), &capture.name, &end, BACKLOG).await);
            let nats = Nats::start();
            let config = bench_config(&capture, &nats)
                .replace(&format!("slot = \"{}\"", capture.name), &format!("slot = \"{}\"", slot("w", round)));
            let (seconds, gateway, cpu) = catch_up(&nats, &config, &slot("w", round), BACKLOG as u64).await;
            cpus.push(cpu);
            with_start_up.push(BACKLOG as f64 / seconds);
            weir.push((BACKLOG - 1) as f64 / stored_span(&nats).await);
            size = first_message_size(&nats).await;
            drop(gateway);
            let (rate, nats_cpu) = bare_publish(&nats, BACKLOG, size, false, "bare").await;
            bare.push(rate);
            bare_nats_cpu.push(nats_cpu);
            let (rate, nats_cpu) = bare_publish(&nats, BACKLOG, size, true, "headers").await;
            bare_headers.push(rate);
            bare_headers_nats_cpu.push(nats_cpu);
            // Both limits at once on the same two cores: about what a client costing no more CPU
            // than these two tools, and doing no work per row, could reach here (generous: the
            // slower one runs alone once the other is done). Not a limit of the goal, which takes
            // each alone; it shows how much of the machine the two leave.
            let together_slot = slot("c", round);
            let (decoded, (published, _)) = tokio::join!(
                recvlogical(&together_slot, &capture.name, &end, BACKLOG),
                bare_publish(&nats, BACKLOG, size, false, "together")
            );
            together.push(decoded.min(published));
        }
        for round in 0..ROUNDS {
            for kind in ["w", "r", "c"] {
                let _ = client.execute(drop_leftover, &[&slot(kind, round)]).await;
            }
        }
        let ranges = (range(&decode), range(&bare), range(&weir));
        let per_row = |pick: fn(&CpuPerRow) -> f64| median(&mut cpus.iter().map(pick).collect::<Vec<_>>());
        let cpu_note = format!(
            "CPU per row (median): weir {:.1} µs, nats-server {:.1} µs, walsender {:.1} µs; machine idle {:.0} %",
            per_row(|c| c.weir),
            per_row(|c| c.nats),
            per_row(|c| c.walsender),
            per_row(|c| c.idle_percent)
        );
        let (decode, bare, weir, with_start_up) =
            (median(&mut decode), median(&mut bare), median(&mut weir), median(&mut with_start_up));
        let limit = decode.min(bare);
        table.push(Row {
            path: format!("pg_recvlogical → /dev/null, {per_txn}-row txns"),
            rows_per_second: decode,
            note: format!("server decode limit; rounds {}", ranges.0),
        });
        table.push(Row {
            path: format!("bare async-nats publish, {size} B messages"),
            rows_per_second: bare,
            note: format!(
                "sink limit; rounds {}; nats-server {:.1} µs per message",
                ranges.1,
                median(&mut bare_nats_cpu)
            ),
        });
        table.push(Row {
            path: format!("bare async-nats publish, {size} B messages with weir's 7 headers"),
            rows_per_second: median(&mut bare_headers),
            note: format!(
                "not a limit of the goal; nats-server {:.1} µs per message",
                median(&mut bare_headers_nats_cpu)
            ),
        });
        let together_range = range(&together);
        let together = median(&mut together);
        table.push(Row {
            path: format!("`pg_recvlogical` and the bare publish at once, {per_txn}-row txns"),
            rows_per_second: together,
            note: format!(
                "the slower of the two, each doing the whole backlog at the same time; {:.2}× the lower limit; rounds {together_range}",
                together / limit
            ),
        });
        table.push(Row {
            path: format!("weir slot → JetStream, {per_txn}-row txns"),
            rows_per_second: weir,
            note: format!(
                "**{:.2}× the lower limit** (first to last stored; rounds {}; {with_start_up:.0} rows/s counting the gateway's start-up); {cpu_note}",
                weir / limit,
                ranges.2
            ),
        });
        capture.cleanup().await;
    }

    // One transaction of a million rows: rate and the gateway's peak memory.
    let capture = Capture::new("bench_big", &[("a", columns)]).await;
    let nats = Nats::start();
    let config = bench_config(&capture, &nats);
    let gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    drop(gateway);
    connect()
        .await
        .batch_execute(&format!(
            "INSERT INTO {} SELECT g, g, 'order ' || g, now() FROM generate_series(1, 1000000) g",
            capture.table("a")
        ))
        .await
        .unwrap();
    let (seconds, gateway, _) = catch_up(&nats, &config, &capture.name, 1_000_000).await;
    let rss = peak_rss_mib(gateway.pid());
    table.push(Row {
        path: "weir slot → JetStream, one 1M-row txn".into(),
        rows_per_second: 1_000_000.0 / seconds,
        note: format!("gateway peak RSS {rss:.0} MiB"),
    });
    drop(gateway);
    capture.cleanup().await;

    // Commit → stored latency at a steady 2k rows/s: 10-row transactions every 5 ms, each row
    // carrying its commit time; a subscriber sees each message as the server stores it.
    let capture = Capture::new("bench_latency", &[("a", columns)]).await;
    let nats = Nats::start();
    let gateway = Gateway::start(&bench_config(&capture, &nats));
    wait_ready(&gateway).await;
    let mut subscriber = nats.client().await.subscribe(format!("weir.public.{}.>", capture.table("a"))).await.unwrap();
    let name = capture.table("a");
    let writer = tokio::spawn(async move {
        let client = connect().await;
        let mut next = Instant::now();
        for t in 0..1000i64 {
            client
                .batch_execute(&format!(
                    "INSERT INTO {name} SELECT g, g, '', now() FROM generate_series({} , {}) g",
                    t * 10 + 1,
                    t * 10 + 10
                ))
                .await
                .unwrap();
            next += Duration::from_millis(5);
            tokio::time::sleep_until(next.into()).await;
        }
    });
    let mut latencies = Vec::new();
    use futures::StreamExt;
    while latencies.len() < 10_000 {
        let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(30), subscriber.next()).await else { break };
        let received = std::time::SystemTime::now();
        let envelope: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        let committed = humantime::parse_rfc3339(envelope["time"].as_str().unwrap()).unwrap();
        latencies.push(received.duration_since(committed).unwrap_or_default().as_secs_f64() * 1000.0);
    }
    writer.await.unwrap();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    drop(gateway);
    capture.cleanup().await;

    println!(
        "backlog: {BACKLOG} rows (id, n, note, timestamptz); default max_batch and linger; catch-up: median of {ROUNDS} interleaved rounds; the gateway connects with `{}`\n",
        gateway_postgres_url()
    );
    println!("| path | rows/s | note |");
    println!("|---|---:|---|");
    for row in &table {
        println!("| {} | {:.0} | {} |", row.path, row.rows_per_second, row.note);
    }
    println!(
        "\ncommit → stored latency at 2k rows/s (10-row txns every 5 ms, {} rows): p50 {:.1} ms, p99 {:.1} ms",
        latencies.len(),
        at(0.5),
        at(0.99)
    );
}
