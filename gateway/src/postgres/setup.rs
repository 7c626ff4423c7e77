//! The control connection (`tokio-postgres`): creates the publication before the slot (the
//! other order fails permanently once changes arrive in between), checks the slot, reads
//! `pg_type`, and remembers in a small JetStream stream that this gateway created the slot, so a
//! slot that later disappears is reported instead of silently re-created.

use super::source::Failure;
use super::values::Types;
use crate::config::PostgresConfig;
use pgwire_replication::Lsn;
use std::time::Duration;

/// JetStream stream holding one message per slot this gateway created or adopted, on subject
/// `weir_postgres_slots.<system identifier>.<slot>` (the last one per subject is kept). A plain
/// stream rather than a key-value bucket: nats-server 2.9 (Debian 12) rejects the bucket
/// settings of current clients.
pub const SLOT_BUCKET: &str = "weir_postgres_slots";

/// Connects the control connection; its driver task logs when it ends.
pub async fn connect_control(config: &PostgresConfig) -> anyhow::Result<tokio_postgres::Client> {
    connect_control_as(config, None).await
}

/// [`connect_control`], with `application_name` set to `name` when given.
pub async fn connect_control_as(config: &PostgresConfig, name: Option<&str>) -> anyhow::Result<tokio_postgres::Client> {
    let mut routed = super::tls::route(config, super::tls::Purpose::Direct).await?;
    if let Some(name) = name {
        routed.application_name(name);
    }
    let (client, connection) = routed
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL ({}): {e}", describe(&config.url)))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "PostgreSQL control connection ended");
        }
    });
    Ok(client)
}

/// The connection string without its password, for messages.
pub fn describe(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(config) => format!(
            "host={:?} port={:?} user={} dbname={}",
            config.get_hosts(),
            config.get_ports(),
            config.get_user().unwrap_or("(default)"),
            config.get_dbname().unwrap_or("(default)")
        ),
        Err(_) => "unparsable url".into(),
    }
}

/// `"schema"."table"` for `schema.table` or `table` (schema `public`).
pub fn quoted_table(name: &str) -> String {
    let (schema, table) = name.split_once('.').unwrap_or(("public", name));
    format!("{}.{}", quote(schema), quote(table))
}

pub fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

fn fatal(message: String) -> Failure {
    Failure::Fatal(anyhow::anyhow!(message))
}

fn retry(error: impl Into<anyhow::Error>) -> Failure {
    Failure::Retry(error.into())
}

/// Where a session starts.
pub enum Start {
    /// Stream from the slot's confirmed position.
    Resume(Lsn),
    /// Create the slot with an exported snapshot and read the tables first (`snapshot = true`,
    /// on the first start or after a snapshot that did not finish).
    Snapshot,
}

/// The record, in stream [`SLOT_BUCKET`], that this gateway created or adopted the slot, and how
/// far it may confirm it (`confirmed`). The gateway writes that position before it moves the
/// slot there, so the slot can never be legitimately ahead of it: a slot found further on at
/// start was dropped and re-created, or moved, by something else, and changes may be missing.
pub struct SlotMarker {
    jetstream: async_nats::jetstream::Context,
    key: String,
    /// What was last written (or read at start): a new `confirmed` keeps the rest.
    record: std::sync::Mutex<serde_json::Value>,
}

impl SlotMarker {
    /// Records the slot: `how` it came to be used, from which position (which it may also be
    /// confirmed at), and the state of its snapshot (`none`, `pending` or `done`).
    pub async fn write(&self, at: &Lsn, how: &str, snapshot: &str) -> Result<(), Failure> {
        let at = at.to_string();
        self.publish(serde_json::json!({"how": how, "at": at, "snapshot": snapshot, "confirmed": at})).await
    }

    /// Records that the slot may be confirmed up to `lsn`; only then may it be.
    pub async fn allow_confirming(&self, lsn: Lsn) -> Result<(), Failure> {
        let mut record = self.record.lock().unwrap_or_else(|p| p.into_inner()).clone();
        record["confirmed"] = lsn.to_string().into();
        self.publish(record).await
    }

    /// How far the record allows the slot to be confirmed (records of weir versions before
    /// 2026-12 do not say).
    pub fn confirmable(&self) -> Option<Lsn> {
        let record = self.record.lock().unwrap_or_else(|p| p.into_inner());
        record["confirmed"].as_str().and_then(|text| Lsn::parse(text).ok())
    }

