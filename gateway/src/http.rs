//! The HTTP source: write endpoints that answer `202` only once every output is stored, plus
//! health, readiness and metrics. The app is a function of its state ([`router`]), so tests can
//! call it without a socket; [`serve`] adds the listener, timeouts and graceful shutdown.

use crate::event::Event;
use crate::metrics::Metrics;
use crate::pipeline::{Disposition, Message, Pipeline, SourceData, Unavailability};
use crate::sink::{Published, SendOrder, Sink, SinkError};
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Stripes for per-key ordering: events with the same entity and key take the same lock, in
/// arrival order (tokio's mutex is fair), and hold it while their outputs are sent.
const KEY_STRIPES: usize = 1024;
/// Most single-event requests run as one batch.
const COALESCE_MAX: usize = 256;
/// A batch running longer than this gives its runner slot up to the requests behind it.
const COALESCE_STALL: Duration = Duration::from_millis(50);
/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Settings of the HTTP source.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Largest accepted body.
    pub max_body: u64,
    /// Time allowed to receive a body.
    pub body_timeout: Duration,
    /// Most requests processed at once.
    pub max_in_flight: usize,
    /// Accepted bearer tokens (empty: none required).
    pub tokens: Vec<String>,
    /// How long an `Idempotency-Key` is remembered (the stream's duplicate window).
    pub idempotency_ttl: Duration,
}

/// Everything the handlers share.
pub struct AppState {
    pipeline: Arc<Pipeline>,
    sink: Sink,
    settings: HttpSettings,
    token_digests: Vec<[u8; 32]>,
    /// Requests admitted and not yet answered. A single event's slot goes with it to the
    /// coalescer, so an event whose client went away still counts until it is processed.
    in_flight: Arc<Semaphore>,
    /// Per stripe, how many batches have sent under it (see [`StripeOrder`]).
    key_locks: Vec<tokio::sync::Mutex<u64>>,
    coalescer: Coalescer,
    idempotency: Mutex<Memory>,
    /// Set when shutting down: `/readyz` answers 503.
    pub draining: AtomicBool,
    /// Counters and histograms served on `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The PostgreSQL source's state, when `[postgres]` is configured.
    postgres: Option<Arc<crate::postgres::SourceStatus>>,
}

enum Remembered {
    InFlight {
        fingerprint: [u8; 32],
    },
    /// Abandoned by its client mid-way: may or may not be stored.
    Unsettled {
        fingerprint: [u8; 32],
        expires: Instant,
    },
    Done {
        fingerprint: [u8; 32],
        status: StatusCode,
        body: AnswerBody,
        expires: Instant,
    },
}

impl AppState {
    /// Shared state for the handlers.
    pub fn new(
        pipeline: Arc<Pipeline>,
        sink: Sink,
        settings: HttpSettings,
        metrics: Arc<Metrics>,
        postgres: Option<Arc<crate::postgres::SourceStatus>>,
    ) -> Arc<AppState> {
        let token_digests = settings.tokens.iter().map(|t| Sha256::digest(t.as_bytes()).into()).collect();
        Arc::new(AppState {
            pipeline,
            sink,
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            token_digests,
            settings,
            key_locks: (0..KEY_STRIPES).map(|_| tokio::sync::Mutex::new(0)).collect(),
            coalescer: Coalescer {
                queue: Mutex::new(VecDeque::new()),
                runners: Arc::new(Semaphore::new(coalesce_runners())),
            },
            idempotency: Mutex::new(Memory::default()),
            draining: AtomicBool::new(false),
            metrics,
            postgres,
        })
    }
}

/// A failure answered as `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Option<Value>,
    /// Seconds for `Retry-After` on `503` and `429`.
    retry_after: u64,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), extra: None, retry_after: 1 }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = merge(json!({"error": {"code": self.code, "message": self.message}}), self.extra);
        let mut response = (self.status, axum::Json(body)).into_response();
        match self.status {
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(self.retry_after));
            }
            StatusCode::UNAUTHORIZED => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"weir\""));
            }
            _ => {}
        }
        response
    }
}

fn sink_error(error: SinkError) -> ApiError {
    match error {
        SinkError::Disconnected => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "nats_unavailable",
            format!("{error}; nothing was stored, retry"),
        ),
        SinkError::Timeout => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "nats_unavailable",
            format!(
                "{error}; it is not known to be stored: retry with the same event id (Idempotency-Key, or a batch line's `id`) to have it stored once"
            ),
        ),
        SinkError::NoLeader { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "nats_unavailable",
            format!(
                "{error}; retry with the same event id (Idempotency-Key, or a batch line's `id`) to have it stored once"
            ),
        ),
        // HTTP's key locks never hold sends back; should one be, it was not sent.
        SinkError::HeldBack => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "nats_unavailable",
            format!("{error}; nothing was stored, retry"),
        ),
        SinkError::NoStream(_) | SinkError::Refused(_) | SinkError::Full(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_stored", format!("{error}; nothing was stored"))
        }
        // Retrying cannot help: the event (after its plugins) is too large to store.
        SinkError::TooLarge(_) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "message_too_large",
            format!("{error}, or lower [http] max_body; nothing was stored"),
        ),
    }
}

/// The answer for an event whose messages were not all stored: `stored` of `total` were. In
/// core NATS mode nothing removes a second copy, so no retry is promised to store once.
fn store_failure(error: SinkError, stored: usize, total: usize, core: bool) -> ApiError {
    let text = error.to_string();
    let unknown = matches!(error, SinkError::Timeout);
    let mut failure = sink_error(error);
    if core && unknown {
        failure.message = format!(
            "{text}; it may or may not have been delivered, and in core NATS mode nothing removes a second copy: retry only if a duplicate is acceptable"
        );
    } else if stored > 0 && core {
        failure.message = format!(
            "{text}: {stored} of this event's {total} messages were sent, the rest not; in core NATS mode a retry sends every one again"
        );
    } else if stored > 0 {
        failure.message = format!(
            "{text}: {stored} of this event's {total} messages were stored, the rest not; retry with the same event id (Idempotency-Key, or a batch line's `id`) to store the rest once"
        );
    }
    failure
}

fn plugin_unavailable(plugin: &str, why: &Unavailability) -> ApiError {
    match why {
        Unavailability::Unloaded => {
            let mut error = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "plugin_unavailable",
                format!(
                    "plugin `{plugin}` is not loaded (its file was removed); nothing was stored, retry once it is back"
                ),
            );
            error.extra = Some(json!({"plugin": plugin}));
            error
        }
        Unavailability::Quarantined(quarantine) => {
            // Whole seconds, rounded up: a retry on time finds the quarantine over.
            let seconds = quarantine.retry_after.as_secs() + u64::from(quarantine.retry_after.subsec_nanos() > 0);
            let retry_after = seconds.max(1);
            let mut error = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "plugin_quarantined",
                format!(
                    "plugin `{plugin}` is quarantined because its events kept failing (last: {}); nothing was stored, retry in {retry_after} s",
                    quarantine.last_error
                ),
            );
            error.extra = Some(json!({"plugin": plugin, "retry_after_s": retry_after}));
            error.retry_after = retry_after;
            error
        }
    }
}

/// The HTTP app.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/events/{entity}", post(post_event))
        .route("/v1/events/{entity}/{key}", axum::routing::put(keyed_event).patch(keyed_event).delete(keyed_event))
        .route("/v1/batch", post(batch))
        .route("/healthz", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        // axum's own answers are plain text; every answer of the API is JSON.
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint (the API is under /v1/events and /v1/batch)")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take this method: POST /v1/events/{entity}, PUT|PATCH|DELETE /v1/events/{entity}/{key}, POST /v1/batch",
            )
        })
        .with_state(state)
}

/// A path whose `{entity}` or `{key}` is not valid percent-encoded UTF-8.
fn bad_path(rejection: PathRejection) -> Response {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_path", rejection.body_text()).into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let connected = state.sink.connected();
    let draining = state.draining.load(Ordering::Relaxed);
    let replicating = state.postgres.as_ref().map(|status| status.connected.load(Ordering::Relaxed));
    let source_nats = state.postgres.as_ref().map(|status| status.nats_connected());
    // Only plugins some route uses count: an unused one that is missing takes nothing down.
    let plugins_loaded = state.pipeline.unloaded_plugins().is_empty();
    let status = state.pipeline.plugins().status();
    let mut body = json!({"nats": connected, "plugins": plugins_loaded, "draining": draining, "plugin_status": status});
    if let (Some(replicating), Some(source_nats)) = (replicating, source_nats) {
        body["postgres"] = json!(replicating);
        body["postgres_nats"] = json!(source_nats);
    }
    if let Some(status) = &state.postgres {
        // Informational: change capture waiting on JetStream (or a plugin) does not make the
        // HTTP side unready.
        body["postgres_paused"] = json!(status.paused.load(Ordering::Relaxed));
    }
    let ready = connected && plugins_loaded && !draining && replicating != Some(false) && source_nats != Some(false);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.set_nats_connected(state.sink.connected());
    state.metrics.set_http_in_flight(state.settings.max_in_flight.saturating_sub(state.in_flight.available_permits()));
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
        .into_response()
}

