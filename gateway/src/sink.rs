//! The NATS sink: connection (auth, TLS, reconnect forever), JetStream stream provisioning, and
//! publishing with PubAcks awaited concurrently and timed-out acks retried under the same id.

use crate::config::{Config, JetStreamConfig, NatsConfig, Storage};
use crate::pipeline::Message;
use acks::{AckRouter, Answer, SendError};
use async_nats::jetstream::{self, stream};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

mod acks;

/// Where a message was stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Published {
    /// Subject it was published to.
    pub subject: async_nats::Subject,
    /// Stream that stored it (JetStream), or `null` for core NATS. Shared by the answers of
    /// every PubAck naming the same stream.
    #[serde(serialize_with = "shared_text")]
    pub stream: Option<Arc<str>>,
    /// Stream sequence (JetStream).
    pub seq: Option<u64>,
    /// JetStream already had a message with this id: stored once.
    pub duplicate: bool,
}

fn shared_text<S: serde::Serializer>(text: &Option<Arc<str>>, serializer: S) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&text.as_deref(), serializer)
}

/// Why a message is not stored; each means "not stored, retry later" to the source.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// Not connected to NATS right now.
    #[error("NATS is not reachable")]
    Disconnected,
    /// No PubAck arrived in time, even after retrying: it may or may not be stored.
    #[error("NATS did not acknowledge the message in time")]
    Timeout,
    /// No stream captures the subject.
    #[error("no JetStream stream captures subject `{0}`; add it to [jetstream] subjects")]
    NoStream(String),
    /// The stream cannot store right now (nothing answers for a subject it captures, or its
    /// cluster says it is not available): not stored.
    #[error(
        "JetStream cannot store to `{subject}` right now: {stream} has no leader (its cluster is electing one or has lost quorum) or was deleted (create it again; weir creates its own [jetstream] stream when it starts)"
    )]
    NoLeader {
        /// Which stream, in words: "stream `NAME`", or that it is not known yet.
        stream: String,
        subject: String,
    },
    /// The server refused the message (too large for the stream, …).
    #[error("NATS refused the message: {0}")]
    Refused(String),
    /// The stream (`discard: new`) or the account is at a limit and takes nothing new.
    #[error(
        "the JetStream stream is full ({0}); raise the stream's or the account's limits, or let max_age or a purge make room"
    )]
    Full(String),
    /// Headers and payload are over the NATS server's `max_payload`: it can never be stored.
    #[error("the message is larger than the NATS server accepts ({0}); raise the server's max_payload")]
    TooLarge(String),
    /// Not sent: a publisher ahead of this one (see [`SendOrder::hold_sends`]) has not stored
    /// its messages yet. Sent once that publisher's are stored, so it cannot overtake them.
    #[error("not sent yet: held behind earlier messages that JetStream has not stored yet")]
    HeldBack,
}

/// A connected sink.
#[derive(Clone)]
pub struct Sink {
    client: async_nats::Client,
    jetstream: Option<JetStreamSink>,
    ack_timeout: Duration,
}

/// JetStream publishing: the context for stream management, the router for PubAcks.
#[derive(Clone)]
struct JetStreamSink {
    context: jetstream::Context,
    acks: Arc<AckRouter>,
    /// The stream's subjects: a subject they capture that nothing answers for has a leaderless
    /// stream behind it, not a missing one.
    stream: Arc<StreamSubjects>,
}

/// A stream's subjects as last read from the server (else as configured), and which streams
/// capture subjects outside them, read again in the background when "no responders" comes back:
/// subjects added to or taken out of the stream while the gateway runs, and routes publishing to
/// streams of their own, are classified by what the server has now. Classifying never waits on
/// the server: it runs in the loop that takes PubAcks, and the server may not answer at all.
struct StreamSubjects {
    name: String,
    subjects: std::sync::RwLock<Vec<String>>,
    /// When the subjects were last read or a read started (`None`: never; they are the
    /// configured ones).
    read_at: Mutex<Option<Instant>>,
    /// Which stream the server said captures a subject outside these (`Unknown` while it is
    /// being asked), and when it was asked.
    others: Mutex<HashMap<String, (Instant, Capturer)>>,
}

/// Which stream captures a subject, as the server says.
#[derive(Clone)]
enum Capturer {
    Stream(String),
    Nobody,
    /// Not known (being asked, or the server did not answer): "no stream" would be a guess
    /// that could misplace a message, so it counts as "not stored, send again".
    Unknown,
}

/// How many subjects outside the stream are remembered at most (bounded memory whatever the
/// plugins make of subjects).
const OTHERS_REMEMBERED: usize = 1024;

/// What the server said is used for this long before it is asked again; during an election
/// every publish is answered "no responders".
const SUBJECTS_FRESH_FOR: Duration = Duration::from_secs(1);
/// How long one question to the server may take; a leaderless cluster may not answer.
const SUBJECTS_READ_TIMEOUT: Duration = Duration::from_secs(2);

impl StreamSubjects {
    fn captures(&self, subject: &str) -> bool {
        let subjects = self.subjects.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        subjects.iter().any(|pattern| crate::subject::pattern_matches(pattern, subject))
    }
}

