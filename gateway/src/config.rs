//! The gateway config file (TOML): strict parsing with errors that name file, line, column and
//! key, `${ENV}` interpolation, durations and sizes as strings, and validation that says how to
//! fix each problem.

use serde::Deserialize;
use serde::de::{self, Deserializer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// A config problem, already formatted as `file:line:column: message`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The whole config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// NATS connection.
    pub nats: NatsConfig,
    /// JetStream stream; absent means core NATS (at-most-once).
    #[serde(default)]
    pub jetstream: Option<JetStreamConfig>,
    /// HTTP source.
    #[serde(default)]
    pub http: HttpConfig,
    /// Plugin directory and per-plugin settings.
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// Routes, tried in order; the first match wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// PostgreSQL change capture (logical replication); absent means no database source.
    #[serde(default)]
    pub postgres: Option<PostgresConfig>,
}

/// `[postgres]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection, as a libpq URL (`postgresql://user@host/db`, `?host=/var/run/postgresql` for
    /// the Unix socket) or key=value string. The role needs `REPLICATION` (or superuser).
    pub url: String,
    /// Replication slot; created (with the publication first) when this gateway starts for the
    /// first time, never silently re-created afterwards.
    #[serde(default = "defaults::slot")]
    pub slot: String,
    /// Publication; created when missing.
    #[serde(default = "defaults::publication")]
    pub publication: String,
    /// Tables to capture (`schema.table`, or `table` for `public`); empty means all tables.
    #[serde(default)]
    pub tables: Vec<String>,
    /// On first start, emit existing rows as op `read` before streaming changes.
    #[serde(default)]
    pub snapshot: bool,
    /// `emit` a `truncate` event per table, or `skip` it (counted in metrics).
    #[serde(default)]
    pub truncate: TruncateMode,
    /// How often the confirmed position is reported to the server (at most 10 s).
    #[serde(default = "defaults::status_interval", deserialize_with = "duration")]
    pub status_interval: Duration,
    /// Most row events published together.
    #[serde(default = "defaults::max_batch")]
    pub max_batch: usize,
    /// How long a batch may wait for more rows before it is published.
    #[serde(default = "defaults::linger", deserialize_with = "duration")]
    pub linger: Duration,
    /// TLS to the server over TCP (a Unix socket never uses TLS). Unset: the url's `sslmode`
    /// (`disable`, `prefer` or `require`), else `prefer`.
    #[serde(default)]
    pub tls: Option<PostgresTls>,
    /// PEM file of the certificate authorities to trust (`verify-ca`, `verify-full`; default:
    /// the system's).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate (chain), for servers that ask for one; with `tls_key_file`.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
}

/// TLS to PostgreSQL, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PostgresTls {
    /// Never.
    Disable,
    /// TLS when the server offers it, without checking its certificate; plain otherwise.
    Prefer,
    /// TLS always, without checking the certificate.
    Require,
    /// TLS, with a certificate signed by a trusted authority (any host name).
    VerifyCa,
    /// TLS, with a trusted certificate issued for the host connected to.
    VerifyFull,
}

/// What becomes of a `TRUNCATE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TruncateMode {
    /// One `truncate` event per table.
    #[default]
    Emit,
    /// Nothing is published; `weir_postgres_truncates_skipped_total` counts it.
    Skip,
}

/// `[nats]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// One server URL, or a comma-separated list.
    #[serde(default)]
    pub url: Option<String>,
    /// Several server URLs.
    #[serde(default)]
    pub urls: Vec<String>,
    /// Token auth.
    #[serde(default)]
    pub token: Option<String>,
    /// User/password auth: user.
    #[serde(default)]
    pub user: Option<String>,
    /// User/password auth: password.
    #[serde(default)]
    pub password: Option<String>,
    /// A `.creds` file (JWT + nkey seed).
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    /// An nkey seed (`SU…`).
    #[serde(default)]
    pub nkey: Option<String>,
    /// TLS settings.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// How long the first connection may take.
    #[serde(default = "defaults::connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
}

/// `[nats.tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Require TLS even when the URL says `nats://`.
    #[serde(default)]
    pub required: bool,
    /// CA certificate (PEM) to trust.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM), for mutual TLS.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// Where JetStream keeps the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// On disk.
    #[default]
    File,
    /// In memory.
    Memory,
}

/// Most requests or publishes in flight a config may ask for (far past any useful window; the
/// semaphores behind them hold at most `usize::MAX >> 3`).
const MAX_IN_FLIGHT: usize = 1_000_000;

/// Longest `max_age`: NATS counts it in nanoseconds in an `i64` (about 292 years).
const MAX_RETENTION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `[jetstream]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamConfig {
    /// Stream name.
    pub stream: String,
    /// Subjects the stream captures.
    #[serde(default = "defaults::stream_subjects")]
    pub subjects: Vec<String>,
    /// Window in which a repeated `Nats-Msg-Id` is stored once.
    #[serde(default = "defaults::duplicate_window", deserialize_with = "duration")]
    pub duplicate_window: Duration,
    /// Oldest message kept (unlimited when absent).
    #[serde(default, deserialize_with = "optional_duration")]
    pub max_age: Option<Duration>,
    /// Most messages kept.
    #[serde(default)]
    pub max_msgs: Option<i64>,
    /// Most bytes kept.
    #[serde(default, deserialize_with = "optional_size")]
    pub max_bytes: Option<u64>,
    /// `file` or `memory`.
    #[serde(default)]
    pub storage: Storage,
    /// Replicas (1, 3 or 5 in a cluster).
    #[serde(default = "defaults::replicas")]
    pub replicas: usize,
    /// How long a publish may hear no PubAck before it sends what is unanswered again (same ids).
    #[serde(default = "defaults::ack_timeout", deserialize_with = "duration")]
    pub ack_timeout: Duration,
    /// Most publishes awaiting their PubAck at once (the ack window).
    #[serde(default = "defaults::ack_window")]
    pub max_in_flight: usize,
}

/// `[http]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on.
    #[serde(default = "defaults::listen", deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Largest accepted request body.
    #[serde(default = "defaults::max_body", deserialize_with = "size")]
    pub max_body: u64,
    /// Most requests processed at once; more are answered `429`.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: usize,
    /// Time allowed to receive a request's headers.
    #[serde(default = "defaults::header_timeout", deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// Time allowed to receive a request's body.
    #[serde(default = "defaults::body_timeout", deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// Bearer tokens accepted on `/v1/*`; empty means no token is required.
    #[serde(default)]
    pub tokens: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: defaults::listen(),
            max_body: defaults::max_body(),
            max_in_flight: defaults::max_in_flight(),
            header_timeout: defaults::header_timeout(),
            body_timeout: defaults::body_timeout(),
            tokens: Vec::new(),
        }
    }
}