fn check_auth(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if state.token_digests.is_empty() {
        return Ok(());
    }
    // The scheme's name is case-insensitive (RFC 9110 §11.1).
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().split_once(' '))
        .and_then(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer").then_some(token))
        .ok_or_else(|| {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing `Authorization: Bearer <token>`")
        })?;
    let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
    // Compare against every token in constant time, whatever matches first.
    let matched = state
        .token_digests
        .iter()
        .fold(subtle::Choice::from(0), |acc, known| acc | subtle::ConstantTimeEq::ct_eq(&digest[..], &known[..]));
    if bool::from(matched) {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid token"))
    }
}

fn media_type(headers: &HeaderMap) -> Cow<'_, str> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| lowercase(v.split(';').next().unwrap_or("").trim()))
        .unwrap_or_default()
}

/// `text` in ASCII lower case, copied only when it has an upper-case letter (on the hot path
/// media types and ops nearly always come in lower case).
fn lowercase(text: &str) -> Cow<'_, str> {
    if text.bytes().any(|byte| byte.is_ascii_uppercase()) {
        Cow::Owned(text.to_ascii_lowercase())
    } else {
        Cow::Borrowed(text)
    }
}

/// Reads the body, refusing (413) on `Content-Length` before reading, or as soon as a
/// streamed body passes the limit; 408 when it arrives too slowly.
async fn read_body(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
    let limit = state.settings.max_body;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("body is larger than the limit of {limit} bytes"),
        )
    };
    let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if length.is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut body = body;
    // Sized once from the announced length (a batch would otherwise be copied as it doubles),
    // but not beyond PRESIZE_AT_MOST: a client may announce more than it sends.
    let announced = length.and_then(|length| usize::try_from(length).ok()).unwrap_or(0);
    let mut collected = Vec::with_capacity(announced.min(PRESIZE_AT_MOST));
    let reading = async {
        while let Some(frame) = body.frame().await {
            let Ok(chunk) = frame?.into_data() else { continue };
            if collected.len() + chunk.len() > limit {
                return Ok(false);
            }
            collected.extend_from_slice(&chunk);
        }
        Ok::<_, axum::Error>(true)
    };
    match tokio::time::timeout(state.settings.body_timeout, reading).await {
        Err(_) => Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "body_timeout", "the body did not arrive in time")),
        Ok(Err(error)) => Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_body", format!("cannot read body: {error}"))),
        Ok(Ok(true)) => Ok(collected),
        Ok(Ok(false)) => {
            // A client still sending when the connection closes sees a broken pipe, not the
            // 413: read on (discarding, bounded in bytes and time) so it can hear the answer.
            let mut budget = limit.max(DRAIN_AT_LEAST);
            let draining = async {
                while let Some(Ok(frame)) = body.frame().await {
                    budget = budget.saturating_sub(frame.data_ref().map_or(0, |chunk| chunk.len()));
                    if budget == 0 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_FOR, draining).await;
            Err(too_large())
        }
    }
}

/// How much of a body over the limit is still read (and discarded) so its sender hears the 413.
const DRAIN_AT_LEAST: usize = 1024 * 1024;
const DRAIN_FOR: Duration = Duration::from_secs(1);

/// Most room reserved for a body before its bytes arrive.
const PRESIZE_AT_MOST: usize = 1 << 20;

/// Deepest nesting of arrays and objects accepted in event data: well within what plugins
/// parsing with serde_json (limit 128, and the envelope adds a level) can read.
const MAX_JSON_DEPTH: usize = 100;

/// Whether JSON `text` nests arrays and objects deeper than [`MAX_JSON_DEPTH`] (the parser
/// that validates bodies stops at serde_json's own limit, 128).
fn nests_too_deep(text: &[u8]) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in text {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn too_deep_message() -> String {
    format!("JSON nests arrays and objects deeper than {MAX_JSON_DEPTH} levels; flatten it")
}

fn bad_json(error: serde_json::Error) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_json", format!("body is not valid JSON: {error}"))
}

/// Now, as RFC 3339 with milliseconds (event times).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

fn valid_word(text: &str) -> bool {
    !text.is_empty() && text.len() <= 64 && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A header that chooses what happens to the event, as UTF-8 text. One that is there but
/// unreadable is refused, not taken as absent: an `Idempotency-Key` skipped that way would let a
/// retry be stored twice.
fn header_utf8<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    let Some(value) = headers.get(name) else { return Ok(None) };
    std::str::from_utf8(value.as_bytes())
        .map(Some)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "bad_header", format!("header `{name}` is not UTF-8 text")))
}

/// Whether a client-chosen event id (idempotency key) can be a `Nats-Msg-Id`.
fn valid_event_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_IDEMPOTENCY_KEY && !id.chars().any(char::is_control)
}

/// A new event's id: a UUIDv7 (ordered by time), hyphenated. Encoded in a stack buffer, where
/// `to_string` goes through the formatting machinery and grows its string.
fn new_event_id() -> String {
    let mut buffer = uuid::Uuid::encode_buffer();
    uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buffer).to_owned()
}

/// The event of a single-event request.
struct SingleEvent {
    event: Event,
    /// Whether the client chose the event's id.
    client_chose_id: bool,
    /// The request's body when the event's data is not the body itself (a structured
    /// CloudEvent's attributes around it, or an empty body), for the request's fingerprint.
    body_if_not_data: Option<Vec<u8>>,
}

/// Builds the event for a single-event request; the body becomes its data without a copy.
/// CloudEvents in binary mode (`ce-*` headers) and structured mode
/// (`application/cloudevents+json`) are unwrapped to their data.
fn single_event(
    headers: &HeaderMap,
    entity: String,
    key: Option<String>,
    default_op: &str,
    body: Vec<u8>,
    allow_empty: bool,
) -> Result<SingleEvent, ApiError> {
    let media = media_type(headers);
    let mut id = header_utf8(headers, "idempotency-key")?.map(str::to_string);
    let mut op = header_utf8(headers, "weir-op")?.unwrap_or(default_op).to_ascii_lowercase();
    let mut body_if_not_data = None;
    let mut data = body;
    // A CloudEvent's `id`, `source` and `type`, in either mode.
    let mut cloud: Option<[Option<String>; 3]> = None;
    if media == "application/cloudevents+json" {
        // Checked strictly first: parsed into a map, a repeated key would be dropped unseen.
        let text = std::str::from_utf8(&data).map_err(|error| {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_json", format!("body is not UTF-8: {error}"))
        })?;
        crate::strict_json::check(text).map_err(bad_json)?;
        let envelope: Value = serde_json::from_str(text).map_err(bad_json)?;
        let attribute = |name: &str| envelope.get(name).and_then(Value::as_str).map(str::to_string);
        if envelope.get("specversion").and_then(Value::as_str) != Some("1.0") || attribute("id").is_none() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_cloudevent",
                "a CloudEvent needs `specversion` \"1.0\" and an `id`",
            ));
        }
        cloud = Some([attribute("id"), attribute("source"), attribute("type")]);
        body_if_not_data = Some(std::mem::replace(&mut data, cloudevent_data(&envelope)?));
    } else if media == "application/json" || media.ends_with("+json") || (allow_empty && data.is_empty()) {
        if data.is_empty() {
            body_if_not_data = Some(std::mem::replace(&mut data, b"{}".to_vec()));
        } else {
            // As text first: skipping a string does not check that its bytes are UTF-8.
            let text = std::str::from_utf8(&data).map_err(|error| {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_json", format!("body is not UTF-8: {error}"))
            })?;
            crate::strict_json::check(text).map_err(bad_json)?;
        }
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("Content-Type `{media}` is not accepted; send application/json or application/cloudevents+json"),
        ));
    }
    if nests_too_deep(&data) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_json", too_deep_message()));
    }
    if media != "application/cloudevents+json"
        && let Some(ce_id) = header_utf8(headers, "ce-id")?
    {
        let attribute = |name: &str| header_utf8(headers, name).map(|value| value.map(str::to_string));
        cloud = Some([Some(ce_id.to_string()), attribute("ce-source")?, attribute("ce-type")?]);
    }
    // A CloudEvent is one event per source and id (CloudEvents 1.0 §3.1.1): two sources may use
    // the same id. Its attributes travel as `ce-*` headers.
    let mut attributes: Vec<(String, String)> = Vec::new();
    if let Some([Some(ce_id), source, kind]) = &cloud {
        id = id.or_else(|| Some(cloudevent_event_id(source.as_deref(), ce_id)));
        for (name, value) in [("ce-id", Some(ce_id)), ("ce-source", source.as_ref()), ("ce-type", kind.as_ref())] {
            if let Some(value) = value {
                attributes.push((name.to_string(), crate::pipeline::header_value(value)));
            }
        }
    }
    if let Some(id) = &id
        && !valid_event_id(id)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_idempotency_key",
            "Idempotency-Key must be 1–255 bytes without control characters",
        ));
    }
    if !valid_word(&op) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_op",
            "Weir-Op must be a word of letters, digits, `-` and `_`",
        ));
    }
    if entity.is_empty() || entity.len() > 255 {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_entity", "entity must be 1–255 bytes"));
    }
    op.truncate(64);
    let key = match key {
        Some(key) => Some(key),
        None => header_utf8(headers, "weir-key")?.map(str::to_string),
    };
    let mut trace: Vec<(String, String)> = ["traceparent", "tracestate"]
        .iter()
        .filter_map(|name| header_text(headers, name).map(|v| (name.to_string(), v.to_string())))
        .collect();
    trace.extend(attributes);
    let client_chose_id = id.is_some();
    let event = Event {
        id: id.unwrap_or_else(new_event_id),
        source: "http".into(),
        entity,
        op,
        key,
        time: now_rfc3339(),
        subject: String::new(),
        headers: trace,
        data,
        old: None,
        position: None,
    };
    Ok(SingleEvent { event, client_chose_id, body_if_not_data })
}