    async fn publish(&self, mut record: serde_json::Value) -> Result<(), Failure> {
        record["time"] = crate::http::now_rfc3339().into();
        let failed = |e: String| retry(anyhow::anyhow!("cannot write {} to stream {SLOT_BUCKET}: {e}", self.key));
        let ack = self
            .jetstream
            .publish(self.key.clone(), record.to_string().into())
            .await
            .map_err(|e| failed(e.to_string()))?;
        ack.await.map_err(|e| failed(e.to_string()))?;
        *self.record.lock().unwrap_or_else(|p| p.into_inner()) = record;
        Ok(())
    }
}

/// The subject of slot `slot`'s record in [`SLOT_BUCKET`]: per server (its system identifier),
/// so a restored or another server's slot of the same name is another record.
async fn marker_key(client: &tokio_postgres::Client, slot: &str) -> Result<String, tokio_postgres::Error> {
    let system: String = client.query_one("SELECT system_identifier::text FROM pg_control_system()", &[]).await?.get(0);
    Ok(format!("{SLOT_BUCKET}.{system}.{slot}"))
}

/// The command that makes weir forget a slot's record.
fn purge_command(key: &str) -> String {
    format!("`nats stream purge {SLOT_BUCKET} --subject {key}`")
}

/// Why a slot whose publication is gone cannot be read on, and how to start again. `purge`: the
/// command that purges the slot's record, when weir holds one.
fn publication_missing_beside_slot(config: &PostgresConfig, purge: Option<&str>) -> String {
    format!(
        "publication {} does not exist but slot {} does: a publication made after its slot cannot be used \
         for the changes before it, so the slot cannot be read on. Start again: create the publication, \
         drop the slot (`SELECT pg_drop_replication_slot('{}')`){}, and run with `snapshot = true` to read \
         the rows already there (changes made while the publication was missing are not captured)",
        config.publication,
        config.slot,
        config.slot,
        purge.map(|purge| format!(" and purge its record ({purge})")).unwrap_or_default()
    )
}

/// Why a lost slot stops capture, and how to start again (`purge`: when weir holds a record).
fn slot_lost(slot: &str, purge: Option<&str>) -> String {
    format!(
        "replication slot `{slot}` is lost (wal_status = lost): the server removed WAL it still needed, so \
         changes were skipped. Drop the slot (`SELECT pg_drop_replication_slot('{slot}')`){} and start again",
        purge.map(|purge| format!(", purge its record ({purge})")).unwrap_or_default()
    )
}

/// Why a slot this gateway made and that is now gone stops capture (`recorded`: its record).
fn slot_missing(slot: &str, recorded: &str, purge: &str) -> String {
    format!(
        "replication slot `{slot}` is missing, but this gateway created it before ({recorded}). Changes since \
         its last confirmed position may be lost, so weir will not re-create it silently. To start over, \
         purge its record ({purge}) and start again"
    )
}

/// Whether a slot's record says its snapshot did not finish (`weir run` then starts it again).
fn snapshot_unfinished(record: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(record).is_ok_and(|v| v["snapshot"] == "pending")
}

/// Server sessions this process opened to create a slot or read a snapshot, each under a name
/// of its own (`application_name` `weir-snapshot-…`, `weir-slot-…`). Cut off by a network gone
/// silent, they stay on the server, which never heard of the cut, until its own TCP keepalive
/// gives up (hours by default): a slot being created stays held (a retry would find it "in
/// use"), and a snapshot's sessions hold back vacuum. The next attempt ends them by name.
#[derive(Debug, Default)]
pub struct OwnSessions {
    names: std::sync::Mutex<Vec<String>>,
}

impl OwnSessions {
    /// A new unique name for a session about `what`, remembered until [`OwnSessions::forget`].
    pub fn new_name(&self, what: &str) -> String {
        let name = format!("weir-{what}-{}", uuid::Uuid::now_v7().simple());
        self.names.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(name.clone());
        name
    }

    /// Once those sessions are known closed (streaming started).
    pub fn forget(&self) {
        self.names.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clear();
    }

    /// Ends those the server still runs; returns how many. Sessions of one's own role may be
    /// ended without privileges.
    async fn end_left(&self, client: &tokio_postgres::Client) -> anyhow::Result<i64> {
        let names = self.names.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        if names.is_empty() {
            return Ok(0);
        }
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = ANY($1) AND pid <> pg_backend_pid()",
                &[&names],
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot end the sessions left by a cut-off connection: {e}"))?;
        Ok(row.get(0))
    }
}

