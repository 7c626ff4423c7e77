//! PostgreSQL change capture end to end: the real `weir` binary reading a logical replication
//! slot of the machine's PostgreSQL (`cargo xtask test` makes sure it runs with
//! `wal_level = logical`) into a private JetStream. Each test uses its own tables, slot and
//! publication, and drops them at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::services::{Gateway, Nats};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn postgres_url() -> String {
    std::env::var("WEIR_TEST_POSTGRES").unwrap_or_else(|_| "host=/var/run/postgresql user=root dbname=test".into())
}

async fn connect() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL answers (cargo xtask test starts it)");
    tokio::spawn(connection);
    client
}

/// A test's own slot, publication and tables, removed when dropped (after the gateway).
struct Capture {
    name: String,
    tables: Vec<String>,
}

impl Capture {
    async fn new(test: &str, tables: &[(&str, &str)]) -> Capture {
        let name = format!("weir_t_{test}_{}", std::process::id());
        let capture =
            Capture { name: name.clone(), tables: tables.iter().map(|(t, _)| format!("{name}_{t}")).collect() };
        capture.cleanup().await;
        let client = connect().await;
        for ((_, columns), table) in tables.iter().zip(&capture.tables) {
            client.batch_execute(&format!("CREATE TABLE {table} ({columns})")).await.unwrap();
        }
        capture
    }

    fn table(&self, short: &str) -> String {
        format!("{}_{short}", self.name)
    }

