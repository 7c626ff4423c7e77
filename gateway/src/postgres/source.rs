//! The change-capture loop: publication and slot set-up, the replication stream, row events
//! through the routes' plugin chains into JetStream, and the slot's confirmed position moved
//! only past transactions whose every event JetStream has acknowledged.

use super::pgoutput::{self, Message, OldKind, Relation};
use super::values::{self, Types};
use super::{SourceStatus, connection};
use crate::config::{PostgresConfig, TruncateMode};
use crate::event::Event;
use crate::metrics::Metrics;
use crate::pipeline::{Disposition, Pipeline, SourceData, Unavailability};
use crate::sink::Sink;
use futures::StreamExt;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Why a session ended.
#[derive(Debug)]
pub enum Failure {
    /// Reconnect after a pause: the server or the network went away.
    Retry(anyhow::Error),
    /// Stop the gateway: continuing could skip changes (slot lost, missing or taken).
    Fatal(anyhow::Error),
}

/// Longest wait for the control connection's queries: over a network gone silent they would
/// otherwise wait for TCP to give up (about 15 minutes on Linux).
const CONTROL_PATIENCE: Duration = Duration::from_secs(30);

/// `work` (queries over the control connection), or a reconnect when it takes over `patience`.
async fn answered_in_time<T>(patience: Duration, work: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    tokio::time::timeout(patience, work).await.unwrap_or_else(|_| {
        Err(retry(anyhow::anyhow!(
            "PostgreSQL did not answer the control connection's queries within {patience:?}; the network may have gone silent"
        )))
    })
}

/// How long a stop waits to mark the last stored position before letting the slot go.
const LAST_MARK_TIMEOUT: Duration = Duration::from_secs(2);

/// Batches' worth of replication messages read ahead of the one being stored.
const READ_AHEAD_BATCHES: usize = 4;
/// At most this many messages read ahead, whatever `max_batch` is.
const READ_AHEAD_MAX: usize = 32_768;

fn retry(error: impl Into<anyhow::Error>) -> Failure {
    Failure::Retry(error.into())
}

/// A batch ahead failed: its session is ending, and nothing behind it may count as stored.
fn ahead_failed() -> Failure {
    retry(anyhow::anyhow!("a batch ahead of this one was not stored"))
}

/// Seconds between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_OFFSET: u64 = 946_684_800;

/// Now, in microseconds since PostgreSQL's epoch (how the server states times).
pub fn now_pg_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| i64::try_from(since.as_micros()).unwrap_or(i64::MAX))
        .saturating_sub(PG_EPOCH_OFFSET as i64 * 1_000_000)
}

/// The last instant RFC 3339 can write (9999-12-31T23:59:59.999999Z), in microseconds since
/// PostgreSQL's epoch.
const LAST_RFC3339_MICROS: i64 = (253_402_300_800 - PG_EPOCH_OFFSET as i64) * 1_000_000 - 1;

/// A commit time from the server, RFC 3339. Past year 9999 (only a broken clock gets there; the
/// formatter has no way to write it) it is clamped to the last instant it can.
fn pg_time(micros: i64) -> String {
    let micros = micros.clamp(0, LAST_RFC3339_MICROS).unsigned_abs();
    let since_1970 = Duration::from_secs(PG_EPOCH_OFFSET) + Duration::from_micros(micros);
    humantime::format_rfc3339_micros(UNIX_EPOCH + since_1970).to_string()
}

/// The change-capture source: one per `[postgres]` section.
pub struct PostgresSource {
    config: PostgresConfig,
    pipeline: Arc<Pipeline>,
    sink: Sink,
    metrics: Arc<Metrics>,
    status: Arc<SourceStatus>,
    /// Whether this process has streamed from the slot: a reconnect then waits for a slot still
    /// held by its own cut-off connection instead of stopping.
    streamed: std::sync::atomic::AtomicBool,
    /// The sessions this process opened to create the slot or read the snapshot, which a retry
    /// after a cut ends if the server still runs them (`setup::prepare`).
    own_sessions: super::setup::OwnSessions,
    marks: Arc<Marks>,
}

/// How far the slot may be confirmed. Every position is recorded in the slot's marker
/// ([`super::setup::SlotMarker`]) before the slot is moved there; [`keep_marker`] writes it,
/// at most once per [`MARK_EVERY`].
#[derive(Default)]
struct Marks {
    /// The furthest position whose changes are all stored: to be confirmed.
    wanted: AtomicU64,
    /// The furthest position the marker allows.
    marked: AtomicU64,
    wanted_moved: tokio::sync::Notify,
    /// Bumped when `marked` moves. A watch, not a `Notify`: the streaming loop keeps one wait
    /// armed across its turns (re-arming costs a lock per replication message), and a batch
    /// waiting to be stored must hear of it too.
    marked_moved: watch::Sender<u64>,
}

/// How often the marker is written while changes are stored: the slot is confirmed this much
/// later (status updates go out every `status_interval` anyway), for one small JetStream write
/// a second.
const MARK_EVERY: Duration = Duration::from_secs(1);

/// Writes the furthest stored position to the marker whenever it moves, then lets it be confirmed.
async fn keep_marker(marker: Arc<super::setup::SlotMarker>, marks: Arc<Marks>) {
    let mut failed_in_a_row = 0u32;
    loop {
        let wanted = marks.wanted.load(Ordering::Relaxed);
        if wanted <= marks.marked.load(Ordering::Relaxed) {
            marks.wanted_moved.notified().await;
            continue;
        }
        match marker.allow_confirming(Lsn::from(wanted)).await {
            Ok(()) => {
                failed_in_a_row = 0;
                marks.marked.fetch_max(wanted, Ordering::Relaxed);
                marks.marked_moved.send_modify(|moves| *moves += 1);
            }
            Err(Failure::Retry(error) | Failure::Fatal(error)) => {
                failed_in_a_row += 1;
                // Every 60th failure while it lasts (a minute or more apart): a marker that
                // cannot be written holds the slot (and the server's WAL) where it is.
                if failed_in_a_row % 60 == 3 {
                    tracing::warn!(error = %format!("{error:#}"), failed_in_a_row, "the slot's marker in stream weir_postgres_slots cannot be written, so the slot is not confirmed and the server keeps WAL for it; see the error");
                } else {
                    tracing::debug!(error = %format!("{error:#}"), "the slot's marker could not be written; the slot is confirmed once it is");
                }
            }
        }
        tokio::time::sleep(MARK_EVERY).await;
    }
}

/// Aborts the task when dropped: a session's helper ends with the session.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Refreshes the replication metrics every few seconds, with the slot's retained WAL read over
/// a connection of its own (so a slow query never holds up the stream).
pub async fn report_metrics(config: PostgresConfig, metrics: Arc<Metrics>, status: Arc<SourceStatus>) {
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        if client.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
            client = super::setup::connect_control(&config).await.ok();
        }
        let mut retained = None;
        if let Some(client) = &client {
            let row = client
                .query_opt(
                    "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                    &[&config.slot],
                )
                .await;
            if let Ok(Some(row)) = row {
                retained = row.get::<_, Option<i64>>(0);
            }
        }
        metrics.set_postgres(&status, retained);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The transaction being read.
