//! PostgreSQL change capture end to end: the real `weir` binary reading a logical replication
//! slot of the machine's PostgreSQL (`cargo xtask test` makes sure it runs with
//! `wal_level = logical`) into a private JetStream. Each test uses its own tables, slot and
//! publication, and drops them at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::netns::SilentLink;
use common::pg::{
    Capture, assert_exactly_once_in_order, connect, current_wal_lsn, log_says_after, mixed_load, readiness_until,
    slot_confirmed_past, stored, stored_in, wait_ready,
};
use common::services::{Gateway, Nats, NatsCluster};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

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
             ROLLBACK TO SAVEPOINT s; COMMIT;
             INSERT INTO {plain} VALUES (5, 'marker', '');"
        ))
        .await
        .unwrap();
    // Changes are stored in commit order: once the later marker is in, anything the rolled-back
    // work had leaked would be too.
    let messages = stored(&nats, 6).await;
    let envelopes: Vec<&Value> = messages.iter().map(|(_, _, e)| e).collect();
    let summary: Vec<String> = messages.iter().map(|(subject, id, _)| format!("{subject} {id}")).collect();
    assert_eq!(envelopes.len(), 6, "{summary:?}\n{}", gateway.log());
    assert_eq!(envelopes[5]["data"]["id"], 5, "{summary:?}");
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

#[tokio::test(flavor = "multi_thread")]
async fn under_replica_identity_using_index_the_key_is_that_indexs_columns() {
    let capture = Capture::new("identity", &[("a", "id int PRIMARY KEY, code text NOT NULL UNIQUE, n int")]).await;
    let table = capture.table("a");
    let client = connect().await;
    client.batch_execute(&format!("ALTER TABLE {table} REPLICA IDENTITY USING INDEX {table}_code_key")).await.unwrap();
    let nats = Nats::start();
    let gateway = Gateway::start(&capture.config(&nats, ""));
    wait_ready(&gateway).await;
    client
        .batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, 'c-1', 0); UPDATE {table} SET n = 1 WHERE id = 1; DELETE FROM {table} WHERE id = 1"
        ))
        .await
        .unwrap();
    let messages = stored(&nats, 3).await;
    let keys: Vec<&Value> = messages.iter().map(|(_, _, event)| &event["key"]).collect();
    // A delete carries only the identity index's columns: the key must not be empty.
    assert_eq!(keys, ["c-1", "c-1", "c-1"], "{}", gateway.log());
    assert_eq!(messages[2].2["old"], json!({"code": "c-1"}));
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn columns_a_primary_key_includes_are_not_part_of_the_key() {
    let capture = Capture::new("include", &[("a", "id int, note text, PRIMARY KEY (id) INCLUDE (note)")]).await;
    let table = capture.table("a");
    let nats = Nats::start();
    let gateway = Gateway::start(&capture.config(&nats, ""));
    wait_ready(&gateway).await;
    connect()
        .await
        .batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, 'a'); UPDATE {table} SET note = 'b' WHERE id = 1; DELETE FROM {table} WHERE id = 1"
        ))
        .await
        .unwrap();
    let messages = stored(&nats, 3).await;
    let keys: Vec<&Value> = messages.iter().map(|(_, _, event)| &event["key"]).collect();
    // One row, one key, whatever the operation (a delete carries only the key's own columns).
    assert_eq!(keys, ["1", "1", "1"], "{}", gateway.log());
    drop(gateway);
    capture.cleanup().await;
}

fn load_tables() -> [(&'static str, &'static str); 2] {
    [("a", "id bigint PRIMARY KEY, n bigint"), ("b", "id bigint PRIMARY KEY, n bigint")]
}