/// Makes the publication and the slot ready and says where to start. `resuming`: this process
/// has streamed from the slot before (a reconnect). `own_sessions`: those this process opened to
/// create the slot or read the snapshot; any still running are ended first.
pub async fn prepare(
    config: &PostgresConfig,
    client: &tokio_postgres::Client,
    sink: &crate::sink::Sink,
    resuming: bool,
    own_sessions: &OwnSessions,
) -> Result<(Start, SlotMarker), Failure> {
    let ended = own_sessions.end_left(client).await.map_err(retry)?;
    if ended > 0 {
        // Looked at again once they are gone (ending one takes a moment).
        return Err(retry(anyhow::anyhow!(
            "ended {ended} server session(s) this gateway left behind when its connection was cut (creating the slot \
             or reading the snapshot); starting again"
        )));
    }
    let marker_key = marker_key(client, &config.slot).await.map_err(retry)?;
    let purge = purge_command(&marker_key);
    let Some(jetstream) = sink.jetstream() else {
        return Err(fatal("[postgres] needs [jetstream]".into()));
    };
    let markers = jetstream
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: SLOT_BUCKET.into(),
            subjects: vec![format!("{SLOT_BUCKET}.>")],
            max_messages_per_subject: 1,
            description: Some("Replication slots weir created or adopted (see docs/postgres.md)".into()),
            ..Default::default()
        })
        .await
        .map_err(|e| retry(anyhow::anyhow!("cannot create JetStream stream {SLOT_BUCKET}: {e}")))?;
    // A gateway killed a moment ago may still hold the slot until the server notices.
    let mut attempts = 0;
    let slot = loop {
        let row = client
            .query_opt(
                "SELECT plugin, database, active, active_pid, wal_status, confirmed_flush_lsn::text \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&config.slot],
            )
            .await
            .map_err(retry)?;
        match row {
            Some(row) if row.get::<_, bool>(2) && attempts < 20 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => break other,
        }
    };
    // Read after the slot is free: a gateway stopping a moment ago writes the marker before it
    // moves the slot, so an older read could be behind the slot and refuse it wrongly.
    let marker = match markers.get_last_raw_message_by_subject(&marker_key).await {
        Ok(message) => Some(message.payload),
        Err(error) if error.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => None,
        Err(error) => {
            return Err(retry(anyhow::anyhow!("cannot read {marker_key} from stream {SLOT_BUCKET}: {error}")));
        }
    };

    let recorded = marker.as_ref().and_then(|m| serde_json::from_slice::<serde_json::Value>(m).ok());
    let record = SlotMarker {
        jetstream: jetstream.clone(),
        key: marker_key.clone(),
        record: std::sync::Mutex::new(recorded.unwrap_or_default()),
    };
    let snapshot_pending = marker.as_deref().is_some_and(snapshot_unfinished);
    // Before the slot is made (the other order fails for good); a slot that stays must have
    // been made after the publication, so one missing now is not made again behind it.
    // Only a slot of this database's pgoutput counts: another's (slot names are server-wide)
    // gets its own error below, which says to choose another name, not to drop it.
    let current: String = client.query_one("SELECT current_database()", &[]).await.map_err(retry)?.get(0);
    let slot_is_ours = slot.as_ref().is_some_and(|row| {
        row.get::<_, Option<String>>(0).as_deref() == Some("pgoutput")
            && row.get::<_, Option<String>>(1).as_deref() == Some(current.as_str())
    });
    let slot_stays = slot_is_ours && !snapshot_pending;
    ensure_publication(config, client, slot_stays.then(|| (marker.is_some(), purge.as_str()))).await?;
    let start = match slot {
        // A snapshot that did not finish: nothing has been confirmed past the slot's creation,
        // so a new slot and a new snapshot lose nothing.
        Some(row) if snapshot_pending && !row.get::<_, bool>(2) => {
            tracing::warn!(slot = %config.slot, "the snapshot did not finish last time; starting it again with a new slot");
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&config.slot])
                .await
                .map_err(|e| retry(anyhow::anyhow!("cannot drop the unfinished snapshot's slot: {e}")))?;
            Start::Snapshot
        }
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            let database: Option<String> = row.get(1);
            let active: bool = row.get(2);
            let pid: Option<i32> = row.get(3);
            let wal_status: Option<String> = row.get(4);
            let confirmed: Option<String> = row.get(5);
            if plugin.as_deref() != Some("pgoutput") {
                return Err(fatal(format!(
                    "replication slot `{}` uses plugin {plugin:?}, not pgoutput; choose another `slot` name",
                    config.slot
                )));
            }
            if database.as_deref() != Some(current.as_str()) {
                return Err(fatal(format!(
                    "replication slot `{}` belongs to database {database:?}, not {current:?}; choose another `slot` name",
                    config.slot
                )));
            }
            if wal_status.as_deref() == Some("lost") {
                return Err(fatal(slot_lost(&config.slot, marker.is_some().then_some(purge.as_str()))));
            }
            if active && resuming {
                // After a network cut the server keeps this gateway's old connection (and the
                // slot) until its `wal_sender_timeout` passes: wait for that, do not stop.
                return Err(retry(anyhow::anyhow!(
                    "replication slot `{}` is still held by PID {}, most likely this gateway's connection \
                     from before the interruption, which the server drops after its wal_sender_timeout",
                    config.slot,
                    pid.unwrap_or_default()
                )));
            }
            if active {
                return Err(fatal(format!(
                    "replication slot `{}` is in use by another process (PID {}); only one reader per slot — \
                     is another weir running with this slot?",
                    config.slot,
                    pid.unwrap_or_default()
                )));
            }
            let confirmed = confirmed
                .as_deref()
                .and_then(|text| Lsn::parse(text).ok())
                .ok_or_else(|| fatal(format!("replication slot `{}` has no confirmed position", config.slot)))?;
            if let Some(allowed) = record.confirmable()
                && confirmed > allowed
            {
                return Err(fatal(format!(
                    "replication slot `{}` is confirmed at {confirmed}, past {allowed}, the furthest this gateway \
                     confirmed it: it was dropped and re-created, or moved, by something else, so changes in \
                     between may be missing. If you know none are (or accept the loss), purge {marker_key} from \
                     stream {SLOT_BUCKET} ({purge}) and start \
                     again: the slot is then adopted where it is",
                    config.slot
                )));
            }
            if marker.is_none() {
                record.write(&confirmed, "adopted", "none").await?;
            }
            Start::Resume(confirmed)
        }
        // A snapshot that was starting when the gateway stopped, before its slot existed:
        // nothing was ever confirmed, so start it again.
        None if snapshot_pending => Start::Snapshot,
        None => {
            if let Some(marker) = marker {
                return Err(fatal(slot_missing(&config.slot, &String::from_utf8_lossy(&marker), &purge)));
            }
            if config.snapshot {
                return Ok((Start::Snapshot, record));
            }
            // Creating it waits for the transactions running now: named, so that a retry after a
            // cut can end it (see `OwnSessions`).
            let name = own_sessions.new_name("slot");
            client.batch_execute(&format!("SET application_name = '{name}'")).await.map_err(retry)?;
            let created: String = client
                .query_one("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')", &[&config.slot])
                .await
                .map_err(|e| retry(anyhow::anyhow!("cannot create replication slot `{}`: {e}", config.slot)))?
                .get(0);
            client.batch_execute("RESET application_name").await.map_err(retry)?;
            let created = Lsn::parse(&created).map_err(|e| fatal(format!("slot position {created:?}: {e}")))?;
            tracing::info!(slot = %config.slot, at = %created, "created replication slot");
            record.write(&created, "created", "none").await?;
            Start::Resume(created)
        }
    };
    Ok((start, record))
}