struct Transaction {
    /// `{slot}:{commit_lsn}:`, the start of every event id in the transaction.
    id_prefix: String,
    /// The commit LSN as text (`Weir-Position`).
    position: String,
    time: String,
    index: u64,
}

/// A table as the stream last described it, with what each of its rows needs.
struct Table {
    relation: Relation,
    primary_key: Vec<String>,
    /// `schema.table`.
    entity: String,
    /// Change counters by op: insert, update, delete, truncate.
    changes: [prometheus_client::metrics::counter::Counter; 4],
}

/// Messages ready to store, by consecutive runs of one route (its name, its messages).
type Prepared = Vec<(String, Vec<crate::pipeline::Message>)>;

/// Batches being stored, oldest first, while the next one is read and prepared. A batch starts
/// sending once the one before has sent everything (not once it is stored), so JetStream is
/// never idle between batches; each yields the newest commit it completes, confirmed in order.
#[derive(Default)]
struct Storing<'a> {
    batches: futures::stream::FuturesOrdered<futures::future::BoxFuture<'a, Result<Option<Lsn>, Failure>>>,
    /// Resolves once the newest batch's sends are all out (or it is over).
    newest_sent: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Each batch not yet stored, oldest first: batches behind one in trouble stop sending, and
    /// no new batch starts while one is in trouble.
    live: Vec<BatchFlags>,
}

/// What batches behind a batch see of it.
#[derive(Clone)]
struct BatchFlags {
    /// Raised by the sink as soon as one of the batch's changes is not stored.
    trouble: Arc<std::sync::atomic::AtomicBool>,
    /// Turns true once the batch and every batch ahead of it are stored.
    stored: watch::Receiver<bool>,
}

impl BatchFlags {
    fn in_trouble(&self) -> bool {
        self.trouble.load(Ordering::Relaxed) && !*self.stored.borrow()
    }
}

/// Keeps batches' sends in batch order, as if they were one batch: a batch lets the next one
/// start sending once all of its first sends are out; once a change is not stored (no answer, no
/// leader, refused, full, NATS gone), the batches behind stop sending and none sends again (a
/// resend) before the batches ahead of it are stored. Messages in flight at the moment a change
/// fails may still be stored out of order, as within one batch; nothing else is.
struct BatchOrder {
    /// Fired once this batch's sends are all out; dropped (also a go-ahead) when it is over.
    sent: Option<tokio::sync::oneshot::Sender<()>>,
    /// Whether the run now publishing is the batch's last (earlier runs' sends do not count).
    last_run: bool,
    /// A send was held back (refused, blocked behind a refusal, NATS gone): it may go out late,
    /// so the next batch waits until this one is stored.
    held_back: bool,
    /// This batch's trouble flag, for the batches behind it.
    trouble: Arc<std::sync::atomic::AtomicBool>,
    /// The batches ahead that were not stored when this one started, oldest first; emptied once
    /// they are stored.
    ahead: Vec<BatchFlags>,
}

impl BatchOrder {
    /// A batch with no other batch to keep order with (the snapshot's).
    fn alone() -> BatchOrder {
        BatchOrder { sent: None, last_run: false, held_back: false, trouble: Arc::default(), ahead: Vec::new() }
    }

    /// Waits until every batch ahead is stored (a batch's flag turns true only once the ones
    /// ahead of it are stored too). `false`: one of them failed, and the session is ending.
    async fn ahead_stored(&mut self) -> bool {
        if let Some(newest) = self.ahead.last_mut()
            && newest.stored.wait_for(|stored| *stored).await.is_err()
        {
            return false;
        }
        self.ahead.clear();
        true
    }
}

impl crate::sink::SendOrder for BatchOrder {
    fn sent(&mut self, every_one: bool) {
        self.held_back |= !every_one;
        if self.last_run
            && !self.held_back
            && let Some(sent) = self.sent.take()
        {
            let _ = sent.send(());
        }
    }

    fn may_resend(&mut self) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(self.ahead_stored())
    }

    fn trouble(&self) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        Some(self.trouble.clone())
    }

    fn hold_sends(&self) -> bool {
        self.ahead.iter().any(BatchFlags::in_trouble)
    }

    /// Order is kept per table, across keys: a change refused (or without room, in a full
    /// stream) holds back every later one, which are sent again behind it.
    fn refusal_holds_all(&self) -> bool {
        true
    }
}

/// Events read but not yet stored, and the newest commit they complete.
#[derive(Default)]
struct Batch {
    events: Vec<Event>,
    /// `end_lsn` of the newest transaction whose events are all in this batch or stored.
    commit: Option<Lsn>,
    started: Option<Instant>,
}

impl PostgresSource {
    /// A source for `config`, publishing through `pipeline` and `sink`.
    pub fn new(
        config: PostgresConfig,
        pipeline: Arc<Pipeline>,
        sink: Sink,
        metrics: Arc<Metrics>,
        status: Arc<SourceStatus>,
    ) -> PostgresSource {
        PostgresSource {
            config,
            pipeline,
            sink,
            metrics,
            status,
            streamed: std::sync::atomic::AtomicBool::new(false),
            own_sessions: super::setup::OwnSessions::default(),
            marks: Arc::default(),
        }
    }

