//! Tests that change the PostgreSQL server itself, in a test binary of their own (and one at a
//! time) because they would break the other change-capture tests running beside them:
//! - the server restarted while the gateway streams a backlog: the gateway reconnects with
//!   backoff and resumes from the slot; nothing is lost, nothing stored twice;
//! - a slot the server invalidated (`wal_status = lost`) while the gateway was stopped: the
//!   gateway refuses to start instead of silently skipping the changes that are gone;
//! - a network gone silent while the slot is being created (with a snapshot or without), which
//!   waits for a transaction held open (creating any logical slot on the server waits for it
//!   too).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::netns::SilentLink;
use common::pg::{
    Capture, assert_exactly_once_in_order, connect, log_says_after, mixed_load, session_waits, stored, wait_ready,
};
use common::services::{Gateway, Nats};
use std::process::Command;
use std::time::{Duration, Instant};

/// Held by each test: they change server-wide state.
static SERVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn restart_postgres() {
    let clusters = Command::new("pg_lsclusters").arg("--no-header").output().expect("pg_lsclusters runs");
    let listing = String::from_utf8_lossy(&clusters.stdout);
    let fields: Vec<&str> = listing.lines().next().expect("a cluster").split_whitespace().collect();
    let status = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", "-m", "fast", fields[0], fields[1], "restart"])
        .status()
        .expect("pg_ctlcluster runs");
    assert!(status.success(), "PostgreSQL restarts");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_mid_stream_resumes_without_loss() {
    let _server = SERVER.lock().await;
    let capture = Capture::new("pgrestart", &[("a", "id bigint PRIMARY KEY, n bigint")]).await;
    connect().await.batch_execute(&format!("ALTER TABLE {} REPLICA IDENTITY FULL", capture.tables[0])).await.unwrap();
    let nats = Nats::start();
    let gateway = Gateway::start(&capture.config(&nats, ""));
    wait_ready(&gateway).await;
    // A backlog written at full speed, then the server restarted while it streams.
    let mut written = mixed_load(&capture.tables, 5_000, Duration::ZERO, 3).await;
    restart_postgres();
    // More changes after the restart (new ids and sequence numbers: seed and offsets differ).
    let table = &capture.tables[0];
    let client = connect().await;
    for i in 0..200i64 {
        let (id, n) = (1_000_000 + i, 10_000_000 + i);
        client.batch_execute(&format!("INSERT INTO {table} VALUES ({id}, {n})")).await.unwrap();
        written.push(common::pg::Change { table: table.clone(), op: "insert".into(), id, n });
    }
    let messages = stored(&nats, written.len()).await;
    assert_exactly_once_in_order(&written, &messages, &capture.tables);
    assert!(gateway.log().contains("reconnecting"), "the gateway saw the restart:\n{}", gateway.log());
    drop(gateway);
    capture.cleanup().await;
}

/// Puts `max_slot_wal_keep_size` back even when the test fails, so later tests keep their slots.
struct ResetKeepSize;

impl Drop for ResetKeepSize {
    fn drop(&mut self) {
        for sql in ["ALTER SYSTEM RESET max_slot_wal_keep_size", "SELECT pg_reload_conf()"] {
            let _ = Command::new("psql")
                .args(["-h", "/var/run/postgresql", "-U", "root", "-d", "test", "-c", sql])
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_slot_stops_the_gateway_with_how_to_start_over() {
    let _server = SERVER.lock().await;
    let capture = Capture::new("lostslot", &[("a", "id bigint PRIMARY KEY, pad text")]).await;
    let table = &capture.tables[0];
    let nats = Nats::start();
    let config = capture.config(&nats, "");
    let gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    let client = connect().await;
    client.batch_execute(&format!("INSERT INTO {table} VALUES (1, 'one')")).await.unwrap();
    assert_eq!(stored(&nats, 1).await.len(), 1);
    drop(gateway);

    // While the gateway is down, the server may keep only 1 MB of WAL for slots: writing and
    // checkpointing past that invalidates the slot, and the changes in that WAL are gone.
    let reset = ResetKeepSize;
    client.batch_execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'").await.unwrap();
    client.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut status = String::new();
    while status != "lost" {
        client
            .batch_execute(&format!(
                "INSERT INTO {table} SELECT g, repeat('x', 200) FROM generate_series(2, 20000) g
                   ON CONFLICT (id) DO UPDATE SET pad = excluded.pad || '.'"
            ))
            .await
            .unwrap();
        client.batch_execute("SELECT pg_switch_wal()").await.unwrap();
        client.batch_execute("CHECKPOINT").await.unwrap();
        let row = client
            .query_one(
                "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
                &[&capture.name],
            )
            .await
            .unwrap();
        status = row.get(0);
        if Instant::now() > deadline {
            break;
        }
    }
    drop(reset);
    assert_eq!(status, "lost", "the server did not invalidate the slot");

    // (It may stop before it even says it listens.)
    let log = match Gateway::try_start(&config) {
        Ok(mut gateway) => {
            let exit = gateway.wait_exit(Duration::from_secs(30)).expect("the gateway stops by itself");
            assert!(!exit.success(), "a lost slot is a failure exit");
            std::thread::sleep(Duration::from_millis(100));
            gateway.log()
        }
        Err(log) => log,
    };
    assert!(log.contains(&format!("replication slot `{}` is lost", capture.name)), "{log}");
    assert!(log.contains("Drop the slot") && log.contains("nats stream purge"), "says how to start over: {log}");
    assert_eq!(nats.messages("WEIR").await.len(), 1, "nothing after the gap was published");
    capture.cleanup().await;
}

/// Points the server at our own TLS certificate, and back when dropped.
struct ServerCertificate;

impl ServerCertificate {
    async fn install(
        client: &tokio_postgres::Client,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> ServerCertificate {
        client.batch_execute(&format!("ALTER SYSTEM SET ssl_cert_file = '{}'", cert.display())).await.unwrap();
        client.batch_execute(&format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display())).await.unwrap();
        client.batch_execute("ALTER SYSTEM SET ssl = on").await.unwrap();
        client.batch_execute("SELECT pg_reload_conf()").await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        ServerCertificate
    }
}

impl Drop for ServerCertificate {
    fn drop(&mut self) {
        for sql in [
            "ALTER SYSTEM RESET ssl_cert_file",
            "ALTER SYSTEM RESET ssl_key_file",
            "ALTER SYSTEM RESET ssl",
            "SELECT pg_reload_conf()",
        ] {
            let _ = Command::new("psql")
                .args(["-h", "/var/run/postgresql", "-U", "root", "-d", "test", "-c", sql])
                .output();
        }
    }
}

/// A password for role `root` over TCP while a test runs, where the server asks TCP clients for
/// one (Debian's default `pg_hba.conf`) and `root` has none; taken away again on drop. A comment
/// on the role marks it, so one left behind by a killed run is known as ours and replaced.
struct TcpPassword(Option<String>);

const TEMPORARY_PASSWORD: &str = "weir test: temporary password, removed after the TLS test";

impl TcpPassword {
    async fn ensure(client: &tokio_postgres::Client, host: &str) -> TcpPassword {
        let without = format!("host={host} port=5432 user=root dbname=test sslmode=disable");
        if tokio_postgres::connect(&without, tokio_postgres::NoTls).await.is_ok() {
            return TcpPassword(None);
        }
        let row = client
            .query_one(
                "SELECT rolpassword IS NOT NULL, shobj_description(oid, 'pg_authid') FROM pg_authid WHERE rolname = 'root'",
                &[],
            )
            .await
            .unwrap();
        let (has_one, comment): (bool, Option<String>) = (row.get(0), row.get(1));
        assert!(
            !has_one || comment.as_deref() == Some(TEMPORARY_PASSWORD),
            "role root needs a password over TCP and has one of its own, which this test cannot know; give it none, or let TCP clients in without one"
        );
        let mut random = [0u8; 16];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut random).unwrap();
        let password = hex::encode(random);
        client.batch_execute(&format!("COMMENT ON ROLE root IS '{TEMPORARY_PASSWORD}'")).await.unwrap();
        client.batch_execute(&format!("ALTER ROLE root PASSWORD '{password}'")).await.unwrap();
        TcpPassword(Some(password))
    }

    /// ` password=…` for a connection string, or nothing.
    fn param(&self) -> String {
        self.0.as_ref().map(|password| format!(" password={password}")).unwrap_or_default()
    }
}

impl Drop for TcpPassword {
    fn drop(&mut self) {
        if self.0.is_none() {
            return;
        }
        for sql in ["ALTER ROLE root PASSWORD NULL", "COMMENT ON ROLE root IS NULL"] {
            let done = Command::new("psql")
                .args(["-h", "/var/run/postgresql", "-U", "root", "-d", "test", "-c", sql])
                .output()
                .is_ok_and(|output| output.status.success());
            if !done {
                eprintln!("could not run `{sql}`: role root may keep a temporary password (the next run replaces it)");
            }
        }
    }
}

/// A CA and a server certificate for localhost signed by it (PEM files), readable by the
/// server's `postgres` user.
fn server_pki(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use std::os::unix::fs::PermissionsExt;
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "weir test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let paths = (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&paths.2, std::fs::Permissions::from_mode(0o600)).unwrap();
    for file in [&paths.1, &paths.2] {
        assert!(Command::new("chown").arg("postgres:postgres").arg(file).status().unwrap().success());
    }
    paths
}

fn weir_check(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.toml");
    std::fs::write(&path, config.replace("{plugins}", &common::plugins_dir().display().to_string())).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_weir")).args(["check", "--config"]).arg(&path).output().unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn change_capture_over_verified_tls() {
    let _server = SERVER.lock().await;
    let pki_dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = server_pki(pki_dir.path());
    let stranger_dir = tempfile::tempdir().unwrap();
    let (stranger_ca, _, _) = server_pki(stranger_dir.path());
    let client = connect().await;
    let installed = ServerCertificate::install(&client, &cert, &key).await;
    let password = TcpPassword::ensure(&client, "localhost").await;

    let capture = Capture::new("tls", &[("a", "id bigint PRIMARY KEY")]).await;
    let table = &capture.tables[0];
    let nats = Nats::start();
    let over_tcp = |tls: &str| {
        capture.config(&nats, tls).replace(
            &format!("url = \"{}\"", common::pg::postgres_url()),
            &format!("url = \"host=localhost port=5432 user=root dbname=test{}\"", password.param()),
        )
    };
    let verified = over_tcp(&format!("tls = \"verify-full\"\ntls_ca_file = \"{}\"", ca.display()));
    let gateway = Gateway::start(&verified);
    wait_ready(&gateway).await;
    client.batch_execute(&format!("INSERT INTO {table} VALUES (1)")).await.unwrap();
    assert_eq!(stored(&nats, 1).await.len(), 1, "{}", gateway.log());
    let encrypted: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'weir' AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(encrypted, 1, "the replication connection is encrypted");
    drop(gateway);

    // A certificate from an authority the gateway does not trust is refused, with the reason.
    let (ok, output) =
        weir_check(&over_tcp(&format!("tls = \"verify-full\"\ntls_ca_file = \"{}\"", stranger_ca.display())));
    assert!(!ok && output.contains("TLS handshake with PostgreSQL at localhost:5432 failed"), "{output}");
    assert!(output.contains("invalid peer certificate"), "{output}");
    // `require` encrypts without checking the certificate, as libpq does.
    let (ok, output) = weir_check(&over_tcp("tls = \"require\""));
    assert!(ok, "{output}");
    drop(installed);
    capture.cleanup().await;
}

/// Waits until a session matching `creating` (SQL over `pg_stat_activity`) runs, then cuts the
/// link: the gateway must notice (TCP keepalive) and, once the link is back, end the creation the
/// server still runs (it never heard of the cut) rather than stop on a slot "in use by another
/// process".
async fn cut_while_creating_the_slot(link: &SilentLink, gateway: &Gateway, creating: &str) {
    session_waits(creating, gateway).await;
    let before = gateway.log().len();
    link.cut();
    // Without keepalives the gateway would wait for the slot for hours.
    log_says_after(gateway, before, "PostgreSQL replication interrupted").await;
    link.mend();
    log_says_after(gateway, before, "left behind").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_creation_waiting_for_a_transaction_notices_a_silent_network_and_is_taken_again() {
    let _server = SERVER.lock().await;
    let capture = Capture::new("silentslot", &[("a", "id bigint PRIMARY KEY, n bigint")]).await;
    let table = capture.table("a");
    let client = connect().await;
    client.batch_execute(&format!("INSERT INTO {table} SELECT g, g FROM generate_series(1, 500) g")).await.unwrap();
    // Creating the slot waits for this transaction (it has written, so it has an id).
    let writer = connect().await;
    writer.batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1000, 1000)")).await.unwrap();
    let nats = Nats::start();
    let link = SilentLink::new();
    let port = link.proxy(None).await;
    let config = capture.config(&nats, "snapshot = true").replace(&common::pg::postgres_url(), &link.url(port));
    let mut gateway = Gateway::start(&config);
    let creating = "application_name LIKE 'weir-snapshot-%' AND state = 'active' \
                    AND query LIKE 'CREATE_REPLICATION_SLOT \"weir_t_silentslot\"%'";
    cut_while_creating_the_slot(&link, &gateway, creating).await;
    writer.batch_execute("COMMIT").await.unwrap();
    let messages = stored(&nats, 501).await;
    let ids: std::collections::BTreeSet<i64> =
        messages.iter().map(|(_, _, envelope)| envelope["data"]["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, (1..=500).chain([1000]).collect(), "{}", gateway.log());
    assert_eq!(messages.len(), 501, "each row once");
    assert!(gateway.wait_exit(Duration::from_millis(200)).is_none(), "the gateway kept running:\n{}", gateway.log());
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_creation_without_snapshot_cut_off_by_a_silent_network_is_ended_and_made_again() {
    let _server = SERVER.lock().await;
    let capture = Capture::new("silentmake", &[("a", "id bigint PRIMARY KEY, n bigint")]).await;
    let table = capture.table("a");
    let writer = connect().await;
    writer.batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1, 1)")).await.unwrap();
    let nats = Nats::start();
    let link = SilentLink::new();
    let port = link.proxy(None).await;
    let config = capture.config(&nats, "").replace(&common::pg::postgres_url(), &link.url(port));
    let mut gateway = Gateway::start(&config);
    let creating = "application_name LIKE 'weir-slot-%' AND state = 'active' AND query LIKE '%pg_create_logical_replication_slot%'";
    cut_while_creating_the_slot(&link, &gateway, creating).await;
    writer.batch_execute("COMMIT").await.unwrap();
    wait_ready(&gateway).await;
    connect().await.batch_execute(&format!("INSERT INTO {table} VALUES (2, 2)")).await.unwrap();
    let messages = stored(&nats, 1).await;
    let ids: Vec<i64> = messages.iter().map(|(_, _, envelope)| envelope["data"]["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [2], "changes from the slot's start on:\n{}", gateway.log());
    assert!(gateway.wait_exit(Duration::from_millis(200)).is_none(), "the gateway kept running:\n{}", gateway.log());
    drop(gateway);
    capture.cleanup().await;
}