/// `[plugins]`: `dir`, `watch`, plus one `[plugins.<name>]` table per plugin.
#[derive(Debug)]
pub struct PluginsConfig {
    /// Directory plugin files are loaded from (`<dir>/<name>.wasm`).
    pub dir: Option<PathBuf>,
    /// How often plugin files are checked for changes; zero turns hot reload off.
    pub watch: Duration,
    /// Per-plugin settings, by name.
    pub entries: BTreeMap<String, PluginConfig>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig { dir: None, watch: Duration::from_secs(1), entries: BTreeMap::new() }
    }
}

impl<'de> Deserialize<'de> for PluginsConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = PluginsConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`dir`, `watch` and `[plugins.<name>]` tables")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<PluginsConfig, A::Error> {
                // Field by field, so errors inside a plugin's table keep their position.
                let mut plugins = PluginsConfig::default();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "dir" {
                        plugins.dir = Some(map.next_value()?);
                    } else if key == "watch" {
                        let text: String = map.next_value()?;
                        plugins.watch = parse_duration(&text).map_err(de::Error::custom)?;
                    } else {
                        if !valid_name(&key) {
                            return Err(de::Error::custom(format!(
                                "plugin name `{key}` must be lowercase letters, digits, `-` and `_`"
                            )));
                        }
                        let entry = map.next_value_seed(PluginEntry(&key))?;
                        plugins.entries.insert(key, entry);
                    }
                }
                Ok(plugins)
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// A `[plugins.<name>]` table; any other value is a key `[plugins]` does not have (a typo of
/// `watch` or `dir`), and the error says so.
struct PluginEntry<'a>(&'a str);

impl<'de> de::DeserializeSeed<'de> for PluginEntry<'_> {
    type Value = PluginConfig;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<PluginConfig, D::Error> {
        struct Table<'a>(&'a str);
        impl<'de> de::Visitor<'de> for Table<'_> {
            type Value = PluginConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a [plugins.{0}] table: `{0}` is not a key of [plugins] (`dir`, `watch`)", self.0)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<PluginConfig, A::Error> {
                PluginConfig::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer.deserialize_any(Table(self.0))
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// `[plugins.<name>]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The `.wasm` file; default `<plugins.dir>/<name>.wasm`.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Passed to the plugin's `configure` as JSON.
    #[serde(default)]
    pub config: Option<toml::Value>,
    /// Time limit per call.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Memory limit per instance.
    #[serde(default)]
    pub memory_mb: Option<usize>,
    /// Most outputs per input event.
    #[serde(default)]
    pub max_outputs: Option<usize>,
    /// Most output bytes per input event.
    #[serde(default, deserialize_with = "optional_size")]
    pub max_output_bytes: Option<u64>,
    /// Most calls running at once (each on an instance of its own).
    #[serde(default)]
    pub max_concurrent_calls: Option<usize>,
    /// Failed events in a row that quarantine the plugin (0: never).
    #[serde(default)]
    pub quarantine_after: Option<u32>,
    /// How long a quarantine lasts at first (doubled after each failed probe).
    #[serde(default, deserialize_with = "optional_duration")]
    pub quarantine_for: Option<Duration>,
}

impl PluginConfig {
    /// The runtime limits this section asks for, defaults elsewhere.
    pub fn limits(&self) -> crate::plugin::Limits {
        let mut limits = crate::plugin::Limits::with_overrides(self.timeout_ms, self.memory_mb);
        if let Some(outputs) = self.max_outputs {
            limits.max_outputs = outputs;
        }
        if let Some(bytes) = self.max_output_bytes {
            limits.max_output_bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        }
        if let Some(calls) = self.max_concurrent_calls {
            limits.max_concurrent_calls = calls;
        }
        if let Some(after) = self.quarantine_after {
            limits.quarantine.after = after;
        }
        if let Some(duration) = self.quarantine_for {
            limits.quarantine.duration = duration;
        }
        limits
    }

    /// The plugin's config as JSON text (`{}` when none).
    pub fn config_json(&self) -> String {
        match self.config.as_ref().map(toml_to_json) {
            Some(Ok(json)) => json.to_string(),
            // Refused by validation; never reached from a loaded config.
            Some(Err(_)) | None => "{}".to_string(),
        }
    }
}

/// A TOML value as the JSON a plugin reads: dates and times as their RFC 3339 text (serialized
/// as is, they became an object with a private marker key). A float JSON cannot hold (`nan`,
/// `inf`) is an error rather than a silent `null`.
pub fn toml_to_json(value: &toml::Value) -> Result<serde_json::Value, String> {
    fn finite(value: &toml::Value) -> bool {
        match value {
            toml::Value::Float(number) => number.is_finite(),
            toml::Value::Array(items) => items.iter().all(finite),
            toml::Value::Table(table) => table.values().all(finite),
            _ => true,
        }
    }
    if !finite(value) {
        return Err("`nan` and `inf` cannot be expressed in JSON".to_string());
    }
    serde_json::Value::deserialize(value.clone()).map_err(|error| error.to_string())
}

/// Where events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// HTTP writes.
    Http,
    /// PostgreSQL change capture.
    Postgres,
}

impl SourceKind {
    /// The name used in events and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Http => "http",
            SourceKind::Postgres => "postgres",
        }
    }
}

/// How the published payload is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Envelope {
    /// `{"id","source","entity","op","time","key","data","old","position"}`.
    #[default]
    Weir,
    /// The data alone.
    Data,
    /// CloudEvents 1.0 structured JSON.
    Cloudevents,
}

/// What happens to an event a plugin rejects or fails on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Publish it to the dead-letter subject (and acknowledge upstream).
    #[default]
    Dlq,
    /// Drop it, counted.
    Drop,
    /// Refuse it upstream (HTTP `422`/`500`).
    Reject,
}

/// `match = { source, entity, op }`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Only events from this source.
    #[serde(default)]
    pub source: Option<SourceKind>,
    /// Entity glob: `*` matches any run of characters (`orders*`, `public.*`).
    #[serde(default)]
    pub entity: Option<String>,
    /// One op or a list of ops.
    #[serde(default, deserialize_with = "one_or_many")]
    pub op: Vec<String>,
}

/// `[[routes]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name for logs and metrics (default `route-<n>`).
    #[serde(default)]
    pub name: Option<String>,
    /// Which events the route takes.
    #[serde(default, rename = "match")]
    pub matcher: MatchConfig,
    /// Plugin chain, in order.
    #[serde(default)]
    pub plugins: Vec<Spanned<String>>,
    /// Subject template; default `weir.{entity}.{op}`.
    #[serde(default)]
    pub subject: Option<Spanned<String>>,
    /// Subjects plugins emit must start with this; default the template's leading literal tokens.
    #[serde(default)]
    pub allowed_prefix: Option<String>,
    /// Payload shape.
    #[serde(default)]
    pub envelope: Envelope,
    /// What to do with rejected and failed events.
    #[serde(default)]
    pub on_error: OnError,
    /// Dead-letter subject template; default `weir.dlq.{entity}`.
    #[serde(default)]
    pub dlq_subject: Option<String>,
    /// Require an HMAC-SHA256 signature (webhook senders such as GitHub or Stripe).
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
}