/// The event id of a CloudEvent: its id scoped by its source (`ce-` and 128 bits of a SHA-256 of
/// both), or its id alone when it names no source.
fn cloudevent_event_id(source: Option<&str>, id: &str) -> String {
    match source {
        Some(source) => {
            let digest = Sha256::new().chain_update(source).chain_update([0]).chain_update(id).finalize();
            format!("ce-{}", hex::encode(&digest[..16]))
        }
        None => id.to_string(),
    }
}

/// A structured CloudEvent's data as JSON bytes: `data`, or `data_base64` decoded when it holds
/// JSON (weir events carry JSON; other binary data is refused rather than dropped).
fn cloudevent_data(envelope: &Value) -> Result<Vec<u8>, ApiError> {
    let Some(encoded) = envelope.get("data_base64") else {
        return serde_json::to_vec(envelope.get("data").unwrap_or(&Value::Null)).map_err(bad_json);
    };
    let refuse = |message: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_cloudevent", message);
    if envelope.get("data").is_some() {
        return Err(refuse("a CloudEvent has `data` or `data_base64`, not both".into()));
    }
    use base64::Engine as _;
    let bytes = encoded
        .as_str()
        .and_then(|text| base64::engine::general_purpose::STANDARD.decode(text).ok())
        .ok_or_else(|| refuse("`data_base64` is not base64".into()))?;
    let text = std::str::from_utf8(&bytes).ok();
    match text.map(crate::strict_json::check) {
        Some(Ok(_)) => Ok(bytes),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "`data_base64` must decode to JSON: weir events carry JSON data",
        )),
    }
}

/// The answer for one event.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    body: AnswerBody,
}

/// An answer's JSON body. The common "stored" answer is typed, so the hot path serializes it
/// directly instead of building a `Value` tree per event.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
enum AnswerBody {
    Stored(Stored),
    Json(Value),
}

#[derive(Debug, Clone, serde::Serialize)]
struct Stored {
    id: String,
    published: Vec<Published>,
    dropped: bool,
}

impl AnswerBody {
    /// The body as a JSON object, written by hand (see [`AnswerBody::write_fields`]).
    fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        out.push(b'{');
        let mut first = true;
        self.write_fields(&mut out, &mut first);
        out.push(b'}');
        out
    }

    /// Appends the body's fields to an object being written, each after a comma unless it is
    /// the `first`. The bytes are serde_json's for the same fields in the same order: a stored
    /// event's answer is a few copies, where serde went through a map per answer (batches'
    /// answers are a thousand of them).
    fn write_fields(&self, out: &mut Vec<u8>, first: &mut bool) {
        match self {
            AnswerBody::Stored(stored) => {
                json_field(out, first, "id");
                push_json(out, &stored.id);
                json_field(out, first, "published");
                write_published(out, &stored.published);
                json_field(out, first, "dropped");
                out.extend_from_slice(if stored.dropped { b"true" } else { b"false" });
            }
            AnswerBody::Json(Value::Object(fields)) => {
                for (name, value) in fields {
                    json_field(out, first, name);
                    push_json(out, value);
                }
            }
            // Every answer is an object; anything else would add no fields.
            AnswerBody::Json(_) => {}
        }
    }
}

/// `"name":` in an object being written, after a comma unless it is the `first` field.
fn json_field(out: &mut Vec<u8>, first: &mut bool, name: &str) {
    if !std::mem::take(first) {
        out.push(b',');
    }
    push_json(out, name);
    out.push(b':');
}

/// `value` as JSON. Writing into a Vec cannot fail, and these values serialize.
fn push_json(out: &mut Vec<u8>, value: &(impl serde::Serialize + ?Sized)) {
    let _ = serde_json::to_writer(&mut *out, value);
}

fn write_published(out: &mut Vec<u8>, published: &[Published]) {
    out.push(b'[');
    for (index, one) in published.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"subject\":");
        push_json(out, one.subject.as_str());
        out.extend_from_slice(b",\"stream\":");
        match &one.stream {
            Some(stream) => push_json(out, &**stream),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"seq\":");
        match one.seq {
            Some(seq) => out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(if one.duplicate { b",\"duplicate\":true}" } else { b",\"duplicate\":false}" });
    }
    out.push(b']');
}

/// A JSON body already written.
fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

/// A batch's answer, `{"results":[…]}`, each line's result with its line number and status
/// before its answer's fields.
fn batch_answer_json(results: &[LineResult]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + results.len() * 160);
    out.extend_from_slice(b"{\"results\":[");
    for (index, result) in results.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"line\":");
        out.extend_from_slice(itoa::Buffer::new().format(result.line).as_bytes());
        out.extend_from_slice(b",\"status\":");
        out.extend_from_slice(itoa::Buffer::new().format(result.status).as_bytes());
        result.body.write_fields(&mut out, &mut false);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

/// One NDJSON line's result: its line number and status beside the event's answer. (Written by
/// [`batch_answer_json`]; serde's form is what the tests hold that to.)
#[cfg_attr(test, derive(serde::Serialize))]
struct LineResult {
    line: usize,
    status: u16,
    #[cfg_attr(test, serde(flatten))]
    body: AnswerBody,
}

/// One event's result from its outputs' outcomes, whichever failed first: an output too large
/// to store ever decides the answer (a retry cannot store the whole event), then one not known
/// to be stored (the client must retry with the same id: under a new one that output could be
/// stored twice), then the first failure. The outcomes are taken.
fn event_outcome(outcomes: &mut [Option<Result<Published, SinkError>>]) -> Result<Vec<Published>, SinkError> {
    let first = |decides: fn(&SinkError) -> bool| {
        outcomes.iter().position(|outcome| matches!(outcome, Some(Err(error)) if decides(error)))
    };
    let decisive = first(|error| matches!(error, SinkError::TooLarge(_)))
        .or_else(|| first(|error| matches!(error, SinkError::Timeout)));
    if let Some(Some(Err(error))) = decisive.map(|index| outcomes[index].take()) {
        return Err(error);
    }
    outcomes.iter_mut().filter_map(Option::take).collect()
}

fn published_json(published: &[Published]) -> Value {
    json!(published)
}

