//! PostgreSQL restarted while the gateway streams a backlog: the gateway reconnects with
//! backoff and resumes from the slot; nothing is lost, nothing stored twice. In a test binary of
//! its own, because restarting the server would break the other change-capture tests running
//! beside it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::pg::{Capture, assert_exactly_once_in_order, connect, mixed_load, stored, wait_ready};
use common::services::{Gateway, Nats};
use std::process::Command;
use std::time::Duration;

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