async fn full_identity(capture: &Capture) {
    let client = connect().await;
    for table in &capture.tables {
        client.batch_execute(&format!("ALTER TABLE {table} REPLICA IDENTITY FULL")).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_points_loses_nothing_and_stores_each_change_once() {
    use rand::Rng;
    let capture = Capture::new("kill", &load_tables()).await;
    full_identity(&capture).await;
    let nats = Nats::start();
    let config = capture.config(&nats, "");
    let mut gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    let tables = capture.tables.clone();
    let writer = tokio::spawn(async move { mixed_load(&tables, 20_000, Duration::from_millis(4), 7).await });
    let mut kills = 0;
    let mut rng = rand::rng();
    while !writer.is_finished() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        drop(gateway); // SIGKILL
        kills += 1;
        gateway = Gateway::start(&config);
        // The next kill lands while it streams, not while it is still connecting.
        wait_ready(&gateway).await;
    }
    let written = writer.await.unwrap();
    assert!(kills >= 3, "the load outlived only {kills} kills; make it longer");
    let messages = stored(&nats, written.len()).await;
    assert_exactly_once_in_order(&written, &messages, &capture.tables);
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_stopped_for_30_seconds_mid_load_pauses_and_resumes_without_loss() {
    let capture = Capture::new("natsdown", &load_tables()).await;
    full_identity(&capture).await;
    let mut nats = Nats::start();
    let gateway = Gateway::start(&capture.config(&nats, ""));
    wait_ready(&gateway).await;
    let tables = capture.tables.clone();
    // ~125 transactions 200 ms apart: the load goes on through most of the outage.
    let writer = tokio::spawn(async move { mixed_load(&tables, 3_000, Duration::from_millis(200), 11).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.stop();
    let stopped = Instant::now();
    // Readiness follows change capture's own NATS connection, not only the HTTP side's.
    let down = readiness_until(&gateway, |ready| ready["postgres_nats"] == false && ready["nats"] == false).await;
    assert_eq!(down["postgres"], true, "the replication stream stays up: {down}");
    // Changes committed since NATS went away cannot be stored, so the slot must not be
    // confirmed past them: not now, nor after status updates have had time to go out.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!writer.is_finished(), "the load must still be writing while NATS is down");
    let client = connect().await;
    let written_while_down = current_wal_lsn(&client).await;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(stopped.elapsed())).await;
    assert!(
        !slot_confirmed_past(&client, &capture.name, &written_while_down).await,
        "the slot was confirmed past changes NATS never stored"
    );
    nats.restart();
    let up = readiness_until(&gateway, |ready| ready["postgres_nats"] == true && ready["nats"] == true).await;
    assert_eq!(up["postgres"], true, "{up}");
    let written = writer.await.unwrap();
    let messages = stored(&nats, written.len()).await;
    assert_exactly_once_in_order(&written, &messages, &capture.tables);
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_leader_killed_mid_load_in_a_cluster_loses_nothing_and_dead_letters_nothing() {
    leader_killed_mid_load(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_streams_leader_killed_mid_load_loses_nothing_and_dead_letters_nothing() {
    // The route publishes to a stream of its own, CDC; the gateway's stream (WEIR, for dead
    // letters) is another. Nothing answering for `cdc.…` must not be taken for "no stream".
    leader_killed_mid_load(true).await;
}

/// A mixed load through a gateway in front of a three-server cluster; the leader of the stream
/// the changes go to (WEIR, or with `on_a_route_stream` a route's own stream CDC) is killed two
/// seconds in. The gateway talks to a server that stays up: while a new leader is elected,
/// nothing answers for the stream's subjects there (the connection itself is not lost). Every
/// change must be stored once and in order, none dead-lettered.
async fn leader_killed_mid_load(on_a_route_stream: bool) {
    let capture = Capture::new(if on_a_route_stream { "routekill" } else { "leaderkill" }, &load_tables()).await;
    full_identity(&capture).await;
    let mut cluster = NatsCluster::start().await;
    let mut leader = cluster.create_stream("WEIR", &["weir.>"], Duration::from_secs(600)).await;
    let (stream, route) = if on_a_route_stream {
        leader = cluster.create_stream("CDC", &["cdc.>"], Duration::from_secs(600)).await;
        ("CDC", "\n[[routes]]\nsubject = \"cdc.{schema}.{table}.{op}\"\n")
    } else {
        ("WEIR", "")
    };
    let config = capture
        .config(cluster.other_than(&leader), "")
        .replace("duplicate_window = \"10m\"", "duplicate_window = \"10m\"\nreplicas = 3")
        + route;
    let gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    let tables = capture.tables.clone();
    let writer = tokio::spawn(async move { mixed_load(&tables, 2_000, Duration::from_millis(100), 31).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.node(&leader).stop();
    assert_ne!(cluster.leader(stream).await, leader);
    let written = writer.await.unwrap();
    let messages = stored_in(cluster.other_than(&leader), stream, written.len()).await;
    let dead_letters: Vec<String> = cluster
        .other_than(&leader)
        .messages("WEIR")
        .await
        .iter()
        .map(|message| message.subject.to_string())
        .filter(|subject| subject.starts_with("weir.dlq."))
        .collect();
    assert!(
        dead_letters.is_empty(),
        "changes were dead-lettered during the election: {dead_letters:?}\n{}",
        gateway.log()
    );
    assert_exactly_once_in_order(&written, &messages, &capture.tables);
    // With a route's stream: "stream `CDC`", or "the stream capturing it" while the server had
    // not said which (when the killed server also led the cluster's metadata).
    let said = if on_a_route_stream { "has no leader" } else { "stream `WEIR` has no leader" };
    assert!(gateway.log().contains(said), "{}", gateway.log());
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_killed_while_nats_is_down_resumes_from_its_last_stored_change() {
    let capture = Capture::new("killdown", &load_tables()).await;
    full_identity(&capture).await;
    let mut nats = Nats::start();
    let config = capture.config(&nats, "");
    let gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    let tables = capture.tables.clone();
    let writer = tokio::spawn(async move { mixed_load(&tables, 2_000, Duration::from_millis(100), 17).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.stop();
    readiness_until(&gateway, |ready| ready["postgres_nats"] == false).await;
    // Longer than the 10 s status interval: a confirmation of anything not stored would have
    // reached the server, and the restarted gateway would skip it.
    tokio::time::sleep(Duration::from_secs(11)).await;
    drop(gateway); // SIGKILL
    nats.restart();
    let gateway = Gateway::start(&config);
    let written = writer.await.unwrap();
    let messages = stored(&nats, written.len()).await;
    assert_exactly_once_in_order(&written, &messages, &capture.tables);
    drop(gateway);
    capture.cleanup().await;
}

/// A batch waits for NATS while reading goes on: a transaction read meanwhile with nothing to
/// store (a skipped truncate) must not confirm the slot past the waiting batch.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_skipped_while_a_batch_waits_for_nats_confirms_nothing_past_the_batch() {
    let capture = Capture::new("skipwait", &load_tables()).await;
    let mut nats = Nats::start();
    let config = capture.config(&nats, "truncate = \"skip\"\nstatus_interval = \"1s\"");
    let gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    let client = connect().await;
    let (a, b) = (capture.table("a"), capture.table("b"));
    client.batch_execute(&format!("INSERT INTO {a} VALUES (0, 0)")).await.unwrap();
    assert_eq!(stored(&nats, 1).await.len(), 1);
    nats.stop();
    readiness_until(&gateway, |ready| ready["postgres_nats"] == false).await;
    for id in 1..=5 {
        client.batch_execute(&format!("INSERT INTO {a} VALUES ({id}, {id})")).await.unwrap();
    }
    // Longer than `linger`: the five rows are a batch of their own, waiting for NATS.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_rows = current_wal_lsn(&client).await;
    client.batch_execute(&format!("TRUNCATE {b}")).await.unwrap();
    // Several status intervals: a confirmation past the rows would have reached the server.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !slot_confirmed_past(&client, &capture.name, &after_rows).await,
        "the slot was confirmed past rows not stored yet:\n{}",
        gateway.log()
    );
    drop(gateway); // SIGKILL
    nats.restart();
    let gateway = Gateway::start(&config);
    let messages = stored(&nats, 6).await;
    let ids: Vec<i64> = messages.iter().map(|(_, _, envelope)| envelope["data"]["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, (0..=5).collect::<Vec<_>>(), "{}", gateway.log());
    drop(gateway);
    capture.cleanup().await;
}

/// How [`cutting_proxy`] cuts its connections.
#[derive(Clone, Copy)]
enum Cut {
    /// The gateway's side is closed at once.
    Close,
    /// Nothing more passes either way and nothing is closed on the gateway's side: packets lost.
    Silent,
}

/// A TCP proxy to the machine's PostgreSQL. Sending on the returned channel cuts every
/// connection open at that moment; the server's side stays open for `hold` — as after a network
/// cut, which the server notices only at its `wal_sender_timeout` — then closes. Later
/// connections pass normally. Upstream it uses the tests' own way in (by default the Unix
/// socket, where peer auth admits `root`; Debian's default asks TCP clients for a password).
async fn cutting_proxy(cut_how: Cut, hold: Duration) -> (u16, tokio::sync::broadcast::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (cut, _) = tokio::sync::broadcast::channel::<()>(4);
    let cuts = cut.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let mut cut = cuts.subscribe();
            tokio::spawn(async move {
                let mut server = common::pg::connect_upstream().await;
                let was_cut = tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                    _ = cut.recv() => true,
                };
                if !was_cut {
                    return;
                }
                if matches!(cut_how, Cut::Close) {
                    drop(client);
                    tokio::time::sleep(hold).await;
                    return;
                }
                tokio::time::sleep(hold).await;
                drop(server);
                // The gateway's side never hears another byte, nor a close.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(client);
            });
        }
    });
    (port, cut)
}

/// Streams a mixed load through a [`cutting_proxy`] that cuts one second in; checks every
/// change is stored once and in order, and that the gateway kept running. Returns its log.
async fn load_through_a_cut(name: &str, how: Cut, hold: Duration, extra: &str) -> String {
    let capture = Capture::new(name, &load_tables()).await;
    full_identity(&capture).await;
    let nats = Nats::start();
    let (port, cut) = cutting_proxy(how, hold).await;
    let config = capture
        .config(&nats, extra)
        .replace(&common::pg::postgres_url(), &common::pg::postgres_url_at("127.0.0.1", port));
    let mut gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    let tables = capture.tables.clone();
    let writer = tokio::spawn(async move { mixed_load(&tables, 2_000, Duration::from_millis(100), 23).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    cut.send(()).unwrap();
    let written = writer.await.unwrap();
    let messages = stored(&nats, written.len()).await;
    // The gateway's log says where a stalled recovery stopped.
    assert!(
        messages.len() >= written.len(),
        "{} of {} changes stored in time; the gateway's log:\n{}",
        messages.len(),
        written.len(),
        gateway.log()
    );
    assert_exactly_once_in_order(&written, &messages, &capture.tables);
    assert!(gateway.wait_exit(Duration::from_millis(200)).is_none(), "the gateway kept running:\n{}", gateway.log());
    let log = gateway.log();
    drop(gateway);
    capture.cleanup().await;
    log
}

#[tokio::test(flavor = "multi_thread")]
async fn a_network_cut_is_ridden_out_while_the_server_still_holds_the_slot() {
    // Held longer than the 10 s a starting gateway waits for a slot to be let go.
    let log = load_through_a_cut("netcut", Cut::Close, Duration::from_secs(14), "").await;
    assert!(log.contains("still held by PID"), "it waited for the slot:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_network_cut_is_noticed_and_capture_resumes() {
    // Status every second: the gateway takes the server as gone after 5 s without an answer.
    let log = load_through_a_cut("silentcut", Cut::Silent, Duration::from_secs(8), "status_interval = \"1s\"").await;
    assert!(log.contains("taking the connection as cut"), "{log}");
}

/// Waits (at most 30 s) until the gateway's log holds `text`.
async fn log_says(gateway: &Gateway, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !gateway.log().contains(text) {
        assert!(Instant::now() < deadline, "the log never said {text:?}:\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rows 1 and 3 small, row 2 over a `max_payload` of 8192, in three transactions.
async fn insert_one_too_large_for_nats(table: &str) -> tokio_postgres::Client {
    let client = connect().await;
    client
        .batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, 'small');
             INSERT INTO {table} VALUES (2, repeat('x', 20000));
             INSERT INTO {table} VALUES (3, 'small');"
        ))
        .await
        .unwrap();
    client
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_too_large_for_nats_is_dead_lettered_and_the_stream_goes_on() {
    let capture = Capture::new("toolarge", &[("a", "id bigint PRIMARY KEY, pad text")]).await;
    let table = capture.table("a");
    let nats = Nats::start_with_max_payload(8192);
    let gateway = Gateway::start(&capture.config(&nats, ""));
    wait_ready(&gateway).await;
    insert_one_too_large_for_nats(&table).await;
    let messages = stored(&nats, 3).await;
    assert_eq!(messages.len(), 3, "{}", gateway.log());
    // The table's subject carries the others in order; the refused one has a dead letter (stored
    // once the batch is retried one by one, so after them).
    let rows: Vec<&Value> = messages
        .iter()
        .filter(|(subject, _, _)| subject == &format!("weir.public.{table}.insert"))
        .map(|(_, _, envelope)| &envelope["data"]["id"])
        .collect();
    assert_eq!(rows, [1, 3]);
    let (_, letter_id, letter) =
        messages.iter().find(|(subject, _, _)| subject == &format!("weir.dlq.public_{table}")).unwrap();
    assert_eq!(letter["key"], "2");
    assert!(letter["error"].as_str().unwrap().contains("max_payload"), "{letter}");
    assert!(letter_id.starts_with("dlq:") && letter["position"].is_string(), "{letter}");
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_held_back_behind_a_refused_one_are_stored_before_the_next_batch() {
    let capture = Capture::new("heldback", &[("a", "id bigint PRIMARY KEY, pad text")]).await;
    let table = capture.table("a");
    let nats = Nats::start_with_max_payload(8192);
    // Batches of three: the first holds row 2's refused insert and the update held back behind
    // it (stored one by one afterwards); the next batch, ready by then, updates row 2 again.
    let gateway = Gateway::start(&capture.config(&nats, "max_batch = 3"));
    wait_ready(&gateway).await;
    connect()
        .await
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO {table} VALUES (2, repeat('x', 20000));
             UPDATE {table} SET pad = 'first' WHERE id = 2;
             INSERT INTO {table} VALUES (3, 'small');
             UPDATE {table} SET pad = 'second' WHERE id = 2;
             INSERT INTO {table} VALUES (4, 'small'), (5, 'small');
             COMMIT;"
        ))
        .await
        .unwrap();
    let messages = stored(&nats, 6).await;
    assert_eq!(messages.len(), 6, "{}", gateway.log());
    let updates: Vec<&Value> = messages
        .iter()
        .filter(|(subject, _, _)| subject == &format!("weir.public.{table}.update"))
        .map(|(_, _, envelope)| &envelope["data"]["pad"])
        .collect();
    assert_eq!(updates, ["first", "second"], "row 2's updates in commit order");
    assert!(messages.iter().any(|(subject, _, _)| subject == &format!("weir.dlq.public_{table}")));
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_whose_dead_letter_no_stream_takes_holds_capture_until_one_does() {
    let capture = Capture::new("noletter", &[("a", "id bigint PRIMARY KEY, pad text")]).await;
    let table = capture.table("a");
    let nats = Nats::start_with_max_payload(8192);
    // The stream takes the tables' changes but not dead letters (`weir.dlq.…`).
    let config = capture.config(&nats, "").replace(r#"subjects = ["weir.>"]"#, r#"subjects = ["weir.public.>"]"#);
    let gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    let client = insert_one_too_large_for_nats(&table).await;
    // Neither the change nor its dead letter can be stored: capture waits there, skipping nothing.
    log_says(&gateway, "change capture waits here").await;
    let ready: Value = reqwest::get(gateway.url("/readyz")).await.unwrap().json().await.unwrap();
    assert_eq!(ready["postgres_paused"], true, "{ready}");
    // Nothing behind it is stored meanwhile, the later changes of its own batch included.
    let held = stream_count(&nats).await;
    client.batch_execute(&format!("INSERT INTO {table} VALUES (4, 'later')")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(stream_count(&nats).await, held, "nothing after the refused change's batch is stored");
    // Once the stream takes dead letters too, the letter and then the rest are stored.
    let context = async_nats::jetstream::new(nats.client().await);
    let mut stream_config = context.get_stream("WEIR").await.unwrap().cached_info().config.clone();
    stream_config.subjects.push("weir.dlq.>".to_string());
    context.update_stream(stream_config).await.unwrap();
    let messages = stored(&nats, 4).await;
    let stored_as: Vec<(String, Value)> =
        messages.iter().map(|(subject, _, envelope)| (subject.clone(), envelope["data"]["id"].clone())).collect();
    let change = format!("weir.public.{table}.insert");
    let letter = (format!("weir.dlq.public_{table}"), Value::Null);
    // In the table's order: the letter takes the refused change's place.
    assert_eq!(
        stored_as,
        [(change.clone(), json!(1)), letter, (change.clone(), json!(3)), (change, json!(4))],
        "{}",
        gateway.log()
    );
    assert_eq!(messages[1].2["key"], "2");
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_stream_holds_capture_and_the_changes_follow_once_it_has_room() {
    let capture = Capture::new("fullstream", &[("a", "id bigint PRIMARY KEY, n bigint")]).await;
    let table = capture.table("a");
    let nats = Nats::start();
    // A stream that refuses new messages at its limit (`discard: new`), made before the gateway.
    let context = async_nats::jetstream::new(nats.client().await);
    let mut stream_config = async_nats::jetstream::stream::Config {
        name: "WEIR".to_string(),
        subjects: vec!["weir.>".to_string()],
        duplicate_window: Duration::from_secs(600),
        max_messages: 3,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    context.create_stream(stream_config.clone()).await.unwrap();
    let gateway = Gateway::start(&capture.config(&nats, ""));
    wait_ready(&gateway).await;
    let client = connect().await;
    for id in 1..=5 {
        client.batch_execute(&format!("INSERT INTO {table} VALUES ({id}, {id})")).await.unwrap();
    }
    log_says(&gateway, "the JetStream stream is full").await;
    let ready: Value = reqwest::get(gateway.url("/readyz")).await.unwrap().json().await.unwrap();
    assert_eq!(ready["postgres_paused"], true, "{ready}");
    assert_eq!(stream_count(&nats).await, 3);
    // Room again: the waiting changes themselves are stored, in order, not dead letters.
    stream_config.max_messages = -1;
    context.update_stream(stream_config).await.unwrap();
    let messages = stored(&nats, 5).await;
    let ids: Vec<(&str, i64)> = messages
        .iter()
        .map(|(subject, _, envelope)| (subject.as_str(), envelope["data"]["id"].as_i64().unwrap_or(-1)))
        .collect();
    let change = format!("weir.public.{table}.insert");
    let want: Vec<(&str, i64)> = (1..=5).map(|id| (change.as_str(), id)).collect();
    assert_eq!(ids, want, "{}", gateway.log());
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_open_across_a_kill_is_stored_once_at_its_commit() {
    let capture = Capture::new("longtxn", &[("a", "id bigint PRIMARY KEY, n bigint")]).await;
    let table = capture.table("a");
    let nats = Nats::start();
    let config = capture.config(&nats, "");
    let gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    // T1 writes first and stays open while later transactions commit and are confirmed.
    let long = connect().await;
    long.batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1, 1)")).await.unwrap();
    let client = connect().await;
    for id in 2..=20 {
        client.batch_execute(&format!("INSERT INTO {table} VALUES ({id}, {id})")).await.unwrap();
    }
    assert_eq!(stored(&nats, 19).await.len(), 19);
    // Past a status update: the slot is confirmed beyond T1's first change.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(gateway); // SIGKILL
    long.batch_execute(&format!("INSERT INTO {table} VALUES (21, 21); COMMIT")).await.unwrap();
    client.batch_execute(&format!("INSERT INTO {table} VALUES (22, 22)")).await.unwrap();
    let gateway = Gateway::start(&config);
    let messages = stored(&nats, 22).await;
    let ids: Vec<i64> = messages.iter().map(|(_, _, e)| e["data"]["id"].as_i64().unwrap()).collect();
    let mut expected: Vec<i64> = (2..=20).collect();
    expected.extend([1, 21, 22]);
    assert_eq!(ids, expected, "commit order, each once:\n{}", gateway.log());
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_frozen_past_the_servers_timeout_reconnects_and_loses_nothing() {
    let capture = Capture::new("frozen", &load_tables()).await;
    full_identity(&capture).await;
    let nats = Nats::start();
    let mut gateway = Gateway::start(&capture.config(&nats, ""));
    wait_ready(&gateway).await;
    let tables = capture.tables.clone();
    let writer = tokio::spawn(async move { mixed_load(&tables, 1_500, Duration::from_millis(200), 31).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Frozen longer than the server's wal_sender_timeout (1 min here): the server drops the
    // replication connection meanwhile.
    let pid = gateway.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_secs(70)).await;
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    let written = writer.await.unwrap();
    let messages = stored(&nats, written.len()).await;
    assert_exactly_once_in_order(&written, &messages, &capture.tables);
    assert!(gateway.wait_exit(Duration::from_millis(200)).is_none(), "the gateway kept running:\n{}", gateway.log());
    assert!(gateway.log().contains("reconnecting"), "the server dropped it meanwhile:\n{}", gateway.log());
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_publication_on_a_busy_database_does_not_pin_wal() {
    let capture = Capture::new("quiet", &[("a", "id bigint PRIMARY KEY")]).await;
    // Written to, but not in the publication.
    let busy = capture.table("busy");
    let client = connect().await;
    client
        .batch_execute(&format!("DROP TABLE IF EXISTS {busy}; CREATE TABLE {busy} (id bigint, pad text)"))
        .await
        .unwrap();
    let nats = Nats::start();
    let gateway = Gateway::start(&capture.config(&nats, ""));
    wait_ready(&gateway).await;
    client.batch_execute(&format!("INSERT INTO {} VALUES (1)", capture.tables[0])).await.unwrap();
    assert_eq!(stored(&nats, 1).await.len(), 1);

    for _ in 0..20 {
        client
            .batch_execute(&format!("INSERT INTO {busy} SELECT g, repeat('x', 200) FROM generate_series(1, 1000) g"))
            .await
            .unwrap();
    }
    let busy_until = current_wal_lsn(&client).await;
    // Caught up with nothing to store, the gateway confirms the server's keepalive position
    // (status updates go out at least every 10 s).
    let deadline = Instant::now() + Duration::from_secs(40);
    while !slot_confirmed_past(&client, &capture.name, &busy_until).await {
        assert!(Instant::now() < deadline, "the slot stayed behind {busy_until}:\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(nats.messages("WEIR").await.len(), 1, "the other table's rows are not published");
    drop(gateway);
    client.batch_execute(&format!("DROP TABLE IF EXISTS {busy}")).await.unwrap();
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_in_use_or_gone_stops_the_gateway_instead_of_skipping_changes() {
    let capture = Capture::new("slots", &[("a", "id bigint PRIMARY KEY, n bigint")]).await;
    let nats = Nats::start();
    let config = capture.config(&nats, "");
    let first = Gateway::start(&config);
    wait_ready(&first).await;

    // A second reader of the same slot.
    let mut second = Gateway::start(&config);
    let status = second.wait_exit(Duration::from_secs(40)).expect("the second gateway stops");
    assert!(!status.success());
    assert!(second.log().contains("is in use by another process"), "{}", second.log());

    // The slot dropped behind the gateway's back while it was down.
    drop(first);
    capture.cleanup_slot().await;
    let mut third = Gateway::start(&config);
    let status = third.wait_exit(Duration::from_secs(30)).expect("the gateway stops");
    assert!(!status.success());
    assert!(third.log().contains("is missing, but this gateway created it before"), "{}", third.log());
    let slots = connect()
        .await
        .query("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&capture.name])
        .await
        .unwrap();
    assert!(slots.is_empty(), "the slot was not silently re-created");

    // Another tool's slot of the same name (slot names are server-wide), and no publication yet:
    // the error says to choose another name, never to drop the other tool's slot.
    let client = connect().await;
    client.batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", capture.name)).await.unwrap();
    client.execute("SELECT pg_create_logical_replication_slot($1, 'test_decoding')", &[&capture.name]).await.unwrap();
    let mut fourth = Gateway::start(&config);
    let status = fourth.wait_exit(Duration::from_secs(30)).expect("the gateway stops");
    assert!(!status.success());
    assert!(fourth.log().contains("not pgoutput; choose another `slot` name"), "{}", fourth.log());
    assert!(!fourth.log().contains("pg_drop_replication_slot"), "{}", fourth.log());
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_re_created_behind_the_gateways_back_is_refused_until_the_operator_accepts_it() {
    let capture = Capture::new("reborn", &[("a", "id bigint PRIMARY KEY, n bigint")]).await;
    let table = capture.table("a");
    let client = connect().await;
    let nats = Nats::start();
    let config = capture.config(&nats, "");
    // Stopped gracefully and killed: neither leaves the slot ahead of what the gateway marked.
    let mut gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    client.batch_execute(&format!("INSERT INTO {table} VALUES (1, 1)")).await.unwrap();
    assert_eq!(stored(&nats, 1).await.len(), 1, "{}", gateway.log());
    assert!(gateway.terminate().success(), "{}", gateway.log());
    let gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    client.batch_execute(&format!("INSERT INTO {table} VALUES (2, 2)")).await.unwrap();
    assert_eq!(stored(&nats, 2).await.len(), 2, "{}", gateway.log());
    // Long enough for the marker to be written and the slot confirmed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(gateway); // SIGKILL
    let mut gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    assert!(gateway.terminate().success(), "{}", gateway.log());

    // While it is down, a change, then the slot dropped and made again: that change is not in it.
    client.batch_execute(&format!("INSERT INTO {table} VALUES (3, 3)")).await.unwrap();
    capture.cleanup_slot().await;
    client.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&capture.name]).await.unwrap();
    client.batch_execute(&format!("INSERT INTO {table} VALUES (4, 4)")).await.unwrap();
    let mut refused = Gateway::start(&config);
    let status = refused.wait_exit(Duration::from_secs(30)).expect("the gateway stops");
    assert!(!status.success());
    assert!(refused.log().contains("it was dropped and re-created, or moved"), "{}", refused.log());
    assert_eq!(nats.messages("WEIR").await.len(), 2, "nothing read from the new slot");

    // The operator accepts the loss by purging the marker, as the message says: the slot is
    // adopted where it is.
    let js = async_nats::jetstream::new(nats.client().await);
    let markers = js.get_stream("weir_postgres_slots").await.unwrap();
    markers.purge().filter(format!("weir_postgres_slots.*.{}", capture.name)).await.unwrap();
    let gateway = Gateway::start(&config);
    let messages = stored(&nats, 3).await;
    let ids: Vec<i64> = messages.iter().map(|(_, _, event)| event["data"]["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 4], "{}", gateway.log());
    drop(gateway);
    capture.cleanup().await;
}

/// `weir check` on `config`: its exit code and what it printed.
fn weir_check(config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.toml");
    std::fs::write(&path, config.replace("{plugins}", &common::plugins_dir().display().to_string())).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["check", "--config"])
        .arg(&path)
        .env("WEIR_CACHE_DIR", common::cache_dir())
        .output()
        .unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publication_that_differs_from_the_configured_tables_is_reported() {
    // Made by an earlier config with two tables, one partitioned (the publication lists its
    // partition); `b` was added to `tables` since.
    let capture = Capture::new(
        "pubdiff",
        &[
            ("a", "id bigint PRIMARY KEY"),
            ("b", "id bigint PRIMARY KEY"),
            ("p", "id bigint PRIMARY KEY) PARTITION BY RANGE (id"),
        ],
    )
    .await;
    let (a, p) = (&capture.tables[0], &capture.tables[2]);
    connect()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {p}_1 PARTITION OF {p} FOR VALUES FROM (0) TO (100); \
             CREATE PUBLICATION {} FOR TABLE {a}, {p}",
            capture.name
        ))
        .await
        .unwrap();
    let nats = Nats::start();
    let config = capture.config(&nats, "");
    let (code, text) = weir_check(&config);
    assert_eq!(code, Some(1), "{text}");
    let missing = format!("publication {} does not include public.{}", capture.name, capture.tables[1]);
    assert!(
        text.lines().any(|l| l.starts_with("error ") && l.contains(&missing) && l.contains("ALTER PUBLICATION")),
        "{text}"
    );
    assert!(
        !text.contains(&format!("public.{p},")) && !text.contains("also includes"),
        "partitions are their table: {text}"
    );
    let gateway = Gateway::start(&config);
    log_says(&gateway, &missing).await;
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn weir_check_reports_server_settings_and_tables_with_fixes() {
    let capture =
        Capture::new("check", &[("keyed", "id bigint PRIMARY KEY, n bigint"), ("keyless", "id bigint, n bigint")])
            .await;
    let nats = Nats::start();
    // A partitioned table whose own identity is FULL, with one partition keyless: the server
    // checks each partition's identity, not the table's.
    let parted = "weir_t_check_parted";
    connect()
        .await
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {parted};
             CREATE TABLE {parted} (id int, n int) PARTITION BY RANGE (id);
             CREATE TABLE {parted}_1 PARTITION OF {parted} FOR VALUES FROM (0) TO (10);
             CREATE TABLE {parted}_2 PARTITION OF {parted} FOR VALUES FROM (10) TO (20);
             ALTER TABLE {parted} REPLICA IDENTITY FULL; ALTER TABLE {parted}_2 REPLICA IDENTITY FULL;"
        ))
        .await
        .unwrap();
    let config = capture
        .config(&nats, "")
        .replace("tables = [", &format!("tables = [\"public.weir_t_no_such_table\", \"public.{parted}\", "));
    let (code, text) = weir_check(&config);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("ok    wal_level = logical"), "{text}");
    assert!(text.contains("ok    role root may replicate"), "{text}");
    assert!(text.contains(&format!("ok    table public.{} (primary key)", capture.table("keyed"))), "{text}");
    let keyless = format!("table public.{} has no primary key", capture.table("keyless"));
    assert!(
        text.lines().any(|l| l.starts_with("error ") && l.contains(&keyless) && l.contains("REPLICA IDENTITY FULL")),
        "{text}"
    );
    assert!(text.contains("table public.weir_t_no_such_table does not exist"), "{text}");
    assert!(text.contains("does not exist yet; `weir run` creates it"), "slot and publication: {text}");
    let partition = format!("partitioned table public.{parted}: partitions public.{parted}_1 have no primary key");
    assert!(text.lines().any(|l| l.starts_with("error ") && l.contains(&partition)), "{text}");
    // Every table of the database (no `tables`): the keyless partition is reported once, under
    // its partitioned table, not also as a table of its own.
    let every_table: String = config
        .lines()
        .map(|line| if line.starts_with("tables = [") { "tables = []" } else { line })
        .collect::<Vec<_>>()
        .join("\n");
    let (_, text) = weir_check(&every_table);
    assert_eq!(text.lines().filter(|l| l.contains(&partition)).count(), 1, "{text}");
    assert!(!text.contains(&format!("table public.{parted}_1 has no primary key")), "{text}");
    connect().await.batch_execute(&format!("DROP TABLE {parted}")).await.unwrap();
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn weir_check_reports_what_weir_run_would_refuse_or_miss_in_the_slot_and_publication() {
    let capture = Capture::new("checkslot", &[("a", "id bigint PRIMARY KEY")]).await;
    let nats = Nats::start();
    let config = capture.config(&nats, "");
    // A run makes the publication, the slot and the slot's record in JetStream.
    let mut gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    assert!(gateway.terminate().success(), "{}", gateway.log());
    let (code, text) = weir_check(&config);
    assert_eq!(code, Some(0), "{text}");
    let client = connect().await;
    let name = &capture.name;
    let error = |text: &str, wanted: &[&str]| {
        assert!(
            text.lines().any(|l| l.starts_with("error ") && wanted.iter().all(|w| l.contains(w))),
            "{wanted:?}:\n{text}"
        )
    };
    // Only inserts published: updates, deletes and truncates would never be captured.
    client.batch_execute(&format!("ALTER PUBLICATION {name} SET (publish = 'insert')")).await.unwrap();
    let (code, text) = weir_check(&config);
    assert_eq!(code, Some(1), "{text}");
    error(&text, &["does not publish update, delete, truncate", "SET (publish = 'insert, update, delete, truncate')"]);
    // The publication gone while the slot stays: made again, it could not decode the slot.
    client.batch_execute(&format!("DROP PUBLICATION {name}")).await.unwrap();
    let (_, text) = weir_check(&config);
    error(&text, &["does not exist but slot", "pg_drop_replication_slot", "nats stream purge weir_postgres_slots"]);
    // `weir run` stops with the same words, and does not make the publication behind the slot.
    let mut refused = Gateway::start(&config);
    let status = refused.wait_exit(Duration::from_secs(30)).expect("the gateway stops");
    assert!(!status.success());
    assert!(refused.log().contains("does not exist but slot"), "{}", refused.log());
    let made: i64 =
        client.query_one("SELECT count(*) FROM pg_publication WHERE pubname = $1", &[name]).await.unwrap().get(0);
    assert_eq!(made, 0, "{}", refused.log());
    // The slot dropped behind weir's back: `weir run` refuses to re-create it, and so does check.
    capture.cleanup_slot().await;
    let (code, text) = weir_check(&config);
    assert_eq!(code, Some(1), "{text}");
    error(
        &text,
        &["is missing, but this gateway created it before", "nats stream purge weir_postgres_slots --subject"],
    );
    // Unless the record says a snapshot did not finish: `weir run` then starts it again.
    let system: String =
        client.query_one("SELECT system_identifier::text FROM pg_control_system()", &[]).await.unwrap().get(0);
    let js = async_nats::jetstream::new(nats.client().await);
    let pending = r#"{"snapshot":"pending"}"#;
    js.publish(format!("weir_postgres_slots.{system}.{name}"), pending.into()).await.unwrap().await.unwrap();
    let (_, text) = weir_check(&config);
    assert!(!text.contains("is missing, but") && text.contains("does not exist yet"), "{text}");
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_and_multi_row_inserts_share_one_lsn_yet_every_row_is_stored() {
    let capture = Capture::new("copy", &[("a", "id bigint PRIMARY KEY, n bigint")]).await;
    let table = capture.table("a");
    let nats = Nats::start();
    let gateway = Gateway::start(&capture.config(&nats, ""));
    wait_ready(&gateway).await;
    let client = connect().await;
    client.batch_execute(&format!("COPY {table} (id) FROM PROGRAM 'seq 1 10000'")).await.unwrap();
    client
        .batch_execute(&format!("INSERT INTO {table} SELECT g, g FROM generate_series(10001, 12000) g"))
        .await
        .unwrap();
    let messages = stored(&nats, 12_000).await;
    assert_eq!(messages.len(), 12_000, "{}", gateway.log());
    let copy_lsn = messages[0].2["position"].as_str().unwrap().to_string();
    for (index, (_, id, envelope)) in messages.iter().enumerate() {
        let (lsn, row) = if index < 10_000 {
            (copy_lsn.as_str(), index)
        } else {
            (messages[10_000].2["position"].as_str().unwrap(), index - 10_000)
        };
        assert_eq!(id, &format!("{}:{lsn}:{row}", capture.name));
        assert_eq!(envelope["data"]["id"], index as i64 + 1);
    }
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn alter_table_mid_stream_uses_the_new_shape_also_after_a_restart() {
    let capture = Capture::new("ddl", &[("a", "id bigint PRIMARY KEY, n int")]).await;
    let table = capture.table("a");
    let nats = Nats::start();
    let config = capture.config(&nats, "");
    let gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    let client = connect().await;
    client
        .batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, 1);
             ALTER TABLE {table} ADD COLUMN note text;
             INSERT INTO {table} VALUES (2, 2, 'two');
             ALTER TABLE {table} ALTER COLUMN n TYPE numeric;
             INSERT INTO {table} VALUES (3, 3.5, 'three');
             ALTER TABLE {table} RENAME COLUMN note TO remark;
             ALTER TABLE {table} DROP COLUMN n;
             INSERT INTO {table} VALUES (4, 'four');"
        ))
        .await
        .unwrap();
    let rows: Vec<Value> = stored(&nats, 4).await.into_iter().map(|(_, _, e)| e["data"].clone()).collect();
    assert_eq!(
        rows,
        vec![
            json!({"id": 1, "n": 1}),
            json!({"id": 2, "n": 2, "note": "two"}),
            json!({"id": 3, "n": "3.5", "note": "three"}),
            json!({"id": 4, "remark": "four"}),
        ],
        "{}",
        gateway.log()
    );
    drop(gateway);
    let gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    client.batch_execute(&format!("INSERT INTO {table} VALUES (5, 'five')")).await.unwrap();
    let last = stored(&nats, 5).await.pop().unwrap().2;
    assert_eq!(last["data"], json!({"id": 5, "remark": "five"}));
    drop(gateway);
    capture.cleanup().await;
}

/// The table as the stored events say it is: reads, inserts and updates set a row, deletes
/// remove it, in stream order.
fn replay(messages: &[(String, String, Value)]) -> std::collections::BTreeMap<i64, i64> {
    let mut rows = std::collections::BTreeMap::new();
    for (_, _, envelope) in messages {
        match envelope["op"].as_str() {
            Some("delete") => {
                rows.remove(&envelope["old"]["id"].as_i64().unwrap());
            }
            _ => {
                rows.insert(envelope["data"]["id"].as_i64().unwrap(), envelope["data"]["n"].as_i64().unwrap());
            }
        }
    }
    rows
}

async fn table_rows(table: &str) -> std::collections::BTreeMap<i64, i64> {
    let rows = connect().await.query(&format!("SELECT id, n FROM {table}"), &[]).await.unwrap();
    rows.iter().map(|row| (row.get(0), row.get(1))).collect()
}

/// Waits until replaying the stream gives the table's current content.
async fn converges(nats: &Nats, table: &str, gateway: &Gateway) -> Vec<(String, String, Value)> {
    let want = table_rows(table).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let messages = stored(nats, 0).await;
        if replay(&messages) == want {
            return messages;
        }
        assert!(std::time::Instant::now() < deadline, "the stream never matched the table\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_emits_existing_rows_once_then_streams_with_no_gap() {
    let capture = Capture::new("snapshot", &[("a", "id bigint PRIMARY KEY, n bigint")]).await;
    let table = capture.table("a");
    let client = connect().await;
    client.batch_execute(&format!("INSERT INTO {table} SELECT g, g FROM generate_series(1, 3000) g")).await.unwrap();
    let nats = Nats::start();
    let gateway = Gateway::start(&capture.config(&nats, "snapshot = true\nmax_batch = 200"));
    // Changes while the snapshot is being read.
    for i in 0..100i64 {
        client
            .batch_execute(&format!(
                "UPDATE {table} SET n = n + 1000000 WHERE id = {}; INSERT INTO {table} VALUES ({}, 0); DELETE FROM {table} WHERE id = {}",
                i * 7 + 1,
                100_000 + i,
                i * 11 + 2
            ))
            .await
            .unwrap();
    }
    let messages = converges(&nats, &table, &gateway).await;
    let reads = messages.iter().filter(|(_, _, e)| e["op"] == "read").count();
    assert_eq!(reads, 3000, "every existing row exactly once");
    assert!(messages.iter().all(|(subject, _, _)| subject.starts_with(&format!("weir.public.{table}."))));
    let ids: std::collections::HashSet<&String> = messages.iter().map(|(_, id, _)| id).collect();
    assert_eq!(ids.len(), messages.len());
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn session_settings_from_the_url_or_the_role_do_not_change_the_values() {
    let capture =
        Capture::new("settings", &[("a", "id int PRIMARY KEY, at timestamptz, day date, raw bytea, ratio float8")])
            .await;
    let table = capture.table("a");
    let client = connect().await;
    let row = |id: i32| {
        format!(
            "INSERT INTO {table} VALUES ({id}, '2026-11-23 12:00:00.5+01', '2026-11-23', '\\x4869', 0.1::float8 + 0.2::float8)"
        )
    };
    client.batch_execute(&row(1)).await.unwrap();
    let nats = Nats::start();
    // Settings a role or database might carry; read by the snapshot's and the stream's sessions.
    let url = common::pg::postgres_url();
    let options =
        "options='-c DateStyle=SQL,DMY -c bytea_output=escape -c TimeZone=America/New_York -c extra_float_digits=0'";
    let config = capture
        .config(&nats, "snapshot = true")
        .replace(&format!("url = \"{url}\""), &format!("url = \"{url} {options}\""));
    assert!(config.contains("DateStyle"), "{config}");
    let gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    client.batch_execute(&row(2)).await.unwrap();
    let messages = stored(&nats, 2).await;
    let ops: Vec<&Value> = messages.iter().map(|(_, _, event)| &event["op"]).collect();
    assert_eq!(ops, ["read", "insert"], "{}", gateway.log());
    for (_, _, event) in &messages {
        let data = &event["data"];
        assert_eq!(data["at"], "2026-11-23T11:00:00.5+00:00", "{event}");
        assert_eq!(data["day"], "2026-11-23", "{event}");
        assert_eq!(data["raw"], "SGk=", "{event}");
        assert_eq!(data["ratio"], json!(0.30000000000000004), "{event}");
    }
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_marked_pending_whose_slot_was_never_made_is_taken() {
    // What a gateway stopped between marking the snapshot pending and creating its slot leaves.
    let capture = Capture::new("unborn", &[("a", "id bigint PRIMARY KEY, n bigint")]).await;
    let table = capture.table("a");
    connect()
        .await
        .batch_execute(&format!("INSERT INTO {table} SELECT g, g FROM generate_series(1, 10) g"))
        .await
        .unwrap();
    let nats = Nats::start();
    let system: String =
        connect().await.query_one("SELECT system_identifier::text FROM pg_control_system()", &[]).await.unwrap().get(0);
    let js = async_nats::jetstream::new(nats.client().await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "weir_postgres_slots".into(),
        subjects: vec!["weir_postgres_slots.>".into()],
        max_messages_per_subject: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let marker = json!({"how": "creating", "at": "0/0", "snapshot": "pending", "time": "2026-12-01T00:00:00Z"});
    js.publish(format!("weir_postgres_slots.{system}.{}", capture.name), marker.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let gateway = Gateway::start(&capture.config(&nats, "snapshot = true"));
    let messages = stored(&nats, 10).await;
    assert_eq!(messages.len(), 10, "{}", gateway.log());
    assert!(messages.iter().all(|(_, _, event)| event["op"] == "read"));
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_stop_leaves_the_slot_at_the_last_stored_change() {
    // With a long status interval nothing is confirmed to the server while running; the stop
    // must not leave the slot behind what is stored (a restart would replay it).
    let capture = Capture::new("goodbye", &[("a", "id bigint PRIMARY KEY, n bigint")]).await;
    let table = capture.table("a");
    let nats = Nats::start();
    let mut gateway = Gateway::start(&capture.config(&nats, "status_interval = \"10s\""));
    wait_ready(&gateway).await;
    connect()
        .await
        .batch_execute(&format!("INSERT INTO {table} SELECT g, g FROM generate_series(1, 100) g"))
        .await
        .unwrap();
    let messages = stored(&nats, 100).await;
    let position = messages.last().unwrap().2["position"].as_str().unwrap().to_string();
    assert!(gateway.terminate().success(), "{}", gateway.log());
    let (confirmed, past) = slot_reached(&capture.name, &position).await;
    assert!(past, "the slot stayed at {confirmed}, before the last stored change at {position}");
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_while_capture_waits_for_a_plugin_still_leaves_the_slot_at_the_last_stored_change() {
    // The stop an operator makes to deploy a fixed plugin: capture is waiting for it then.
    let capture = Capture::new("waitstop", &[("a", "id bigint PRIMARY KEY")]).await;
    let table = capture.table("a");
    let nats = Nats::start();
    // With a long status interval nothing reaches the server while running: the stop must.
    let (_dir, live, config) = live_noop_config(&capture, &nats, "status_interval = \"10s\"");
    let mut gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    let client = connect().await;
    client.batch_execute(&format!("INSERT INTO {table} SELECT g FROM generate_series(1, 100) g")).await.unwrap();
    let messages = stored(&nats, 100).await;
    let position = messages.last().unwrap().2["position"].as_str().unwrap().to_string();

    unplug(&gateway, &live).await;
    client.batch_execute(&format!("INSERT INTO {table} VALUES (101)")).await.unwrap();
    log_says(&gateway, "change capture waits for its file to come back").await;
    assert!(gateway.terminate().success(), "{}", gateway.log());
    let (confirmed, past) = slot_reached(&capture.name, &position).await;
    assert!(past, "the slot stayed at {confirmed}, before the last stored change at {position}");
    assert_eq!(nats.messages("WEIR").await.len(), 100, "nothing passed without the plugin");
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_change_capture_and_http_within_one_drain_timeout() {
    // A PostgreSQL that accepts and never answers keeps the source connecting, and a request
    // still sending its body keeps the HTTP drain waiting: both must end within the one
    // `--drain-timeout` (3 s), not one after the other (6 s).
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hung.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = hung.accept().await {
            held.push(connection);
        }
    });
    let capture = Capture::new("drained", &[("a", "id int PRIMARY KEY")]).await;
    let nats = Nats::start();
    let url = common::pg::postgres_url();
    let config = capture.config(&nats, "").replace(
        &format!("url = \"{url}\""),
        &format!("url = \"host=127.0.0.1 port={port} user=root dbname=test sslmode=disable\""),
    );
    assert!(config.contains(&format!("port={port}")), "{config}");
    let mut gateway = Gateway::start_with_drain(&config, "3s");
    let address = gateway.url("").trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut slow = std::net::TcpStream::connect(address).unwrap();
    std::io::Write::write_all(
        &mut slow,
        b"POST /v1/events/slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    assert!(gateway.terminate().success(), "{}", gateway.log());
    let took = started.elapsed();
    assert!(took < Duration::from_millis(5500), "stopping took {took:?}\n{}", gateway.log());
    drop(slow);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn change_capture_dials_the_urls_hostaddr_as_libpq_does() {
    // `hostaddr` is the address to connect to; `host` only names the server (for TLS). A name
    // that resolves nowhere must not matter, through the TLS tunnel (`prefer`, the default; the
    // server answers "no TLS" on its socket behind the proxy) or without it.
    let capture = Capture::new("hostaddr", &[("a", "id int PRIMARY KEY")]).await;
    let table = capture.table("a");
    let client = connect().await;
    let nats = Nats::start();
    let (port, _cut) = cutting_proxy(Cut::Close, Duration::ZERO).await;
    let url = format!("{} hostaddr=127.0.0.1", common::pg::postgres_url_at("weir-unresolvable.invalid", port));
    for (row, tls) in [(1, ""), (2, "tls = \"disable\"")] {
        let config = capture.config(&nats, tls).replace(&common::pg::postgres_url(), &url);
        assert!(config.contains("hostaddr=127.0.0.1"), "{config}");
        let mut gateway = Gateway::start(&config);
        wait_ready(&gateway).await;
        client.batch_execute(&format!("INSERT INTO {table} VALUES ({row})")).await.unwrap();
        let messages = stored(&nats, row).await;
        assert_eq!(messages.len(), row, "{tls:?}: the row was not stored\n{}", gateway.log());
        assert_eq!(messages[row - 1].2["data"]["id"], row, "{tls:?}");
        assert!(gateway.terminate().success(), "{}", gateway.log());
    }
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_snapshot_reads_what_the_publication_sends() {
    // A row filter and a column list, a generated column, and an inheritance child the
    // publication lists itself: the snapshot must match what streaming sends.
    let client = connect().await;
    let child = "weir_t_pubshape_c";
    client.batch_execute(&format!("DROP TABLE IF EXISTS {child}")).await.unwrap();
    let capture = Capture::new(
        "pubshape",
        &[
            ("a", "id int PRIMARY KEY, n int, secret text, g int GENERATED ALWAYS AS (n * 2) STORED"),
            ("p", "id int PRIMARY KEY, n int"),
        ],
    )
    .await;
    let (a, parent) = (capture.table("a"), capture.table("p"));
    client
        .batch_execute(&format!(
            "CREATE TABLE {child} (PRIMARY KEY (id)) INHERITS ({parent});
             INSERT INTO {a} (id, n, secret) SELECT g, g, 'hidden' FROM generate_series(1, 10) g;
             INSERT INTO {parent} VALUES (1, 1); INSERT INTO {child} VALUES (2, 2);
             CREATE PUBLICATION {name} FOR TABLE {a} (id, n) WHERE (n > 5), {parent};",
            name = capture.name
        ))
        .await
        .unwrap();
    let nats = Nats::start();
    let gateway = Gateway::start(&capture.config(&nats, "snapshot = true"));
    wait_ready(&gateway).await;
    client.batch_execute(&format!("INSERT INTO {a} (id, n, secret) VALUES (11, 11, 'hidden')")).await.unwrap();
    let messages = stored(&nats, 8).await;
    let summary: Vec<(String, Value, String)> = messages
        .iter()
        .map(|(_, _, event)| {
            (event["entity"].as_str().unwrap().to_string(), event["data"].clone(), event["op"].to_string())
        })
        .collect();
    let rows_of = |table: &str| -> Vec<&Value> {
        summary.iter().filter(|(entity, _, _)| entity == &format!("public.{table}")).map(|(_, data, _)| data).collect()
    };
    let a_rows = rows_of(&a);
    assert_eq!(a_rows.len(), 6, "rows 6..=10 read, 11 inserted: {summary:?}\n{}", gateway.log());
    assert!(
        a_rows.iter().all(|data| data.as_object().unwrap().len() == 2 && data["n"].as_i64().unwrap() > 5),
        "{a_rows:?}"
    );
    assert_eq!(rows_of(&parent), [&json!({"id": 1, "n": 1})], "the parent without its child's rows: {summary:?}");
    assert_eq!(rows_of(child), [&json!({"id": 2, "n": 2})], "{summary:?}");
    drop(gateway);
    client.batch_execute(&format!("DROP TABLE IF EXISTS {child}")).await.unwrap();
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_cut_short_by_kill_9_is_taken_again() {
    let capture = Capture::new("resnapshot", &[("a", "id bigint PRIMARY KEY, n bigint")]).await;
    let table = capture.table("a");
    let client = connect().await;
    client.batch_execute(&format!("INSERT INTO {table} SELECT g, g FROM generate_series(1, 50000) g")).await.unwrap();
    let nats = Nats::start();
    let config = capture.config(&nats, "snapshot = true\nmax_batch = 100");
    let gateway = Gateway::start(&config);
    // Kill it once some, but not all, rows are stored.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stream_count(&nats).await < 1000 {
        assert!(std::time::Instant::now() < deadline, "{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(gateway);
    let partial = stream_count(&nats).await;
    assert!(partial < 50_000, "killed before the snapshot finished ({partial} rows stored)");
    client.batch_execute(&format!("UPDATE {table} SET n = -1 WHERE id = 1")).await.unwrap();
    let gateway = Gateway::start(&config);
    let messages = converges(&nats, &table, &gateway).await;
    assert!(gateway.log().contains("the snapshot did not finish last time"), "{}", gateway.log());
    assert_eq!(replay(&messages).get(&1), Some(&-1));
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_query_whose_answer_is_lost_to_a_silent_network_is_given_up_and_taken_again() {
    let capture = Capture::new("silentread", &[("a", "id bigint PRIMARY KEY, n bigint")]).await;
    let table = capture.table("a");
    let client = connect().await;
    client.batch_execute(&format!("INSERT INTO {table} SELECT g, g FROM generate_series(1, 500) g")).await.unwrap();
    let nats = Nats::start();
    let link = SilentLink::new();
    // The network goes silent as the snapshot opens its cursor: a connection waiting for an
    // answer hears nothing more, as behind a lock or during a long scan.
    let port = link.proxy(Some(b"DECLARE weir_snapshot")).await;
    let config = capture.config(&nats, "snapshot = true").replace(&common::pg::postgres_url(), &link.url(port));
    let mut gateway = Gateway::start(&config);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !link.was_cut.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the snapshot never opened its cursor:\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = gateway.log().len();
    // Without keepalives the gateway would wait for that answer for hours.
    log_says_after(&gateway, before, "PostgreSQL replication interrupted").await;
    link.mend();
    let messages = converges(&nats, &table, &gateway).await;
    assert!(messages.iter().all(|(_, _, e)| e["op"] == "read"));
    // The cut-off snapshot's sessions (holding back vacuum) are gone: ended, or closed. Their
    // names are in the log (other tests' snapshots may be running).
    let log = gateway.log();
    let names: Vec<String> = log
        .match_indices("weir-snapshot-")
        .map(|(at, prefix)| log[at..].chars().take(prefix.len() + 32).collect())
        .collect();
    assert!(names.len() >= 2, "two snapshots were started:\n{log}");
    let client = connect().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = client
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY($1)", &[&names])
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} snapshot sessions left on the server:\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gateway.wait_exit(Duration::from_millis(200)).is_none(), "the gateway kept running:\n{}", gateway.log());
    drop(gateway);
    capture.cleanup().await;
}

/// A config whose one route runs plugin `live`, a copy of the no-op plugin in a watched
/// directory of its own: the directory and the plugin's file.
fn live_noop_config(
    capture: &Capture,
    nats: &Nats,
    postgres_extra: &str,
) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live.wasm");
    std::fs::copy(common::plugin_path("noop"), &live).unwrap();
    let config = capture
        .config(nats, &format!("{postgres_extra}\n\n[[routes]]\nplugins = [\"live\"]\n"))
        .replace("dir = \"{plugins}\"", &format!("dir = \"{}\"\nwatch = \"100ms\"", dir.path().display()));
    (dir, live, config)
}

/// Waits (up to 40 s) until `weir_postgres_lag_seconds` satisfies `wanted`.
async fn lag_reaches(gateway: &Gateway, wanted: impl Fn(f64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let text = reqwest::get(gateway.url("/metrics")).await.unwrap().text().await.unwrap();
        let lag = text
            .lines()
            .find_map(|line| line.strip_prefix("weir_postgres_lag_seconds "))
            .and_then(|value| value.trim().parse::<f64>().ok());
        if lag.is_some_and(&wanted) {
            return;
        }
        assert!(Instant::now() < deadline, "weir_postgres_lag_seconds stayed at {lag:?}:\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Removes the plugin file `live` and waits until the gateway has unloaded it.
async fn unplug(gateway: &Gateway, live: &std::path::Path) {
    std::fs::remove_file(live).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while reqwest::get(gateway.url("/readyz")).await.unwrap().json::<Value>().await.unwrap()["plugins"] != false {
        assert!(Instant::now() < deadline, "the plugin was not unloaded:\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The slot's confirmed position, and whether it is at or past `position`.
async fn slot_reached(slot: &str, position: &str) -> (String, bool) {
    connect()
        .await
        .query_one(
            "SELECT confirmed_flush_lsn::text, confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &position],
        )
        .await
        .map(|row| (row.get(0), row.get(1)))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_plugin_pauses_change_capture_and_nothing_is_skipped() {
    let capture = Capture::new("unplugged", &[("a", "id bigint PRIMARY KEY")]).await;
    let table = capture.table("a");
    let nats = Nats::start();
    let (_dir, live, config) = live_noop_config(&capture, &nats, "");
    let gateway = Gateway::start(&config);
    wait_ready(&gateway).await;
    let client = connect().await;
    client.batch_execute(&format!("INSERT INTO {table} VALUES (1)")).await.unwrap();
    assert_eq!(stored(&nats, 1).await.len(), 1);

    unplug(&gateway, &live).await;
    for id in 2..=40 {
        client.batch_execute(&format!("INSERT INTO {table} VALUES ({id})")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(nats.messages("WEIR").await.len(), 1, "nothing passes while the plugin is gone");
    // The lag in seconds shows how old the waiting changes are, and grows.
    lag_reaches(&gateway, |seconds| seconds >= 2.0).await;

    std::fs::copy(common::plugin_path("noop"), &live).unwrap();
    let ids: Vec<i64> = stored(&nats, 40).await.iter().map(|(_, _, e)| e["data"]["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, (1..=40).collect::<Vec<_>>(), "{}", gateway.log());
    lag_reaches(&gateway, |seconds| seconds == 0.0).await;
    drop(gateway);
    capture.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quarantined_plugin_pauses_change_capture_until_a_probe_succeeds() {
    let capture = Capture::new("quarantine", &[("a", "id bigint PRIMARY KEY, seq int")]).await;
    let table = capture.table("a");
    let nats = Nats::start();
    let extra = "\n[[routes]]\nplugins = [\"fixture_panic_every_10th\"]\n\n[plugins.fixture_panic_every_10th]\nquarantine_after = 3\nquarantine_for = \"2s\"\n";
    let gateway = Gateway::start(&capture.config(&nats, extra));
    wait_ready(&gateway).await;
    let client = connect().await;
    // Three changes the plugin fails on, each in a transaction of its own: dead-lettered, and the
    // plugin quarantined.
    for id in 1..=3 {
        client.batch_execute(&format!("INSERT INTO {table} VALUES ({id}, {})", id * 10)).await.unwrap();
    }
    assert_eq!(stored(&nats, 3).await.len(), 3);
    log_says(&gateway, "plugin quarantined for").await;
    // Changes read meanwhile wait for the probe; none is dead-lettered or skipped.
    for id in 4..=8 {
        client.batch_execute(&format!("INSERT INTO {table} VALUES ({id}, {id})")).await.unwrap();
    }
    let messages = stored(&nats, 8).await;
    log_says(&gateway, "plugin quarantined; change capture waits").await;
    log_says(&gateway, "quarantine lifted").await;
    let dead = messages.iter().filter(|(subject, ..)| subject.starts_with("weir.dlq.")).count();
    let ids: Vec<i64> = messages
        .iter()
        .filter(|(subject, ..)| !subject.starts_with("weir.dlq."))
        .map(|(_, _, event)| event["data"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!((dead, ids), (3, (4..=8).collect::<Vec<_>>()), "{}", gateway.log());
    drop(gateway);
    capture.cleanup().await;
}

async fn stream_count(nats: &Nats) -> u64 {
    let context = async_nats::jetstream::new(nats.client().await);
    context.get_stream("WEIR").await.unwrap().info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_transaction_streams_through_in_bounded_memory() {
    const ROWS: u64 = 200_000;
    let capture = Capture::new("bigtxn", &[("a", "id bigint PRIMARY KEY, pad text")]).await;
    let table = capture.table("a");
    let nats = Nats::start();
    let gateway = Gateway::start(&capture.config(&nats, ""));
    wait_ready(&gateway).await;
    let client = connect().await;
    client.batch_execute(&format!("INSERT INTO {table} VALUES (0, 'warm-up')")).await.unwrap();
    assert_eq!(stored(&nats, 1).await.len(), 1);
    let before = common::peak_rss_kib(gateway.pid());
    // One transaction of ~512-byte rows: about 120 MiB of envelopes if it were held whole.
    client
        .batch_execute(&format!(
            "INSERT INTO {table} SELECT g, repeat(md5(g::text), 16) FROM generate_series(1, {ROWS}) g"
        ))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while stream_count(&nats).await < ROWS + 1 {
        assert!(Instant::now() < deadline, "not all rows stored:\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(stream_count(&nats).await, ROWS + 1, "each row stored once");
    let grown_mib = common::peak_rss_kib(gateway.pid()).saturating_sub(before) / 1024;
    assert!(grown_mib < 64, "peak memory grew {grown_mib} MiB over a {ROWS}-row transaction");
    drop(gateway);
    capture.cleanup().await;
}
