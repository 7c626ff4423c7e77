//! `cargo xtask instructions [batch]`: the user-space instructions `weir` spends per event, sent
//! as single-event HTTP requests or (with `batch`) as NDJSON batches of 1000, counted by
//! valgrind's callgrind. Unlike the HTTP bench's events per second, the count
//! does not move with how loaded or throttled the machine is, so two builds can be compared on a
//! noisy machine (docs/benchmarks.md).

use anyhow::{Context, bail};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The HTTP bench's event.
const BODY: &str = r#"{"id":123456,"status":"paid","total":129.87,"customer":{"id":42,"name":"Ann Example"}}"#;
/// Lines per NDJSON batch, as in the HTTP bench.
const BATCH_LINES: usize = 1000;

/// How the events reach `weir`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// One event per `POST /v1/events/orders`, over 16 keep-alive connections: enough that
    /// requests are coalesced into batches.
    Single,
    /// `POST /v1/batch` with [`BATCH_LINES`] lines (keys 0–999), over 4 connections as in the
    /// HTTP bench.
    Batch,
}

impl Load {
    fn connections(self) -> usize {
        match self {
            Load::Single => 16,
            Load::Batch => 4,
        }
    }

    /// Events of the short and the long run; their difference leaves out start-up and compilation.
    fn runs(self) -> [usize; 2] {
        match self {
            Load::Single => [1_000, 5_000],
            Load::Batch => [8_000, 40_000],
        }
    }

    /// Events sent before counting starts, so that every connection has been used.
    fn warm_up(self) -> usize {
        match self {
            Load::Single => 200,
            Load::Batch => 4_000,
        }
    }

    /// The request that carries `events` events (a whole batch or one event).
    fn request(self) -> (String, usize) {
        let (path, content_type, body, events) = match self {
            Load::Single => ("/v1/events/orders", "application/json", BODY.to_string(), 1),
            Load::Batch => {
                let lines: String = (0..BATCH_LINES)
                    .map(|i| format!("{{\"entity\":\"orders\",\"key\":\"{i}\",\"data\":{BODY}}}\n"))
                    .collect();
                ("/v1/batch", "application/x-ndjson", lines, BATCH_LINES)
            }
        };
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: weir\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        (request, events)
    }
}