    fn config(&self, nats: &Nats, extra: &str) -> String {
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

    async fn cleanup(&self) {
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
        client.batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", self.name)).await.unwrap();
        for table in &self.tables {
            client.batch_execute(&format!("DROP TABLE IF EXISTS {table}")).await.unwrap();
        }
    }
}

async fn wait_ready(gateway: &Gateway) {
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

/// Stream messages as (subject, Nats-Msg-Id, envelope), waiting until `count` are stored.
async fn stored(nats: &Nats, count: usize) -> Vec<(String, String, Value)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let messages = nats.messages("WEIR").await;
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

#[tokio::test(flavor = "multi_thread")]
async fn row_changes_of_each_type_are_stored_with_their_values() {
    let client = connect().await;
    let _ = client.batch_execute("CREATE TYPE weir_t_mood AS ENUM ('calm', 'busy')").await;
    let capture = Capture::new(
        "types",
        &[(
            "items",
            "id int PRIMARY KEY, flag bool, small int2, big int8, ratio float8, price numeric, doc jsonb, \
             at timestamptz, day date, uid uuid, raw bytea, tags text[], grid int[], note text, mood weir_t_mood",
        )],
    )
    .await;
    let items = capture.table("items");
    let nats = Nats::start();
    let gateway = Gateway::start(&capture.config(&nats, ""));
    wait_ready(&gateway).await;

    client
        .batch_execute(&format!(
            "SET TIME ZONE 'UTC';
             INSERT INTO {items} VALUES (1, true, -3, 9007199254740993, 'NaN', 12345678901234567890.123456789,
               '{{\"a\": [1, 2]}}', '2026-11-23 12:00:00.5+01', '2026-11-23', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
               '\\x4869', '{{\"a b\",NULL}}', '{{{{1,2}},{{3,4}}}}', NULL, 'busy');
             UPDATE {items} SET ratio = 2.5, note = 'x' WHERE id = 1;
             DELETE FROM {items} WHERE id = 1;
             TRUNCATE {items};"
        ))
        .await
        .unwrap();

    let messages = stored(&nats, 4).await;
    let subjects: Vec<&str> = messages.iter().map(|(s, _, _)| s.as_str()).collect();
    let prefix = format!("weir.public.{items}");
    assert_eq!(
        subjects,
        vec![
            format!("{prefix}.insert"),
            format!("{prefix}.update"),
            format!("{prefix}.delete"),
            format!("{prefix}.truncate")
        ],
        "{}",
        gateway.log()
    );
    let insert = &messages[0].2;
    assert_eq!(insert["source"], "postgres");
    assert_eq!(insert["entity"], format!("public.{items}"));
    assert_eq!(insert["key"], "1");
    assert_eq!(
        insert["data"],
        json!({
            "id": 1, "flag": true, "small": -3, "big": 9007199254740993u64, "ratio": "NaN",
            "price": "12345678901234567890.123456789", "doc": {"a": [1, 2]},
            "at": "2026-11-23T11:00:00.5+00:00", "day": "2026-11-23",
            "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "raw": "SGk=", "tags": ["a b", null],
            "grid": [[1, 2], [3, 4]], "note": null, "mood": "busy"
        })
    );
    // Ids: slot, commit LSN, index in the transaction; the position is the commit LSN.
    let id = &messages[0].1;
    let parts: Vec<&str> = id.split(':').collect();
    assert_eq!((parts[0], parts[2]), (capture.name.as_str(), "0"), "{id}");
    assert_eq!(insert["position"], parts[1]);
    // The four statements ran in one transaction (one batch_execute): indexes 0..3, one LSN.
    for (index, (_, id, _)) in messages.iter().enumerate() {
        assert_eq!(id, &format!("{}:{}:{index}", capture.name, parts[1]));
    }
    let update = &messages[1].2;
    assert_eq!((update["data"]["ratio"].clone(), update["data"]["note"].clone()), (json!(2.5), json!("x")));
    assert_eq!(update["old"], Value::Null, "REPLICA IDENTITY DEFAULT sends no old row for a non-key update");
    let delete = &messages[2].2;
    assert_eq!(delete["old"], json!({"id": 1}), "the key of the deleted row");
    assert_eq!(delete["key"], "1");

    drop(gateway);
    capture.cleanup().await;
    let _ = client.batch_execute("DROP TYPE IF EXISTS weir_t_mood").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unchanged_toast_is_marked_and_replica_identity_full_sends_old_rows() {
    let capture = Capture::new(
        "toast",
        &[("plain", "id int PRIMARY KEY, note text, big text"), ("full", "id int PRIMARY KEY, note text, big text")],
    )
    .await;
    let (plain, full) = (capture.table("plain"), capture.table("full"));
    let client = connect().await;
    client
        .batch_execute(&format!(
            "ALTER TABLE {full} REPLICA IDENTITY FULL;
             ALTER TABLE {plain} ALTER COLUMN big SET STORAGE EXTERNAL;
             ALTER TABLE {full} ALTER COLUMN big SET STORAGE EXTERNAL;"
        ))
        .await
        .unwrap();
    let nats = Nats::start();
    let gateway = Gateway::start(&capture.config(&nats, ""));
    wait_ready(&gateway).await;
    let big = "x".repeat(100_000);
    for table in [&plain, &full] {
        client.execute(&format!("INSERT INTO {table} VALUES (1, 'a', $1)"), &[&big]).await.unwrap();
        client.batch_execute(&format!("UPDATE {table} SET note = 'b' WHERE id = 1")).await.unwrap();
    }
    // Rolled-back work, including a rolled-back savepoint, produces nothing.
    client
        .batch_execute(&format!(
            "BEGIN; INSERT INTO {plain} VALUES (2, 'gone', ''); ROLLBACK;
             BEGIN; INSERT INTO {plain} VALUES (3, 'kept', ''); SAVEPOINT s; INSERT INTO {plain} VALUES (4, 'gone', '');
             ROLLBACK TO SAVEPOINT s; COMMIT;"
        ))
        .await
        .unwrap();
    let messages = stored(&nats, 5).await;
    let envelopes: Vec<&Value> = messages.iter().map(|(_, _, e)| e).collect();
    let summary: Vec<String> = messages.iter().map(|(subject, id, _)| format!("{subject} {id}")).collect();
    assert_eq!(envelopes.len(), 5, "{summary:?}\n{}", gateway.log());
    let plain_update = envelopes[1];
    assert_eq!(plain_update["data"], json!({"id": 1, "note": "b"}), "the unchanged TOAST value is not sent as null");
    let headers = nats.messages("WEIR").await[1].headers.clone();
    assert_eq!(headers.get("Weir-Unchanged-Toast").map(|v| v.to_string()), Some("big".into()));
    let full_update = envelopes[3];
    assert_eq!(full_update["data"]["big"].as_str().map(str::len), Some(100_000), "filled from the full old row");
    assert_eq!(full_update["old"]["note"], "a");
    assert_eq!(envelopes[4]["data"]["id"], 3, "only the committed part of the savepoint transaction");
    drop(gateway);
    capture.cleanup().await;
}
