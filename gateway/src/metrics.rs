//! Prometheus metrics (prefix `weir_`), served on `/metrics`. Names are a contract: every
//! source and route reports the same counters.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

type Labels = Vec<(&'static str, String)>;

fn seconds_histogram() -> Histogram {
    // 50 µs to ~26 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    received: Family<Labels, Counter>,
    published: Family<Labels, Counter>,
    dropped: Family<Labels, Counter>,
    rejected: Family<Labels, Counter>,
    dead_lettered: Family<Labels, Counter>,
    plugin_errors: Family<Labels, Counter>,
    chain_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    plugin_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    publish_seconds: Histogram,
    http_in_flight: Gauge,
    nats_connected: Gauge,
    plugin_reloads: Family<Labels, Counter>,
    plugin_loaded: Family<Labels, Gauge>,
    plugin_quarantined: Family<Labels, Gauge>,
    plugin_quarantines: Family<Labels, Counter>,
    pg_changes: Family<Labels, Counter>,
    pg_truncates_skipped: Family<Labels, Counter>,
    pg_connected: Gauge,
    pg_confirmed_lsn: Gauge,
    pg_lag_bytes: Gauge,
    pg_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pg_retained_wal_bytes: Gauge,
}

impl Metrics {
    /// Registers every metric; the `weir_postgres_*` ones only with `postgres` (change capture
    /// configured), so an HTTP-only gateway does not report replication as down.
    pub fn new(postgres: bool) -> Metrics {
        let mut registry = Registry::with_prefix("weir");
        let metrics = Metrics {
            received: Family::default(),
            published: Family::default(),
            dropped: Family::default(),
            rejected: Family::default(),
            dead_lettered: Family::default(),
            plugin_errors: Family::default(),
            chain_seconds: Family::new_with_constructor(seconds_histogram),
            plugin_seconds: Family::new_with_constructor(seconds_histogram),
            publish_seconds: seconds_histogram(),
            http_in_flight: Gauge::default(),
            nats_connected: Gauge::default(),
            plugin_reloads: Family::default(),
            plugin_loaded: Family::default(),
            plugin_quarantined: Family::default(),
            plugin_quarantines: Family::default(),
            pg_changes: Family::default(),
            pg_truncates_skipped: Family::default(),
            pg_connected: Gauge::default(),
            pg_confirmed_lsn: Gauge::default(),
            pg_lag_bytes: Gauge::default(),
            pg_lag_seconds: Gauge::default(),
            pg_retained_wal_bytes: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("events_received", "Events received, by source and route", metrics.received.clone());
        registry.register("events_published", "Messages stored, by source and route", metrics.published.clone());
        registry.register(
            "events_dropped",
            "Events that produced nothing, by source and route",
            metrics.dropped.clone(),
        );
        registry.register(
            "events_rejected",
            "Events rejected by a plugin, by source, route and plugin",
            metrics.rejected.clone(),
        );
        registry.register(
            "events_dead_lettered",
            "Events stored on the dead-letter subject",
            metrics.dead_lettered.clone(),
        );
        registry.register("plugin_errors", "Plugin failures, by plugin and kind", metrics.plugin_errors.clone());
        registry.register(
            "plugin_chain_duration_seconds",
            "Time to run a route's plugin chain over a batch",
            metrics.chain_seconds.clone(),
        );
        registry.register(
            "plugin_call_duration_seconds",
            "Time of one plugin's call over a batch, by plugin",
            metrics.plugin_seconds.clone(),
        );
        registry.register(
            "http_in_flight",
            "HTTP requests admitted and not yet answered (bounded by [http] max_in_flight)",
            metrics.http_in_flight.clone(),
        );
        registry.register(
            "publish_duration_seconds",
            "Time from publishing to the last PubAck of a batch",
            metrics.publish_seconds.clone(),
        );
        registry.register("nats_connected", "1 while connected to NATS", metrics.nats_connected.clone());
        registry.register(
            "plugin_reloads",
            "Plugin file changes seen while running, by plugin and result (loaded, refused, removed)",
            metrics.plugin_reloads.clone(),
        );
        registry.register(
            "plugin_loaded",
            "1 while a version of the plugin is serving, by plugin",
            metrics.plugin_loaded.clone(),
        );
        registry.register(
            "plugin_quarantined",
            "1 while the serving version of the plugin is quarantined (its events held back), by plugin",
            metrics.plugin_quarantined.clone(),
        );
        registry.register(
            "plugin_quarantines",
            "Times a plugin was quarantined, a failed probe renewing it included, by plugin",
            metrics.plugin_quarantines.clone(),
        );
        if !postgres {
            return Metrics { registry, ..metrics };
        }
        registry.register(
            "postgres_changes",
            "Row changes read from the replication slot, by schema, table and op",
            metrics.pg_changes.clone(),
        );
        registry.register(
            "postgres_truncates_skipped",
            "TRUNCATEs not published (truncate = \"skip\"), by schema and table",
            metrics.pg_truncates_skipped.clone(),
        );
        registry.register("postgres_connected", "1 while the replication stream is up", metrics.pg_connected.clone());
        registry.register(
            "postgres_confirmed_lsn",
            "Position confirmed to the server: every change before it is stored",
            metrics.pg_confirmed_lsn.clone(),
        );
        registry.register(
            "postgres_lag_bytes",
            "WAL between the server's position and the confirmed one",
            metrics.pg_lag_bytes.clone(),
        );
        registry.register(
            "postgres_lag_seconds",
            "Age of the changes being read while the stream is behind (now minus their commit time); 0 once caught up",
            metrics.pg_lag_seconds.clone(),
        );
        registry.register(
            "postgres_retained_wal_bytes",
            "WAL the server keeps for the slot (pg_current_wal_lsn() - restart_lsn)",
            metrics.pg_retained_wal_bytes.clone(),
        );
        Metrics { registry, ..metrics }
    }

    /// `count` events arrived from `source` for `route` (`none` when no route matched).
    pub fn received_many(&self, source: &str, route: &str, count: usize) {
        let labels = vec![("source", source.to_string()), ("route", route.to_string())];
        self.received.get_or_create(&labels).inc_by(count as u64);
    }
    /// `count` messages were stored.
    pub fn published(&self, source: &str, route: &str, count: usize) {
        let labels = vec![("source", source.to_string()), ("route", route.to_string())];
        self.published.get_or_create(&labels).inc_by(count as u64);
    }
    /// An event produced nothing.
    pub fn dropped(&self, source: &str, route: &str) {
        self.dropped.get_or_create(&vec![("source", source.to_string()), ("route", route.to_string())]).inc();
    }
    /// A plugin rejected an event.
    pub fn rejected(&self, source: &str, route: &str, plugin: &str) {
        let labels = vec![("source", source.to_string()), ("route", route.to_string()), ("plugin", plugin.to_string())];
        self.rejected.get_or_create(&labels).inc();
    }
    /// An event went to the dead-letter subject.
    pub fn dead_lettered(&self, source: &str, route: &str) {
        self.dead_lettered.get_or_create(&vec![("source", source.to_string()), ("route", route.to_string())]).inc();
    }
    /// A plugin failed.
    pub fn plugin_error(&self, plugin: &str, kind: &str) {
        self.plugin_errors.get_or_create(&vec![("plugin", plugin.to_string()), ("kind", kind.to_string())]).inc();
    }
    /// A route's chain ran over a batch.
    pub fn chain_duration(&self, route: &str, elapsed: Duration) {
        self.chain_seconds.get_or_create(&vec![("route", route.to_string())]).observe(elapsed.as_secs_f64());
    }
    /// One plugin's call over a batch.
    pub fn plugin_call_duration(&self, plugin: &str, elapsed: Duration) {
        self.plugin_seconds.get_or_create(&vec![("plugin", plugin.to_string())]).observe(elapsed.as_secs_f64());
    }
    /// HTTP requests admitted and not yet answered.
    pub fn set_http_in_flight(&self, requests: usize) {
        self.http_in_flight.set(i64::try_from(requests).unwrap_or(i64::MAX));
    }
    /// A batch was published and acknowledged.
    pub fn publish_duration(&self, elapsed: Duration) {
        self.publish_seconds.observe(elapsed.as_secs_f64());
    }
    /// NATS connection state.
    pub fn set_nats_connected(&self, connected: bool) {
        self.nats_connected.set(i64::from(connected));
    }

    /// A plugin file changed and was handled with `result`.
    pub fn plugin_reload(&self, plugin: &str, result: &str) {
        self.plugin_reloads.get_or_create(&vec![("plugin", plugin.to_string()), ("result", result.to_string())]).inc();
    }
    /// Whether a version of `plugin` is serving.
    pub fn set_plugin_loaded(&self, plugin: &str, loaded: bool) {
        self.plugin_loaded.get_or_create(&vec![("plugin", plugin.to_string())]).set(i64::from(loaded));
    }

    /// A plugin entered (or renewed) its quarantine.
    pub fn plugin_quarantine_began(&self, plugin: &str) {
        self.set_plugin_quarantine_state(plugin, true);
        self.plugin_quarantines.get_or_create(&vec![("plugin", plugin.to_string())]).inc();
    }
    /// Whether the serving version of `plugin` is quarantined (a new version starts without, and
    /// a quarantine lifts).
    pub fn set_plugin_quarantine_state(&self, plugin: &str, quarantined: bool) {
        self.plugin_quarantined.get_or_create(&vec![("plugin", plugin.to_string())]).set(i64::from(quarantined));
    }

    /// The counter of row changes read from the slot for one table and op; callers keep it, so
    /// counting a row costs one atomic add.
    pub fn postgres_changes(&self, schema: &str, table: &str, op: &str) -> Counter {
        let labels = vec![("schema", schema.to_string()), ("table", table.to_string()), ("op", op.to_string())];
        self.pg_changes.get_or_create(&labels).clone()
    }
    /// A TRUNCATE was skipped.
    pub fn postgres_truncate_skipped(&self, schema: &str, table: &str) {
        let labels = vec![("schema", schema.to_string()), ("table", table.to_string())];
        self.pg_truncates_skipped.get_or_create(&labels).inc();
    }
    /// Replication state, refreshed periodically.
    pub fn set_postgres(&self, status: &crate::postgres::SourceStatus, retained_wal: Option<i64>) {
        use std::sync::atomic::Ordering;
        let confirmed = status.confirmed_lsn.load(Ordering::Relaxed);
        let server = status.server_lsn.load(Ordering::Relaxed);
        self.pg_connected.set(i64::from(status.connected.load(Ordering::Relaxed)));
        self.pg_confirmed_lsn.set(i64::try_from(confirmed).unwrap_or(i64::MAX));
        self.pg_lag_bytes.set(i64::try_from(server.saturating_sub(confirmed)).unwrap_or(i64::MAX));
        let reading = status.reading_commit_micros.load(Ordering::Relaxed);
        let behind = if reading == 0 { 0 } else { crate::postgres::now_pg_micros().saturating_sub(reading).max(0) };
        self.pg_lag_seconds.set(behind as f64 / 1e6);
        if let Some(bytes) = retained_wal {
            self.pg_retained_wal_bytes.set(bytes);
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text.push_str("# metrics could not be encoded\n");
        }
        text
    }
}