impl JetStreamSink {
    /// Why nothing answered for `subject`, by what is known now; what is stale is asked again
    /// in the background, for the next send (a message classified "no leader" is sent again
    /// after 250 ms).
    fn nobody_answered(&self, subject: &str) -> SinkError {
        self.read_subjects_if_stale();
        if self.stream.captures(subject) {
            return self.no_leader(subject);
        }
        match self.capturer(subject) {
            Capturer::Stream(stream) => {
                SinkError::NoLeader { stream: format!("stream `{stream}`"), subject: subject.to_string() }
            }
            Capturer::Unknown => SinkError::NoLeader {
                stream: "the stream capturing it (JetStream has not said which yet)".into(),
                subject: subject.to_string(),
            },
            Capturer::Nobody => SinkError::NoStream(subject.to_string()),
        }
    }

    /// Which stream captures `subject` (outside this sink's stream) as last said; the server is
    /// asked in the background when nothing or only something stale is known.
    fn capturer(&self, subject: &str) -> Capturer {
        let mut others = lock(&self.stream.others);
        let known = others.get(subject).cloned();
        if let Some((at, capturer)) = &known
            && at.elapsed() < SUBJECTS_FRESH_FOR
        {
            return capturer.clone();
        }
        if others.len() >= OTHERS_REMEMBERED {
            others.clear();
        }
        // Marked as asked now, so concurrent answers do not ask again meanwhile. A stale "no
        // stream" is not believed until asked again: acting on it dead-letters change capture's
        // rows, while "not stored, send again" only costs a resend.
        let capturer = match known {
            Some((_, Capturer::Stream(name))) => Capturer::Stream(name),
            _ => Capturer::Unknown,
        };
        others.insert(subject.to_string(), (Instant::now(), capturer.clone()));
        drop(others);
        let (context, stream, subject) = (self.context.clone(), self.stream.clone(), subject.to_string());
        tokio::spawn(async move {
            let asked = tokio::time::timeout(SUBJECTS_READ_TIMEOUT, context.stream_by_subject(subject.as_str())).await;
            let said = match asked {
                Ok(Ok(name)) => Capturer::Stream(name),
                Ok(Err(error)) if matches!(error.kind(), jetstream::context::GetStreamByNameErrorKind::NotFound) => {
                    Capturer::Nobody
                }
                Ok(Err(_)) | Err(_) => Capturer::Unknown,
            };
            lock(&stream.others).insert(subject, (Instant::now(), said));
        });
        capturer
    }

    /// Starts reading the stream's subjects from the server unless they are fresh or being
    /// read. A read that fails (no leader to answer, a timeout, the stream deleted) keeps what
    /// was known: a stream deleted while the gateway runs keeps its subjects, so change capture
    /// waits for it instead of dead-lettering what belongs in it.
    fn read_subjects_if_stale(&self) {
        {
            let mut read_at = lock(&self.stream.read_at);
            if read_at.is_some_and(|at| at.elapsed() < SUBJECTS_FRESH_FOR) {
                return;
            }
            *read_at = Some(Instant::now());
        }
        let (context, stream) = (self.context.clone(), self.stream.clone());
        tokio::spawn(async move {
            let read = tokio::time::timeout(SUBJECTS_READ_TIMEOUT, context.get_stream(&stream.name)).await;
            if let Ok(Ok(info)) = read {
                *stream.subjects.write().unwrap_or_else(|poisoned| poisoned.into_inner()) =
                    info.cached_info().config.subjects.clone();
            }
            // Fresh from when the answer came, not from when it was asked.
            *lock(&stream.read_at) = Some(Instant::now());
        });
    }

    fn no_leader(&self, subject: &str) -> SinkError {
        SinkError::NoLeader { stream: format!("stream `{}`", self.stream.name), subject: subject.to_string() }
    }
}

/// Connection options from `[nats]`; each lost connection is counted in `lost`.
async fn options(nats: &NatsConfig, lost: watch::Sender<u64>) -> anyhow::Result<async_nats::ConnectOptions> {
    let lost = Arc::new(lost);
    let mut options = match (&nats.token, &nats.user, &nats.password, &nats.creds_file, &nats.nkey) {
        (Some(token), ..) => async_nats::ConnectOptions::with_token(token.clone()),
        (None, Some(user), Some(password), ..) => {
            async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
        }
        (None, None, _, Some(creds), _) => async_nats::ConnectOptions::with_credentials_file(creds.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot read NATS creds file {}: {e}", creds.display()))?,
        (None, None, _, None, Some(seed)) => async_nats::ConnectOptions::with_nkey(seed.clone()),
        _ => async_nats::ConnectOptions::new(),
    };
    if let Some(tls) = &nats.tls {
        options = options.require_tls(tls.required);
        if let Some(ca) = &tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    Ok(options
        .name("weir")
        .connection_timeout(nats.connect_timeout)
        // Reconnect forever (with the client's backoff); sources answer 503 meanwhile.
        .max_reconnects(None)
        .retry_on_initial_connect()
        // A connection that stops answering (packets lost, nothing closed) is given up after
        // three unanswered pings, ~15 s: sources then answer 503 at once instead of timing out.
        .ping_interval(Duration::from_secs(5))
        .event_callback(move |event| {
            let lost = lost.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        lost.send_modify(|count| *count += 1);
                        tracing::warn!("disconnected from NATS; reconnecting");
                    }
                    async_nats::Event::Connected => tracing::info!("connected to NATS"),
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            }
        }))
}

