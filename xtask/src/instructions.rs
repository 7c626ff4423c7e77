//! `cargo xtask instructions`: the user-space instructions `weir` spends per single-event HTTP
//! request, counted by valgrind's callgrind. Unlike the HTTP bench's events per second, the count
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
/// Concurrent keep-alive connections: enough that requests are coalesced into batches.
const CONNECTIONS: usize = 16;
/// Requests of the short and the long run; their difference leaves out start-up and compilation.
const RUNS: [usize; 2] = [1_000, 5_000];

/// Counts `weir` (a release build at `weir`) under callgrind for each of [`RUNS`], with NATS on
/// `nats_port`, and prints the instructions per event. Callgrind's files stay in `out_dir`.
pub fn count(weir: &Path, plugins_dir: &Path, nats_port: u16, out_dir: &Path) -> anyhow::Result<()> {
    if !Command::new("valgrind").arg("--version").output().is_ok_and(|o| o.status.success()) {
        bail!("valgrind is needed to count instructions: install it (Debian package `valgrind`)");
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let mut counted = Vec::new();
    for requests in RUNS {
        let instructions = count_one(weir, plugins_dir, nats_port, out_dir, requests)?;
        counted.push((requests, instructions));
    }
    println!("| requests (16 connections, no-op route) | weir's user-space instructions |");
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

fn count_one(weir: &Path, plugins_dir: &Path, nats_port: u16, out_dir: &Path, requests: usize) -> anyhow::Result<u64> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
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
listen = "127.0.0.1:{port}"
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
    let log_path = out_dir.join(format!("weir.{requests}.log"));
    let log = std::fs::File::create(&log_path)?;
    eprintln!("xtask: weir under callgrind, {requests} requests (log: {})", log_path.display());
    let child = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out_dir.join(format!("callgrind.{requests}.out")).display()))
        .arg(weir)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start valgrind")?;
    let mut gateway = Gateway(child);
    wait_ready(&mut gateway.0, port, &log_path)?;
    post_events(port, 200)?;
    post_events(port, requests)?;
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

/// Posts `total` events over [`CONNECTIONS`] keep-alive connections; every answer must be 202.
fn post_events(port: u16, total: usize) -> anyhow::Result<()> {
    let senders: Vec<_> = (0..CONNECTIONS)
        .map(|connection| {
            let count = total / CONNECTIONS + usize::from(connection < total % CONNECTIONS);
            std::thread::spawn(move || post_on_one_connection(port, count))
        })
        .collect();
    for sender in senders {
        sender.join().map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
    }
    Ok(())
}

fn post_on_one_connection(port: u16, count: usize) -> anyhow::Result<()> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let request = format!(
        "POST /v1/events/orders HTTP/1.1\r\nHost: weir\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
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