/// Counts `weir` (a release build at `weir`) under callgrind for each of the load's two runs, with
/// NATS on `nats_port`, and prints the instructions per event. Callgrind's files stay in `out_dir`.
pub fn count(weir: &Path, plugins_dir: &Path, nats_port: u16, out_dir: &Path, load: Load) -> anyhow::Result<()> {
    if !Command::new("valgrind").arg("--version").output().is_ok_and(|o| o.status.success()) {
        bail!("valgrind is needed to count instructions: install it (Debian package `valgrind`)");
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    // Both runs take the plugin from a cache filled beforehand, so neither pays for compiling it
    // and their difference is the events alone.
    let cache_dir = out_dir.join("plugin-cache");
    let config = write_config(out_dir, plugins_dir, nats_port, 0)?;
    let check = Command::new(weir)
        .args(["check", "--config"])
        .arg(&config)
        .env("WEIR_CACHE_DIR", &cache_dir)
        .output()
        .context("cannot run `weir check` to fill the plugin cache")?;
    if !check.status.success() {
        bail!("`weir check` failed before counting:\n{}", String::from_utf8_lossy(&check.stderr));
    }
    let mut counted = Vec::new();
    for events in load.runs() {
        let instructions = count_one(weir, plugins_dir, nats_port, out_dir, load, events)?;
        counted.push((events, instructions));
    }
    let sent = match load {
        Load::Single => "single-event requests, 16 connections",
        Load::Batch => "NDJSON batches of 1000, 4 connections",
    };
    println!("| events ({sent}, no-op route) | weir's user-space instructions |");
    println!("|---:|---:|");
    for (requests, instructions) in &counted {
        println!("| {requests} | {instructions} |");
    }
    let [(short, short_count), (long, long_count)] = [counted[0], counted[1]];
    let per_event = long_count.saturating_sub(short_count) as f64 / (long - short) as f64;
    println!("\ninstructions per event: {per_event:.0}");
    println!(
        "(callgrind's files: {}; `callgrind_annotate --inclusive=yes <file>` shows where they go)",
        out_dir.display()
    );
    Ok(())
}

fn count_one(
    weir: &Path,
    plugins_dir: &Path,
    nats_port: u16,
    out_dir: &Path,
    load: Load,
    requests: usize,
) -> anyhow::Result<u64> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = write_config(out_dir, plugins_dir, nats_port, port)?;
    let log_path = out_dir.join(format!("weir.{requests}.log"));
    let log = std::fs::File::create(&log_path)?;
    eprintln!("xtask: weir under callgrind, {requests} requests (log: {})", log_path.display());
    let child = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out_dir.join(format!("callgrind.{requests}.out")).display()))
        .arg(weir)
        .args(["run", "--config"])
        .arg(&config)
        .env("WEIR_CACHE_DIR", out_dir.join("plugin-cache"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start valgrind")?;
    let mut gateway = Gateway(child);
    wait_ready(&mut gateway.0, port, &log_path)?;
    post_events(port, load, load.warm_up())?;
    post_events(port, load, requests)?;
    let pid = gateway.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().context("cannot stop weir")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while gateway.0.try_wait()?.is_none() {
        if Instant::now() > deadline {
            bail!("weir did not stop within two minutes of SIGTERM; see {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(&log_path)?;
    log.lines()
        .find_map(|line| line.split_once("Collected :").map(|(_, count)| count.trim().to_string()))
        .and_then(|count| count.parse().ok())
        .with_context(|| format!("callgrind reported no instruction count; see {}", log_path.display()))
}

/// Writes the no-op route's config (HTTP on `http_port`) and returns its path.
fn write_config(
    out_dir: &Path,
    plugins_dir: &Path,
    nats_port: u16,
    http_port: u16,
) -> anyhow::Result<std::path::PathBuf> {
    let config = out_dir.join("weir.toml");
    std::fs::write(
        &config,
        format!(
            r#"[nats]
url = "nats://127.0.0.1:{nats_port}"
[jetstream]
stream = "WEIR_INSTRUCTIONS"
subjects = ["instructions.>"]
storage = "memory"
[http]
listen = "127.0.0.1:{http_port}"
[plugins]
dir = "{}"
[plugins.noop]
[[routes]]
plugins = ["noop"]
subject = "instructions.{{entity}}.{{op}}"
"#,
            plugins_dir.display()
        ),
    )?;
    Ok(config)
}

/// Kills a gateway left running by an error.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn wait_ready(child: &mut Child, port: u16, log_path: &Path) -> anyhow::Result<()> {
    // Under valgrind, start-up (and compiling the plugin) takes a minute or more.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("weir exited ({status}) before it was ready; see {}", log_path.display());
        }
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: weir\r\nConnection: close\r\n\r\n");
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("weir was not ready within ten minutes; see {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Posts `total` events over the load's keep-alive connections; every answer must be 202.
fn post_events(port: u16, load: Load, total: usize) -> anyhow::Result<()> {
    let (request, per_request) = load.request();
    let requests = total / per_request;
    let connections = load.connections();
    let senders: Vec<_> = (0..connections)
        .map(|connection| {
            let count = requests / connections + usize::from(connection < requests % connections);
            let request = request.clone();
            std::thread::spawn(move || post_on_one_connection(port, &request, count))
        })
        .collect();
    for sender in senders {
        sender.join().map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
    }
    Ok(())
}

fn post_on_one_connection(port: u16, request: &str, count: usize) -> anyhow::Result<()> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    for _ in 0..count {
        writer.write_all(request.as_bytes())?;
        let mut status = String::new();
        reader.read_line(&mut status)?;
        let mut length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            if header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().context("bad Content-Length in an answer")?;
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        if !status.starts_with("HTTP/1.1 202") {
            bail!("weir answered {} {}", status.trim(), String::from_utf8_lossy(&body));
        }
    }
    Ok(())
}