fn server_list(nats: &NatsConfig) -> Vec<String> {
    let mut urls: Vec<String> = nats.url.iter().flat_map(|u| u.split(',')).map(|u| u.trim().to_string()).collect();
    urls.extend(nats.urls.iter().cloned());
    urls
}

/// A server url for messages: a user and password in it (`nats://user:secret@host`) are hidden.
fn without_credentials(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let hidden = if host.len() < rest.len() { "…@" } else { "" };
    if scheme.is_empty() { format!("{hidden}{host}") } else { format!("{scheme}://{hidden}{host}") }
}

/// The stream configuration `[jetstream]` asks for.
pub fn stream_config(js: &JetStreamConfig) -> stream::Config {
    stream::Config {
        name: js.stream.clone(),
        subjects: js.subjects.clone(),
        duplicate_window: js.duplicate_window,
        max_age: js.max_age.unwrap_or_default(),
        max_messages: js.max_msgs.unwrap_or(-1),
        max_bytes: js.max_bytes.and_then(|b| i64::try_from(b).ok()).unwrap_or(-1),
        storage: match js.storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        },
        num_replicas: js.replicas,
        ..Default::default()
    }
}

/// Differences between the stream on the server and the config, as readable lines.
pub fn stream_differences(want: &stream::Config, have: &stream::Config) -> Vec<String> {
    let mut differences = Vec::new();
    let mut compare = |what: &str, want: String, have: String| {
        if want != have {
            differences.push(format!("{what}: config says {want}, the stream has {have}"));
        }
    };
    let mut want_subjects = want.subjects.clone();
    let mut have_subjects = have.subjects.clone();
    want_subjects.sort();
    have_subjects.sort();
    compare("subjects", format!("{want_subjects:?}"), format!("{have_subjects:?}"));
    compare("duplicate_window", format!("{:?}", want.duplicate_window), format!("{:?}", have.duplicate_window));
    compare("max_age", format!("{:?}", want.max_age), format!("{:?}", have.max_age));
    compare("max_msgs", want.max_messages.to_string(), have.max_messages.to_string());
    compare("max_bytes", want.max_bytes.to_string(), have.max_bytes.to_string());
    compare("storage", format!("{:?}", want.storage), format!("{:?}", have.storage));
    compare("replicas", want.num_replicas.to_string(), have.num_replicas.to_string());
    differences
}

/// A subject template the config publishes to that no subject of the stream can capture.
pub struct SubjectGap {
    /// A subject the template makes, to ask the server whether another stream takes it.
    pub sample: String,
    /// Route plugins may set another subject, so it may never be used.
    pub plugins_may_change_it: bool,
    /// What publishes there, the template and how to fix it.
    pub message: String,
}

/// Subject templates the config publishes to (route subjects, the dead letters of routes with
/// plugins, change capture's refused-change letters) that none of `stream_subjects` can capture.
pub fn subjects_outside_stream(config: &Config, stream_subjects: &[String]) -> Vec<SubjectGap> {
    use crate::config::{OnError, SourceKind};
    use crate::pipeline::{DEFAULT_DLQ_SUBJECT, DEFAULT_POSTGRES_SUBJECT, DEFAULT_SUBJECT};
    let Some(js) = &config.jetstream else { return Vec::new() };
    let mut gaps: Vec<SubjectGap> = Vec::new();
    let mut check = |plugins_may_change_it: bool, what: String, template: &str| {
        if stream_subjects.iter().any(|pattern| crate::subject::template_overlaps(template, pattern)) {
            return;
        }
        let message = format!(
            "{what} `{template}`, which no subject of stream `{}` captures ({}); add one to [jetstream] subjects, or a stream for it",
            js.stream,
            stream_subjects.join(", ")
        );
        if !gaps.iter().any(|gap| gap.message == message) {
            gaps.push(SubjectGap { sample: crate::subject::template_sample(template), plugins_may_change_it, message });
        }
    };
    let postgres = config.postgres.is_some();
    for (index, route) in config.routes.iter().enumerate() {
        let name = crate::pipeline::route_name(index, route);
        let has_plugins = !route.plugins.is_empty();
        let what = if has_plugins {
            format!("route `{name}` publishes (unless its plugins set another subject) to")
        } else {
            format!("route `{name}` publishes to")
        };
        match &route.subject {
            Some(template) => check(has_plugins, what, template.get_ref()),
            None => {
                if route.matcher.source != Some(SourceKind::Postgres) {
                    check(has_plugins, what.clone(), DEFAULT_SUBJECT);
                }
                if postgres && route.matcher.source != Some(SourceKind::Http) {
                    check(has_plugins, what, DEFAULT_POSTGRES_SUBJECT);
                }
            }
        }
        // Only plugins make dead letters.
        if has_plugins && route.on_error == OnError::Dlq {
            let dlq = route.dlq_subject.as_deref().unwrap_or(DEFAULT_DLQ_SUBJECT);
            check(true, format!("route `{name}` sends dead letters to"), dlq);
        }
    }
    if config.routes.is_empty() {
        check(false, "the default route publishes to".to_string(), DEFAULT_SUBJECT);
        if postgres {
            check(false, "the default route publishes changes to".to_string(), DEFAULT_POSTGRES_SUBJECT);
        }
    }
    if postgres {
        check(false, "change capture sends the changes NATS refuses to".to_string(), DEFAULT_DLQ_SUBJECT);
    }
    gaps
}

