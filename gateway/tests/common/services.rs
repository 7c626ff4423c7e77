//! Real services for end-to-end tests: a private `nats-server` per test (so a test can stop and
//! restart it without disturbing others) and the real `weir` binary with a temporary config.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn nats_binary() -> PathBuf {
    for candidate in ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    "nats-server".into()
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A private JetStream-enabled NATS server on a free port, storing in a temp dir.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    /// How the test's own client connects, when the server needs more than token or user/password.
    client_options: Option<Arc<dyn Fn() -> async_nats::ConnectOptions + Send + Sync>>,
    /// Holds a config file the server reads (on restarts too).
    config_dir: Option<tempfile::TempDir>,
}

impl Nats {
    pub fn start() -> Nats {
        Nats::start_with(&[])
    }

    /// With extra `nats-server` arguments, e.g. `["--auth", "secret"]`.
    pub fn start_with(extra: &[&str]) -> Nats {
        let mut nats = Nats {
            child: None,
            // Chosen by the server itself (see `spawn`): a port picked here could be taken by
            // another test's server before this one binds it.
            port: 0,
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|a| a.to_string()).collect(),
            client_options: None,
            config_dir: None,
        };
        nats.spawn();
        nats
    }

    /// Starts the server: on a port of its choosing the first time (read back from its ports
    /// file), on the same port after a restart, so clients reconnect to it.
    fn spawn(&mut self) {
        let port = if self.port == 0 { "-1".to_string() } else { self.port.to_string() };
        let child = Command::new(nats_binary())
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
            .arg(self.dir.path())
            .arg("--ports_file_dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server runs (cargo xtask test installs it)");
        let ports_file = self.dir.path().join(format!("nats-server_{}.ports", child.id()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let listening = loop {
            // {"nats":["nats://127.0.0.1:PORT"]}, written once the server listens.
            let port = std::fs::read_to_string(&ports_file).ok().and_then(|ports| {
                let ports: serde_json::Value = serde_json::from_str(&ports).ok()?;
                ports["nats"][0].as_str()?.rsplit(':').next()?.parse::<u16>().ok()
            });
            if let Some(port) = port {
                break port;
            }
            assert!(Instant::now() < deadline, "nats-server did not start (no {})", ports_file.display());
            std::thread::sleep(Duration::from_millis(20));
        };
        self.port = listening;
        assert!(wait_for_port(self.port, Duration::from_secs(10)), "nats-server listens on {}", self.port);
    }

    /// A server that accepts messages of at most `bytes` (headers and payload).
    pub fn start_with_max_payload(bytes: usize) -> Nats {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nats.conf");
        std::fs::write(&file, format!("max_payload: {bytes}\n")).unwrap();
        let mut nats = Nats::start_with(&["-c", file.to_str().unwrap()]);
        nats.config_dir = Some(dir);
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Sets how [`Nats::client`] connects (nkey, creds, TLS).
    pub fn with_client_options(
        mut self,
        options: impl Fn() -> async_nats::ConnectOptions + Send + Sync + 'static,
    ) -> Nats {
        self.client_options = Some(Arc::new(options));
        self
    }

    pub async fn client(&self) -> async_nats::Client {
        if let Some(options) = &self.client_options {
            return options().connect(self.url()).await.unwrap();
        }
        let arg = |flag: &str| self.extra.iter().position(|a| a == flag).map(|i| self.extra[i + 1].clone());
        match (arg("--auth"), arg("--user"), arg("--pass")) {
            (Some(token), ..) => async_nats::ConnectOptions::with_token(token).connect(self.url()).await.unwrap(),
            (None, Some(user), Some(pass)) => {
                async_nats::ConnectOptions::with_user_and_password(user, pass).connect(self.url()).await.unwrap()
            }
            _ => async_nats::connect(self.url()).await.unwrap(),
        }
    }

    /// Every message in `stream`, in sequence order.
    pub async fn messages(&self, stream: &str) -> Vec<async_nats::jetstream::message::StreamMessage> {
        use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
        use futures::StreamExt;
        let context = async_nats::jetstream::new(self.client().await);
        let mut stream = context.get_stream(stream).await.unwrap();
        let state = stream.info().await.unwrap().state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return out;
        }
        // One consumer reading in batches: a request per message took seconds once a test's
        // stream held tens of thousands.
        let config = pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            // One server's reader: in a cluster that has lost a server, a replicated consumer
            // can take longer to place than a request waits.
            num_replicas: 1,
            memory_storage: true,
            ..Default::default()
        };
        // A cluster that has just lost a server can fail to place a consumer for a while (seen
        // for over 30 s on a loaded machine); then the messages are read one request each.
        let deadline = Instant::now() + Duration::from_secs(10);
        let consumer = loop {
            match stream.create_consumer(config.clone()).await {
                Ok(consumer) => break consumer,
                Err(_) if Instant::now() < deadline => continue,
                Err(_) => return Nats::messages_one_by_one(&stream, state.last_sequence).await,
            }
        };
        let mut last = 0;
        while last < state.last_sequence {
            let mut batch =
                consumer.fetch().max_messages(1000).expires(Duration::from_millis(500)).messages().await.unwrap();
            let mut fetched = 0;
            while let Some(message) = batch.next().await {
                let message = message.unwrap();
                let info = message.info().unwrap();
                let (sequence, time) = (info.stream_sequence, info.published);
                fetched += 1;
                last = sequence;
                // What the stream held when asked; later messages are left out, as before.
                if sequence <= state.last_sequence {
                    out.push(async_nats::jetstream::message::StreamMessage {
                        subject: message.subject.clone(),
                        sequence,
                        headers: message.headers.clone().unwrap_or_default(),
                        payload: message.payload.clone(),
                        time,
                    });
                }
            }
            if fetched == 0 {
                break;
            }
        }
        let name = consumer.cached_info().name.clone();
        let _ = stream.delete_consumer(&name).await;
        out
    }

    async fn messages_one_by_one(
        stream: &async_nats::jetstream::stream::Stream,
        last_sequence: u64,
    ) -> Vec<async_nats::jetstream::message::StreamMessage> {
        let mut out = Vec::new();
        for sequence in 1..=last_sequence {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match stream.get_raw_message(sequence).await {
                    Ok(message) => {
                        out.push(message);
                        break;
                    }
                    // A gap (a deleted message) is not an error of the read.
                    Err(error)
                        if error.kind() == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                    {
                        break;
                    }
                    Err(error) => assert!(Instant::now() < deadline, "cannot read message {sequence}: {error}"),
                }
            }
        }
        out
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Three JetStream servers clustered over routes, each a [`Nats`] of its own.
pub struct NatsCluster {
    pub nodes: Vec<Nats>,
}

impl NatsCluster {
    /// Starts three servers `n1`–`n3`.
    pub async fn start() -> NatsCluster {
        // Route ports must be known to every node's config up front; client ports are the
        // servers' own choice. A route port taken meanwhile shows as a cluster that never forms.
        let route_ports: Vec<u16> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect::<Vec<_>>()
            .iter()
            .map(|listener| listener.local_addr().unwrap().port())
            .collect();
        let routes: Vec<String> = route_ports.iter().map(|port| format!("\"nats-route://127.0.0.1:{port}\"")).collect();
        let nodes = route_ports
            .iter()
            .enumerate()
            .map(|(index, port)| {
                let dir = tempfile::tempdir().unwrap();
                let file = dir.path().join("node.conf");
                std::fs::write(
                    &file,
                    format!(
                        "server_name: n{}\ncluster {{ name: weir_test, listen: \"127.0.0.1:{port}\", routes: [{}] }}\n",
                        index + 1,
                        routes.join(", ")
                    ),
                )
                .unwrap();
                let mut node = Nats::start_with(&["-c", file.to_str().unwrap()]);
                node.config_dir = Some(dir);
                node
            })
            .collect();
        NatsCluster { nodes }
    }

    /// Creates a stream kept on all three servers, as [`Capture::config`](super::pg) and the
    /// gateway tests configure it; returns its leader's server name.
    pub async fn create_stream(&self, name: &str, subjects: &[&str], duplicate_window: Duration) -> String {
        let context = async_nats::jetstream::new(self.nodes[0].client().await);
        let config = async_nats::jetstream::stream::Config {
            name: name.to_string(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            duplicate_window,
            num_replicas: 3,
            ..Default::default()
        };
        // Refused until the servers have found each other and elected a metadata leader.
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(error) = context.create_stream(config.clone()).await {
            assert!(Instant::now() < deadline, "the NATS cluster did not create stream {name} in 30 s: {error}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.leader(name).await
    }

    /// The server name of `stream`'s leader, once it has one (at most 30 s).
    pub async fn leader(&self, stream: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for node in self.nodes.iter().filter(|node| node.pid().is_some()) {
                let context = async_nats::jetstream::new(node.client().await);
                if let Ok(mut info) = context.get_stream(stream).await
                    && let Ok(info) = info.info().await
                    && let Some(leader) = info.cluster.as_ref().and_then(|cluster| cluster.leader.clone())
                {
                    return leader;
                }
            }
            assert!(Instant::now() < deadline, "stream {stream} has no leader after 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The node named `name` (`n1`–`n3`).
    pub fn node(&mut self, name: &str) -> &mut Nats {
        let index: usize = name.trim_start_matches('n').parse().unwrap();
        &mut self.nodes[index - 1]
    }

    /// A running node other than `name`.
    pub fn other_than(&self, name: &str) -> &Nats {
        self.nodes
            .iter()
            .enumerate()
            .find(|(index, node)| format!("n{}", index + 1) != name && node.pid().is_some())
            .map(|(_, node)| node)
            .unwrap()
    }
}

/// The real `weir run` with a config written to a temp dir.
#[derive(Debug)]
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts `weir run` with `config` (`{plugins}` is replaced with the plugin directory) and
    /// waits until it listens.
    pub fn start(config: &str) -> Gateway {
        Gateway::try_start(config).unwrap_or_else(|log| panic!("weir did not start:\n{log}"))
    }

    pub fn try_start(config: &str) -> Result<Gateway, String> {
        Gateway::try_start_with_drain(config, "20s")
    }

    /// [`Gateway::start`] with `--drain-timeout drain`.
    pub fn start_with_drain(config: &str, drain: &str) -> Gateway {
        Gateway::try_start_with_drain(config, drain).unwrap_or_else(|log| panic!("weir did not start:\n{log}"))
    }

    fn try_start_with_drain(config: &str, drain: &str) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weir.toml");
        let config = config.replace("{plugins}", &super::plugins_dir().display().to_string());
        std::fs::write(&path, config).unwrap();
        // `WEIR_BENCH_BIN` runs another build (benchmarks compare builds side by side).
        let binary = std::env::var_os("WEIR_BENCH_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_weir").into());
        let mut child = Command::new(binary)
            .args(["run", "--config"])
            .arg(&path)
            .args(["--drain-timeout", drain])
            .env("WEIR_CACHE_DIR", super::cache_dir())
            .env("WEIR_LOG", "info,async_nats=warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (found, wait) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("weir listening on http://").nth(1) {
                    let _ = found.send(rest.trim().to_string());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        match wait.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => Ok(Gateway { child, addr: addr.parse().unwrap(), log, _dir: dir }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                Err(log.lock().unwrap().clone())
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "weir exits after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