/// Creates the publication if it is missing. `existing_slot`: the slot exists and is kept
/// (whether weir holds a record of it, and the command that purges that record).
async fn ensure_publication(
    config: &PostgresConfig,
    client: &tokio_postgres::Client,
    existing_slot: Option<(bool, &str)>,
) -> Result<(), Failure> {
    let existing = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&config.publication])
        .await
        .map_err(retry)?;
    if existing.is_some() {
        // Weir creates the publication from `tables` but never alters one that exists.
        for difference in publication_differences(config, client).await.map_err(retry)? {
            tracing::warn!("{difference}");
        }
        return Ok(());
    }
    if let Some((recorded, purge)) = existing_slot {
        // The slot cannot decode a change from before the publication existed: made now, the
        // stream would stop at the first such change for good.
        return Err(fatal(publication_missing_beside_slot(config, recorded.then_some(purge))));
    }
    let scope = if config.tables.is_empty() {
        "FOR ALL TABLES".to_string()
    } else {
        format!("FOR TABLE {}", config.tables.iter().map(|t| quoted_table(t)).collect::<Vec<_>>().join(", "))
    };
    let statement = format!("CREATE PUBLICATION {} {scope}", quote(&config.publication));
    client
        .batch_execute(&statement)
        .await
        .map_err(|e| fatal(format!("cannot create publication `{}` ({statement}): {e}", config.publication)))?;
    tracing::info!(publication = %config.publication, %scope, "created publication");
    Ok(())
}