    /// Runs until `shutdown` turns true (returns `Ok`) or a fatal problem (returns `Err`);
    /// reconnects with backoff after anything else.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        // A TLS setting that cannot work is a config error: stop instead of retrying forever.
        if let Err(error) = super::tls::check_settings(&self.config) {
            tracing::error!(error = %format!("{error:#}"), "PostgreSQL change capture cannot start");
            return Err(error);
        }
        let mut backoff = Duration::from_millis(200);
        loop {
            let started = Instant::now();
            let outcome = self.session(&mut shutdown).await;
            self.status.connected.store(false, Ordering::Relaxed);
            match outcome {
                Ok(()) => return Ok(()),
                Err(Failure::Fatal(error)) => {
                    tracing::error!(error = %format!("{error:#}"), "PostgreSQL change capture stopped");
                    return Err(error);
                }
                Err(Failure::Retry(_)) if *shutdown.borrow() => return Ok(()),
                Err(Failure::Retry(error)) => {
                    if started.elapsed() > Duration::from_secs(30) {
                        backoff = Duration::from_millis(200);
                    }
                    tracing::warn!(error = %format!("{error:#}"), retry_in = ?backoff, "PostgreSQL replication interrupted; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
            if *shutdown.borrow() {
                return Ok(());
            }
        }
    }

    async fn session(&self, shutdown: &mut watch::Receiver<bool>) -> Result<(), Failure> {
        let control = within_connect_time(super::setup::connect_control(&self.config)).await?;
        let resuming = self.streamed.load(Ordering::Relaxed);
        let (start, marker) = answered_in_time(
            CONTROL_PATIENCE * 2,
            super::setup::prepare(&self.config, &control, &self.sink, resuming, &self.own_sessions),
        )
        .await?;
        let marker = Arc::new(marker);
        let mut types =
            answered_in_time(CONTROL_PATIENCE, async { super::setup::load_types(&control).await.map_err(retry) })
                .await?;
        let start = match start {
            super::setup::Start::Resume(lsn) => lsn,
            super::setup::Start::Snapshot => self.snapshot(&control, &types, &marker, shutdown).await?,
        };
        let replication =
            connection::replication_config(&self.config, connection::Purpose::Direct).await.map_err(retry)?;
        let replication = replication
            .with_start_lsn(start)
            .with_ack_lsn(start)
            .with_status_interval(self.config.status_interval)
            // Room to keep reading the slot while a batch or two is being stored.
            .with_buffer_size((READ_AHEAD_BATCHES * self.config.max_batch.max(2048)).min(READ_AHEAD_MAX))
            .with_application_name("weir");
        let mut stream = within_connect_time(async { Ok(ReplicationClient::connect(replication).await?) }).await?;
        // From here the server may hold the slot for this process (START_REPLICATION can be
        // accepted unseen): a reconnect waits for it to be let go instead of stopping.
        self.streamed.store(true, Ordering::Relaxed);
        // The snapshot's and the slot's sessions are closed by now.
        self.own_sessions.forget();
        // `connect` only starts the client's worker: ready once the server took START_REPLICATION.
        tokio::select! {
            started = within_connect_time(async { Ok(stream.wait_started().await?) }) => started?,
            _ = shutdown.changed() => return Ok(()),
        }
        self.status.connected.store(true, Ordering::Relaxed);
        self.status.confirmed_lsn.store(start.as_u64(), Ordering::Relaxed);
        // Raised from here by what this server says (another server, after a restore or a
        // failover, may be behind the last one).
        self.status.server_lsn.store(start.as_u64(), Ordering::Relaxed);
        self.status.reading_commit_micros.store(0, Ordering::Relaxed);
        self.marks.wanted.store(start.as_u64(), Ordering::Relaxed);
        self.marks.marked.store(marker.confirmable().unwrap_or(start).max(start).as_u64(), Ordering::Relaxed);
        let marking = AbortOnDrop(tokio::spawn(keep_marker(marker.clone(), self.marks.clone())));
        tracing::info!(slot = %self.config.slot, from = %start, "PostgreSQL change capture streaming");

        let mut relations: HashMap<u32, Table> = HashMap::new();
        let mut transaction: Option<Transaction> = None;
        let mut batch = Batch::default();
        let mut server_gone = std::pin::pin!(server_stops_answering(&control, self.config.status_interval));
        let mut storing = Storing::default();
        // Waits armed once, not once per replication message (each arming takes a lock, and
        // three messages come per single-row transaction): the stop, a marker written, and the
        // batch's linger, reset only when a new batch starts.
        let mut stop_signal = shutdown.clone();
        // (A sender gone counts as a stop, as everywhere.)
        let mut stop = std::pin::pin!(async move {
            let _ = stop_signal.changed().await;
        });
        let mut marked = std::pin::pin!(changed(self.marks.marked_moved.subscribe()));
        let mut linger_timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        let mut linger_set_for = None;
        // `Ok` when asked to stop; the stop's own work follows below, also when a stop cut a
        // wait short (a plugin, NATS) and so ended the loop with an error.
        let streaming = async {
            loop {
                let linger = batch.started.map(|started| tokio::time::Instant::from_std(started + self.config.linger));
                if linger != linger_set_for {
                    if let Some(at) = linger {
                        linger_timer.as_mut().reset(at);
                    }
                    linger_set_for = linger;
                }
                let next = tokio::select! {
                    biased;
                    _ = &mut stop => None,
                    Some(stored) = storing.batches.next(), if !storing.batches.is_empty() => {
                        let commit = stored?;
                        self.stored(&stream, commit, &mut batch, storing.batches.is_empty());
                        continue;
                    }
                    receiver = &mut marked => {
                        self.confirm_marked(&stream);
                        marked.set(changed(receiver));
                        continue;
                    }
                    event = stream.recv() => Some(event),
                    error = &mut server_gone => return Err(retry(error)),
                    () = &mut linger_timer, if linger.is_some() => {
                        self.flush(&mut batch, &stream, shutdown, &mut storing).await?;
                        continue;
                    }
                };
                let Some(event) = next else { return Ok(()) };
                let event = match event {
                    Ok(Some(event)) => event,
                    Ok(None) => return Err(retry(anyhow::anyhow!("the replication stream ended"))),
                    Err(error) => return Err(retry(error)),
                };
                match event {
                    ReplicationEvent::Begin { final_lsn, commit_time_micros, .. } => {
                        // How far behind the stream is: the age of what it reads now.
                        self.status.reading_commit_micros.store(commit_time_micros.max(1), Ordering::Relaxed);
                        let position = final_lsn.to_string();
                        transaction = Some(Transaction {
                            id_prefix: format!("{}:{position}:", self.config.slot),
                            position,
                            time: pg_time(commit_time_micros),
                            index: 0,
                        });
                    }
                    ReplicationEvent::Commit { end_lsn, .. } => {
                        transaction = None;
                        batch.commit = Some(end_lsn);
                        if batch.events.is_empty() && storing.batches.is_empty() {
                            // Nothing to store (all filtered by the publication): confirm now.
                            self.confirm(&stream, end_lsn);
                            batch.commit = None;
                        }
                    }
                    ReplicationEvent::XLogData { data, wal_end, .. } => {
                        // The server's WAL end also comes with the data (0 inside a transaction):
                        // during a catch-up, keepalives are rare and the lag would read as none.
                        self.status.server_lsn.fetch_max(wal_end.as_u64(), Ordering::Relaxed);
                        let message = pgoutput::decode(data).map_err(|e| Failure::Fatal(e.into()))?;
                        // A table's shape and a new type are looked up over the control connection,
                        // which the watchdog cannot watch while this runs. (Rows ask it nothing.)
                        let asks_the_server = matches!(message, Message::Relation(_) | Message::Type { .. });
                        let applying =
                            self.apply(message, &control, &mut types, &mut relations, transaction.as_mut(), &mut batch);
                        if asks_the_server {
                            answered_in_time(CONTROL_PATIENCE, applying).await?;
                        } else {
                            applying.await?;
                        }
                        if batch.events.len() >= self.config.max_batch {
                            self.flush(&mut batch, &stream, shutdown, &mut storing).await?;
                        }
                    }
                    ReplicationEvent::KeepAlive { wal_end, .. } => {
                        self.status.server_lsn.fetch_max(wal_end.as_u64(), Ordering::Relaxed);
                        // Caught up with nothing in flight: confirm the server's position, so a quiet
                        // publication on a busy database does not pin WAL.
                        if transaction.is_none()
                            && batch.events.is_empty()
                            && batch.commit.is_none()
                            && storing.batches.is_empty()
                        {
                            self.confirm(&stream, wal_end);
                            // The server sends one when it has sent everything: not behind.
                            self.status.reading_commit_micros.store(0, Ordering::Relaxed);
                        }
                    }
                    ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
                }
            }
        };
        match streaming.await {
            Ok(()) => {}
            Err(Failure::Retry(_)) if *shutdown.borrow() => {}
            Err(failure) => return Err(failure),
        }
        // Shutting down: the batches being stored are finished (their sleeps end at shutdown);
        // nothing half-read is confirmed, the slot replays it next time.
        while let Some(Ok(commit)) = storing.batches.next().await {
            self.stored(&stream, commit, &mut batch, storing.batches.is_empty());
        }
        // The last stored position is marked here, after the marker's own writer has stopped
        // (one connection keeps the writes in order; an older one landing last would make the
        // next start refuse the slot).
        drop(marking);
        let wanted = self.marks.wanted.load(Ordering::Relaxed);
        if wanted > self.marks.marked.load(Ordering::Relaxed)
            && let Ok(Ok(())) =
                tokio::time::timeout(LAST_MARK_TIMEOUT, marker.allow_confirming(Lsn::from(wanted))).await
        {
            self.marks.marked.fetch_max(wanted, Ordering::Relaxed);
            self.confirm_marked(&stream);
        }
        let _ = stream.shutdown().await;
        let _ = tokio::time::timeout(CONTROL_PATIENCE, self.confirm_on_the_way_out(&control)).await;
        Ok(())
    }

    /// Turns one decoded message into events (or relation/type bookkeeping).
    async fn apply(
        &self,
        message: Message,
        control: &tokio_postgres::Client,
        types: &mut Types,
        relations: &mut HashMap<u32, Table>,
        transaction: Option<&mut Transaction>,
        batch: &mut Batch,
    ) -> Result<(), Failure> {
        let change = match message {
            Message::Relation(relation) => {
                if relation.columns.iter().any(|c| types.kind(c.type_oid).is_none()) {
                    *types = super::setup::load_types(control).await.map_err(retry)?;
                }
                let primary_key = super::setup::primary_key(control, relation.oid).await.map_err(retry)?;
                let changes = ["insert", "update", "delete", "truncate"]
                    .map(|op| self.metrics.postgres_changes(&relation.schema, &relation.table, op));
                let entity = format!("{}.{}", relation.schema, relation.table);
                relations.insert(relation.oid, Table { relation, primary_key, entity, changes });
                return Ok(());
            }
            // Sent once a session for each custom type a table uses: `pg_type` is read again
            // only for one not seen yet (a type made since the last read).
            Message::Type { oid, .. } => {
                if types.kind(oid).is_none() {
                    *types = super::setup::load_types(control).await.map_err(retry)?;
                }
                return Ok(());
            }
            Message::Other(_) => return Ok(()),
            change => change,
        };
        let Some(transaction) = transaction else {
            return Err(Failure::Fatal(anyhow::anyhow!("a row change arrived outside a transaction")));
        };
        let relation_of = |oid: u32| {
            relations.get(&oid).ok_or_else(|| {
                Failure::Fatal(anyhow::anyhow!("row change for relation {oid} before its Relation message"))
            })
        };
        let mut push = |table: &Table,
                        op: &str,
                        op_index: usize,
                        key: Option<String>,
                        data: Vec<u8>,
                        old: Option<Vec<u8>>,
                        unchanged: Vec<String>| {
            let mut headers = Vec::new();
            if !unchanged.is_empty() {
                headers.push(("Weir-Unchanged-Toast".to_string(), unchanged.join(",")));
            }
            let mut id = String::with_capacity(transaction.id_prefix.len() + 8);
            id.push_str(&transaction.id_prefix);
            id.push_str(itoa::Buffer::new().format(transaction.index));
            transaction.index += 1;
            table.changes[op_index].inc();
            batch.started.get_or_insert_with(Instant::now);
            batch.events.push(Event {
                id,
                source: "postgres".into(),
                entity: table.entity.clone(),
                op: op.into(),
                key,
                time: transaction.time.clone(),
                subject: String::new(),
                headers,
                data,
                old,
                position: Some(transaction.position.clone()),
            });
        };
        match change {
            Message::Insert { relation, new } => {
                let table = relation_of(relation)?;
                let (relation, key) = (&table.relation, table.primary_key.as_slice());
                let (data, unchanged) = types.row(&relation.columns, &new, None);
                push(table, "insert", 0, values::key(&relation.columns, &new, key), data, None, unchanged);
            }
            Message::Update { relation, old, new } => {
                let table = relation_of(relation)?;
                let (relation, key) = (&table.relation, table.primary_key.as_slice());
                let full_old = old.as_ref().filter(|(kind, _)| *kind == OldKind::Full).map(|(_, row)| row.as_slice());
                let (data, unchanged) = types.row(&relation.columns, &new, full_old);
                let old = old.map(|(kind, row)| match kind {
                    OldKind::Full => types.row(&relation.columns, &row, None).0,
                    OldKind::Key => types.key_row(&relation.columns, &row),
                });
                push(table, "update", 1, values::key(&relation.columns, &new, key), data, old, unchanged);
            }
            Message::Delete { relation, old: (kind, row) } => {
                let table = relation_of(relation)?;
                let (relation, key) = (&table.relation, table.primary_key.as_slice());
                let old = match kind {
                    OldKind::Full => types.row(&relation.columns, &row, None).0,
                    OldKind::Key => types.key_row(&relation.columns, &row),
                };
                let key = values::key(&relation.columns, &row, key);
                push(table, "delete", 2, key, b"null".to_vec(), Some(old), Vec::new());
            }
            Message::Truncate { relations: truncated, cascade, restart_identity } => {
                for oid in truncated {
                    let table = relation_of(oid)?;
                    if self.config.truncate == TruncateMode::Skip {
                        self.metrics.postgres_truncate_skipped(&table.relation.schema, &table.relation.table);
                        continue;
                    }
                    let data = format!(r#"{{"cascade":{cascade},"restart_identity":{restart_identity}}}"#).into_bytes();
                    push(table, "truncate", 3, None, data, None, Vec::new());
                }
            }
            Message::Relation(_) | Message::Type { .. } | Message::Other(_) => {}
        }
        Ok(())
    }

    /// Prepares the batch (plugin chains, envelopes) while the batches before it are stored,
    /// then, once the newest of them has sent everything, starts storing this one behind it (see
    /// [`BatchOrder`]). The reading loop polls the batches being stored and confirms, in order,
    /// the newest commit each completes.
    async fn flush<'a>(
        &'a self,
        batch: &mut Batch,
        stream: &ReplicationClient,
        shutdown: &mut watch::Receiver<bool>,
        storing: &mut Storing<'a>,
    ) -> Result<(), Failure> {
        let events = std::mem::take(&mut batch.events);
        batch.started = None;
        let commit = batch.commit.take();
        let mut newest_sent = storing.newest_sent.take();
        let (batches, live) = (&mut storing.batches, &mut storing.live);
        let prepared = {
            let mut preparing = std::pin::pin!(self.prepare(events, shutdown));
            let mut ready = None;
            let mut marked = self.marks.marked_moved.subscribe();
            // A marker written since the streaming loop last looked is confirmed now.
            self.confirm_marked(stream);
            // The batches ahead keep moving (and those stored are confirmed) until this one is
            // prepared and the newest one has sent everything; and, if one of them is in
            // trouble, until all of them are stored.
            loop {
                live.retain(|flags| !*flags.stored.borrow());
                let in_trouble = live.iter().any(BatchFlags::in_trouble);
                if newest_sent.is_none()
                    && !in_trouble
                    && let Some(prepared) = ready.take()
                {
                    break prepared;
                }
                tokio::select! {
                    biased;
                    Some(stored) = batches.next(), if !batches.is_empty() => {
                        if let Some(commit) = stored? {
                            self.confirm(stream, commit);
                        }
                    }
                    // Stored batches are confirmed as the marker allows also while this one
                    // waits (for a quarantined plugin, say: minutes).
                    Ok(()) = marked.changed() => self.confirm_marked(stream),
                    _ = async {
                        if let Some(sent) = newest_sent.as_mut() {
                            let _ = sent.await;
                        }
                    }, if newest_sent.is_some() => newest_sent = None,
                    done = &mut preparing, if ready.is_none() => match done {
                        Ok(prepared) => ready = Some(prepared),
                        Err(failure) => {
                            // Shutting down: the batches being stored finish first, as at any
                            // shutdown, so what they stored is confirmed.
                            while let Some(Ok(commit)) = batches.next().await {
                                if let Some(commit) = commit {
                                    self.confirm(stream, commit);
                                }
                            }
                            return Err(failure);
                        }
                    },
                }
            }
        };
        let (sent, newest_sent) = tokio::sync::oneshot::channel();
        let (stored, stored_flag) = watch::channel(false);
        storing.newest_sent = Some(newest_sent);
        let mut shutdown = shutdown.clone();
        let trouble = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ahead = storing.live.clone();
        storing.live.push(BatchFlags { trouble: trouble.clone(), stored: stored_flag });
        storing.batches.push_back(Box::pin(async move {
            let mut order = BatchOrder { sent: Some(sent), last_run: false, held_back: false, trouble, ahead };
            self.publish_prepared(prepared, &mut order, &mut shutdown).await?;
            // Stored means this batch and every one ahead of it, so a batch behind that waits
            // for it waits for all of them.
            if !order.ahead_stored().await {
                return Err(ahead_failed());
            }
            let _ = stored.send(true);
            Ok(commit)
        }));
        Ok(())
    }

    /// A batch is stored: confirms the newest commit it completes and, once every batch is
    /// stored and nothing has been read since, the commit of transactions read meanwhile that
    /// had nothing to store.
    fn stored(&self, stream: &ReplicationClient, commit: Option<Lsn>, batch: &mut Batch, all_stored: bool) {
        if let Some(commit) = commit {
            self.confirm(stream, commit);
        }
        if all_stored
            && batch.events.is_empty()
            && let Some(commit) = batch.commit.take()
        {
            self.confirm(stream, commit);
        }
        // Everything the server has sent is stored: not behind (an idle server sends no
        // keepalive to say so until new WAL comes).
        let stored_to = self.marks.wanted.load(Ordering::Relaxed);
        if all_stored && batch.events.is_empty() && stored_to >= self.status.server_lsn.load(Ordering::Relaxed) {
            self.status.reading_commit_micros.store(0, Ordering::Relaxed);
        }
    }

    /// Runs a route's chain; while one of its plugins is unloaded (file removed) or quarantined,
    /// waits for it to come back: reading pauses, nothing is skipped.
    async fn process_when_available(
        &self,
        route: usize,
        mut events: Vec<Event>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Vec<Disposition>, Failure> {
        let mut warned = false;
        // Dispositions of the events run so far (a quarantine's probes), in order.
        let mut done = Vec::new();
        loop {
            match self.pipeline.process(route, events, SourceData::Unchecked, &self.metrics).await {
                Ok(dispositions) => {
                    // Only its own pause: the batch before may still be waiting for NATS.
                    if warned {
                        self.status.paused.store(false, Ordering::Relaxed);
                    }
                    done.extend(dispositions);
                    return Ok(done);
                }
                Err(unavailable) => {
                    done.extend(unavailable.done);
                    if !warned {
                        let route = &self.pipeline.route(route).name;
                        match &unavailable.why {
                            Unavailability::Unloaded => {
                                tracing::warn!(plugin = %unavailable.plugin, %route, "plugin not loaded; change capture waits for its file to come back");
                            }
                            Unavailability::Quarantined(quarantine) => {
                                tracing::warn!(plugin = %unavailable.plugin, %route, last_error = %quarantine.last_error, "plugin quarantined; change capture waits (nothing is skipped) until a probe call succeeds or a fixed file is deployed");
                            }
                        }
                        warned = true;
                    }
                    self.status.paused.store(true, Ordering::Relaxed);
                    events = unavailable.events;
                    let waiting = format!("waiting for plugin `{}`", unavailable.plugin);
                    sleep_unless_shut_down(Duration::from_millis(250), shutdown, &waiting).await?;
                }
            }
        }
    }

    /// Routes and stores `events` in order; see [`Self::prepare`] and [`Self::publish_prepared`].
    async fn store(&self, events: Vec<Event>, shutdown: &mut watch::Receiver<bool>) -> Result<(), Failure> {
        let prepared = self.prepare(events, shutdown).await?;
        self.publish_prepared(prepared, &mut BatchOrder::alone(), shutdown).await
    }

    /// Runs `events` through their routes' plugin chains, in order: the messages to store, by
    /// consecutive runs of one route.
    async fn prepare(&self, events: Vec<Event>, shutdown: &mut watch::Receiver<bool>) -> Result<Prepared, Failure> {
        let mut runs: Vec<(usize, Vec<Event>)> = Vec::new();
        for event in events {
            let Some(route) = self.pipeline.route_for(&event) else {
                self.metrics.received_many("postgres", "none", 1);
                self.metrics.dropped("postgres", "none");
                continue;
            };
            match runs.last_mut() {
                Some((last, run)) if *last == route => run.push(event),
                _ => runs.push((route, vec![event])),
            }
        }
        let mut prepared = Vec::with_capacity(runs.len());
        for (route, run) in runs {
            let route_name = self.pipeline.route(route).name.clone();
            self.metrics.received_many("postgres", &route_name, run.len());
            let started = Instant::now();
            let mut dispositions = self.process_when_available(route, run, shutdown).await?;
            self.metrics.chain_duration(&route_name, started.elapsed());
            let mut messages = Vec::new();
            for disposition in &mut dispositions {
                match disposition {
                    Disposition::Publish(out) => messages.append(out),
                    Disposition::Rejected { dead_letter, plugin, reason } => {
                        self.metrics.rejected("postgres", &route_name, plugin);
                        match dead_letter.take() {
                            Some(message) => {
                                self.metrics.dead_lettered("postgres", &route_name);
                                messages.push(message);
                            }
                            None => {
                                tracing::warn!(route = %route_name, %plugin, %reason, "change rejected by a plugin and dropped (the route's on_error is not dlq)")
                            }
                        }
                    }
                    Disposition::Failed { dead_letter, plugin, error } => {
                        self.metrics.plugin_error(plugin, error.kind.as_str());
                        match dead_letter.take() {
                            Some(message) => {
                                self.metrics.dead_lettered("postgres", &route_name);
                                messages.push(message);
                            }
                            None => {
                                tracing::warn!(route = %route_name, %plugin, %error, "plugin failed on a change; dropped (the route's on_error is not dlq)")
                            }
                        }
                    }
                    Disposition::Dropped => self.metrics.dropped("postgres", &route_name),
                }
            }
            if !messages.is_empty() {
                prepared.push((route_name, messages));
            }
        }
        Ok(prepared)
    }

    /// Stores prepared messages in order, behind the batch ahead (`order`). A publish that fails
    /// is retried with the same ids until it succeeds; a change NATS refuses for good is
    /// replaced by its dead letter.
    async fn publish_prepared(
        &self,
        prepared: Prepared,
        order: &mut BatchOrder,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), Failure> {
        let runs = prepared.len();
        for (run, (route_name, messages)) in prepared.into_iter().enumerate() {
            let published_started = Instant::now();
            order.last_run = run + 1 == runs;
            if let Err(refusal) = self.publish_until_stored(&messages, order, shutdown).await? {
                // One of them can never be stored (too large, …): store the others one by one and
                // a dead letter for each refused change, so the stream does not stall on it.
                tracing::warn!(%refusal, "NATS refused a change; storing the batch one by one");
                for message in &messages {
                    if let Err(refusal) =
                        self.publish_until_stored(std::slice::from_ref(message), order, shutdown).await?
                    {
                        let letter = refused_letter(message, &refusal);
                        self.store_dead_letter(message, &letter, order, shutdown).await?;
                        self.metrics.dead_lettered("postgres", &route_name);
                    }
                }
            }
            self.metrics.publish_duration(published_started.elapsed());
            self.metrics.published("postgres", &route_name, messages.len());
            self.status.paused.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Moves the slot to the position this gateway confirmed last. The replication client ends
    /// the stream without sending a last status, so the server may hold the slot up to
    /// `status_interval` behind, and a restart would replay (same ids) what is already stored,
    /// stored twice if it comes after the stream's `duplicate_window`. Best effort: on failure
    /// the replay is what happens.
    async fn confirm_on_the_way_out(&self, control: &tokio_postgres::Client) {
        let confirmed = Lsn::from(self.status.confirmed_lsn.load(Ordering::Relaxed)).to_string();
        // The server lets the slot go a moment after the stream ends.
        for _ in 0..20 {
            let slot = control
                .query_opt("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&self.config.slot])
                .await;
            match slot {
                Ok(Some(row)) if row.get::<_, bool>(0) => tokio::time::sleep(Duration::from_millis(100)).await,
                Ok(Some(_)) => {
                    let moved = control
                        .execute(
                            "SELECT pg_replication_slot_advance(slot_name, $2::text::pg_lsn) FROM pg_replication_slots \
                             WHERE slot_name = $1 AND NOT active AND confirmed_flush_lsn < $2::text::pg_lsn",
                            &[&self.config.slot, &confirmed],
                        )
                        .await;
                    if let Err(error) = moved {
                        tracing::debug!(%error, "could not move the slot to its last confirmed position on the way out");
                    }
                    return;
                }
                _ => return,
            }
        }
    }

    /// Creates the slot with an exported snapshot and emits every row of the published tables as
    /// it was at the slot's start (op `read`), so streaming from the slot continues with no gap
    /// and no double. Reads through a cursor, `max_batch` rows at a time. Returns the slot's
    /// start. If this does not finish, the marker stays `pending` and the next start drops the
    /// slot and snapshots again (rows already stored are stored again, under new ids).
    async fn snapshot(
        &self,
        control: &tokio_postgres::Client,
        types: &Types,
        marker: &super::setup::SlotMarker,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Lsn, Failure> {
        use super::setup::quote;
        // Marked pending before the slot exists: a crash (or a failed write) between creating the
        // slot and marking it would otherwise leave a slot the next start adopts, skipping the
        // snapshot for good.
        marker.write(&Lsn::ZERO, "creating", "pending").await?;
        // Creating the slot waits for the transactions running now, however long they take.
        let replication =
            connection::replication_config(&self.config, connection::Purpose::Waiting).await.map_err(retry)?;
        // The exporter and the reader share one unique name: cut off, they stay on the server
        // (holding the slot while it is created, and the snapshot's xmin), to be ended by name.
        let session = self.own_sessions.new_name("snapshot");
        let mut exporter =
            ReplicationClient::connect_gated(replication.with_application_name(&session)).await.map_err(retry)?;
        let created = exporter
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
                quote(&self.config.slot)
            ))
            .await
            .map_err(|e| retry(anyhow::anyhow!("cannot create replication slot `{}`: {e}", self.config.slot)))?;
        let field = |index: usize| {
            created
                .first()
                .and_then(|row| row.get(index))
                .and_then(|value| value.as_ref())
                .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
                .ok_or_else(|| {
                    Failure::Fatal(anyhow::anyhow!("CREATE_REPLICATION_SLOT answered without field {index}"))
                })
        };
        let start = Lsn::parse(&field(1)?).map_err(|e| Failure::Fatal(anyhow::anyhow!("slot position: {e}")))?;
        let snapshot_name = field(2)?;
        marker.write(&start, "created", "pending").await?;
        tracing::info!(slot = %self.config.slot, at = %start, %session, "created replication slot; reading the tables' existing rows");

        // The exported snapshot lives as long as the exporting session stays idle.
        let reader = super::setup::connect_control_as(&self.config, Some(&session)).await.map_err(retry)?;
        reader
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
                snapshot_name.replace('\'', "''")
            ))
            .await
            .map_err(|e| retry(anyhow::anyhow!("cannot use the exported snapshot: {e}")))?;
        // The snapshot reads what the publication sends: each table on its own (an inheritance
        // parent without its children, which the publication lists themselves), the columns of
        // its column list without generated ones (pgoutput sends neither), the rows its row
        // filter passes. Column lists and row filters exist from PostgreSQL 15, generated columns
        // from 12.
        let version: i32 =
            reader.query_one("SELECT current_setting('server_version_num')::int", &[]).await.map_err(retry)?.get(0);
        let filters = if version >= 150_000 { "p.attnames, p.rowfilter" } else { "NULL::text[], NULL::text" };
        let tables = reader
            .query(
                &format!(
                    "SELECT c.oid, p.schemaname::text, p.tablename::text, c.relkind = 'p', {filters} \
                     FROM pg_publication_tables p \
                     JOIN pg_namespace n ON n.nspname = p.schemaname \
                     JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
                     WHERE p.pubname = $1 ORDER BY 2, 3"
                ),
                &[&self.config.publication],
            )
            .await
            .map_err(retry)?;
        let not_generated = if version >= 120_000 { "AND attgenerated = ''" } else { "" };
        let time = crate::http::now_rfc3339();
        let mut index = 0u64;
        for table in &tables {
            let (oid, schema, name): (u32, String, String) = (table.get(0), table.get(1), table.get(2));
            let (partitioned, published, row_filter): (bool, Option<Vec<String>>, Option<String>) =
                (table.get(3), table.get(4), table.get(5));
            let columns: Vec<pgoutput::Column> = reader
                .query(
                    &format!(
                        "SELECT attname::text, atttypid FROM pg_attribute \
                         WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped {not_generated} ORDER BY attnum"
                    ),
                    &[&oid],
                )
                .await
                .map_err(retry)?
                .iter()
                .map(|row| pgoutput::Column { name: row.get(0), type_oid: row.get(1), key: false })
                .filter(|column| published.as_ref().is_none_or(|names| names.contains(&column.name)))
                .collect();
            let key_columns = super::setup::primary_key(control, oid).await.map_err(retry)?;
            let reads = self.metrics.postgres_changes(&schema, &name, "read");
            let list: Vec<String> = columns.iter().map(|c| quote(&c.name)).collect();
            // A partitioned table holds no rows itself (`ONLY` would read none): it stands for its
            // partitions when the publication publishes through the root.
            let only = if partitioned { "" } else { "ONLY " };
            let filter = row_filter.map(|condition| format!(" WHERE {condition}")).unwrap_or_default();
            reader
                .batch_execute(&format!(
                    "DECLARE weir_snapshot NO SCROLL CURSOR FOR SELECT {} FROM {only}{}.{}{filter}",
                    list.join(", "),
                    quote(&schema),
                    quote(&name)
                ))
                .await
                .map_err(retry)?;
            loop {
                let fetched = reader
                    .simple_query(&format!("FETCH {} FROM weir_snapshot", self.config.max_batch))
                    .await
                    .map_err(retry)?;
                let mut events = Vec::new();
                for message in fetched {
                    let tokio_postgres::SimpleQueryMessage::Row(row) = message else { continue };
                    let values: Vec<pgoutput::Value> = (0..columns.len())
                        .map(|i| match row.get(i) {
                            Some(text) => pgoutput::Value::Text(bytes::Bytes::copy_from_slice(text.as_bytes())),
                            None => pgoutput::Value::Null,
                        })
                        .collect();
                    let (data, _) = types.row(&columns, &values, None);
                    reads.inc();
                    events.push(Event {
                        id: format!("{}:{start}:snapshot:{index}", self.config.slot),
                        source: "postgres".into(),
                        entity: format!("{schema}.{name}"),
                        op: "read".into(),
                        key: values::key(&columns, &values, &key_columns),
                        time: time.clone(),
                        subject: String::new(),
                        headers: Vec::new(),
                        data,
                        old: None,
                        position: Some(start.to_string()),
                    });
                    index += 1;
                }
                if events.is_empty() {
                    break;
                }
                self.store(events, shutdown).await?;
            }
            reader.batch_execute("CLOSE weir_snapshot").await.map_err(retry)?;
            tracing::info!(table = %format!("{schema}.{name}"), "snapshot of table stored");
        }
        reader.batch_execute("COMMIT").await.map_err(retry)?;
        // A gated session that never started streaming does not answer a graceful stop.
        exporter.abort();
        // Retried in place: left `pending`, the next start would take the whole snapshot again.
        let mut pause = Duration::from_millis(200);
        while let Err(Failure::Retry(error) | Failure::Fatal(error)) = marker.write(&start, "created", "done").await {
            tracing::warn!(error = %format!("{error:#}"), retry_in = ?pause, "the snapshot is stored but could not be marked done; retrying");
            sleep_unless_shut_down(pause, shutdown, "marking the snapshot done").await?;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
        tracing::info!(slot = %self.config.slot, rows = index, "snapshot done; streaming changes");
        Ok(start)
    }

    /// Publishes until JetStream stores `messages` (pausing and retrying what is not stored yet
    /// while it is unreachable or full): `Ok(Ok(()))`, or `Ok(Err(reason))` when the server
    /// refuses one for good.
    async fn publish_until_stored(
        &self,
        messages: &[crate::pipeline::Message],
        order: &mut BatchOrder,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Result<(), String>, Failure> {
        use crate::sink::SinkError;
        let mut pause = Duration::from_millis(100);
        // What is still to store after a failed round; the stored ones are not sent again (a
        // long wait would outlast `duplicate_window`, and a full stream needs the room).
        let mut pending: Vec<crate::pipeline::Message> = Vec::new();
        loop {
            let sending = if pending.is_empty() {
                messages
            } else {
                // Sent again: only behind the batches ahead, so it cannot overtake their resends.
                if !order.ahead_stored().await {
                    return Err(ahead_failed());
                }
                &pending[..]
            };
            let outcomes = self.sink.publish_ordered(sending, order).await;
            let mut unstored = Vec::new();
            let mut failure = None;
            for (message, outcome) in sending.iter().zip(outcomes) {
                match outcome {
                    Ok(_) => {}
                    Err(SinkError::Refused(reason)) => return Ok(Err(reason)),
                    Err(error @ (SinkError::TooLarge(_) | SinkError::NoStream(_))) => {
                        return Ok(Err(error.to_string()));
                    }
                    // Not sent, behind a batch ahead in trouble: sent once that one is stored
                    // (above), without a pause or a warning of its own.
                    Err(SinkError::HeldBack) => unstored.push(message.clone()),
                    Err(error) => {
                        failure.get_or_insert(error);
                        unstored.push(message.clone());
                    }
                }
            }
            let Some(error) = failure else {
                if unstored.is_empty() {
                    self.status.paused.store(false, Ordering::Relaxed);
                    return Ok(Ok(()));
                }
                pending = unstored;
                continue;
            };
            self.status.paused.store(true, Ordering::Relaxed);
            tracing::warn!(%error, events = unstored.len(), retry_in = ?pause, "cannot store changes in JetStream; reading from the slot is paused");
            sleep_unless_shut_down(pause, shutdown, "JetStream was unavailable").await?;
            pause = (pause * 2).min(Duration::from_secs(2));
            pending = unstored;
        }
    }

    /// Stores the dead letter of a change NATS refused. One NATS refuses too (its subject is in
    /// no stream, the stream is sealed, …) stops change capture here, retrying, rather than skip
    /// the change: nothing read after its batch is stored until NATS stores the letter.
    async fn store_dead_letter(
        &self,
        change: &crate::pipeline::Message,
        letter: &crate::pipeline::Message,
        order: &mut BatchOrder,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), Failure> {
        let mut pause = Duration::from_secs(1);
        while let Err(refusal) = self.publish_until_stored(std::slice::from_ref(letter), order, shutdown).await? {
            self.status.paused.store(true, Ordering::Relaxed);
            tracing::error!(
                id = change.id(),
                subject = %letter.subject,
                error = %refusal,
                retry_in = ?pause,
                "NATS refused a change and its dead letter; change capture waits here (nothing read after its batch is stored) until NATS stores the dead letter: see the error"
            );
            sleep_unless_shut_down(pause, shutdown, "a dead letter could not be stored").await?;
            pause = (pause * 2).min(Duration::from_secs(30));
        }
        Ok(())
    }

    /// Everything before `lsn` is stored: confirmed to the server as far as the marker allows,
    /// and the rest once it does.
    fn confirm(&self, stream: &ReplicationClient, lsn: Lsn) {
        if self.marks.wanted.fetch_max(lsn.as_u64(), Ordering::Relaxed) < lsn.as_u64() {
            self.marks.wanted_moved.notify_one();
        }
        self.confirm_marked(stream);
    }

    /// Confirms what is stored, up to what the marker allows.
    fn confirm_marked(&self, stream: &ReplicationClient) {
        let allowed = self.marks.wanted.load(Ordering::Relaxed).min(self.marks.marked.load(Ordering::Relaxed));
        if allowed > self.status.confirmed_lsn.load(Ordering::Relaxed) {
            stream.update_applied_lsn(Lsn::from(allowed));
            self.status.confirmed_lsn.store(allowed, Ordering::Relaxed);
        }
    }
}

/// Resolves when `receiver` sees a change, handing it back to wait again; never once its
/// sender is gone (a wait that ended at once would spin the loop polling it).
async fn changed<T>(mut receiver: watch::Receiver<T>) -> watch::Receiver<T> {
    if receiver.changed().await.is_err() {
        // The sender is gone: nothing will change again.
        std::future::pending::<()>().await;
    }
    receiver
}

/// Waits `pause` before a retry; a shutdown meanwhile ends the session (to be resumed from the
/// slot) instead.
async fn sleep_unless_shut_down(
    pause: Duration,
    shutdown: &mut watch::Receiver<bool>,
    while_: &str,
) -> Result<(), Failure> {
    tokio::select! {
        _ = tokio::time::sleep(pause) => Ok(()),
        _ = shutdown.changed() => Err(retry(anyhow::anyhow!("shut down while {while_}"))),
    }
}

/// How long a connection to PostgreSQL may take before it is retried: a silent network would
/// otherwise hold each attempt for as long as TCP keeps trying (minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

async fn within_connect_time<T>(connecting: impl Future<Output = anyhow::Result<T>>) -> Result<T, Failure> {
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(connected) => connected.map_err(retry),
        Err(_) => Err(retry(anyhow::anyhow!("PostgreSQL did not accept a connection within {CONNECT_TIMEOUT:?}"))),
    }
}

/// Resolves once PostgreSQL stops answering on the control connection: a query every
/// `interval` that gets no answer within three intervals (at least 5 s). After a silent network
/// cut the replication stream would otherwise wait until TCP gives up, about a quarter of an hour.
async fn server_stops_answering(control: &tokio_postgres::Client, interval: Duration) -> anyhow::Error {
    let patience = (interval * 3).max(Duration::from_secs(5));
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(patience, control.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return anyhow::anyhow!("the PostgreSQL control connection failed: {error}"),
            Err(_) => {
                return anyhow::anyhow!(
                    "PostgreSQL did not answer for {patience:?}: taking the connection as cut, reconnecting"
                );
            }
        }
    }
}

/// A small dead letter for a change NATS refused to store: where it was going, why, and its
/// id and position, so it can be found and re-read from the table.
fn refused_letter(message: &crate::pipeline::Message, reason: &str) -> crate::pipeline::Message {
    use async_nats::header::HeaderName;
    let header = |name: &'static str| message.header(name).map(str::to_string);
    let entity = header("Weir-Entity").unwrap_or_default();
    let body = serde_json::json!({
        "id": message.id(),
        "entity": entity,
        "op": header("Weir-Op"),
        "key": header("Weir-Key").map(|key| key.chars().take(1024).collect::<String>()),
        "position": header("Weir-Position"),
        "subject": message.subject,
        "bytes": message.payload.len(),
        "error": reason,
    });
    let mut headers = crate::pipeline::Headers::default();
    headers.append(
        HeaderName::from_static("Nats-Msg-Id"),
        crate::pipeline::header_value(&format!("dlq:{}", message.id())),
    );
    for name in ["Weir-Source", "Weir-Entity", "Weir-Op", "Weir-Position"] {
        if let Some(value) = header(name) {
            headers.append(HeaderName::from_static(name), value);
        }
    }
    headers.append(HeaderName::from_static("Weir-Error-Kind"), "refused".into());
    headers.append(
        HeaderName::from_static("Weir-Error"),
        crate::pipeline::header_value(&reason.chars().take(1024).collect::<String>()),
    );
    crate::pipeline::Message {
        subject: format!("weir.dlq.{}", crate::subject::token(&entity)).into(),
        headers,
        payload: body.to_string().into_bytes().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::SendOrder;
    use futures::FutureExt;
    use tokio::sync::oneshot::{self, error::TryRecvError};

    /// A batch behind one whose stored flag is `ahead`; the trouble flag of that one too.
    fn order(
        ahead: Option<watch::Receiver<bool>>,
    ) -> (BatchOrder, oneshot::Receiver<()>, Arc<std::sync::atomic::AtomicBool>) {
        let (sent, next_may_send) = oneshot::channel();
        let ahead_trouble = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ahead = ahead.map(|stored| BatchFlags { trouble: ahead_trouble.clone(), stored }).into_iter().collect();
        (
            BatchOrder { sent: Some(sent), last_run: false, held_back: false, trouble: Arc::default(), ahead },
            next_may_send,
            ahead_trouble,
        )
    }

    #[test]
    fn the_next_batch_may_send_once_the_last_runs_sends_are_all_out() {
        let (mut order, mut next_may_send, _) = order(None);
        order.sent(true);
        assert_eq!(next_may_send.try_recv(), Err(TryRecvError::Empty), "an earlier run's sends do not count");
        order.last_run = true;
        order.sent(true);
        assert_eq!(next_may_send.try_recv(), Ok(()));
    }

    #[test]
    fn a_send_held_back_keeps_the_next_batch_waiting_until_the_batch_is_over() {
        let (mut order, mut next_may_send, _) = order(None);
        order.sent(false);
        order.last_run = true;
        order.sent(true);
        assert_eq!(next_may_send.try_recv(), Err(TryRecvError::Empty), "a held-back send may still go out late");
        drop(order);
        assert_eq!(next_may_send.try_recv(), Err(TryRecvError::Closed));
    }

    #[test]
    fn batches_behind_one_in_trouble_stop_sending_until_it_is_stored() {
        let (stored, ahead) = watch::channel(false);
        let (order, _, ahead_trouble) = order(Some(ahead));
        order.trouble.store(true, Ordering::Relaxed);
        assert!(!order.hold_sends(), "its own trouble does not hold its own sends");
        ahead_trouble.store(true, Ordering::Relaxed);
        assert!(order.hold_sends(), "the batch ahead is in trouble and not stored");
        stored.send(true).unwrap();
        assert!(!order.hold_sends(), "the batches ahead are stored: its own resends go out");
    }

    #[tokio::test]
    async fn a_resend_waits_until_the_batch_ahead_is_stored() {
        let (stored, ahead) = watch::channel(false);
        let (mut order, _, _) = order(Some(ahead));
        assert_eq!(order.may_resend().now_or_never(), None, "the batch ahead is not stored yet");
        stored.send(true).unwrap();
        assert!(order.may_resend().await);
    }

    #[tokio::test]
    async fn nothing_is_sent_again_behind_a_batch_that_failed() {
        let (stored, ahead) = watch::channel(false);
        let (mut order, _, _) = order(Some(ahead));
        drop(stored);
        assert!(!order.may_resend().await, "the batch ahead failed: its changes were not stored");
    }
}