/// `webhook = { … }` on a route: HMAC-SHA256 over the raw body, checked before parsing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Accepted secrets; more than one lets a secret be rotated without downtime.
    pub secrets: Vec<String>,
    /// How the signature is carried: `hex` (a hex digest in `header` after `prefix`, GitHub's
    /// way) or `stripe` (`t=<unix time>,v1=<hex>[,v1=…]` in one header, over `{t}.{body}`).
    #[serde(default)]
    pub scheme: WebhookScheme,
    /// Header carrying the signature (default `X-Signature-256`, or `Stripe-Signature` for
    /// the `stripe` scheme): see [`WebhookConfig::header`].
    #[serde(default)]
    pub header: Option<String>,
    /// Text before the hex digest in the header.
    #[serde(default = "defaults::signature_prefix")]
    pub prefix: String,
    /// Header with a Unix timestamp; when set, the signed text is `{timestamp}.{body}` and
    /// requests outside `tolerance` are refused.
    #[serde(default)]
    pub timestamp_header: Option<String>,
    /// Largest accepted clock difference; by default the stream's `duplicate_window` up to 5
    /// minutes, so a replay inside it is recognised (see [`WebhookConfig::tolerance`]).
    #[serde(default, deserialize_with = "optional_duration")]
    pub tolerance: Option<Duration>,
    /// Header with the sender's delivery id: it becomes the event id, so a replayed delivery is
    /// stored once.
    #[serde(default)]
    pub delivery_header: Option<String>,
}

mod defaults {
    use std::net::SocketAddr;
    use std::time::Duration;

    pub fn slot() -> String {
        "weir".into()
    }

    pub fn publication() -> String {
        "weir".into()
    }

    pub fn status_interval() -> Duration {
        Duration::from_secs(1)
    }

    pub fn max_batch() -> usize {
        5000
    }

    pub fn linger() -> Duration {
        Duration::from_millis(5)
    }

    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn stream_subjects() -> Vec<String> {
        vec!["weir.>".to_string()]
    }
    pub fn duplicate_window() -> Duration {
        Duration::from_secs(120)
    }
    pub fn replicas() -> usize {
        1
    }
    pub fn ack_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn max_in_flight() -> usize {
        1024
    }
    /// nats.go's default for asynchronous publishes too; wider than 1024 lets a batch's sends
    /// overlap the previous batch's PubAcks (docs/benchmarks.md, seventh session).
    pub fn ack_window() -> usize {
        4096
    }
    pub fn listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8080))
    }
    pub fn max_body() -> u64 {
        1 << 20
    }
    pub fn header_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn body_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn signature_prefix() -> String {
        "sha256=".to_string()
    }
    pub fn tolerance() -> Duration {
        Duration::from_secs(300)
    }
}

/// How a webhook sender carries its signature.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookScheme {
    /// A hex HMAC-SHA256 digest after a prefix; a timestamp, if any, in a header of its own.
    #[default]
    Hex,
    /// Stripe's `Stripe-Signature: t=…,v1=…`.
    Stripe,
}

impl WebhookConfig {
    /// The header carrying the signature.
    pub fn header(&self) -> &str {
        match (&self.header, self.scheme) {
            (Some(name), _) => name,
            (None, WebhookScheme::Hex) => "X-Signature-256",
            (None, WebhookScheme::Stripe) => "Stripe-Signature",
        }
    }

    /// Whether requests carry a signed timestamp (so `tolerance` applies).
    pub fn timestamped(&self) -> bool {
        self.timestamp_header.is_some() || self.scheme == WebhookScheme::Stripe
    }

    /// The accepted clock difference: as set, else the default (settled against the stream's
    /// `duplicate_window` when the config is parsed).
    pub fn tolerance(&self) -> Duration {
        self.tolerance.unwrap_or_else(defaults::tolerance)
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration ({e}); write e.g. \"500ms\", \"30s\", \"2m\", \"7d\""))
}

fn parse_size(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|_| format!("`{text}` is not a size; write e.g. \"512KiB\", \"1MiB\", \"2GB\""))
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text).map_err(de::Error::custom)
}

fn optional_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}

fn size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum SizeValue {
        Bytes(u64),
        Text(String),
    }
    match SizeValue::deserialize(deserializer)? {
        SizeValue::Bytes(bytes) => Ok(bytes),
        SizeValue::Text(text) => parse_size(&text).map_err(de::Error::custom),
    }
}

fn optional_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    size(deserializer).map(Some)
}

fn socket_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(|_| de::Error::custom(format!("`{text}` is not an address; write e.g. \"127.0.0.1:8080\"")))
}

fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

/// `line:column` (1-based) of byte `offset` in `text`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Config text after `${…}` interpolation, with where each substitution stood in the original, so
/// errors point at the file as written.
#[derive(Debug)]
pub struct Interpolated {
    /// The text to parse.
    pub text: String,
    /// For each substitution: its start and end in `text`, and its end in the original.
    substitutions: Vec<(usize, usize, usize)>,
}

impl Interpolated {
    /// The original offset of `offset` in the interpolated text (inside a substituted value: the
    /// start of its `${…}`).
    fn original(&self, offset: usize) -> usize {
        let mut shift: isize = 0;
        for &(start, end, original_end) in &self.substitutions {
            if offset < start {
                break;
            }
            if offset < end {
                return start.saturating_add_signed(shift);
            }
            shift = original_end as isize - end as isize;
        }
        offset.saturating_add_signed(shift)
    }
}

/// Where in TOML text the scanner is: a `${…}` is substituted in values and strings, escaped for
/// the kind of string it stands in, and left alone in comments.
#[derive(Clone, Copy, PartialEq)]
enum Context {
    Bare,
    Comment,
    Basic,
    Literal,
    MultiBasic,
    MultiLiteral,
}