/// Every type in `pg_type`, for turning values into JSON.
pub async fn load_types(client: &tokio_postgres::Client) -> anyhow::Result<Types> {
    let rows = client
        .query("SELECT oid, typname::text, typtype, typelem, typcategory, typbasetype FROM pg_type", &[])
        .await
        .map_err(|e| anyhow::anyhow!("cannot read pg_type: {e}"))?;
    let rows: Vec<(u32, String, i8, u32, i8, u32)> =
        rows.iter().map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5))).collect();
    let mut types = Types::from_rows(&rows);
    // `box` separates array items with `;` (its values contain commas).
    let delimiters = client
        .query("SELECT oid, typdelim::text FROM pg_type WHERE typdelim <> ','", &[])
        .await
        .map_err(|e| anyhow::anyhow!("cannot read pg_type: {e}"))?;
    for row in &delimiters {
        let delimiter: String = row.get(1);
        if let Some(delimiter) = delimiter.chars().next() {
            types.set_delimiter(row.get(0), delimiter);
        }
    }
    Ok(types)
}

/// The event key's column names for table `oid`, in key order: the primary key, or, under
/// REPLICA IDENTITY USING INDEX, that index's columns (a delete then carries only those, so a key
/// from the primary key would be empty); empty without either. An index's `INCLUDE` columns are
/// not part of it (a delete does not carry them). (Under REPLICA IDENTITY FULL the
/// Relation message marks every column as identity, so the event key cannot come from those flags.)
pub async fn primary_key(client: &tokio_postgres::Client, oid: u32) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indrelid \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND k.position <= i.indnkeyatts \
               AND CASE WHEN c.relreplident = 'i' THEN i.indisreplident ELSE i.indisprimary END \
             ORDER BY k.position",
            &[&oid],
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the primary key of table {oid}: {e}"))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// How an existing publication differs from `[postgres] tables`, each with the statement that
/// makes them agree: a table added to `tables` after the publication was made is otherwise never
/// captured, without a word.
async fn publication_differences(
    config: &PostgresConfig,
    client: &tokio_postgres::Client,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let publication = &config.publication;
    let Some(row) = client
        .query_opt(
            "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await?
    else {
        return Ok(Vec::new());
    };
    let all_tables: bool = row.get(0);
    let name = quote(publication);
    let mut differences = Vec::new();
    // A publication made with `WITH (publish = …)` leaves the other operations out, silently.
    let truncate_wanted = config.truncate == crate::config::TruncateMode::Emit;
    let operations: [(&str, bool, bool); 4] = [
        ("insert", row.get(1), true),
        ("update", row.get(2), true),
        ("delete", row.get(3), true),
        ("truncate", row.get(4), truncate_wanted),
    ];
    let unpublished: Vec<&str> = operations
        .iter()
        .filter(|(_, published, wanted)| *wanted && !published)
        .map(|(operation, _, _)| *operation)
        .collect();
    if !unpublished.is_empty() {
        differences.push(format!(
            "publication {publication} does not publish {}: those changes are never captured; to publish them: ALTER PUBLICATION {name} SET (publish = 'insert, update, delete, truncate')",
            unpublished.join(", ")
        ));
    }
    if config.tables.is_empty() {
        if !all_tables {
            differences.push(format!(
                "publication {publication} lists tables, but [postgres] `tables` is empty (every table): only the listed ones are captured; to capture more, add them (ALTER PUBLICATION {name} ADD TABLE …), or start over with new `publication` and `slot` names (and `snapshot = true` to read the rows already there): a publication dropped and made again cannot be read by the slot made before it"
            ));
        }
        return Ok(differences);
    }
    if all_tables {
        differences.push(format!(
            "publication {publication} is FOR ALL TABLES, but [postgres] `tables` lists some: every table's changes are captured; to capture only those, start over with new `publication` and `slot` names (and `snapshot = true` to read the rows already there): a FOR ALL TABLES publication cannot be narrowed, and one dropped and made again cannot be read by the slot made before it"
        ));
        return Ok(differences);
    }
    // By partition root: without `publish_via_partition_root` the view lists a partitioned
    // table's partitions, while `tables` names the table.
    let published: Vec<String> = client
        .query(
            "SELECT DISTINCT rn.nspname::text || '.' || r.relname::text \
             FROM pg_publication_tables pt \
             JOIN pg_namespace n ON n.nspname = pt.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
             JOIN pg_class r ON r.oid = coalesce(pg_partition_root(c.oid), c.oid) \
             JOIN pg_namespace rn ON rn.oid = r.relnamespace \
             WHERE pt.pubname = $1",
            &[publication],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let wanted: Vec<String> =
        config.tables.iter().map(|t| if t.contains('.') { t.clone() } else { format!("public.{t}") }).collect();
    let missing: Vec<&String> = wanted.iter().filter(|table| !published.contains(table)).collect();
    let extra: Vec<&String> = published.iter().filter(|table| !wanted.contains(table)).collect();
    let names = |tables: &[&String]| tables.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", ");
    let quoted = |tables: &[&String]| tables.iter().map(|t| quoted_table(t)).collect::<Vec<_>>().join(", ");
    if !missing.is_empty() {
        differences.push(format!(
            "publication {publication} does not include {}, which [postgres] `tables` lists: their changes are not captured; add them: ALTER PUBLICATION {name} ADD TABLE {}",
            names(&missing),
            quoted(&missing)
        ));
    }
    if !extra.is_empty() {
        differences.push(format!(
            "publication {publication} also includes {}, which [postgres] `tables` does not list: their changes are captured too; to stop that: ALTER PUBLICATION {name} DROP TABLE {} (or DROP TABLES IN SCHEMA, for a schema the publication names)",
            names(&extra),
            quoted(&extra)
        ));
    }
    Ok(differences)
}

/// The slot's marker as JetStream holds it, with its key: `Ok(None)` when there is none, or
/// NATS could not be reached (`nats` is `None`; the NATS check said so); `Err` when it could not
/// be read.
async fn read_marker(
    nats: Option<&async_nats::Client>,
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<(String, String)>, String> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let key = marker_key(client, slot).await.map_err(|e| format!("cannot read the server's system identifier: {e}"))?;
    let Some(nats) = nats else { return Ok(None) };
    let stream = match async_nats::jetstream::new(nats.clone()).get_stream(SLOT_BUCKET).await {
        Ok(stream) => stream,
        Err(error) if crate::sink::stream_not_found(&error) => return Ok(None),
        Err(error) => return Err(format!("cannot read stream {SLOT_BUCKET}, where slots' records are kept: {error}")),
    };
    match stream.get_last_raw_message_by_subject(&key).await {
        Ok(message) => Ok(Some((key, String::from_utf8_lossy(&message.payload).into_owned()))),
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(error) => Err(format!("cannot read {key} from stream {SLOT_BUCKET}: {error}")),
    }
}

/// `weir check` for `[postgres]`: server settings, permissions, tables, publication and slot.
/// Prints what is fine and returns each problem with how to fix it. (`nats`: the NATS check's
/// client, for the slot's marker in JetStream.)
pub async fn check(config: &PostgresConfig, nats: Option<&async_nats::Client>) -> Vec<String> {
    if let Err(error) = super::tls::check_settings(config) {
        return vec![format!("{error:#}")];
    }
    let client = match connect_control(config).await {
        Ok(client) => client,
        // TLS errors already say what to fix.
        Err(error) if format!("{error:#}").contains("TLS") => return vec![format!("{error:#}")],
        Err(error) => return vec![format!("{error:#}; fix [postgres] url or start PostgreSQL")],
    };
    println!("ok    PostgreSQL connected ({})", describe(&config.url));
    let mut problems = Vec::new();
    let setting = |name: &'static str| {
        let client = &client;
        async move {
            client
                .query_one("SELECT setting FROM pg_settings WHERE name = $1", &[&name])
                .await
                .map(|row| row.get::<_, String>(0))
                .unwrap_or_default()
        }
    };
    let wal_level = setting("wal_level").await;
    if wal_level == "logical" {
        println!("ok    wal_level = logical");
    } else {
        problems.push(format!(
            "PostgreSQL wal_level is `{wal_level}`, change capture needs `logical`: run \
             `ALTER SYSTEM SET wal_level = logical` and restart PostgreSQL"
        ));
    }
    match client
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
    {
        Ok(row) if row.get::<_, bool>(1) => println!("ok    role {} may replicate", row.get::<_, String>(0)),
        Ok(row) => {
            let role: String = row.get(0);
            problems.push(format!(
                "role `{role}` lacks the REPLICATION attribute: `ALTER ROLE {} REPLICATION`",
                quote(&role)
            ));
        }
        Err(error) => problems.push(format!("cannot read the role's attributes: {error}")),
    }
    let slots_max: i64 = setting("max_replication_slots").await.parse().unwrap_or(0);
    let senders_max: i64 = setting("max_wal_senders").await.parse().unwrap_or(0);
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.map(|row| row.get::<_, i64>(0)).unwrap_or(0) }
    };
    let slots_used = count("SELECT count(*) FROM pg_replication_slots").await;
    let mut senders_used = count("SELECT count(*) FROM pg_stat_replication").await;
    let slot = client
        .query_opt(
            "SELECT plugin, active, active_pid, wal_status, database = current_database(), database \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await
        .ok()
        .flatten();
    if let Some(pid) = slot.as_ref().and_then(|row| row.get::<_, Option<i32>>(2)) {
        // This gateway's own stream holds the slot: not a sender another one would need. (Not
        // counted when the holder is an ordinary session, which pg_stat_replication omits.)
        let own = client
            .query_one("SELECT count(*) FROM pg_stat_replication WHERE pid = $1", &[&pid])
            .await
            .map_or(0, |row| row.get::<_, i64>(0));
        senders_used -= own;
    }
    let marker = match read_marker(nats, &client, &config.slot).await {
        Ok(marker) => marker,
        Err(error) => {
            problems.push(error);
            None
        }
    };
    // A snapshot that did not finish: `weir run` starts it again, with a new slot.
    let snapshot_pending = marker.as_ref().is_some_and(|(_, recorded)| snapshot_unfinished(recorded.as_bytes()));
    if slot.is_none() && slots_used >= slots_max {
        problems.push(format!(
            "max_replication_slots = {slots_max} and {slots_used} are in use: raise it (restart needed) or drop \
             unused slots (`SELECT pg_drop_replication_slot(name)`)"
        ));
    }
    if senders_used >= senders_max {
        problems
            .push(format!("max_wal_senders = {senders_max} and {senders_used} are in use: raise it (restart needed)"));
    }
    match &slot {
        None => match &marker {
            // As `weir run` would: a slot this gateway made is gone, so changes may be lost.
            Some((key, recorded)) if !snapshot_pending => {
                problems.push(slot_missing(&config.slot, recorded, &purge_command(key)))
            }
            _ => {
                println!("note  slot {} does not exist yet; `weir run` creates it (after the publication)", config.slot)
            }
        },
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            let active: bool = row.get(1);
            let wal_status: Option<String> = row.get(3);
            let same_database: Option<bool> = row.get(4);
            if plugin.as_deref() != Some("pgoutput") {
                problems
                    .push(format!("slot {} uses plugin {plugin:?}, not pgoutput; choose another `slot`", config.slot));
            } else if same_database != Some(true) {
                problems.push(format!(
                    "slot {} belongs to database {:?}, not this one; choose another `slot`",
                    config.slot,
                    row.get::<_, Option<String>>(5).unwrap_or_default()
                ));
            } else if wal_status.as_deref() == Some("lost") {
                let purge = marker.as_ref().map(|(key, _)| purge_command(key));
                problems.push(slot_lost(&config.slot, purge.as_deref()));
            } else if active {
                println!(
                    "note  slot {} is in use (PID {}); fine if that is this gateway",
                    config.slot,
                    row.get::<_, Option<i32>>(2).unwrap_or_default()
                );
            } else {
                println!("ok    slot {} (pgoutput, {})", config.slot, wal_status.unwrap_or_default());
            }
        }
    }
    match client.query_opt("SELECT puballtables FROM pg_publication WHERE pubname = $1", &[&config.publication]).await {
        Ok(Some(_)) => match publication_differences(config, &client).await {
            Ok(differences) if differences.is_empty() => {
                println!("ok    publication {} exists and matches `tables`", config.publication);
            }
            Ok(differences) => problems.extend(differences),
            Err(error) => problems.push(format!("cannot read the publication's tables: {error}")),
        },
        // Made after the slot, it cannot decode what the slot holds from before it.
        Ok(None) if slot.is_some() && !snapshot_pending => problems.push(publication_missing_beside_slot(
            config,
            marker.as_ref().map(|(key, _)| purge_command(key)).as_deref(),
        )),
        Ok(None) => println!("note  publication {} does not exist yet; `weir run` creates it", config.publication),
        Err(error) => problems.push(format!("cannot read publications: {error}")),
    }
    // Each captured table: it exists, and UPDATE/DELETE can be published (a key or FULL identity).
    // (Privilege: the snapshot reads a partitioned table's partitions; NULL for a table dropped
    // meanwhile, counted as readable.)
    // A partitioned table's own identity does not count: the server checks each partition's.
    type TableRow = (String, String, i8, bool, bool, Option<bool>, bool, Option<String>, bool);
    let tables: Vec<TableRow> = match client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relreplident, \
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident AND i.indisvalid), \
               has_schema_privilege(n.oid, 'USAGE') AND CASE WHEN c.relkind = 'p' \
                 THEN (SELECT bool_and(has_table_privilege(t.relid, 'SELECT')) \
                       FROM pg_partition_tree(c.oid) t WHERE t.isleaf) \
                 ELSE has_table_privilege(c.oid, 'SELECT') END, \
               c.relkind = 'p', \
               (SELECT string_agg(quote_ident(ln.nspname) || '.' || quote_ident(l.relname), ', ') \
                FROM pg_partition_tree(c.oid) t JOIN pg_class l ON l.oid = t.relid \
                JOIN pg_namespace ln ON ln.oid = l.relnamespace \
                WHERE t.isleaf AND c.relkind = 'p' AND NOT (l.relreplident = 'f' \
                  OR (l.relreplident = 'd' AND EXISTS (SELECT 1 FROM pg_index i \
                      WHERE i.indrelid = l.oid AND i.indisprimary)) \
                  OR (l.relreplident = 'i' AND EXISTS (SELECT 1 FROM pg_index i \
                      WHERE i.indrelid = l.oid AND i.indisreplident AND i.indisvalid)))), \
               c.relispartition \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'",
            &[],
        )
        .await
    {
        Ok(rows) => rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6), r.get(7), r.get(8)))
            .collect(),
        Err(error) => {
            problems.push(format!("cannot list tables: {error}"));
            Vec::new()
        }
    };
    let wanted: Vec<(String, String)> = if config.tables.is_empty() {
        // A partition is judged under its partitioned table (which names the keyless ones), so
        // listing it on its own as well would report it twice.
        tables.iter().filter(|row| !row.8).map(|(s, t, ..)| (s.clone(), t.clone())).collect()
    } else {
        config
            .tables
            .iter()
            .map(|name| {
                let (schema, table) = name.split_once('.').unwrap_or(("public", name));
                (schema.to_string(), table.to_string())
            })
            .collect()
    };
    for (schema, table) in wanted {
        let quoted = format!("{}.{}", quote(&schema), quote(&table));
        match tables.iter().find(|(s, t, ..)| *s == schema && *t == table) {
            None => problems.push(format!("table {schema}.{table} does not exist; create it or fix [postgres] tables")),
            Some((_, _, identity, has_key, has_identity_index, readable, partitioned, keyless_partitions, _)) => {
                match (*identity as u8, has_key, has_identity_index) {
                    _ if *partitioned => match keyless_partitions {
                        None => {
                            println!("ok    table {schema}.{table} (partitioned: every partition has a key or FULL)")
                        }
                        Some(partitions) => problems.push(format!(
                            "partitioned table {schema}.{table}: partitions {partitions} have no primary key (or \
                             FULL identity), so UPDATE and DELETE on them will fail once they are published; add \
                             a primary key to {quoted} (its partitions get it) or `ALTER TABLE … REPLICA IDENTITY \
                             FULL` on each"
                        )),
                    },
                    (b'f', ..) => println!("ok    table {schema}.{table} (REPLICA IDENTITY FULL: old rows in full)"),
                    (b'd', true, _) => println!("ok    table {schema}.{table} (primary key)"),
                    (b'i', _, true) => println!("ok    table {schema}.{table} (REPLICA IDENTITY USING INDEX)"),
                    // The index was dropped: the server then acts as NOTHING.
                    (b'i', _, false) => problems.push(format!(
                        "table {schema}.{table} has REPLICA IDENTITY USING INDEX but the index is gone: UPDATE and \
                         DELETE on it will fail once it is published; `ALTER TABLE {quoted} REPLICA IDENTITY \
                         DEFAULT` (with a primary key), USING INDEX another unique index, or FULL"
                    )),
                    (b'n', ..) => problems.push(format!(
                        "table {schema}.{table} has REPLICA IDENTITY NOTHING: UPDATE and DELETE on it will fail once \
                         it is published; `ALTER TABLE {quoted} REPLICA IDENTITY DEFAULT` (with a primary key) or FULL"
                    )),
                    _ => problems.push(format!(
                        "table {schema}.{table} has no primary key: UPDATE and DELETE on it will fail once it is \
                         published, and its events carry no key; add a primary key or \
                         `ALTER TABLE {quoted} REPLICA IDENTITY FULL`"
                    )),
                }
                if config.snapshot && *readable == Some(false) {
                    problems.push(format!(
                        "the snapshot reads table {schema}.{table}, which this role may not SELECT: \
                         `GRANT SELECT ON {quoted} TO …` (the role in [postgres] url)"
                    ));
                }
            }
        }
    }
    problems
}
