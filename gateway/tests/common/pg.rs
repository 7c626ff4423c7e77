//! PostgreSQL helpers for the change-capture tests: a connection to the machine's server, a
//! test's own tables, slot and publication, and waiting for the stream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use super::services::{Gateway, Nats};
use serde_json::Value;
use std::time::{Duration, Instant};

pub fn postgres_url() -> String {
    std::env::var("WEIR_TEST_POSTGRES").unwrap_or_else(|_| "host=/var/run/postgresql user=root dbname=test".into())
}

/// The tests' connection, parsed (key=value pairs or a URI).
pub fn postgres_config() -> tokio_postgres::Config {
    postgres_url().parse().expect("WEIR_TEST_POSTGRES is a valid connection string")
}

/// [`postgres_url`] over TCP to `host`:`port` (a proxy): the same user, database and password.
pub fn postgres_url_at(host: &str, port: u16) -> String {
    let config = postgres_config();
    // libpq quoting: single quotes, with `\` and `'` escaped.
    let quote = |value: &str| format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut url = format!("host={host} port={port}");
    if let Some(user) = config.get_user() {
        url.push_str(&format!(" user={}", quote(user)));
    }
    if let Some(dbname) = config.get_dbname() {
        url.push_str(&format!(" dbname={}", quote(dbname)));
    }
    if let Some(password) = config.get_password() {
        url.push_str(&format!(" password={}", quote(&String::from_utf8_lossy(password))));
    }
    url
}

pub async fn connect() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL answers (cargo xtask test starts it)");
    tokio::spawn(connection);
    client
}

/// A test's own slot, publication and tables, removed when dropped (after the gateway).
pub struct Capture {
    pub name: String,
    pub tables: Vec<String>,
}

impl Capture {
    pub async fn new(test: &str, tables: &[(&str, &str)]) -> Capture {
        // A fixed name per test, so a run cleans up what a failed earlier run left behind.
        let name = format!("weir_t_{test}");
        let capture =
            Capture { name: name.clone(), tables: tables.iter().map(|(t, _)| format!("{name}_{t}")).collect() };
        capture.cleanup().await;
        let client = connect().await;
        for ((_, columns), table) in tables.iter().zip(&capture.tables) {
            client.batch_execute(&format!("CREATE TABLE {table} ({columns})")).await.unwrap();
        }
        capture
    }

    pub fn table(&self, short: &str) -> String {
        format!("{}_{short}", self.name)
    }

    pub fn config(&self, nats: &Nats, extra: &str) -> String {
        let tables: Vec<String> = self.tables.iter().map(|t| format!("\"public.{t}\"")).collect();
        format!(
            r#"
[nats]
url = "{url}"

[jetstream]
stream = "WEIR"
subjects = ["weir.>"]
duplicate_window = "10m"

[http]
listen = "127.0.0.1:0"

[plugins]
dir = "{{plugins}}"

[postgres]
url = "{pg}"
slot = "{name}"
publication = "{name}"
tables = [{tables}]
{extra}
"#,
            url = nats.url(),
            pg = postgres_url(),
            name = self.name,
            tables = tables.join(", ")
        )
    }

    pub async fn cleanup(&self) {
        self.cleanup_slot().await;
        let client = connect().await;
        client.batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", self.name)).await.unwrap();
        for table in &self.tables {
            client.batch_execute(&format!("DROP TABLE IF EXISTS {table}")).await.unwrap();
        }
    }