/// Replaces `${NAME}` (and `${NAME:-default}`) with environment values; `$${` is a literal `${`.
/// Comments are left as written. A value is escaped for the string it stands in (`"…"`,
/// `"""…"""`); a literal string (`'…'`) cannot escape, so a value it cannot hold is an error.
pub fn interpolate(
    text: &str,
    file: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Interpolated, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut substitutions = Vec::new();
    let mut context = Context::Bare;
    let mut index = 0;
    let bytes = text.as_bytes();
    while index < text.len() {
        let rest = &text[index..];
        // Context changes: comments, string openings and closings, escapes in basic strings.
        let step = match context {
            Context::Bare if rest.starts_with('#') => Some((Context::Comment, 1)),
            Context::Bare if rest.starts_with("\"\"\"") => Some((Context::MultiBasic, 3)),
            Context::Bare if rest.starts_with("'''") => Some((Context::MultiLiteral, 3)),
            Context::Bare if rest.starts_with('"') => Some((Context::Basic, 1)),
            Context::Bare if rest.starts_with('\'') => Some((Context::Literal, 1)),
            Context::Comment if rest.starts_with('\n') => Some((Context::Bare, 1)),
            // A one-line string left open ends at its line (TOML then reports it), so what
            // follows — comments above all — is not read as string content.
            Context::Basic | Context::Literal if rest.starts_with('\n') => Some((Context::Bare, 1)),
            Context::Basic | Context::MultiBasic if rest.starts_with('\\') => {
                Some((context, 1 + rest[1..].chars().next().map_or(0, char::len_utf8)))
            }
            Context::Basic if rest.starts_with('"') => Some((Context::Bare, 1)),
            // Up to two more quotes before the closing three are content (`"""x""""` is `x"`).
            Context::MultiBasic if rest.starts_with("\"\"\"") => {
                Some((Context::Bare, rest.bytes().take(5).take_while(|&b| b == b'"').count()))
            }
            Context::Literal if rest.starts_with('\'') => Some((Context::Bare, 1)),
            Context::MultiLiteral if rest.starts_with("'''") => {
                Some((Context::Bare, rest.bytes().take(5).take_while(|&b| b == b'\'').count()))
            }
            _ => None,
        };
        if let Some((next, length)) = step {
            out.push_str(&rest[..length]);
            context = next;
            index += length;
            continue;
        }
        if context == Context::Comment || bytes[index] != b'$' {
            let length = rest.chars().next().map_or(1, char::len_utf8);
            out.push_str(&rest[..length]);
            index += length;
            continue;
        }
        if rest.starts_with("$${") {
            // One byte shorter: recorded like a substitution, so positions after it map back.
            let at = out.len();
            out.push_str("${");
            index += 3;
            substitutions.push((at, out.len(), index));
            continue;
        }
        let Some(body) = rest.strip_prefix("${") else {
            out.push('$');
            index += 1;
            continue;
        };
        let (line, column) = position(text, index);
        let Some(end) = body.find('}') else {
            return Err(ConfigError(format!("{file}:{line}:{column}: `${{` without a closing `}}`")));
        };
        let expression = &body[..end];
        let (name, default) = match expression.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (expression, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(ConfigError(format!("{file}:{line}:{column}: `${{{expression}}}` is not a variable name")));
        }
        let value = match (lookup(name), default) {
            (Some(value), _) => value,
            (None, Some(default)) => default.to_string(),
            (None, None) => {
                return Err(ConfigError(format!(
                    "{file}:{line}:{column}: environment variable `{name}` is not set (set it, or write `${{{name}:-default}}`)"
                )));
            }
        };
        let substituted_at = out.len();
        match context {
            Context::Literal | Context::MultiLiteral => {
                let unfit = if context == Context::Literal {
                    value.contains(['\'', '\n', '\r'])
                } else {
                    value.contains("'''")
                };
                if unfit || value.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
                    return Err(ConfigError(format!(
                        "{file}:{line}:{column}: the value of `{name}` cannot stand in a '…' string (it has a quote, line break or control character); use a \"…\" string"
                    )));
                }
                out.push_str(&value);
            }
            _ => {
                for c in value.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
                        c => out.push(c),
                    }
                }
            }
        }
        index += 2 + end + 1;
        substitutions.push((substituted_at, out.len(), index));
    }
    Ok(Interpolated { text: out, substitutions })
}