/// Runs events through their routes and the sink; one answer per event, in order.
async fn ingest(state: &Arc<AppState>, events: Vec<Event>) -> Vec<Result<Answer, ApiError>> {
    if !state.sink.connected() {
        return events.iter().map(|_| Err(sink_error(SinkError::Disconnected))).collect();
    }
    // Per-key order: the key stripes are held while this batch sends (see `StripeOrder`).
    // Plugins run before they are taken: concurrent requests have no order between them, and
    // their plugin calls then overlap another batch's publishing.
    let event_stripes: Vec<Option<usize>> =
        events.iter().map(|e| e.key.as_ref().map(|k| stripe(&e.entity, k))).collect();
    let mut stripes: Vec<usize> = event_stripes.iter().flatten().copied().collect();
    stripes.sort_unstable();
    stripes.dedup();

    let count = events.len();
    let mut routed: HashMap<usize, Vec<(usize, Event)>> = HashMap::new();
    let mut answers: Vec<Option<Result<Answer, ApiError>>> = (0..count).map(|_| None).collect();
    let mut ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    for (position, event) in events.into_iter().enumerate() {
        match state.pipeline.route_for(&event) {
            Some(route) => routed.entry(route).or_default().push((position, event)),
            None => {
                state.metrics.received_many("http", "none", 1);
                state.metrics.dropped("http", "none");
                answers[position] = Some(Ok(Answer {
                    status: StatusCode::ACCEPTED,
                    body: AnswerBody::Json(json!({"id": event.id, "published": [], "dropped": true})),
                }));
            }
        }
    }
    // Every route's chain first; then everything is published in arrival order, in one run, so
    // events of one key keep their order even when an op sends them down different routes.
    let mut processed: Vec<(usize, usize, Disposition)> = Vec::with_capacity(count);
    // Events a plugin that cannot run holds back, with the plugin and why.
    let mut held: Vec<(usize, String, Unavailability)> = Vec::new();
    for (route, items) in routed {
        let (positions, batch): (Vec<usize>, Vec<Event>) = items.into_iter().unzip();
        state.metrics.received_many("http", &state.pipeline.route(route).name, batch.len());
        let started = Instant::now();
        let dispositions = match state.pipeline.process(route, batch, SourceData::Checked, &state.metrics).await {
            Ok(dispositions) => dispositions,
            // The events not run are answered "retry"; the first may have run as a probe.
            Err(unavailable) => {
                for position in &positions[unavailable.done.len()..] {
                    answers[*position] = Some(Err(plugin_unavailable(&unavailable.plugin, &unavailable.why)));
                    held.push((*position, unavailable.plugin.clone(), unavailable.why.clone()));
                }
                unavailable.done
            }
        };
        if !dispositions.is_empty() {
            state.metrics.chain_duration(&state.pipeline.route(route).name, started.elapsed());
        }
        processed.extend(positions.into_iter().zip(dispositions).map(|(position, d)| (position, route, d)));
    }
    processed.sort_unstable_by_key(|(position, ..)| *position);
    hold_later_events_of_held_keys(&held, &event_stripes, &mut processed, &mut answers);
    // The messages move out of the dispositions; each event's span says which are its own.
    let mut messages: Vec<Message> = Vec::new();
    let mut spans = Vec::with_capacity(processed.len());
    for (_, _, disposition) in &mut processed {
        let start = messages.len();
        match disposition {
            Disposition::Publish(out) => messages.append(out),
            Disposition::Rejected { dead_letter, .. } | Disposition::Failed { dead_letter, .. } => {
                messages.extend(dead_letter.take());
            }
            Disposition::Dropped => {}
        }
        spans.push(start..messages.len());
    }
    let published_started = Instant::now();
    // One outcome per message: events coalesced from different requests do not share a
    // failure that is not theirs.
    let stored = if messages.is_empty() {
        Vec::new()
    } else {
        let mut order = StripeOrder::lock(&state.key_locks, stripes).await;
        state.sink.publish_ordered(&messages, &mut order).await
    };
    // Each outcome belongs to one event's span: taken, not copied.
    let mut stored: Vec<Option<Result<Published, SinkError>>> = stored.into_iter().map(Some).collect();
    state.metrics.publish_duration(published_started.elapsed());
    let mut published_per_route: Vec<(usize, usize)> = Vec::new();
    for ((position, route, disposition), span) in processed.into_iter().zip(spans) {
        let route_name = &state.pipeline.route(route).name;
        let on_error = state.pipeline.route(route).on_error;
        let mut published = 0;
        let id = std::mem::take(&mut ids[position]);
        // Whether this event had something to store, and if so whether all of it was stored.
        let total = span.len();
        let stored_count = stored[span.clone()].iter().filter(|outcome| matches!(outcome, Some(Ok(_)))).count();
        let stored_here: Option<Result<Vec<Published>, SinkError>> =
            (total > 0).then(|| event_outcome(&mut stored[span]));
        let answer = match (stored_here, disposition) {
            (Some(Err(error)), _) => Err(store_failure(error, stored_count, total, state.sink.jetstream().is_none())),
            (Some(Ok(stored)), Disposition::Publish(_)) => {
                published += stored.len();
                Ok(Answer {
                    status: StatusCode::ACCEPTED,
                    body: AnswerBody::Stored(Stored { id, published: stored, dropped: false }),
                })
            }
            (_, Disposition::Dropped | Disposition::Publish(_)) => {
                state.metrics.dropped("http", route_name);
                Ok(Answer {
                    status: StatusCode::ACCEPTED,
                    body: AnswerBody::Json(json!({"id": id, "published": [], "dropped": true})),
                })
            }
            (stored, Disposition::Rejected { plugin, reason, .. }) => {
                state.metrics.rejected("http", route_name, &plugin);
                let mut error = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "rejected", reason);
                let dead = match stored {
                    Some(Ok(stored)) => {
                        state.metrics.dead_lettered("http", route_name);
                        published_json(&stored)
                    }
                    _ => Value::Null,
                };
                error.extra = Some(json!({"plugin": plugin, "id": id, "dead_lettered": dead}));
                Err(error)
            }
            (stored, Disposition::Failed { plugin, error, .. }) => {
                state.metrics.plugin_error(&plugin, error.kind.as_str());
                match (stored, on_error) {
                    (Some(Ok(stored)), _) => {
                        state.metrics.dead_lettered("http", route_name);
                        Ok(Answer {
                            status: StatusCode::ACCEPTED,
                            body: AnswerBody::Json(json!({"id": id, "published": [], "dropped": false,
                                         "dead_lettered": published_json(&stored),
                                         "error": {"plugin": plugin, "kind": error.kind.as_str(), "message": error.message}})),
                        })
                    }
                    (_, crate::config::OnError::Drop) => {
                        state.metrics.dropped("http", route_name);
                        Ok(Answer {
                            status: StatusCode::ACCEPTED,
                            body: AnswerBody::Json(json!({"id": id, "published": [], "dropped": true})),
                        })
                    }
                    _ => {
                        let mut failure =
                            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "plugin_failed", error.message);
                        failure.extra = Some(json!({"plugin": plugin, "kind": error.kind.as_str(), "id": id}));
                        Err(failure)
                    }
                }
            }
        };
        answers[position] = Some(answer);
        if published > 0 {
            match published_per_route.iter_mut().find(|(r, _)| *r == route) {
                Some((_, total)) => *total += published,
                None => published_per_route.push((route, published)),
            }
        }
    }
    for (route, published) in published_per_route {
        state.metrics.published("http", &state.pipeline.route(route).name, published);
    }
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "no answer"))))
        .collect()
}

/// The key stripes one batch publishes under. They are held while its messages are sent, so
/// batches sharing a key send one after another; the NATS connection then stores them in the
/// order sent, so the stripes are let go before the acks are in. Only a resend (after a
/// timed-out ack) could overtake a later batch's message: it takes the stripes again and goes
/// ahead only if no batch has sent under them since, else its messages fail (`503`, retry).
struct StripeOrder<'a> {
    locks: &'a [tokio::sync::Mutex<u64>],
    stripes: Vec<usize>,
    /// Each stripe's count as this batch left it.
    generations: Vec<u64>,
    guards: Vec<tokio::sync::MutexGuard<'a, u64>>,
}

impl<'a> StripeOrder<'a> {
    /// Takes `stripes` (sorted: a fixed order, so batches cannot deadlock).
    async fn lock(locks: &'a [tokio::sync::Mutex<u64>], stripes: Vec<usize>) -> StripeOrder<'a> {
        let mut generations = Vec::with_capacity(stripes.len());
        let mut guards = Vec::with_capacity(stripes.len());
        for &index in &stripes {
            let mut guard = locks[index].lock().await;
            *guard += 1;
            generations.push(*guard);
            guards.push(guard);
        }
        StripeOrder { locks, stripes, generations, guards }
    }
}

impl SendOrder for StripeOrder<'_> {
    // Unsent ones fail (503) rather than go out later, so the locks may go either way.
    fn sent(&mut self, _every_one: bool) {
        self.guards.clear();
    }