    /// Drops the slot (waiting for a just-stopped gateway to let go of it).
    pub async fn cleanup_slot(&self) {
        let client = connect().await;
        // The slot may still be held for a moment by a gateway that was just stopped.
        for _ in 0..50 {
            let dropped = client
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.name],
                )
                .await;
            if dropped.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Polls `/readyz` until `wanted` holds of its body (at most 30 s); returns the body. The status
/// must agree: 200 exactly when every part is up.
pub async fn readiness_until(gateway: &Gateway, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = reqwest::get(gateway.url("/readyz")).await.unwrap();
        let status = response.status().as_u16();
        let ready: Value = response.json().await.unwrap();
        if wanted(&ready) {
            let all_up = ["nats", "plugins", "postgres", "postgres_nats"].iter().all(|part| ready[part] == true);
            assert_eq!(status, if all_up { 200 } else { 503 }, "{ready}");
            return ready;
        }
        assert!(Instant::now() < deadline, "/readyz never showed what was awaited: {ready}\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn wait_ready(gateway: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = reqwest::get(gateway.url("/readyz")).await.unwrap().json::<Value>().await.unwrap();
        if ready["postgres"] == true {
            return;
        }
        assert!(Instant::now() < deadline, "replication did not start: {ready}\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The server's current WAL position, as text (`0/1A2B3C4`).
pub async fn current_wal_lsn(client: &tokio_postgres::Client) -> String {
    client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0)
}

/// Whether slot `slot` has been confirmed (its `confirmed_flush_lsn`) at or past `lsn`.
pub async fn slot_confirmed_past(client: &tokio_postgres::Client, slot: &str, lsn: &str) -> bool {
    client
        .query_one(
            "SELECT coalesce(bool_or(confirmed_flush_lsn >= $2::text::pg_lsn), false) \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &lsn],
        )
        .await
        .unwrap()
        .get(0)
}

/// Stream messages as (subject, Nats-Msg-Id, envelope), waiting until `count` are stored.
pub async fn stored(nats: &Nats, count: usize) -> Vec<(String, String, Value)> {
    stored_in(nats, "WEIR", count).await
}

/// [`stored`] from stream `stream`.
pub async fn stored_in(nats: &Nats, stream: &str, count: usize) -> Vec<(String, String, Value)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let messages = nats.messages(stream).await;
        if messages.len() >= count || Instant::now() > deadline {
            return messages
                .iter()
                .map(|m| {
                    let id = m.headers.get("Nats-Msg-Id").map(|v| v.to_string()).unwrap_or_default();
                    (m.subject.to_string(), id, serde_json::from_slice(&m.payload).unwrap_or(Value::Null))
                })
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One committed change as the writer made it: table, op, row id and the row's `n` (the
/// writer's sequence number; for a delete, the `n` of the deleted row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub table: String,
    pub op: String,
    pub id: i64,
    pub n: i64,
}

/// Writes about `changes` row changes over `tables` (each `(id bigint PRIMARY KEY, n bigint)`)
/// in transactions of 1–40 statements — inserts, updates, deletes, multi-row inserts — pausing
/// `pace` between transactions. Returns the committed changes in commit order.
pub async fn mixed_load(tables: &[String], changes: usize, pace: Duration, seed: u64) -> Vec<Change> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let client = connect().await;
    let mut live: Vec<Vec<(i64, i64)>> = vec![Vec::new(); tables.len()];
    let mut next_id = 1i64;
    let mut n = 0i64;
    let mut committed = Vec::new();
    while committed.len() < changes {
        let mut sql = String::from("BEGIN;");
        let mut pending = Vec::new();
        let statements = rng.random_range(1..=40);
        for _ in 0..statements {
            let t = rng.random_range(0..tables.len());
            let table = &tables[t];
            n += 1;
            match rng.random_range(0..10) {
                0..=4 => {
                    sql.push_str(&format!("INSERT INTO {table} VALUES ({next_id}, {n});"));
                    live[t].push((next_id, n));
                    pending.push(Change { table: table.clone(), op: "insert".into(), id: next_id, n });
                    next_id += 1;
                }
                5 => {
                    // A multi-row insert: several rows, one statement.
                    let rows: Vec<String> = (0..5)
                        .map(|i| {
                            let id = next_id + i;
                            let row_n = n * 100 + i;
                            live[t].push((id, row_n));
                            pending.push(Change { table: table.clone(), op: "insert".into(), id, n: row_n });
                            format!("({id}, {row_n})")
                        })
                        .collect();
                    next_id += 5;
                    sql.push_str(&format!("INSERT INTO {table} VALUES {};", rows.join(",")));
                }
                6..=8 if !live[t].is_empty() => {
                    let index = rng.random_range(0..live[t].len());
                    let id = live[t][index].0;
                    live[t][index].1 = n;
                    sql.push_str(&format!("UPDATE {table} SET n = {n} WHERE id = {id};"));
                    pending.push(Change { table: table.clone(), op: "update".into(), id, n });
                }
                _ if !live[t].is_empty() => {
                    let index = rng.random_range(0..live[t].len());
                    let (id, old_n) = live[t].swap_remove(index);
                    sql.push_str(&format!("DELETE FROM {table} WHERE id = {id};"));
                    pending.push(Change { table: table.clone(), op: "delete".into(), id, n: old_n });
                }
                _ => {}
            }
        }
        sql.push_str("COMMIT;");
        client.batch_execute(&sql).await.unwrap();
        committed.extend(pending);
        tokio::time::sleep(pace).await;
    }
    committed
}

/// The stored changes per table, in stream order, as `Change`s read from the envelopes
/// (`old.n` for deletes: the tables use REPLICA IDENTITY FULL).
pub fn changes_in(messages: &[(String, String, Value)]) -> Vec<Change> {
    messages
        .iter()
        .map(|(_, _, envelope)| {
            let entity = envelope["entity"].as_str().unwrap_or_default();
            let row = if envelope["op"] == "delete" { &envelope["old"] } else { &envelope["data"] };
            Change {
                table: entity.split_once('.').map_or(entity, |(_, t)| t).to_string(),
                op: envelope["op"].as_str().unwrap_or_default().to_string(),
                id: row["id"].as_i64().unwrap_or(-1),
                n: row["n"].as_i64().unwrap_or(-1),
            }
        })
        .collect()
}

/// Asserts that the stream holds every committed change exactly once, and per table in commit
/// order.
pub fn assert_exactly_once_in_order(written: &[Change], messages: &[(String, String, Value)], tables: &[String]) {
    let ids: std::collections::HashSet<&str> = messages.iter().map(|(_, id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), messages.len(), "every stored message has its own id");
    let stored = changes_in(messages);
    assert_eq!(stored.len(), written.len(), "every committed change stored exactly once");
    for table in tables {
        let want: Vec<&Change> = written.iter().filter(|c| &c.table == table).collect();
        let have: Vec<&Change> = stored.iter().filter(|c| &c.table == table).collect();
        if let Some(at) = want.iter().zip(&have).position(|(w, h)| w != h) {
            panic!("table {table}: change {at} differs: wrote {:?}, stored {:?}", want[at], have[at]);
        }
        assert_eq!(want.len(), have.len(), "table {table}");
    }
}

/// A connection to where the tests' PostgreSQL listens: its Unix socket (the default url's
/// `host` is a directory) or its TCP address.
pub async fn connect_upstream() -> Box<dyn Upstream> {
    use tokio_postgres::config::Host;
    let config = postgres_config();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    match config.get_hosts().first() {
        Some(Host::Tcp(host)) => Box::new(tokio::net::TcpStream::connect((host.as_str(), port)).await.unwrap()),
        Some(Host::Unix(dir)) => {
            Box::new(tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await.unwrap())
        }
        None => {
            Box::new(tokio::net::UnixStream::connect(format!("/var/run/postgresql/.s.PGSQL.{port}")).await.unwrap())
        }
    }
}

pub trait Upstream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Upstream for T {}

/// Waits (at most 30 s) until a session of the machine's PostgreSQL matches `condition` (SQL
/// over `pg_stat_activity`).
pub async fn session_waits(condition: &str, gateway: &Gateway) {
    let client = connect().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE {condition}");
        if client.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) > 0 {
            return;
        }
        if Instant::now() > deadline {
            let waiting = client
                .query("SELECT query FROM pg_stat_activity WHERE wait_event_type = 'Lock'", &[])
                .await
                .unwrap()
                .iter()
                .map(|row| row.get::<_, String>(0))
                .collect::<Vec<_>>();
            panic!("no session where {condition} (waiting for locks: {waiting:?}):\n{}", gateway.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (at most 30 s) until the part of the gateway's log after `from` bytes holds `text`.
pub async fn log_says_after(gateway: &Gateway, from: usize, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !gateway.log().get(from..).is_some_and(|new| new.contains(text)) {
        assert!(Instant::now() < deadline, "the log never said {text:?} after the cut:\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