impl Config {
    /// Reads, interpolates, parses and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        let config = Config::parse(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(Path::new("."));
        Ok(config.resolve_paths(base))
    }

    /// Parses config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let interpolated = interpolate(text, file, |name| std::env::var(name).ok())?;
        // Positions in errors are in the file as written.
        let at = |offset: usize| position(text, interpolated.original(offset));
        let config: Config = toml::from_str(&interpolated.text).map_err(|error| {
            let message = error.message().trim_end().to_string();
            match error.span() {
                Some(span) => {
                    let (line, column) = at(span.start);
                    ConfigError(format!("{file}:{line}:{column}: {message}"))
                }
                None => ConfigError(format!("{file}: {message}")),
            }
        })?;
        let problems = config.validate(&at, file);
        if !problems.is_empty() {
            return Err(ConfigError(problems.join("\n")));
        }
        let mut config = config;
        // A webhook's default tolerance stays inside the window that recognises a replay.
        let window = config.replay_window();
        for route in &mut config.routes {
            if let Some(webhook) = &mut route.webhook
                && webhook.tolerance.is_none()
            {
                webhook.tolerance = Some(window.min(defaults::tolerance()));
            }
        }
        Ok(config)
    }

    /// How long a repeated event id is recognised: the stream's `duplicate_window`, or in core
    /// NATS mode (no stream to deduplicate) the gateway's own memory of answers, 2 minutes.
    pub fn replay_window(&self) -> Duration {
        self.jetstream.as_ref().map_or(Duration::from_secs(120), |js| js.duplicate_window)
    }

    /// Makes every relative path (plugins, NATS credentials and TLS files, PostgreSQL TLS
    /// files) relative to the config file's directory, so the gateway reads the same files
    /// whatever directory it is started from.
    fn resolve_paths(mut self, base: &Path) -> Config {
        let resolve = |path: &mut Option<PathBuf>| {
            if let Some(relative) = path.as_ref().filter(|p| p.is_relative()) {
                *path = Some(base.join(relative));
            }
        };
        resolve(&mut self.plugins.dir);
        for plugin in self.plugins.entries.values_mut() {
            resolve(&mut plugin.file);
        }
        resolve(&mut self.nats.creds_file);
        if let Some(tls) = self.nats.tls.as_mut() {
            resolve(&mut tls.ca_file);
            resolve(&mut tls.cert_file);
            resolve(&mut tls.key_file);
        }
        if let Some(pg) = self.postgres.as_mut() {
            resolve(&mut pg.tls_ca_file);
            resolve(&mut pg.tls_cert_file);
            resolve(&mut pg.tls_key_file);
        }
        self
    }

    /// The plugin file for `name`.
    pub fn plugin_file(&self, name: &str) -> Option<PathBuf> {
        match self.plugins.entries.get(name).and_then(|p| p.file.clone()) {
            Some(file) => Some(file),
            None => self.plugins.dir.as_ref().map(|dir| dir.join(format!("{name}.wasm"))),
        }
    }

    /// Every plugin name routes use, in first-use order.
    pub fn used_plugins(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for route in &self.routes {
            for name in &route.plugins {
                if !names.contains(name.get_ref()) {
                    names.push(name.get_ref().clone());
                }
            }
        }
        names
    }

    /// Cross-field checks; every problem found, each with its position and how to fix it.
    /// Every problem of the parsed config; `position` turns a span's start into line and column.
    fn validate(&self, position: &dyn Fn(usize) -> (usize, usize), file: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let at = |span: std::ops::Range<usize>| {
            let (line, column) = position(span.start);
            format!("{file}:{line}:{column}")
        };
        if self.nats.url.is_none() && self.nats.urls.is_empty() {
            problems.push(format!("{file}: [nats] needs `url` (e.g. \"nats://127.0.0.1:4222\")"));
        }
        // The client takes one way to authenticate; a second would be ignored without a word.
        let ways = [
            self.nats.token.is_some(),
            self.nats.user.is_some(),
            self.nats.creds_file.is_some(),
            self.nats.nkey.is_some(),
        ];
        if ways.iter().filter(|set| **set).count() > 1 {
            problems.push(format!(
                "{file}: [nats] sets more than one of `token`, `user`, `creds_file`, `nkey`; choose one"
            ));
        }
        if self.nats.user.is_some() != self.nats.password.is_some() {
            problems.push(format!("{file}: [nats] `user` and `password` go together"));
        }
        if let Some(tls) = &self.nats.tls
            && tls.cert_file.is_some() != tls.key_file.is_some()
        {
            problems.push(format!("{file}: [nats.tls] `cert_file` and `key_file` go together: set both or neither"));
        }
        if let Some(js) = &self.jetstream {
            if js.stream.is_empty() || js.stream.contains(['.', '*', '>', ' ', '/', '\\']) {
                problems.push(format!(
                    "{file}: [jetstream] stream `{}` is not a valid stream name (no `.`, `*`, `>`, spaces or slashes)",
                    js.stream
                ));
            }
            if js.subjects.is_empty() {
                problems.push(format!("{file}: [jetstream] `subjects` is empty; e.g. subjects = [\"weir.>\"]"));
            }
            if js.max_in_flight == 0 {
                problems.push(format!("{file}: [jetstream] `max_in_flight` must be at least 1"));
            }
            if js.max_in_flight > MAX_IN_FLIGHT {
                problems.push(format!("{file}: [jetstream] `max_in_flight` must be at most {MAX_IN_FLIGHT}"));
            }
            if js.duplicate_window.is_zero() {
                problems.push(format!(
                    "{file}: [jetstream] `duplicate_window` must be longer than 0s: it is how long a repeated event id is stored once and its answer remembered (e.g. \"2m\")"
                ));
            } else if js.duplicate_window < Duration::from_millis(100) {
                problems
                    .push(format!("{file}: [jetstream] `duplicate_window` must be at least 100ms (NATS refuses less)"));
            }
            // What NATS refuses, or stores as another value (then reported as a difference at
            // every start): caught here, with the fix.
            if let Some(max_age) = js.max_age
                && !max_age.is_zero()
                && max_age < js.duplicate_window
            {
                problems.push(format!(
                    "{file}: [jetstream] `max_age` ({max_age:?}) must not be shorter than `duplicate_window` ({:?}): NATS refuses such a stream; shorten `duplicate_window` or lengthen `max_age`",
                    js.duplicate_window
                ));
            }
            if js.max_age.is_some_and(|max_age| max_age > MAX_RETENTION) {
                problems
                    .push(format!("{file}: [jetstream] `max_age` must be at most 100y (leave it out for no limit)"));
            }
            if js.max_msgs.is_some_and(|max| max < 1) {
                problems.push(format!("{file}: [jetstream] `max_msgs` must be at least 1 (leave it out for no limit)"));
            }
            if js.max_bytes.is_some_and(|max| max == 0 || max > i64::MAX as u64) {
                problems.push(format!(
                    "{file}: [jetstream] `max_bytes` must be between 1B and 8EiB (leave it out for no limit)"
                ));
            }
            if !(1..=5).contains(&js.replicas) {
                problems.push(format!("{file}: [jetstream] `replicas` must be 1 to 5 (NATS keeps at most 5)"));
            }
            if js.ack_timeout < Duration::from_millis(10) {
                problems.push(format!(
                    "{file}: [jetstream] `ack_timeout` must be at least 10ms: it is how long a publish waits for its PubAck (e.g. \"5s\")"
                ));
            }
        }
        if self.nats.connect_timeout.is_zero() {
            problems.push(format!("{file}: [nats] `connect_timeout` must be longer than 0s (e.g. \"10s\")"));
        }
        if self.http.max_in_flight == 0 {
            problems.push(format!("{file}: [http] `max_in_flight` must be at least 1"));
        }
        if self.http.max_in_flight > MAX_IN_FLIGHT {
            problems.push(format!("{file}: [http] `max_in_flight` must be at most {MAX_IN_FLIGHT}"));
        }
        if self.http.header_timeout.is_zero() || self.http.body_timeout.is_zero() {
            problems.push(format!(
                "{file}: [http] `header_timeout` and `body_timeout` must be longer than 0s: at 0s every request that is not yet wholly received is cut off"
            ));
        }
        if self.http.tokens.iter().any(|t| t.len() < 16) {
            problems.push(format!("{file}: [http] every token must be at least 16 characters long"));
        }
        if let Some(pg) = &self.postgres {
            let valid_name = |name: &str| {
                !name.is_empty()
                    && name.len() <= 63
                    && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            };
            if !valid_name(&pg.slot) {
                problems.push(format!(
                    "{file}: [postgres] `slot` must be 1–63 lowercase letters, digits or `_` (got {:?})",
                    pg.slot
                ));
            }
            if !valid_name(&pg.publication) {
                problems.push(format!(
                    "{file}: [postgres] `publication` must be 1–63 lowercase letters, digits or `_` (got {:?})",
                    pg.publication
                ));
            }
            if let Err(error) = pg.url.parse::<tokio_postgres::Config>() {
                problems.push(format!("{file}: [postgres] `url` is not a PostgreSQL connection string: {error}"));
            }
            if pg.status_interval.is_zero() || pg.status_interval > Duration::from_secs(10) {
                problems.push(format!("{file}: [postgres] `status_interval` must be between 1ms and 10s"));
            }
            if pg.max_batch == 0 {
                problems.push(format!("{file}: [postgres] `max_batch` must be at least 1"));
            }
            if pg.tls_cert_file.is_some() != pg.tls_key_file.is_some() {
                problems.push(format!(
                    "{file}: [postgres] `tls_cert_file` and `tls_key_file` go together: set both or neither"
                ));
            }
            if let (Some(tls), Ok(parsed)) = (pg.tls, pg.url.parse::<tokio_postgres::Config>()) {
                let from_url = match parsed.get_ssl_mode() {
                    tokio_postgres::config::SslMode::Disable => Some(PostgresTls::Disable),
                    tokio_postgres::config::SslMode::Require => Some(PostgresTls::Require),
                    _ => None,
                };
                if from_url.is_some_and(|mode| mode != tls) {
                    problems.push(format!(
                        "{file}: [postgres] `tls` and the url's `sslmode` disagree; remove `sslmode` from the url"
                    ));
                }
            }
            if self.jetstream.is_none() {
                problems.push(format!(
                    "{file}: [postgres] needs [jetstream]: change capture confirms a position only after \
                     JetStream has stored the changes"
                ));
            }
        }
        for (index, route) in self.routes.iter().enumerate() {
            for name in &route.plugins {
                if !self.plugins.entries.contains_key(name.get_ref()) && self.plugins.dir.is_none() {
                    problems.push(format!(
                        "{}: route {} uses plugin `{}`, which has no [plugins.{}] section and there is no plugins.dir",
                        at(name.span()),
                        index + 1,
                        name.get_ref(),
                        name.get_ref()
                    ));
                }
            }
            if let Some(webhook) = &route.webhook
                && (webhook.secrets.is_empty() || webhook.secrets.iter().any(|s| s.len() < 16))
            {
                problems
                    .push(format!("{file}: route {}: webhook needs `secrets`, each at least 16 characters", index + 1));
            }
            if let Some(webhook) = &route.webhook
                && webhook.scheme == WebhookScheme::Stripe
                && webhook.timestamp_header.is_some()
            {
                problems.push(format!(
                    "{file}: route {}: webhook scheme `stripe` reads the timestamp from its signature header; remove `timestamp_header`",
                    index + 1
                ));
            }
            if let Some(subject) = &route.subject
                && let Err(error) = crate::pipeline::SubjectTemplate::parse(subject.get_ref())
            {
                problems.push(format!("{}: route {}: {error}", at(subject.span()), index + 1));
            }
            if let Some(dlq) = &route.dlq_subject
                && let Err(error) = crate::pipeline::SubjectTemplate::parse(dlq)
            {
                problems.push(format!("{file}: route {}: `dlq_subject`: {error}", index + 1));
            }
            if let Some(prefix) = &route.allowed_prefix
                && let Err(error) = crate::subject::validate(prefix)
            {
                problems.push(format!(
                    "{file}: route {}: `allowed_prefix` must be whole subject tokens, like \"shop\" or \"shop.orders\": {error}",
                    index + 1
                ));
            }
        }
        // A replay inside the tolerance but past the window would be taken as a new event.
        let window = self.replay_window();
        for (index, route) in self.routes.iter().enumerate() {
            if let Some(webhook) = &route.webhook
                && webhook.timestamped()
                && let Some(tolerance) = webhook.tolerance
                && tolerance > window
            {
                problems.push(format!(
                    "{file}: route {}: webhook `tolerance` ({tolerance:?}) is longer than the time a repeated event is recognised ({window:?}: [jetstream] `duplicate_window`, 2m in core NATS mode): a request replayed in between would be stored again; lower `tolerance` or raise `duplicate_window`",
                    index + 1
                ));
            }
        }
        for (name, plugin) in &self.plugins.entries {
            if let Some(Err(why)) = plugin.config.as_ref().map(toml_to_json) {
                problems.push(format!("{file}: [plugins.{name}] `config`: {why}"));
            }
            if plugin.max_concurrent_calls == Some(0) {
                problems.push(format!("{file}: [plugins.{name}] `max_concurrent_calls` must be at least 1"));
            }
            if plugin.quarantine_for.is_some_and(|time| time > crate::plugin::health::LONGEST_QUARANTINE) {
                problems.push(format!(
                    "{file}: [plugins.{name}] `quarantine_for` must be at most 24h; to never quarantine the plugin, set `quarantine_after = 0`"
                ));
            }
            if plugin.quarantine_for == Some(Duration::ZERO) {
                problems.push(format!(
                    "{file}: [plugins.{name}] `quarantine_for` must be longer than 0s; to never quarantine the plugin, set `quarantine_after = 0`"
                ));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, "weir.toml").map_err(|e| e.0)
    }

    const MINIMAL: &str = "[nats]\nurl = \"nats://127.0.0.1:4222\"\n";

    #[test]
    fn a_plugins_config_reaches_it_as_json_with_dates_as_text() {
        let config = parse(&format!(
            "{MINIMAL}[plugins.p]\nconfig = {{ since = 2026-01-01, at = 2026-01-01T10:00:00Z, n = 1.5 }}\n"
        ))
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(&config.plugins.entries["p"].config_json()).unwrap();
        assert_eq!(json, serde_json::json!({"since": "2026-01-01", "at": "2026-01-01T10:00:00Z", "n": 1.5}));
        let error = parse(&format!("{MINIMAL}[plugins.p]\nconfig = {{ limit = nan }}\n")).unwrap_err();
        assert!(error.contains("[plugins.p] `config`: `nan` and `inf` cannot be expressed in JSON"), "{error}");
    }

    #[test]
    fn a_string_left_open_does_not_make_later_comments_string_content() {
        let text = "[nats]\nurl = \"nats://x\n# see ${NOT_SET}\n";
        let interpolated = interpolate(text, "weir.toml", |_| None);
        assert!(interpolated.is_ok(), "the comment is not interpolated");
        let error = parse(text).unwrap_err();
        assert!(error.starts_with("weir.toml:2:") && !error.contains("NOT_SET"), "{error}");
    }

    #[test]
    fn values_nats_would_refuse_or_store_otherwise_are_refused_with_fixes() {
        let error = parse(&format!(
            "{MINIMAL}connect_timeout = \"0s\"\n[jetstream]\nstream = \"S\"\nduplicate_window = \"2m\"\nmax_age = \"1m\"\nmax_msgs = 0\nmax_bytes = \"0B\"\nreplicas = 0\nack_timeout = \"0s\"\nmax_in_flight = 2000000\n[http]\nheader_timeout = \"0s\"\n"
        ))
        .unwrap_err();
        for wanted in [
            "[nats] `connect_timeout` must be longer than 0s",
            "`max_age` (60s) must not be shorter than `duplicate_window` (120s): NATS refuses such a stream",
            "`max_msgs` must be at least 1 (leave it out for no limit)",
            "`max_bytes` must be between 1B and 8EiB",
            "`replicas` must be 1 to 5",
            "`ack_timeout` must be at least 10ms",
            "[jetstream] `max_in_flight` must be at most 1000000",
            "`header_timeout` and `body_timeout` must be longer than 0s",
        ] {
            assert!(error.contains(wanted), "{wanted}: {error}");
        }
        let error = parse(&format!("{MINIMAL}[jetstream]\nstream = \"S\"\nduplicate_window = \"50ms\"\n")).unwrap_err();
        assert!(error.contains("`duplicate_window` must be at least 100ms"), "{error}");
        let error = parse(&format!("{MINIMAL}[jetstream]\nstream = \"S\"\nmax_age = \"300y\"\n")).unwrap_err();
        assert!(error.contains("`max_age` must be at most 100y"), "{error}");
    }

    #[test]
    fn postgres_settings_are_validated_with_fixes() {
        let config = parse(&format!(
            "{MINIMAL}[jetstream]\nstream = \"S\"\n[postgres]\nurl = \"host=/var/run/postgresql dbname=app\"\n"
        ))
        .unwrap();
        let pg = config.postgres.unwrap();
        assert_eq!((pg.slot.as_str(), pg.publication.as_str(), pg.max_batch), ("weir", "weir", 5000));
        assert_eq!(pg.status_interval, Duration::from_secs(1));
        let error = parse(&format!(
            "{MINIMAL}[postgres]\nurl = \"host=/tmp\"\nslot = \"Bad-Name\"\nstatus_interval = \"1m\"\n"
        ))
        .unwrap_err();
        let tls_error = parse(&format!(
            "{MINIMAL}[jetstream]\nstream = \"S\"\n[postgres]\nurl = \"host=db sslmode=require\"\ntls = \"disable\"\ntls_cert_file = \"c.pem\"\n"
        ))
        .unwrap_err();
        assert!(tls_error.contains("`tls` and the url's `sslmode` disagree"), "{tls_error}");
        assert!(tls_error.contains("`tls_cert_file` and `tls_key_file` go together"), "{tls_error}");
        let tls_error =
            parse(&format!("{MINIMAL}[jetstream]\nstream = \"S\"\n[postgres]\nurl = \"host=db\"\ntls = \"verify\"\n"))
                .unwrap_err();
        assert!(
            tls_error.contains(
                "unknown variant `verify`, expected one of `disable`, `prefer`, `require`, `verify-ca`, `verify-full`"
            ),
            "{tls_error}"
        );
        for expected in [
            "[postgres] `slot` must be 1–63 lowercase letters, digits or `_` (got \"Bad-Name\")",
            "[postgres] `status_interval` must be between 1ms and 10s",
            "[postgres] needs [jetstream]",
        ] {
            assert!(error.contains(expected), "missing {expected:?} in:\n{error}");
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.http.max_body, 1 << 20);
        assert!(config.jetstream.is_none());
    }

    #[test]
    fn unknown_keys_name_file_line_column_and_key() {
        let error =
            parse("[nats]\nurl = \"nats://x\"\n[http]\nlisten = \"127.0.0.1:1\"\ncolour = \"blue\"\n").unwrap_err();
        assert!(error.starts_with("weir.toml:5:1: unknown field `colour`"), "{error}");
        let error = parse(&format!("{MINIMAL}[plugins.redact]\nconfig = {{}}\ntimeout = 5\n")).unwrap_err();
        assert!(error.starts_with("weir.toml:5:1: unknown field `timeout`"), "{error}");
        let error = parse(&format!("{MINIMAL}[[routes]]\nmatch = {{ entity = \"a\", kind = \"b\" }}\n")).unwrap_err();
        assert!(error.starts_with("weir.toml:4:") && error.contains("unknown field `kind`"), "{error}");
    }

    #[test]
    fn settings_that_would_quietly_break_delivery_are_refused() {
        let error = parse(&format!("{MINIMAL}[jetstream]\nstream = \"S\"\nduplicate_window = \"0s\"\n")).unwrap_err();
        assert!(error.contains("[jetstream] `duplicate_window` must be longer than 0s"), "{error}");
        let error = parse(&format!("{MINIMAL}[nats.tls]\ncert_file = \"c.pem\"\n")).unwrap_err();
        assert!(error.contains("[nats.tls] `cert_file` and `key_file` go together"), "{error}");
        let route = |rest: &str| format!("{MINIMAL}[[routes]]\n{rest}\n");
        let error = parse(&format!("{MINIMAL}[plugins]\nwacth = \"5s\"\n")).unwrap_err();
        assert!(error.contains("`wacth` is not a key of [plugins] (`dir`, `watch`)"), "{error}");
        let error = parse(&route("dlq_subject = \"dead..{entity}\"")).unwrap_err();
        assert!(error.contains("route 1: `dlq_subject`:"), "{error}");
        let error = parse(&route("allowed_prefix = \"shop.\"")).unwrap_err();
        assert!(error.contains("route 1: `allowed_prefix` must be whole subject tokens"), "{error}");
        // A plugin may move every event under the prefix (plugins/route does), so a route
        // subject outside it is allowed (with a warning at start).
        assert!(parse(&route("allowed_prefix = \"shop\"")).is_ok());
    }

    #[test]
    fn durations_and_sizes_are_strings_with_helpful_errors() {
        let config = parse(&format!("{MINIMAL}[jetstream]\nstream = \"S\"\nduplicate_window = \"5m\"\nmax_bytes = \"1GiB\"\n[http]\nmax_body = \"512KiB\"\n")).unwrap();
        let js = config.jetstream.unwrap();
        assert_eq!(js.duplicate_window, Duration::from_secs(300));
        assert_eq!(js.max_bytes, Some(1 << 30));
        assert_eq!(config.http.max_body, 512 << 10);
        let error = parse(&format!("{MINIMAL}[jetstream]\nstream = \"S\"\nmax_age = \"forever\"\n")).unwrap_err();
        assert!(
            error.starts_with("weir.toml:5:11:") && error.contains("not a duration") && error.contains("\"2m\""),
            "{error}"
        );
        let error = parse(&format!("{MINIMAL}[http]\nmax_body = \"lots\"\n")).unwrap_err();
        assert!(error.contains("weir.toml:4:12:") && error.contains("not a size"), "{error}");
    }

    #[test]
    fn a_webhook_tolerance_past_the_duplicate_window_is_refused_and_the_default_stays_inside() {
        let route = |tolerance: &str| {
            format!(
                "{MINIMAL}[jetstream]\nstream = \"S\"\n[[routes]]\nwebhook = {{ secrets = [\"0123456789abcdef\"], timestamp_header = \"T\"{tolerance} }}\n"
            )
        };
        let error = parse(&route(", tolerance = \"5m\"")).unwrap_err();
        assert!(error.contains("longer than the time a repeated event is recognised (120s"), "{error}");
        // Core NATS mode: the gateway's own memory (2 minutes) is the window.
        let core = route(", tolerance = \"5m\"").replace("[jetstream]\nstream = \"S\"\n", "");
        assert!(parse(&core).unwrap_err().contains("recognised (120s"));
        let error = parse(&route(", scheme = \"stripe\"")).unwrap_err();
        assert!(error.contains("remove `timestamp_header`"), "{error}");
        let config = Config::parse(&route(""), "weir.toml").unwrap();
        let window = config.jetstream.as_ref().unwrap().duplicate_window;
        assert_eq!(config.routes[0].webhook.as_ref().unwrap().tolerance(), window.min(Duration::from_secs(300)));
    }

    #[test]
    fn env_interpolation() {
        let lookup = |name: &str| (name == "TOKEN").then(|| "s\"e\\cret".to_string());
        let text =
            interpolate("a = \"${TOKEN}\"\nb = \"${MISSING:-x}\"\nc = \"$${LITERAL}\"\n", "f", lookup).unwrap().text;
        assert_eq!(text, "a = \"s\\\"e\\\\cret\"\nb = \"x\"\nc = \"${LITERAL}\"\n");
        // Comments are left alone; a literal string takes the value as it is, or refuses it.
        let plain = |name: &str| (name == "PLAIN").then(|| r"a\b".to_string());
        let text = interpolate("# token = \"${NOPE}\"\nt = '${PLAIN}' # ${NOPE}\n", "f", plain).unwrap().text;
        assert_eq!(text, "# token = \"${NOPE}\"\nt = 'a\\b' # ${NOPE}\n");
        let error = interpolate("t = '${QUOTE}'", "f", |_| Some("it's".to_string())).unwrap_err().0;
        assert!(error.starts_with("f:1:6:") && error.contains("use a \"…\" string"), "{error}");
        // Positions after (and inside) a substitution map back to the file as written.
        let written = "k = { a = \"${X}\", b = 1 }";
        let interpolated = interpolate(written, "f", |_| Some("0123456789".to_string())).unwrap();
        let after = interpolated.text.find("b =").unwrap();
        assert_eq!(interpolated.original(after), written.find("b =").unwrap());
        let inside = interpolated.text.find("345").unwrap();
        assert_eq!(interpolated.original(inside), written.find("${X}").unwrap());
        // `$${` is a byte shorter once written out: positions after it still map back, also
        // next to characters of more than one byte.
        let written = "a = \"$${X}$${Y}\" # café\nbogus = 1\n";
        let interpolated = interpolate(written, "f", |_| None).unwrap();
        let bogus = interpolated.text.find("bogus").unwrap();
        assert_eq!(interpolated.original(bogus), written.find("bogus").unwrap());
        assert_eq!(position(written, written.find("é").unwrap() + 1), (1, 23), "inside a character: its start");
        // Quotes right before a multi-line string's end are content; the comment after it stays one.
        let text = interpolate("a = \"\"\"x\"\"\"\" # ${NOPE}\nb = '''y'''' # ${NOPE}\n", "f", |_| None).unwrap().text;
        assert!(text.contains("# ${NOPE}\nb"), "{text}");
        let error = interpolate("\na = \"${NOPE}\"", "f", |_| None).unwrap_err().0;
        assert_eq!(error, "f:2:6: environment variable `NOPE` is not set (set it, or write `${NOPE:-default}`)");
        assert!(interpolate("a = \"${A B}\"", "f", |_| None).unwrap_err().0.contains("not a variable name"));
    }

    #[test]
    fn every_problem_is_listed_with_how_to_fix_it() {
        let error = parse(
            "[nats]\ntoken = \"t\"\nuser = \"u\"\n[jetstream]\nstream = \"a.b\"\n[[routes]]\nplugins = [\"nope\"]\nsubject = \"a..{op}\"\n",
        )
        .unwrap_err();
        let lines: Vec<&str> = error.lines().collect();
        assert!(lines.iter().any(|l| l.contains("needs `url`")), "{error}");
        assert!(lines.iter().any(|l| l.contains("more than one of")), "{error}");
        assert!(lines.iter().any(|l| l.contains("`user` and `password` go together")), "{error}");
        assert!(lines.iter().any(|l| l.contains("not a valid stream name")), "{error}");
        assert!(lines.iter().any(|l| l.starts_with("weir.toml:7:12: route 1 uses plugin `nope`")), "{error}");
        assert!(
            lines.iter().any(|l| l.starts_with("weir.toml:8:11: route 1:") && l.contains("empty token")),
            "{error}"
        );
    }

    #[test]
    fn two_ways_to_authenticate_to_nats_are_refused() {
        for pair in [
            "user = \"u\"\npassword = \"p\"\nnkey = \"SU\"",
            "creds_file = \"c\"\nnkey = \"SU\"",
            "user = \"u\"\npassword = \"p\"\ncreds_file = \"c\"",
        ] {
            let error = parse(&format!("[nats]\nurl = \"nats://x\"\n{pair}\n")).unwrap_err();
            assert!(error.contains("sets more than one of `token`, `user`, `creds_file`, `nkey`"), "{pair}: {error}");
        }
    }

    #[test]
    fn quarantine_settings_reach_the_plugin_limits_and_zero_time_is_refused() {
        let base = "[nats]\nurl = \"nats://x\"\n[plugins.p]\n";
        let config = parse(&format!("{base}quarantine_after = 0\nquarantine_for = \"1m\"\n")).unwrap();
        let limits = config.plugins.entries["p"].limits();
        assert_eq!((limits.quarantine.after, limits.quarantine.duration), (0, Duration::from_secs(60)));
        let defaults = parse(base).unwrap().plugins.entries["p"].limits();
        assert_eq!((defaults.quarantine.after, defaults.quarantine.duration), (50, Duration::from_secs(10)));
        let error = parse(&format!("{base}quarantine_for = \"0s\"\n")).unwrap_err();
        assert!(error.contains("[plugins.p] `quarantine_for` must be longer than 0s; to never quarantine"), "{error}");
    }

    #[test]
    fn relative_file_paths_are_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weir.toml");
        std::fs::write(
            &path,
            "[nats]\nurl = \"nats://127.0.0.1:4222\"\ncreds_file = \"secrets/weir.creds\"\n\
             [nats.tls]\nca_file = \"ca.pem\"\ncert_file = \"/etc/weir/c.pem\"\nkey_file = \"c.key\"\n\
             [jetstream]\nstream = \"S\"\n\
             [plugins]\ndir = \"plugins\"\n\
             [postgres]\nurl = \"host=db\"\ntls_ca_file = \"db-ca.pem\"\ntls_cert_file = \"db.pem\"\ntls_key_file = \"db.key\"\n",
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        let at = |name: &str| Some(dir.path().join(name));
        assert_eq!(config.nats.creds_file, at("secrets/weir.creds"));
        let tls = config.nats.tls.as_ref().unwrap();
        assert_eq!((tls.ca_file.clone(), tls.key_file.clone()), (at("ca.pem"), at("c.key")));
        assert_eq!(tls.cert_file, Some(PathBuf::from("/etc/weir/c.pem")), "absolute paths stay");
        assert_eq!(config.plugins.dir, at("plugins"));
        let pg = config.postgres.as_ref().unwrap();
        assert_eq!(
            (pg.tls_ca_file.clone(), pg.tls_cert_file.clone(), pg.tls_key_file.clone()),
            (at("db-ca.pem"), at("db.pem"), at("db.key"))
        );
    }

    #[test]
    fn the_example_configs_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for example in ["examples/quickstart/weir.toml", "examples/postgres-cdc/weir.toml"] {
            let config = Config::load(&root.join(example)).unwrap_or_else(|e| panic!("{example}: {}", e.0));
            assert!(
                config.plugins.dir.as_ref().is_some_and(|dir| dir.ends_with("plugins/target/wasm32-wasip2/release"))
            );
            assert!(!config.routes.is_empty(), "{example}");
        }
    }
}