    fn may_resend(&mut self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            if !self.guards.is_empty() {
                return true;
            }
            for (&index, &generation) in self.stripes.iter().zip(&self.generations) {
                let guard = self.locks[index].lock().await;
                if *guard != generation {
                    self.guards.clear();
                    return false;
                }
                self.guards.push(guard);
            }
            true
        })
    }
}

/// Single-event requests waiting to run. Requests that arrive while others are being processed
/// run through their chains and are published together ("natural batching"): under load one
/// plugin call and one run of pipelined publishes serve many requests, while an event that
/// arrives alone is processed at once, with no waiting for company.
struct Coalescer {
    queue: Mutex<VecDeque<Waiting>>,
    runners: Arc<Semaphore>,
}

struct Waiting {
    event: Event,
    answer: tokio::sync::oneshot::Sender<Result<Answer, ApiError>>,
    /// The idempotency key (its mark, settled if the event is never answered) and the
    /// request's fingerprint, to remember the answer under.
    claim: Option<(InFlightGuard, [u8; 32])>,
    /// The request's in-flight slot, given back once the event is answered.
    admitted: OwnedSemaphorePermit,
}

/// Most batches of coalesced requests that run at once: one per core, so plugins can use every
/// core. Fewer runners make bigger batches, which cost less per event (docs/benchmarks.md).
fn coalesce_runners() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
}

/// Runs one single-event request's event, batched with whatever other requests are waiting.
/// With `remember`, its answer is remembered under that idempotency key by the runner, so a
/// client that goes away meanwhile still finds it when it retries.
async fn submit(
    state: &Arc<AppState>,
    event: Event,
    claim: Option<(InFlightGuard, [u8; 32])>,
    admitted: OwnedSemaphorePermit,
) -> Result<Answer, ApiError> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    state.coalescer.queue.lock().unwrap_or_else(|p| p.into_inner()).push_back(Waiting {
        event,
        answer,
        claim,
        admitted,
    });
    // A task of its own: a client that goes away must not abandon the others' events.
    start_runner(state);
    answered.await.unwrap_or_else(|_| {
        Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the event was not processed"))
    })
}

/// Runs waiting events in batches until none is left.
async fn run_waiting(state: Arc<AppState>, permit: tokio::sync::OwnedSemaphorePermit) {
    let coalescer = &state.coalescer;
    let mut permit = Some(permit);
    loop {
        while permit.is_some() {
            let batch: Vec<Waiting> = {
                let mut queue = coalescer.queue.lock().unwrap_or_else(|p| p.into_inner());
                let take = queue.len().min(COALESCE_MAX);
                queue.drain(..take).collect()
            };
            if batch.is_empty() {
                break;
            }
            // Each route's events run as a group of their own and are answered when it is done:
            // a request does not wait for another route's slow plugin it was coalesced with.
            let mut groups: futures::stream::FuturesUnordered<_> =
                by_route(&state, batch).into_iter().map(|group| run_group(&state, group)).collect();
            let mut all_done = std::pin::pin!(async { while groups.next().await.is_some() {} });
            if tokio::time::timeout(COALESCE_STALL, &mut all_done).await.is_err() {
                // A slow batch (a plugin spinning toward its limit, NATS slow to acknowledge)
                // gives its slot up, so the requests behind it do not wait for it.
                drop(permit.take());
                start_runner(&state);
                all_done.await;
            }
        }
        drop(permit.take());
        // An event queued after the last look, by a request that found every runner busy, is
        // picked up here: whoever releases a runner looks again.
        if coalescer.queue.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            return;
        }
        match coalescer.runners.clone().try_acquire_owned() {
            Ok(again) => permit = Some(again),
            Err(_) => return,
        }
    }
}

/// Splits coalesced requests by the route their event takes, keeping arrival order in each.
fn by_route(state: &AppState, batch: Vec<Waiting>) -> Vec<Vec<Waiting>> {
    let mut groups: Vec<(Option<usize>, Vec<Waiting>)> = Vec::new();
    for waiting in batch {
        let route = state.pipeline.route_for(&waiting.event);
        match groups.iter_mut().find(|(have, _)| *have == route) {
            Some((_, group)) => group.push(waiting),
            None => groups.push((route, vec![waiting])),
        }
    }
    groups.into_iter().map(|(_, group)| group).collect()
}

/// Runs one group of coalesced requests and answers each.
async fn run_group(state: &Arc<AppState>, group: Vec<Waiting>) {
    let mut events = Vec::with_capacity(group.len());
    let mut answers = Vec::with_capacity(group.len());
    for waiting in group {
        events.push(waiting.event);
        answers.push((waiting.answer, waiting.claim, waiting.admitted));
    }
    let results = ingest(state, events).await;
    for ((answer, claim, _admitted), result) in answers.into_iter().zip(results) {
        if let Some((guard, fingerprint)) = claim {
            remember(state, &guard.keys[0], fingerprint, &result);
            guard.disarm();
        }
        // The request may be gone (client disconnected); its event was still processed.
        let _ = answer.send(result);
    }
}

/// Starts a runner if events are waiting and a runner slot is free.
fn start_runner(state: &Arc<AppState>) {
    if state.coalescer.queue.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
        return;
    }
    if let Ok(permit) = state.coalescer.runners.clone().try_acquire_owned() {
        tokio::spawn(run_waiting(state.clone(), permit));
    }
}

/// Per-key order when part of a batch is held back (a plugin unloaded or quarantined): a later
/// event of a held event's key, on any route, is not stored before it; it gets the same "retry"
/// answer. (Keys are compared by stripe: a rare collision holds an event back needlessly, which
/// costs its sender a retry and nothing else.)
fn hold_later_events_of_held_keys(
    held: &[(usize, String, Unavailability)],
    event_stripes: &[Option<usize>],
    processed: &mut Vec<(usize, usize, Disposition)>,
    answers: &mut [Option<Result<Answer, ApiError>>],
) {
    if held.is_empty() {
        return;
    }
    let mut first_held: HashMap<usize, &(usize, String, Unavailability)> = HashMap::new();
    for entry in held {
        if let Some(stripe) = event_stripes[entry.0] {
            first_held
                .entry(stripe)
                .and_modify(|first| *first = if entry.0 < first.0 { entry } else { first })
                .or_insert(entry);
        }
    }
    processed.retain(|(position, ..)| {
        let Some(first) = event_stripes[*position].and_then(|stripe| first_held.get(&stripe)) else { return true };
        if first.0 > *position {
            return true;
        }
        answers[*position] = Some(Err(plugin_unavailable(&first.1, &first.2)));
        false
    });
}

fn stripe(entity: &str, key: &str) -> usize {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: a tenth of a SHA-256, and the same key always takes the same stripe.
    let mut hasher = std::hash::DefaultHasher::new();
    (entity, key).hash(&mut hasher);
    usize::try_from(hasher.finish() % KEY_STRIPES as u64).unwrap_or_default()
}

fn answer_response(answer: Result<Answer, ApiError>) -> Response {
    match answer {
        Ok(answer) => json_response(answer.status, answer.body.to_json()),
        Err(error) => error.into_response(),
    }
}

/// Admission: in-flight bound (429) and auth (401), before the body is read. A webhook route's
/// sender proves itself by its signature instead (GitHub, Stripe and the like send no token).
fn admit(state: &AppState, headers: &HeaderMap, webhook: bool) -> Result<OwnedSemaphorePermit, ApiError> {
    if !webhook {
        check_auth(state, headers)?;
    }
    state.in_flight.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", "too many requests in flight; retry shortly")
    })
}