/// Whether looking a stream up failed because the server has no such stream (rather than
/// JetStream being off, a permission or a timeout).
pub fn stream_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(error.kind(), jetstream::context::GetStreamErrorKind::JetStream(inner)
        if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// Connects a NATS client with the `[nats]` settings and waits up to `connect_timeout` for the
/// first connection. (The client itself then reconnects forever.)
pub async fn connect_client(config: &Config) -> anyhow::Result<async_nats::Client> {
    Ok(connect_watched_client(config).await?.0)
}

/// [`connect_client`], with a count of the connections it lost since.
async fn connect_watched_client(config: &Config) -> anyhow::Result<(async_nats::Client, watch::Receiver<u64>)> {
    let (lost, lost_count) = watch::channel(0);
    let urls = server_list(&config.nats);
    let unreachable = || {
        anyhow::anyhow!(
            "cannot reach NATS at {} within {:?}; is nats-server running?",
            urls.iter().map(|url| without_credentials(url)).collect::<Vec<_>>().join(", "),
            config.nats.connect_timeout
        )
    };
    let connecting = async {
        // With retry_on_initial_connect, `connect` returns before the connection is up.
        let client = options(&config.nats, lost).await?.connect(urls.clone()).await.map_err(anyhow::Error::from)?;
        while client.connection_state() != async_nats::connection::State::Connected {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok::<_, anyhow::Error>(client)
    };
    let client = tokio::time::timeout(config.nats.connect_timeout, connecting).await.map_err(|_| unreachable())??;
    Ok((client, lost_count))
}

impl Sink {
    /// Connects (waiting up to `connect_timeout` for the first connection) and, with
    /// JetStream, creates the stream if missing. An existing stream that differs from the config
    /// is reported in the log, never changed.
    pub async fn connect(config: &Config) -> anyhow::Result<Sink> {
        let sink = Sink::connect_publisher(config).await?;
        if let (Some(JetStreamSink { context, .. }), Some(js)) = (&sink.jetstream, &config.jetstream) {
            let want = stream_config(js);
            let mut stream = match context.get_stream(&js.stream).await {
                Ok(stream) => stream,
                Err(error) if stream_not_found(&error) => context
                    .create_stream(want.clone())
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot create JetStream stream `{}`: {e}", js.stream))?,
                // Not "no such stream" (a timeout, no JetStream): creating it would only hide why.
                Err(error) => return Err(anyhow::anyhow!("cannot look up JetStream stream `{}`: {error}", js.stream)),
            };
            let info = stream.info().await.map_err(|e| anyhow::anyhow!("cannot read stream `{}`: {e}", js.stream))?;
            for difference in stream_differences(&want, &info.config) {
                tracing::warn!(stream = %js.stream, "stream differs from config (not changed): {difference}");
            }
            for gap in subjects_outside_stream(config, &info.config.subjects) {
                tracing::warn!("{} (unless another stream captures it)", gap.message);
            }
        } else if config.jetstream.is_none() {
            tracing::warn!("no [jetstream] section: publishing to core NATS, which is at-most-once");
        }
        Ok(sink)
    }

    /// A sink with a connection of its own, for a source on a runtime of its own (its
    /// connection's task then runs beside it); the stream is left to [`Sink::connect`].
    pub async fn connect_publisher(config: &Config) -> anyhow::Result<Sink> {
        let (client, lost) = connect_watched_client(config).await?;
        let (jetstream, ack_timeout) = match &config.jetstream {
            Some(js) => {
                let context = jetstream::ContextBuilder::new().timeout(js.ack_timeout).build(client.clone());
                let acks = Arc::new(AckRouter::start(client.clone(), js.max_in_flight, lost).await?);
                let (subjects, read_at) = match context.get_stream(&js.stream).await {
                    Ok(stream) => (stream.cached_info().config.subjects.clone(), Some(Instant::now())),
                    Err(_) => (js.subjects.clone(), None),
                };
                let stream = Arc::new(StreamSubjects {
                    name: js.stream.clone(),
                    subjects: std::sync::RwLock::new(subjects),
                    read_at: Mutex::new(read_at),
                    others: Mutex::new(HashMap::new()),
                });
                (Some(JetStreamSink { context, acks, stream }), js.ack_timeout)
            }
            None => (None, Duration::from_secs(5)),
        };
        Ok(Sink { client, jetstream, ack_timeout })
    }

    /// Whether the client is connected right now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The JetStream context, unless the sink is core NATS.
    pub fn jetstream(&self) -> Option<&jetstream::Context> {
        self.jetstream.as_ref().map(|jetstream| &jetstream.context)
    }

    /// The NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Publishes `messages` in order and waits until every one is stored (JetStream PubAck) or
    /// flushed (core); the first failure is the answer.
    pub async fn publish_all(&self, messages: &[Message]) -> Result<Vec<Published>, SinkError> {
        self.publish_each(messages).await.into_iter().collect()
    }

    /// Publishes `messages` in order; one outcome per message; see [`Sink::publish_ordered`]. Sends go out back to back and
    /// acks are awaited together. Once NATS is unreachable or not acknowledging, nothing more is
    /// sent and the rest share that failure. A message the server refuses (no stream, too large)
    /// fails alone, except that later messages of the same entity and key are not sent either:
    /// they must not overtake it.
    pub async fn publish_each(&self, messages: &[Message]) -> Vec<Result<Published, SinkError>> {
        self.publish_ordered(messages, &mut InOrder).await
    }

    /// [`Sink::publish_each`], telling `order` when the sends are out and asking it before any
    /// message is sent again.
    pub async fn publish_ordered(
        &self,
        messages: &[Message],
        order: &mut dyn SendOrder,
    ) -> Vec<Result<Published, SinkError>> {
        if !self.connected() {
            if let Some(trouble) = order.trouble() {
                trouble.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            return messages.iter().map(|_| Err(SinkError::Disconnected)).collect();
        }
        match &self.jetstream {
            Some(jetstream) => self.publish_jetstream(jetstream, messages, order).await,
            None => self.publish_core(messages).await,
        }
    }

    /// Core NATS: publishes in order, then one flush for all. A message the client refuses (too
    /// large for the server's `max_payload`, a bad subject) fails alone, and so do the later
    /// messages of its entity and key (they must not overtake it); once the connection fails,
    /// nothing more is sent.
    async fn publish_core(&self, messages: &[Message]) -> Vec<Result<Published, SinkError>> {
        let mut outcomes: Vec<Option<Result<Published, SinkError>>> = vec![None; messages.len()];
        let mut failed_keys: HashMap<(String, String), SinkError> = HashMap::new();
        let mut stop: Option<SinkError> = None;
        for (index, message) in messages.iter().enumerate() {
            if let Some(error) = &stop {
                outcomes[index] = Some(Err(error.clone()));
                continue;
            }
            let key = order_key(message);
            if let Some(error) = key.as_ref().and_then(|key| failed_keys.get(key)) {
                outcomes[index] = Some(Err(error.clone()));
                continue;
            }
            let sent = self
                .client
                .publish_with_headers(message.subject.clone(), message.headers.to_nats(), message.payload.clone())
                .await;
            if let Err(error) = sent {
                let error = match error.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => SinkError::TooLarge(error.to_string()),
                    async_nats::client::PublishErrorKind::InvalidSubject => SinkError::Refused(error.to_string()),
                    async_nats::client::PublishErrorKind::Send => {
                        stop = Some(SinkError::Disconnected);
                        outcomes[index] = Some(Err(SinkError::Disconnected));
                        continue;
                    }
                };
                if let Some(key) = key {
                    failed_keys.insert(key, error.clone());
                }
                outcomes[index] = Some(Err(error));
            }
        }
        let flushed = match tokio::time::timeout(self.ack_timeout, self.client.flush()).await {
            Err(_) => Err(SinkError::Timeout),
            Ok(Err(_)) => Err(SinkError::Disconnected),
            Ok(Ok(())) => Ok(()),
        };
        outcomes
            .into_iter()
            .zip(messages)
            .map(|(outcome, message)| {
                outcome.unwrap_or_else(|| {
                    flushed.clone().map(|()| Published {
                        subject: message.subject.clone(),
                        stream: None,
                        seq: None,
                        duplicate: false,
                    })
                })
            })
            .collect()
    }

    /// JetStream: sends go out back to back, PubAcks are awaited as they come. Sends that get
    /// no answer within `ack_timeout` of the last answer are sent again in order with the same
    /// `Nats-Msg-Id` (so JetStream stores one copy), up to three attempts while connected,
    /// unless a later message of their key went out (see [`resendable`]). Never reports a
    /// message stored that is not.
    async fn publish_jetstream(
        &self,
        jetstream: &JetStreamSink,
        messages: &[Message],
        order: &mut dyn SendOrder,
    ) -> Vec<Result<Published, SinkError>> {
        let progress = Mutex::new(Progress {
            outcomes: vec![None; messages.len()],
            not_stored: vec![false; messages.len()],
            failures: Failures {
                trouble: order.trouble(),
                refusal_holds_all: order.refusal_holds_all(),
                ..Failures::default()
            },
        });
        // Which messages have gone out at least once.
        let mut sent = vec![false; messages.len()];
        let mut attempt = 1;
        // Why the last attempt stopped: the answer for what is still unanswered at the end.
        let mut last_stop = SinkError::Timeout;
        loop {
            let due: Vec<usize> = {
                let mut progress = lock(&progress);
                if let Some(stop) = progress.failures.stop.take() {
                    last_stop = stop;
                }
                if attempt == 1 {
                    (0..messages.len()).collect()
                } else {
                    resendable(messages, &sent, &mut progress, &last_stop)
                }
            };
            if due.is_empty() || (attempt > 1 && !order.may_resend().await) {
                break;
            }
            self.attempt(jetstream, messages, &due, &progress, &mut sent, order).await;
            let unanswered = lock(&progress).failures.stop.is_some();
            if !unanswered || attempt >= 3 || !self.connected() {
                break;
            }
            attempt += 1;
            // A leader election takes seconds, and "no leader" comes back at once: give it time.
            let no_leader =
                lock(&progress).failures.stop.clone().filter(|stop| matches!(stop, SinkError::NoLeader { .. }));
            if let Some(error) = no_leader {
                let pause = (Duration::from_millis(250) * 2u32.pow(attempt - 2)).min(self.ack_timeout);
                // Once a second at most: every publish call of an election would log it.
                static LAST_LOGGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let second = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_secs());
                if LAST_LOGGED.swap(second, std::sync::atomic::Ordering::Relaxed) != second {
                    tracing::info!(%error, retry_in = ?pause, "sending the messages it did not store again");
                }
                tokio::time::sleep(pause).await;
            }
            tracing::debug!(attempt, "PubAcks missing; publishing the unanswered messages again with the same ids");
        }
        let Progress { outcomes, failures, not_stored } = progress.into_inner().unwrap_or_else(|p| p.into_inner());
        let stopped = failures.stop.unwrap_or(last_stop);
        outcomes
            .into_iter()
            .enumerate()
            .map(|(index, outcome)| {
                outcome.unwrap_or_else(|| {
                    // Sent and never answered "not stored": it may be in the stream, whatever
                    // stopped the call (a lost connection, a timeout).
                    Err(if sent[index] && !not_stored[index] { SinkError::Timeout } else { stopped.clone() })
                })
            })
            .collect()
    }

    /// One attempt at the messages `due`: sending and awaiting answers run side by side, since
    /// each unanswered send holds room in the window.
    async fn attempt(
        &self,
        jetstream: &JetStreamSink,
        messages: &[Message],
        due: &[usize],
        progress: &Mutex<Progress>,
        sent: &mut [bool],
        order: &mut dyn SendOrder,
    ) {
        let acks = &jetstream.acks;
        let call = acks.call_id();
        // Only a connection lost from here on ends this attempt: PubAcks owed on a lost one
        // never come, so waiting `ack_timeout` for them would hold the caller for nothing.
        let mut lost = acks.lost();
        // Whatever of this call is still pending when it ends (or is dropped mid-way) is
        // abandoned, so its room in the window is never lost.
        let mut leftovers = acks.abandon_on_drop(call);
        let mut all_answered = false;
        let (answers_to, mut answers) = mpsc::unbounded_channel();
        // Set when the answers stop coming: a send still waiting for room in the window gives up
        // at once instead of holding the caller (and its key locks) for another `ack_timeout`.
        let stopped = &tokio::sync::Notify::new();
        let send_all = async move {
            let mut every_one = true;
            for (position, &index) in due.iter().enumerate() {
                let message = &messages[index];
                if order.hold_sends() {
                    // Not sent: the caller sends them again behind the publisher in trouble.
                    // This call is in trouble too, for those behind it.
                    let mut progress = lock(progress);
                    progress.failures.raise();
                    for &held in &due[position..] {
                        progress.outcomes[held].get_or_insert(Err(SinkError::HeldBack));
                    }
                    every_one = false;
                    break;
                }
                {
                    let mut progress = lock(progress);
                    match progress.failures.blocking(message) {
                        Blocked::Stop => {
                            every_one = false;
                            break;
                        }
                        Blocked::Key(error) => {
                            every_one = false;
                            progress.outcomes[index] = Some(Err(error));
                            continue;
                        }
                        // Sent again, it may be stored this time.
                        Blocked::No => progress.not_stored[index] = false,
                    }
                }
                let outcome = tokio::select! {
                    biased;
                    () = stopped.notified() => {
                        every_one = false;
                        break;
                    }
                    outcome = acks.send(call, index, message, &answers_to) => outcome,
                };
                match outcome {
                    Ok(()) => sent[index] = true,
                    Err(error) => {
                        every_one = false;
                        let error = match error {
                            SendError::Closed => SinkError::Disconnected,
                            SendError::Refused(text) => SinkError::Refused(text),
                            SendError::TooLarge(text) => SinkError::TooLarge(text),
                        };
                        let mut progress = lock(progress);
                        progress.failures.record(message, &error);
                        if matches!(error, SinkError::Refused(_) | SinkError::TooLarge(_)) {
                            progress.outcomes[index] = Some(Err(error));
                        }
                    }
                }
            }
            order.sent(every_one);
            // Dropping `answers_to` here lets `answers` end once every send is answered.
        };
        let await_all = async {
            // One timer for the whole call, re-armed lazily: "no answer for `ack_timeout`".
            let sleep = tokio::time::sleep(self.ack_timeout);
            tokio::pin!(sleep);
            let mut last_answer = Instant::now();
            // Armed once for the call, not once per answer awaited (each arming takes a lock);
            // watched until the router, which holds the sender, is gone.
            let lost = lost.changed();
            tokio::pin!(lost);
            let mut watching = true;
            loop {
                let gone = tokio::select! {
                    biased;
                    answer = answers.recv() => {
                        let Some((index, answer)) = answer else {
                            // Closed: every pending send of this call held a sender, so none is left.
                            all_answered = true;
                            break;
                        };
                        last_answer = Instant::now();
                        let message = &messages[index];
                        let outcome = match answer {
                            Answer::NoStream | Answer::Unavailable => {
                                let error = match answer {
                                    Answer::Unavailable => jetstream.no_leader(&message.subject),
                                    _ => jetstream.nobody_answered(&message.subject),
                                };
                                if let SinkError::NoLeader { .. } = error {
                                    // Not stored: left unanswered, to be sent again.
                                    let mut progress = lock(progress);
                                    progress.not_stored[index] = true;
                                    progress.failures.stop_with(error);
                                    continue;
                                }
                                Err(error)
                            }
                            Answer::Stored { stream, seq, duplicate } => Ok(Published {
                                subject: message.subject.clone(),
                                stream: Some(stream),
                                seq: Some(seq),
                                duplicate,
                            }),
                            Answer::Refused(reason) => Err(SinkError::Refused(reason)),
                            Answer::Full(reason) => Err(SinkError::Full(reason)),
                        };
                        let mut progress = lock(progress);
                        if let Err(error) = &outcome {
                            progress.failures.record(message, error);
                        }
                        progress.outcomes[index] = Some(outcome);
                        continue;
                    }
                    // PubAcks owed on a lost connection never come.
                    changed = &mut lost, if watching => match changed {
                        Ok(()) => true,
                        Err(_) => {
                            watching = false;
                            continue;
                        }
                    },
                    () = &mut sleep => {
                        let deadline = last_answer + self.ack_timeout;
                        if Instant::now() < deadline {
                            sleep.as_mut().reset(deadline);
                            continue;
                        }
                        false
                    }
                };
                // NATS is gone or not acknowledging: stop sending; what is unanswered may or may
                // not be stored, and is sent again (deduplicated by its id).
                let mut progress = lock(progress);
                // (What was sent and is unanswered is reported as not known to be stored.)
                let stop = if gone { SinkError::Disconnected } else { SinkError::Timeout };
                match progress.failures.stop {
                    // Sends left unanswered are not known to be unstored, as "no leader" says.
                    None | Some(SinkError::NoLeader { .. }) => progress.failures.stop = Some(stop),
                    Some(_) => {}
                }
                progress.failures.raise();
                drop(progress);
                acks.abandon(call);
                stopped.notify_one();
                break;
            }
        };
        futures::join!(send_all, await_all);
        if all_answered {
            leftovers.disarm();
        }
    }
}

/// The unanswered messages to send again, in order. A message is sent again only if no later
/// message of its entity and key has gone out: that one may be stored already, and the resend
/// would land after it (after a lost connection, the client delivers what it still had queued
/// while what it had buffered is gone). Such a message fails instead (not known to be stored),
/// and so does every later unanswered message of its key: resending those alone would put them
/// ahead of it.
fn resendable(messages: &[Message], sent: &[bool], progress: &mut Progress, reason: &SinkError) -> Vec<usize> {
    let mut later_sent = std::collections::HashSet::new();
    let mut due = Vec::new();
    for index in (0..messages.len()).rev() {
        let key = order_key(&messages[index]);
        // Sent and not answered "not stored": it may be in the stream.
        let maybe_stored = sent[index] && !progress.not_stored[index];
        if progress.outcomes[index].is_none() {
            if let Some(key) = key.as_ref().filter(|key| later_sent.contains(*key)) {
                progress.outcomes[index] = Some(Err(if maybe_stored { SinkError::Timeout } else { reason.clone() }));
                // Later messages of its key already in `due` are held back when their turn comes
                // (some may be stored: not known to be stored).
                progress.failures.keys.entry(key.clone()).or_insert(SinkError::Timeout);
                continue;
            }
            due.push(index);
        }
        if maybe_stored && let Some(key) = key {
            later_sent.insert(key);
        }
    }
    due.reverse();
    due
}

/// How a caller keeps order across concurrent publishes (HTTP's per-key locks). One
/// connection stores what it sends in the order sent, so only a resend could overtake.
pub trait SendOrder: Send {
    /// This attempt's sends are all queued on the connection, in order: later publishers may
    /// send now. `every_one` is false when some were not sent (a refusal, a key blocked behind
    /// one, NATS gone): those may yet go out after a later publisher's.
    fn sent(&mut self, every_one: bool);
    /// Before unanswered messages are sent again: whether that still keeps their order (no
    /// later message of theirs was sent meanwhile). `false` fails them instead.
    fn may_resend(&mut self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
    /// A flag the call raises as soon as one of its messages is not stored (no answer, no
    /// leader, refused, full, connection lost), for publishers behind it (see `hold_sends`).
    fn trouble(&self) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        None
    }
    /// Asked before each send: stop sending, because a publisher ahead is in trouble. What is
    /// not sent comes back [`SinkError::HeldBack`], for the caller to send again behind it.
    fn hold_sends(&self) -> bool {
        false
    }
    /// Whether a message the stream refuses (or has no room for) holds back every later message
    /// of the call not yet sent, not only its key's: for callers that keep order across keys
    /// (change capture keeps it per table).
    fn refusal_holds_all(&self) -> bool {
        false
    }
}

/// No order to keep beyond the call's own.
pub struct InOrder;

impl SendOrder for InOrder {
    fn sent(&mut self, _every_one: bool) {}

    fn may_resend(&mut self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(std::future::ready(true))
    }
}

/// The outcomes so far of one [`Sink::publish_each`], and what has failed.
struct Progress {
    outcomes: Vec<Option<Result<Published, SinkError>>>,
    /// Answered "not stored, no leader" on its last send: resending it cannot overtake anything.
    not_stored: Vec<bool>,
    failures: Failures,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What has failed so far in one [`Sink::publish_each`].
#[derive(Default)]
struct Failures {
    /// NATS is unreachable or not acknowledging: send nothing more.
    stop: Option<SinkError>,
    /// Entity and key of refused messages: later messages of theirs are held back.
    keys: std::collections::HashMap<(String, String), SinkError>,
    /// [`SendOrder::refusal_holds_all`]: a refusal holds back every later message.
    refusal_holds_all: bool,
    /// The first refusal, when it holds back every later message.
    refused: Option<SinkError>,
    /// The caller's trouble flag ([`SendOrder::trouble`]), raised at the first failure.
    trouble: Option<Arc<std::sync::atomic::AtomicBool>>,
}

enum Blocked {
    No,
    Stop,
    Key(SinkError),
}

/// The entity and key a message is ordered by, if it has a key.
fn order_key(message: &Message) -> Option<(String, String)> {
    let key = message.header("Weir-Key")?;
    let entity = message.header("Weir-Entity").unwrap_or("");
    Some((entity.to_string(), key.to_string()))
}

impl Failures {
    fn raise(&self) {
        if let Some(trouble) = &self.trouble {
            trouble.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn stop_with(&mut self, error: SinkError) {
        self.raise();
        self.stop.get_or_insert(error);
    }

    fn record(&mut self, message: &Message, error: &SinkError) {
        self.raise();
        match error {
            SinkError::Disconnected | SinkError::Timeout | SinkError::NoLeader { .. } => {
                self.stop.get_or_insert_with(|| error.clone());
            }
            SinkError::NoStream(_) | SinkError::Refused(_) | SinkError::TooLarge(_) | SinkError::Full(_) => {
                if self.refusal_holds_all {
                    self.refused.get_or_insert_with(|| error.clone());
                } else if let Some(key) = order_key(message) {
                    self.keys.entry(key).or_insert_with(|| error.clone());
                }
            }
            // Never an answer from NATS: set by the call itself for what it did not send.
            SinkError::HeldBack => {}
        }
    }

    fn blocking(&self, message: &Message) -> Blocked {
        if self.stop.is_some() {
            return Blocked::Stop;
        }
        if let Some(error) = &self.refused {
            return Blocked::Key(error.clone());
        }
        if self.keys.is_empty() {
            return Blocked::No;
        }
        match order_key(message).and_then(|key| self.keys.get(&key)) {
            Some(error) => Blocked::Key(error.clone()),
            None => Blocked::No,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::HeaderName;

    fn keyed(key: &str) -> Message {
        let mut headers = crate::pipeline::Headers::with_capacity(0);
        headers.append(HeaderName::from_static("Weir-Entity"), "orders".to_string());
        headers.append(HeaderName::from_static("Weir-Key"), key.to_string());
        Message { subject: "weir.orders.insert".into(), headers, payload: bytes::Bytes::new() }
    }

    fn progress(count: usize) -> Progress {
        Progress { outcomes: vec![None; count], not_stored: vec![false; count], failures: Failures::default() }
    }

    #[test]
    fn any_failure_raises_the_callers_trouble_flag() {
        for error in [SinkError::Timeout, SinkError::Full("full".into()), SinkError::Refused("no".into())] {
            let trouble = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut failures = Failures { trouble: Some(trouble.clone()), ..Failures::default() };
            failures.record(&keyed("1"), &error);
            assert!(trouble.load(std::sync::atomic::Ordering::Relaxed), "{error}");
        }
    }

    #[test]
    fn urls_in_messages_hide_their_credentials() {
        assert_eq!(without_credentials("nats://weir:s3cret@nats:4222"), "nats://…@nats:4222");
        assert_eq!(without_credentials("tls://token@10.0.0.1"), "tls://…@10.0.0.1");
        assert_eq!(without_credentials("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(without_credentials("user:pw@host:4222"), "…@host:4222");
    }

    #[test]
    fn a_refusal_holds_back_its_key_or_with_order_across_keys_every_later_message() {
        let full = SinkError::Full("maximum bytes exceeded".into());
        let mut per_key = Failures::default();
        per_key.record(&keyed("1"), &full);
        assert!(matches!(per_key.blocking(&keyed("1")), Blocked::Key(SinkError::Full(_))));
        assert!(matches!(per_key.blocking(&keyed("2")), Blocked::No));
        let mut across_keys = Failures { refusal_holds_all: true, ..Failures::default() };
        across_keys.record(&keyed("1"), &full);
        assert!(matches!(across_keys.blocking(&keyed("2")), Blocked::Key(SinkError::Full(_))));
    }

    #[test]
    fn sends_answered_not_stored_are_resent_together_in_order() {
        let messages = [keyed("k1"), keyed("k1"), keyed("k2")];
        let mut answered_not_stored = progress(3);
        answered_not_stored.not_stored = vec![true, true, true];
        let no_leader = SinkError::NoLeader { stream: "S".into(), subject: "weir.orders.insert".into() };
        assert_eq!(resendable(&messages, &[true; 3], &mut answered_not_stored, &no_leader), [0, 1, 2]);
        // A later send of the key that may be stored holds the earlier one back: it fails (not
        // stored), and the key's later one is held back when its turn comes (not known to be).
        let mut maybe_stored = progress(3);
        maybe_stored.not_stored = vec![true, false, true];
        assert_eq!(resendable(&messages, &[true; 3], &mut maybe_stored, &no_leader), [1, 2]);
        assert!(matches!(maybe_stored.outcomes[0], Some(Err(SinkError::NoLeader { .. }))));
        let k1 = ("orders".to_string(), "k1".to_string());
        assert!(matches!(maybe_stored.failures.keys.get(&k1), Some(SinkError::Timeout)));
    }
}