/// Verifies a webhook signature over the raw body (before anything parses it). Returns the
/// event id: the delivery id when the route names a delivery header, else one derived from the
/// signature, so the same signed request sent again (a replay) is stored once.
fn verify_webhook(
    webhook: &crate::config::WebhookConfig,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<String, ApiError> {
    use crate::config::WebhookScheme;
    use hmac::Mac as _;
    let refuse = |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, "bad_signature", message.to_string());
    let name = webhook.header();
    let malformed = || refuse(&format!("missing or malformed `{name}` signature header"));
    let value = header_text(headers, name).map(str::trim).ok_or_else(malformed)?;
    // The signatures to check (Stripe sends one per secret while one is rotated) and the signed
    // timestamp, if the scheme has one.
    let (signatures, timestamp): (Vec<Vec<u8>>, Option<&str>) = match webhook.scheme {
        WebhookScheme::Hex => {
            let signature = value
                .strip_prefix(webhook.prefix.as_str())
                .and_then(|digest| hex::decode(digest.trim()).ok())
                .ok_or_else(malformed)?;
            let timestamp = match &webhook.timestamp_header {
                Some(name) => Some(
                    header_text(headers, name)
                        .map(str::trim)
                        .ok_or_else(|| refuse(&format!("missing `{name}` header")))?,
                ),
                None => None,
            };
            (vec![signature], timestamp)
        }
        WebhookScheme::Stripe => {
            let mut timestamp = None;
            let mut signatures = Vec::new();
            for (key, field) in value.split(',').filter_map(|part| part.trim().split_once('=')) {
                match key {
                    "t" => timestamp = Some(field),
                    "v1" => signatures.extend(hex::decode(field).ok()),
                    _ => {}
                }
            }
            if timestamp.is_none() || signatures.is_empty() {
                return Err(malformed());
            }
            (signatures, timestamp)
        }
    };
    if let Some(value) = timestamp {
        let seconds: i64 = value.parse().map_err(|_| refuse("the signed timestamp is not a Unix time"))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        if now.abs_diff(seconds) > webhook.tolerance().as_secs() {
            return Err(refuse("timestamp is outside the accepted tolerance"));
        }
    }
    let valid = webhook.secrets.iter().any(|secret| {
        let Ok(mut mac) = hmac::Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return false };
        if let Some(timestamp) = timestamp {
            mac.update(timestamp.as_bytes());
            mac.update(b".");
        }
        mac.update(body);
        signatures.iter().any(|signature| mac.clone().verify_slice(signature).is_ok())
    });
    if !valid {
        return Err(refuse("signature does not match"));
    }
    match &webhook.delivery_header {
        // Without it a replayed delivery would be stored again: the signature covers the body only.
        Some(name) => match header_text(headers, name) {
            Some(delivery) => Ok(delivery.to_string()),
            None => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "missing_delivery_id",
                format!("missing `{name}` header: this webhook route deduplicates deliveries by it"),
            )),
        },
        // Signed material only: an unsigned header (an Idempotency-Key) would let a replay pass.
        // What the signature covers, not the signature header: extra or reordered `v1=` entries
        // would otherwise make a replay look new.
        None => {
            let mut signed = Sha256::new();
            if let Some(timestamp) = timestamp {
                signed.update(timestamp.as_bytes());
                signed.update(b".");
            }
            signed.update(body);
            Ok(format!("sig-{}", hex::encode(&signed.finalize()[..16])))
        }
    }
}

async fn single(state: Arc<AppState>, request: Request, entity: String, key: Option<String>, op: &str) -> Response {
    let (mut parts, body) = request.into_parts();
    // Webhook routes: find the route from what the path and headers say, verify, then parse.
    let probe_op = lowercase(header_text(&parts.headers, "weir-op").unwrap_or(op));
    let webhook = state
        .pipeline
        .route_for_parts("http", &entity, &probe_op)
        .and_then(|route| state.pipeline.route(route).webhook.as_ref());
    let permit = match admit(&state, &parts.headers, webhook.is_some()) {
        Ok(permit) => permit,
        Err(error) => return error.into_response(),
    };
    let body = match read_body(&state, &parts.headers, body).await {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    if let Some(webhook) = webhook {
        match verify_webhook(webhook, &parts.headers, &body) {
            // The delivery id is the idempotency key: a replayed delivery is answered, not stored again.
            Ok(delivery) => match HeaderValue::from_str(&delivery) {
                Ok(value) => {
                    parts.headers.insert("idempotency-key", value);
                }
                Err(_) => {
                    return ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad_delivery_id",
                        "delivery id is not a valid header value",
                    )
                    .into_response();
                }
            },
            Err(error) => return error.into_response(),
        }
    }
    let SingleEvent { event, client_chose_id, body_if_not_data } =
        match single_event(&parts.headers, entity, key, op, body, parts.method == Method::DELETE) {
            Ok(made) => made,
            Err(error) => return error.into_response(),
        };
    if !client_chose_id {
        return answer_response(submit(&state, event, None, permit).await);
    }
    // An Idempotency-Key, a CloudEvent's id or a webhook's delivery id.
    let idempotency_key = event.id.clone();
    // Everything of the request that shapes the event: the same key with another record key,
    // media type or CloudEvent attribute is another request (422), not a retry.
    let mut print = Sha256::new()
        .chain_update(parts.method.as_str())
        .chain_update([0])
        .chain_update(parts.uri.path())
        .chain_update([0])
        .chain_update(&event.op)
        .chain_update([0])
        .chain_update(media_type(&parts.headers).as_bytes())
        .chain_update([0]);
    match &event.key {
        Some(key) => print.update([&[1u8][..], key.as_bytes(), &[0]].concat()),
        None => print.update([0]),
    }
    for (name, value) in event.headers.iter().filter(|(name, _)| name.starts_with("ce-")) {
        print.update([name.as_bytes(), &[0], value.as_bytes(), &[0]].concat());
    }
    let body = body_if_not_data.as_deref().unwrap_or(&event.data);
    let fingerprint: [u8; 32] = print.chain_update(body).finalize().into();
    if let Some(answer) = remembered(&state, &idempotency_key, fingerprint) {
        return answer_response(answer);
    }
    // The mark goes with the event to the runner, which remembers the answer even if the client
    // has gone away (and should the event never be answered, the guard settles the mark).
    let guard = InFlightGuard { state: state.clone(), keys: vec![idempotency_key] };
    answer_response(submit(&state, event, Some((guard, fingerprint)), permit).await)
}

/// Answers remembered by idempotency key, and when each expires in the order they were
/// remembered (one TTL for all, so the front is always the next to expire): expiring costs
/// nothing per lookup, however many keys there are.
#[derive(Default)]
struct Memory {
    entries: HashMap<String, Remembered>,
    expiry: std::collections::VecDeque<(Instant, String)>,
}

/// Most keys remembered at once (each holds its answer: a few hundred bytes, more for an event
/// split into many outputs). Past it, with JetStream, new keys are not remembered: JetStream
/// still stores a retry once, answered `duplicate: true`, but a reused key with another request
/// is not refused. In core NATS mode such requests get `503` until there is room.
const MAX_REMEMBERED: usize = 200_000;

impl Memory {
    fn expire(&mut self, now: Instant) {
        while self.expiry.front().is_some_and(|(expires, _)| *expires <= now) {
            let Some((expires, key)) = self.expiry.pop_front() else { break };
            // Unless remembered again since (a later expiry).
            if matches!(self.entries.get(&key),
                Some(Remembered::Done { expires: at, .. } | Remembered::Unsettled { expires: at, .. }) if *at <= expires)
            {
                self.entries.remove(&key);
            }
        }
    }

    /// Leaves `key` bound to the request with `fingerprint` for `ttl`, with no answer to give:
    /// whether it is stored is not known.
    fn unsettle(&mut self, key: &str, fingerprint: [u8; 32], ttl: Duration) {
        let expires = Instant::now() + ttl;
        self.entries.insert(key.to_string(), Remembered::Unsettled { fingerprint, expires });
        self.expiry.push_back((expires, key.to_string()));
    }

    /// Whether `key` may be added (it is there already, or there is room).
    fn has_room_for(&self, key: &str) -> bool {
        self.entries.len() < MAX_REMEMBERED || self.entries.contains_key(key)
    }
}

/// Records the answer for an idempotency key: stored outcomes and plugin rejections are
/// remembered; "not stored, retry" answers are forgotten, so the retry is processed.
fn remember(state: &AppState, key: &str, fingerprint: [u8; 32], answer: &Result<Answer, ApiError>) {
    let keep = match answer {
        Ok(answer) => Some((answer.status, answer.body.clone())),
        Err(error) if error.status == StatusCode::UNPROCESSABLE_ENTITY => {
            let response = json!({"error": {"code": error.code, "message": error.message}});
            Some((error.status, AnswerBody::Json(merge(response, error.extra.clone()))))
        }
        Err(_) => None,
    };
    let mut memory = state.idempotency.lock().unwrap_or_else(|p| p.into_inner());
    match keep {
        Some((status, body)) if memory.has_room_for(key) => {
            let expires = Instant::now() + state.settings.idempotency_ttl;
            memory.entries.insert(key.to_string(), Remembered::Done { fingerprint, status, body, expires });
            memory.expiry.push_back((expires, key.to_string()));
        }
        Some(_) => {
            memory.entries.remove(key);
        }
        // A failure: the same request again is processed, but the key stays bound to it (an
        // earlier attempt of it may be stored). Only a key this request marked: with the
        // memory full, unmarked keys are not added.
        None if matches!(memory.entries.get(key), Some(Remembered::InFlight { .. })) => {
            memory.unsettle(key, fingerprint, state.settings.idempotency_ttl);
        }
        None => {}
    }
}

/// Settles the `InFlight` idempotency marks of events that end without an answer (a batch's
/// client went away; a runner that never answered): they may or may not be stored, so the keys
/// stay bound to their requests for the usual time. The same request again is processed
/// (JetStream stores it once); a different one under the key gets `422`.
struct InFlightGuard {
    state: Arc<AppState>,
    keys: Vec<String>,
}

impl InFlightGuard {
    /// Every key's answer is remembered (or forgotten): nothing left to settle.
    fn disarm(mut self) {
        self.keys.clear();
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut memory = self.state.idempotency.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            if let Some(Remembered::InFlight { fingerprint }) = memory.entries.get(key) {
                let fingerprint = *fingerprint;
                memory.unsettle(key, fingerprint, self.state.settings.idempotency_ttl);
            }
        }
    }
}

fn merge(mut body: Value, extra: Option<Value>) -> Value {
    if let Some(Value::Object(extra)) = extra {
        for (key, value) in extra {
            body["error"][key] = value;
        }
    }
    body
}

fn key_reused() -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
        "this Idempotency-Key (event id) was used with a different request",
    )
}

/// The stored answer for a repeated key, a conflict, or `None` to go ahead (marked in flight).
fn remembered(state: &AppState, key: &str, fingerprint: [u8; 32]) -> Option<Result<Answer, ApiError>> {
    let mut memory = state.idempotency.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    memory.expire(now);
    match memory.entries.get(key) {
        Some(Remembered::Done { fingerprint: seen, status, body, expires }) if *expires >= now => {
            if *seen != fingerprint {
                return Some(Err(key_reused()));
            }
            Some(Ok(Answer { status: *status, body: body.clone() }))
        }
        // The same request again goes ahead (and is stored once); another is refused.
        Some(Remembered::Unsettled { fingerprint: seen, expires }) if *expires >= now && *seen != fingerprint => {
            Some(Err(key_reused()))
        }
        Some(Remembered::InFlight { fingerprint: seen }) => {
            if *seen != fingerprint {
                return Some(Err(key_reused()));
            }
            Some(Err(ApiError::new(
                StatusCode::CONFLICT,
                "in_progress",
                "a request with this Idempotency-Key (event id) is in progress",
            )))
        }
        _ if memory.has_room_for(key) => {
            memory.entries.insert(key.to_string(), Remembered::InFlight { fingerprint });
            None
        }
        // Full: with JetStream, its duplicate window still stores a retry once; in core NATS
        // mode this memory is all there is, so the request waits for room rather than risk a
        // second delivery.
        _ if state.sink.jetstream().is_some() => None,
        _ => Some(Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "too many idempotency keys are remembered right now; retry shortly",
        ))),
    }
}

async fn post_event(
    State(state): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    let Path(entity) = match path {
        Ok(path) => path,
        Err(rejection) => return bad_path(rejection),
    };
    single(state, request, entity, None, "insert").await
}

async fn keyed_event(
    State(state): State<Arc<AppState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    request: Request,
) -> Response {
    let Path((entity, key)) = match path {
        Ok(path) => path,
        Err(rejection) => return bad_path(rejection),
    };
    let op = if request.method() == Method::DELETE { "delete" } else { "update" };
    single(state, request, entity, Some(key), op).await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    entity: String,
    #[serde(default)]
    op: Option<String>,
    #[serde(default)]
    key: Option<Value>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    data: Option<Box<serde_json::value::RawValue>>,
}

async fn batch(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let _permit = match admit(&state, &parts.headers, false) {
        Ok(permit) => permit,
        Err(error) => return error.into_response(),
    };
    let media = media_type(&parts.headers);
    if media != "application/x-ndjson" && media != "application/ndjson" && media != "application/jsonl" {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send NDJSON as application/x-ndjson",
        )
        .into_response();
    }
    let body = match read_body(&state, &parts.headers, body).await {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    let trace: Vec<(String, String)> = ["traceparent", "tracestate"]
        .iter()
        .filter_map(|name| header_text(&parts.headers, name).map(|v| (name.to_string(), v.to_string())))
        .collect();
    let now = now_rfc3339();
    let mut results: Vec<LineResult> = Vec::new();
    let mut events = Vec::new();
    let mut slots = Vec::new();
    // Lines with their own id, as with an Idempotency-Key: slot → (id, fingerprint).
    let mut keyed: HashMap<usize, (String, [u8; 32])> = HashMap::new();
    // The ids this batch marked in flight, with their lines' fingerprints.
    let mut own_ids: HashMap<String, ([u8; 32], usize)> = HashMap::new();
    // Lines repeating an earlier line of this batch: (slot, the earlier line's slot).
    let mut repeats: Vec<(usize, usize)> = Vec::new();
    // A client that goes away mid-batch (hyper then drops this handler) abandons its events
    // where they are, so their sends give their room in the ack window back at once; their
    // keys are left unsettled (see `InFlightGuard`).
    let mut guard = InFlightGuard { state: state.clone(), keys: Vec::new() };
    for (index, raw) in body.split(|&byte| byte == b'\n').enumerate() {
        let line_number = index + 1;
        // Checked per line: one bad byte fails its own line, not the batch.
        let Ok(line) = std::str::from_utf8(raw.strip_suffix(b"\r").unwrap_or(raw)) else {
            results.push(LineResult {
                line: line_number,
                status: 400,
                body: AnswerBody::Json(json!({"error": {"code": "bad_line", "message": "the line is not UTF-8"}})),
            });
            continue;
        };
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Result<BatchLine, _> = serde_json::from_str(line);
        let event = parsed.map_err(|e| e.to_string()).and_then(|line| {
            let op = line.op.unwrap_or_else(|| "insert".into()).to_ascii_lowercase();
            if !valid_word(&op) || line.entity.is_empty() || line.entity.len() > 255 {
                return Err("`entity` must be 1–255 bytes and `op` a word".to_string());
            }
            if line.data.as_ref().is_some_and(|raw| nests_too_deep(raw.get().as_bytes())) {
                return Err(too_deep_message());
            }
            if let Some(Err(error)) = line.data.as_ref().map(|raw| crate::strict_json::check(raw.get())) {
                return Err(format!("`data` is not accepted: {error}"));
            }
            if line.id.as_deref().is_some_and(|id| !valid_event_id(id)) {
                return Err("`id` must be 1–255 bytes without control characters".to_string());
            }
            let has_id = line.id.is_some();
            let event = Event {
                id: line.id.unwrap_or_else(new_event_id),
                source: "http".into(),
                entity: line.entity,
                op,
                key: line.key.map(|k| match k {
                    Value::String(s) => s,
                    other => other.to_string(),
                }),
                time: now.clone(),
                subject: String::new(),
                headers: trace.clone(),
                data: line.data.map_or_else(|| b"{}".to_vec(), |raw| raw.get().as_bytes().to_vec()),
                old: None,
                position: None,
            };
            Ok((event, has_id))
        });
        // A webhook route's signature covers one request body; it cannot be checked per line.
        let event = event.and_then(|(event, has_id)| match state.pipeline.route_for(&event) {
            Some(route) if state.pipeline.route(route).webhook.is_some() => Err(format!(
                "entity `{}` is a webhook route; send it to /v1/events/{} with its signature",
                event.entity, event.entity
            )),
            _ => Ok((event, has_id)),
        });
        match event {
            Ok((event, has_id)) => {
                // A line's own id is an idempotency key, shared with single requests: the same
                // id with the same line gets the same answer, with anything else 422.
                if has_id && let Some(&(own, first)) = own_ids.get(&event.id) {
                    // The same id twice in this batch: the same line gets the earlier line's
                    // answer, without being sent again (core NATS would deliver it twice);
                    // another line under the id is refused.
                    let result = if own == line_print(&event) {
                        repeats.push((results.len(), first));
                        LineResult { line: line_number, status: 0, body: AnswerBody::Json(Value::Null) }
                    } else {
                        line_result(line_number, Err(key_reused()))
                    };
                    results.push(result);
                    continue;
                } else if has_id {
                    let print = line_print(&event);
                    if let Some(answer) = remembered(&state, &event.id, print) {
                        results.push(line_result(line_number, answer));
                        continue;
                    }
                    guard.keys.push(event.id.clone());
                    own_ids.insert(event.id.clone(), (print, results.len()));
                    keyed.insert(results.len(), (event.id.clone(), print));
                }
                slots.push(results.len());
                // Filled in with the event's answer below.
                results.push(LineResult { line: line_number, status: 0, body: AnswerBody::Json(Value::Null) });
                events.push(event);
            }
            Err(message) => results.push(LineResult {
                line: line_number,
                status: 400,
                body: AnswerBody::Json(json!({"error": {"code": "bad_line", "message": message}})),
            }),
        }
    }
    if results.is_empty() {
        return ApiError::new(StatusCode::BAD_REQUEST, "empty_batch", "the batch has no lines").into_response();
    }
    let answers = ingest(&state, events).await;
    for (slot, answer) in slots.into_iter().zip(answers) {
        if let Some((id, fingerprint)) = keyed.get(&slot) {
            remember(&state, id, *fingerprint, &answer);
        }
        results[slot] = line_result(results[slot].line, answer);
    }
    guard.disarm();
    for (slot, first) in repeats {
        results[slot] =
            LineResult { line: results[slot].line, status: results[first].status, body: results[first].body.clone() };
    }
    let all_accepted = results.iter().all(|result| result.status < 300);
    let status = if all_accepted { StatusCode::ACCEPTED } else { StatusCode::MULTI_STATUS };
    // The longest wait any `503` line asks for (a quarantined plugin's), at least a second.
    let retry = results
        .iter()
        .filter(|result| result.status == StatusCode::SERVICE_UNAVAILABLE.as_u16())
        .map(|result| match &result.body {
            AnswerBody::Json(body) => body["error"]["retry_after_s"].as_u64().unwrap_or(1),
            AnswerBody::Stored(_) => 1,
        })
        .max();
    let mut response = json_response(status, batch_answer_json(&results));
    if let Some(seconds) = retry {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    }
    response
}

/// What identifies a batch line's request, for its idempotency key.
fn line_print(event: &Event) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"batch-line\0")
        .chain_update(&event.entity)
        .chain_update([0])
        .chain_update(&event.op)
        .chain_update([0])
        .chain_update(event.key.as_deref().unwrap_or_default())
        .chain_update([0])
        .chain_update(&event.data)
        .finalize()
        .into()
}

/// A line's result from its event's answer.
fn line_result(line: usize, answer: Result<Answer, ApiError>) -> LineResult {
    match answer {
        Ok(answer) => LineResult { line, status: answer.status.as_u16(), body: answer.body },
        Err(error) => {
            let body = merge(json!({"error": {"code": error.code, "message": error.message}}), error.extra);
            LineResult { line, status: error.status.as_u16(), body: AnswerBody::Json(body) }
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and lets open
/// requests finish for up to `drain`. Headers must arrive within `header_timeout`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    header_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) -> anyhow::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Request heads over 64 KiB or with more than 100 headers (hyper's default) are answered 431.
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(64 * 1024)
        .max_header_size(64 * 1024);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(connection) => connection,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service.clone());
                let watched = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = watched.await {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("stopped accepting connections; draining in-flight requests");
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(?drain, "drain timeout passed with requests still open");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_written_as_serde_json_would_write_them() {
        let published = |subject: &str, stream: Option<&str>, seq: Option<u64>, duplicate: bool| Published {
            subject: subject.into(),
            stream: stream.map(Arc::from),
            seq,
            duplicate,
        };
        let stored = AnswerBody::Stored(Stored {
            id: "order-1 \"é\"\u{1}".into(),
            published: vec![
                published("weir.orders.insert", Some("WEIR"), Some(18_446_744_073_709_551_615), false),
                published("a.b", None, None, true),
            ],
            dropped: false,
        });
        let none = AnswerBody::Stored(Stored { id: "x".into(), published: Vec::new(), dropped: true });
        let error =
            AnswerBody::Json(json!({"error": {"code": "bad_line", "message": "line\n2", "at": [1, 2.5, null]}}));
        let empty = AnswerBody::Json(json!({}));
        for body in [&stored, &none, &error, &empty] {
            assert_eq!(String::from_utf8(body.to_json()).unwrap(), serde_json::to_string(body).unwrap());
        }
        let results: Vec<LineResult> = [stored, none, error, empty]
            .into_iter()
            .enumerate()
            .map(|(index, body)| LineResult { line: index + 1, status: 202 + index as u16 * 100, body })
            .collect();
        #[derive(serde::Serialize)]
        struct BatchAnswer<'a> {
            results: &'a [LineResult],
        }
        assert_eq!(
            String::from_utf8(batch_answer_json(&results)).unwrap(),
            serde_json::to_string(&BatchAnswer { results: &results }).unwrap()
        );
        assert_eq!(batch_answer_json(&[]), br#"{"results":[]}"#);
    }

    #[test]
    fn a_failed_store_says_what_a_retry_does() {
        let timeout = store_failure(SinkError::Timeout, 0, 1, false);
        assert_eq!(timeout.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(timeout.message.contains("to have it stored once"), "{}", timeout.message);
        let core = store_failure(SinkError::Timeout, 0, 1, true);
        assert!(core.message.contains("nothing removes a second copy") && !core.message.contains("stored once"));
        let gone = store_failure(SinkError::Disconnected, 0, 1, true);
        assert!(gone.message.ends_with("nothing was stored, retry"), "{}", gone.message);
        let partly = store_failure(SinkError::Full("max_msgs".into()), 2, 3, false);
        assert!(partly.message.contains("2 of this event's 3 messages were stored"), "{}", partly.message);
        assert!(!partly.message.contains("nothing was stored"), "{}", partly.message);
        let core_partly = store_failure(SinkError::Disconnected, 1, 2, true);
        assert!(core_partly.message.contains("a retry sends every one again"), "{}", core_partly.message);
    }

    #[test]
    fn an_output_not_known_to_be_stored_decides_the_events_answer() {
        let event_outcome = |outcomes: Vec<Result<Published, SinkError>>| {
            event_outcome(&mut outcomes.into_iter().map(Some).collect::<Vec<_>>())
        };
        let stored = || Ok(Published { subject: "s".into(), stream: Some("S".into()), seq: Some(1), duplicate: false });
        let outcomes = vec![stored(), Err(SinkError::Full("max_bytes".into())), Err(SinkError::Timeout)];
        assert!(matches!(event_outcome(outcomes), Err(SinkError::Timeout)));
        let outcomes = vec![Err(SinkError::Full("max_bytes".into())), stored()];
        assert!(matches!(event_outcome(outcomes), Err(SinkError::Full(_))));
        assert_eq!(event_outcome(vec![stored(), stored()]).map(|all| all.len()).ok(), Some(2));
        let outcomes = vec![Err(SinkError::Timeout), Err(SinkError::TooLarge("over max_payload".into()))];
        assert!(matches!(event_outcome(outcomes), Err(SinkError::TooLarge(_))), "a retry cannot help");
    }

    #[test]
    fn remembered_answers_expire_in_order_unless_remembered_again() {
        let mut memory = Memory::default();
        let start = Instant::now();
        let done = |expires: Instant| Remembered::Done {
            fingerprint: [0; 32],
            status: StatusCode::ACCEPTED,
            body: AnswerBody::Json(Value::Null),
            expires,
        };
        for (key, at) in [("a", 1), ("b", 2), ("a", 3)] {
            let expires = start + Duration::from_secs(at);
            memory.entries.insert(key.to_string(), done(expires));
            memory.expiry.push_back((expires, key.to_string()));
        }
        memory.expire(start + Duration::from_secs(2));
        // `b` expired; `a` was remembered again (until 3) and stays.
        assert!(memory.entries.contains_key("a") && !memory.entries.contains_key("b"));
        assert_eq!(memory.expiry.len(), 1);
        memory.expire(start + Duration::from_secs(3));
        assert!(memory.entries.is_empty() && memory.expiry.is_empty());
    }

    #[test]
    fn nesting_is_counted_outside_strings_only() {
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(!nests_too_deep(nested(MAX_JSON_DEPTH).as_bytes()));
        assert!(nests_too_deep(nested(MAX_JSON_DEPTH + 1).as_bytes()));
        let brackets_in_text = format!(r#"{{"a":"{}","b":"\"[{{"}}"#, "[".repeat(500));
        assert!(!nests_too_deep(brackets_in_text.as_bytes()));
        let escaped_backslash = format!(r#"["\\", {}]"#, nested(MAX_JSON_DEPTH));
        assert!(nests_too_deep(escaped_backslash.as_bytes()), "a string ending in \\\\ is closed");
    }
}
