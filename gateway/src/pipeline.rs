//! From events to messages: route matching, subject templates, the plugin chain, and the payload
//! envelope. Sources hand events in; the sink takes messages out.

use crate::config::{Config, Envelope, OnError, RouteConfig, SourceKind, WebhookConfig};
use crate::event::Event;
use crate::plugin::health::{Change, Ticket};
use crate::plugin::{ErrorKind, Outcome, Plugin, PluginError, PluginSet, PluginSlot, Quarantine};
use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use std::sync::Arc;

/// A parsed subject template such as `shop.{entity}.{op}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    Entity,
    Op,
    Key,
    Source,
    Schema,
    Table,
}

impl SubjectTemplate {
    /// Parses a template: dot-separated tokens, each a literal or one of `{entity}`, `{op}`,
    /// `{key}`, `{source}`, `{schema}`, `{table}`.
    pub fn parse(template: &str) -> Result<SubjectTemplate, String> {
        let mut tokens = Vec::new();
        for part in template.split('.') {
            let token = match part {
                "" => return Err(format!("subject template `{template}` has an empty token")),
                "{entity}" => Token::Entity,
                "{op}" => Token::Op,
                "{key}" => Token::Key,
                "{source}" => Token::Source,
                "{schema}" => Token::Schema,
                "{table}" => Token::Table,
                literal if literal.contains(['{', '}']) => {
                    return Err(format!(
                        "subject template token `{literal}` is not a placeholder; use a whole token: {{entity}}, {{op}}, {{key}}, {{source}}, {{schema}} or {{table}}"
                    ));
                }
                literal => {
                    crate::subject::validate(literal).map_err(|e| format!("subject template `{template}`: {e}"))?;
                    Token::Literal(literal.to_string())
                }
            };
            tokens.push(token);
        }
        Ok(SubjectTemplate { tokens })
    }

    /// The literal tokens before the first placeholder, joined: the default allowed prefix.
    pub fn literal_prefix(&self) -> String {
        let literals: Vec<&str> = self
            .tokens
            .iter()
            .map_while(|t| match t {
                Token::Literal(l) => Some(l.as_str()),
                _ => None,
            })
            .collect();
        literals.join(".")
    }

    /// The subject for `event`; every value from the event becomes one sanitized token.
    pub fn render(&self, event: &Event) -> String {
        use crate::subject::push_token;
        let (schema, table) = event.entity.split_once('.').unwrap_or(("public", event.entity.as_str()));
        // Written into one string: this runs for every message.
        let mut subject = String::with_capacity(64);
        for (index, token) in self.tokens.iter().enumerate() {
            if index > 0 {
                subject.push('.');
            }
            match token {
                Token::Literal(literal) => subject.push_str(literal),
                Token::Entity => push_token(&mut subject, &event.entity),
                Token::Op => push_token(&mut subject, &event.op),
                Token::Key => push_token(&mut subject, event.key.as_deref().unwrap_or("_")),
                Token::Source => push_token(&mut subject, &event.source),
                Token::Schema => push_token(&mut subject, schema),
                Token::Table => push_token(&mut subject, table),
            }
        }
        subject
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else { return pattern == text };
    let Some(mut remaining) = text.strip_prefix(first) else { return false };
    let pieces: Vec<&str> = rest.split('*').collect();
    for (index, piece) in pieces.iter().enumerate() {
        if index == pieces.len() - 1 {
            return remaining.ends_with(piece);
        }
        match remaining.find(piece) {
            Some(at) => remaining = &remaining[at + piece.len()..],
            None => return false,
        }
    }
    true
}

/// A route, ready to run.
pub struct Route {
    /// Name for logs and metrics.
    pub name: String,
    source: Option<SourceKind>,
    entity: Option<String>,
    ops: Vec<String>,
    chain: Vec<Arc<PluginSlot>>,
    subject: SubjectTemplate,
    /// The default subject of PostgreSQL changes, when the route sets no `subject`.
    postgres_subject: Option<SubjectTemplate>,
    allowed_prefix: String,
    /// Payload shape.
    pub envelope: Envelope,
    /// What to do with rejected and failed events.
    pub on_error: OnError,
    dlq: SubjectTemplate,
    /// Signature check for webhook senders.
    pub webhook: Option<WebhookConfig>,
}

impl Route {
    fn matches(&self, source: &str, entity: &str, op: &str) -> bool {
        self.source.is_none_or(|s| s.as_str() == source)
            && self.entity.as_deref().is_none_or(|p| glob_matches(p, entity))
            && (self.ops.is_empty() || self.ops.iter().any(|have| have == op))
    }
}

/// A message ready for NATS.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Subject to publish to (shared: each send and each answer takes it without a copy).
    pub subject: async_nats::Subject,
    /// Headers, in order.
    pub headers: Headers,
    /// Payload (shared, so retries and hand-offs to the client do not copy it).
    pub payload: bytes::Bytes,
}

impl Message {
    /// The `Nats-Msg-Id` header.
    pub fn id(&self) -> &str {
        self.header(MSG_ID).unwrap_or("")
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }
}

/// A message's headers as a list. The NATS client's own map (a hash map of vectors) is built
/// at each send instead: building it once and cloning it per send cost more than either.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Headers(Vec<(HeaderName, String)>);

impl Headers {
    /// Room for the host's headers plus `extra`.
    pub fn with_capacity(extra: usize) -> Headers {
        Headers(Vec::with_capacity(HOST_HEADERS.len() + extra))
    }

    /// Adds a header (a name may repeat).
    pub fn append(&mut self, name: HeaderName, value: String) {
        self.0.push((name, value));
    }

    /// Sets header `name`, replacing every value it had.
    pub fn set(&mut self, name: HeaderName, value: String) {
        self.0.retain(|(have, _)| have != &name);
        self.0.push((name, value));
    }

    /// The first value of header `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(have, _)| AsRef::<str>::as_ref(have) == name).map(|(_, value)| value.as_str())
    }

    /// Every header, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(name, value)| (AsRef::<str>::as_ref(name), value.as_str()))
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The NATS client's form, for one send.
    pub fn to_nats(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (index, (name, value)) in self.0.iter().enumerate() {
            let value = HeaderValue::from(value.clone());
            // `insert` hashes once, `append` twice: append only to a name already there.
            if self.0[..index].iter().any(|(earlier, _)| earlier == name) {
                map.append(name.clone(), value);
            } else {
                map.insert(name.clone(), value);
            }
        }
        map
    }
}

const MSG_ID: &str = "Nats-Msg-Id";
/// Headers the host sets; an event's own header of the same name (any case) is left out.
const HOST_HEADERS: [&str; 7] =
    [MSG_ID, "Weir-Source", "Weir-Entity", "Weir-Op", "Content-Type", "Weir-Position", "Weir-Key"];

/// A header value NATS can carry: line breaks become spaces (they would end the header).
pub fn header_value(text: &str) -> String {
    if has_line_break(text) { text.replace(['\r', '\n'], " ") } else { text.to_string() }
}

/// Whether `name` can be a NATS header name: printable ASCII without `:`.
pub fn valid_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// What became of one input event.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Publish these messages (one per output event).
    Publish(Vec<Message>),
    /// Every output was dropped (or no route matched).
    Dropped,
    /// A plugin rejected it; `dead_letter` is set when the route sends it to the DLQ.
    Rejected { plugin: String, reason: String, dead_letter: Option<Message> },
    /// A plugin failed on it; `dead_letter` is set when the route sends it to the DLQ.
    Failed { plugin: String, error: PluginError, dead_letter: Option<Message> },
}

/// A route's chain cannot run now: one of its plugins has no serving version (its file was
/// removed) or is quarantined. The events not run come back untouched, so the source can answer
/// "retry" or wait.
#[derive(Debug)]
pub struct Unavailable {
    /// The plugin that cannot run.
    pub plugin: String,
    /// Why.
    pub why: Unavailability,
    /// The dispositions of the first events, which did run (a quarantine's probe): often none.
    pub done: Vec<Disposition>,
    /// The events after those, as they were handed in.
    pub events: Vec<Event>,
}

/// Why a plugin cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailability {
    /// No version is loaded.
    Unloaded,
    /// Its events kept failing; it is held back for a while.
    Quarantined(Quarantine),
}

/// Logs and counts a plugin's entering or leaving quarantine. A version that stopped serving
/// while it ran is only logged: the metrics are the serving version's.
fn report_health(slot: &PluginSlot, plugin: &Arc<Plugin>, change: Change, metrics: &crate::metrics::Metrics) {
    if change == Change::None {
        return;
    }
    let serving = slot.current().is_some_and(|current| Arc::ptr_eq(&current, plugin));
    let version = plugin.info().version_label();
    match change {
        Change::None => {}
        Change::Quarantined { duration, failed_in_a_row, last_error } if serving => {
            tracing::error!(
                plugin = %plugin.name(),
                %version,
                failed_in_a_row,
                last_error = %last_error,
                "plugin quarantined for {duration:?}: its events keep failing, so routes using it hold events back (HTTP answers 503, change capture waits) instead of dead-lettering them; then one event probes it. Deploy a fixed plugin file to lift the quarantine at once"
            );
            metrics.plugin_quarantine_began(plugin.name());
        }
        Change::Lifted if serving => {
            tracing::info!(plugin = %plugin.name(), %version, "plugin handled its probe event; quarantine lifted");
            metrics.set_plugin_quarantine_state(plugin.name(), false);
        }
        Change::Quarantined { last_error, .. } => {
            tracing::warn!(plugin = %plugin.name(), %version, last_error = %last_error, "a replaced version of the plugin kept failing on the events it was finishing; the serving version is not affected");
        }
        Change::Lifted => {}
    }
}

/// How many of `results` to take: all, or up to the `limit`-th failure in a row.
fn end_at_failures_in_a_row<T, E>(results: &[Result<T, E>], limit: u32) -> usize {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX).max(1);
    let mut in_a_row = 0;
    for (index, result) in results.iter().enumerate() {
        in_a_row = if result.is_err() { in_a_row + 1 } else { 0 };
        if in_a_row >= limit {
            return index + 1;
        }
    }
    results.len()
}

/// Events a plugin quarantined by their failures did not run, as they came in.
struct Held {
    plugin: String,
    why: Unavailability,
    events: Vec<Event>,
}

/// A chain allowed to run: its plugins' serving versions, each with its ticket.
struct Admitted {
    chain: Vec<Arc<Plugin>>,
    /// Each place's ticket, to record its results under.
    tickets: Vec<Ticket>,
}

impl Admitted {
    /// Whether one of the plugins runs as a quarantine's probe.
    fn probing(&self) -> bool {
        self.tickets.iter().any(Ticket::is_probe)
    }
}

/// The routes and their plugin chains.
pub struct Pipeline {
    routes: Vec<Route>,
    plugins: Arc<PluginSet>,
}

impl Pipeline {
    /// Builds routes from the config, with the already loaded `plugins` by name. Without routes,
    /// a default route publishes every event to `weir.{entity}.{op}`.
    pub fn new(config: &Config, plugins: Arc<PluginSet>) -> anyhow::Result<Pipeline> {
        let mut routes = Vec::new();
        for (index, route) in config.routes.iter().enumerate() {
            routes.push(build_route(index, route, &plugins)?);
        }
        if routes.is_empty() {
            let default = RouteConfig {
                name: Some("default".into()),
                matcher: Default::default(),
                plugins: Vec::new(),
                subject: None,
                allowed_prefix: None,
                envelope: Envelope::Weir,
                on_error: OnError::Dlq,
                dlq_subject: None,
                webhook: None,
            };
            routes.push(build_route(0, &default, &plugins)?);
        }
        Ok(Pipeline { routes, plugins })
    }

    /// The plugins routes draw on, with their reload state.
    pub fn plugins(&self) -> &Arc<PluginSet> {
        &self.plugins
    }

    /// Plugins some route needs that have no serving version (their file was removed).
    pub fn unloaded_plugins(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .routes
            .iter()
            .flat_map(|route| &route.chain)
            .filter(|slot| slot.current().is_none())
            .map(|slot| slot.name())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Index of the first route matching `event`.
    pub fn route_for(&self, event: &Event) -> Option<usize> {
        self.route_for_parts(&event.source, &event.entity, &event.op)
    }

    /// Index of the first route an event of this source, entity and op would take (an HTTP
    /// request's route is known before its event is built).
    pub fn route_for_parts(&self, source: &str, entity: &str, op: &str) -> Option<usize> {
        self.routes.iter().position(|route| route.matches(source, entity, op))
    }

    /// The route at `index`.
    pub fn route(&self, index: usize) -> &Route {
        &self.routes[index]
    }

    /// Runs `events`, which all match route `index`, through its chain: one disposition per
    /// event, in order. Plugins run on the calling task and yield at each epoch tick. The chain's
    /// versions are taken once per run, so a reload meanwhile does not change plugins under it.
    ///
    /// While a plugin of the chain is unloaded or quarantined, nothing runs and the events come
    /// back in [`Unavailable`]. When a quarantine's time is up, the first event alone runs as
    /// the probe: if the plugin handles it, the rest follow at once; if not, the rest come back
    /// held, after the probe's disposition.
    pub async fn process(
        &self,
        index: usize,
        mut events: Vec<Event>,
        source_data: SourceData,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Vec<Disposition>, Unavailable> {
        let route = &self.routes[index];
        // The dispositions of probes run so far; usually none, and then the chain's own are
        // handed back as they are.
        let mut done = Vec::new();
        loop {
            let admitted = match self.admit_chain(route) {
                Ok(admitted) => admitted,
                Err((plugin, why)) => return Err(Unavailable { plugin, why, done, events }),
            };
            if !admitted.probing() || events.len() <= 1 {
                let (ran, held) = self.run_chain(route, &admitted, events, source_data, metrics).await;
                if done.is_empty() && held.is_none() {
                    return Ok(ran);
                }
                done.extend(ran);
                return match held {
                    Some(held) => Err(Unavailable { plugin: held.plugin, why: held.why, done, events: held.events }),
                    None => Ok(done),
                };
            }
            let rest = events.split_off(1);
            let (ran, held) = self.run_chain(route, &admitted, events, source_data, metrics).await;
            done.extend(ran);
            if let Some(mut held) = held {
                held.events.extend(rest);
                return Err(Unavailable { plugin: held.plugin, why: held.why, done, events: held.events });
            }
            events = rest;
        }
    }

    /// The serving version of each plugin of `route`'s chain with its ticket, when every one may
    /// run. Nothing is taken unless all may run.
    fn admit_chain(&self, route: &Route) -> Result<Admitted, (String, Unavailability)> {
        let mut chain = Vec::with_capacity(route.chain.len());
        for slot in &route.chain {
            let Some(plugin) = slot.current() else {
                return Err((slot.name().to_string(), Unavailability::Unloaded));
            };
            if let Err(quarantine) = plugin.health().check() {
                return Err((slot.name().to_string(), Unavailability::Quarantined(quarantine)));
            }
            chain.push(plugin);
        }
        let mut tickets: Vec<Ticket> = Vec::with_capacity(chain.len());
        for (index, plugin) in chain.iter().enumerate() {
            // A plugin listed twice is admitted once; its later places run on an ordinary ticket.
            if let Some(earlier) = chain[..index].iter().position(|earlier| Arc::ptr_eq(earlier, plugin)) {
                tickets.push(tickets[earlier].ordinary());
                continue;
            }
            match plugin.health().admit() {
                Ok(ticket) => tickets.push(ticket),
                // Another caller took the probe since the check: give back any taken here.
                Err(quarantine) => {
                    for (plugin, ticket) in chain.iter().zip(tickets) {
                        plugin.health().release_probe(ticket);
                    }
                    return Err((plugin.name().to_string(), Unavailability::Quarantined(quarantine)));
                }
            }
        }
        Ok(Admitted { chain, tickets })
    }

    /// Runs `events` through `chain`, the serving versions of `route`'s plugins: the
    /// dispositions of the first events, and the rest as they came in when a plugin was
    /// quarantined by failures among them (it stopped running them; see
    /// [`Plugin::run_stopping`]).
    async fn run_chain(
        &self,
        route: &Route,
        admitted: &Admitted,
        mut events: Vec<Event>,
        source_data: SourceData,
        metrics: &crate::metrics::Metrics,
    ) -> (Vec<Disposition>, Option<Held>) {
        for event in &mut events {
            let template = match &route.postgres_subject {
                Some(template) if event.source == "postgres" => template,
                _ => &route.subject,
            };
            event.subject = template.render(event);
        }
        let mut count = events.len();
        // Dead letters carry the event as it came in, and held events go back as they came in:
        // the first plugin's inputs, kept once that plugin has run (plugins borrow their inputs,
        // so nothing is copied for this).
        let mut originals: Vec<Event> = Vec::new();
        let mut held: Option<(String, Unavailability)> = None;
        // The next plugin's inputs, and which input event each descends from.
        let mut batch = events;
        let mut origins: Vec<usize> = (0..count).collect();
        let mut verdicts: Vec<Option<Disposition>> = vec![None; count];
        for ((plugin, slot), ticket) in admitted.chain.iter().zip(&route.chain).zip(&admitted.tickets) {
            let started = std::time::Instant::now();
            // Everything dropped or failed before this plugin: no call to count.
            let called = !batch.is_empty();
            let (results, quarantined) = self.run_plugin(route, plugin, slot, *ticket, &batch, metrics).await;
            if called {
                metrics.plugin_call_duration(plugin.name(), started.elapsed());
            }
            let inputs = std::mem::take(&mut batch);
            if let Some(why) = quarantined
                && let Some(&first_held) = origins.get(results.len())
            {
                // The plugin stopped: the input its first unrun event descends from, and every
                // later one, are held back whole (per-key order), with what earlier plugins did.
                held = Some((plugin.name().to_string(), Unavailability::Quarantined(why)));
                count = first_held;
                verdicts.truncate(count);
                origins.truncate(origins.partition_point(|origin| *origin < count));
            }
            if originals.is_empty() {
                originals = inputs;
            }
            let mut next_origins = Vec::with_capacity(origins.len());
            // (After a stop, `origins` holds only the inputs before the first held one.)
            for (origin, result) in std::mem::take(&mut origins).into_iter().zip(results) {
                if verdicts[origin].is_some() {
                    continue;
                }
                match result {
                    Ok(Outcome::Keep(event)) => {
                        next_origins.push(origin);
                        batch.push(event);
                    }
                    Ok(Outcome::Split(events)) => {
                        next_origins.extend(std::iter::repeat_n(origin, events.len()));
                        batch.extend(events);
                    }
                    Ok(Outcome::Drop) => {}
                    Ok(Outcome::Reject(reason)) => {
                        let dead_letter = (route.on_error == OnError::Dlq)
                            .then(|| dead_letter(route, &originals[origin], plugin, "rejected", &reason));
                        verdicts[origin] =
                            Some(Disposition::Rejected { plugin: plugin.name().into(), reason, dead_letter });
                    }
                    Err(error) => {
                        let dead_letter = (route.on_error == OnError::Dlq).then(|| {
                            dead_letter(route, &originals[origin], plugin, error.kind.as_str(), &error.message)
                        });
                        verdicts[origin] =
                            Some(Disposition::Failed { plugin: plugin.name().into(), error, dead_letter });
                    }
                }
            }
            // Outputs of an input that failed later in the batch are not published.
            let (kept_origins, kept): (Vec<usize>, Vec<Event>) = next_origins
                .into_iter()
                .zip(std::mem::take(&mut batch))
                .filter(|(origin, _)| verdicts[*origin].is_none())
                .unzip();
            origins = kept_origins;
            batch = kept;
        }
        let live = origins.into_iter().zip(batch);
        let mut outputs: Vec<Vec<Message>> = vec![Vec::new(); count];
        for (origin, event) in live {
            // With no plugin, `originals` is empty and the data is the source's own.
            let data_is_json = source_data == SourceData::Checked
                && originals.get(origin).is_none_or(|original| original.data == event.data);
            outputs[origin].push(to_message(route, event, data_is_json));
        }
        let dispositions = verdicts
            .into_iter()
            .zip(outputs)
            .map(|(verdict, messages)| match verdict {
                Some(verdict) => verdict,
                None if messages.is_empty() => Disposition::Dropped,
                None => Disposition::Publish(messages),
            })
            .collect();
        let held = held.map(|(plugin, why)| Held { plugin, why, events: originals.split_off(count) });
        (dispositions, held)
    }

    /// Runs `batch` through one plugin of `route`: a result per event, in order, up to the
    /// failure that quarantines the plugin, and then the quarantine (the rest is not run).
    async fn run_plugin(
        &self,
        route: &Route,
        plugin: &Arc<Plugin>,
        slot: &PluginSlot,
        ticket: Ticket,
        batch: &[Event],
        metrics: &crate::metrics::Metrics,
    ) -> (Vec<Result<Outcome, PluginError>>, Option<Quarantine>) {
        if batch.is_empty() {
            // Gives a probe left with no event back.
            report_health(slot, plugin, plugin.health().record::<Outcome>(ticket, &[]), metrics);
            return (Vec::new(), None);
        }
        let mut results = Vec::with_capacity(batch.len());
        while results.len() < batch.len() {
            // After a stop, not quarantined after all (a success elsewhere reset the count
            // meanwhile): the rest runs, under the same stop.
            if !results.is_empty()
                && let Err(quarantine) = plugin.health().check()
            {
                return (results, Some(quarantine));
            }
            let stop_after = if ticket.is_probe() { None } else { plugin.health().failures_to_quarantine() };
            let mut ran: Vec<Result<Outcome, PluginError>> = plugin
                .run_stopping(&batch[results.len()..], stop_after)
                .await
                .into_iter()
                .map(|result| result.and_then(|outcome| self.check_prefix(route, plugin, outcome)))
                .collect();
            // Failures of single events in a call that ran (a bad subject, an output limit)
            // count too: what comes after the one that quarantines the plugin is not taken.
            if let Some(limit) = stop_after {
                ran.truncate(end_at_failures_in_a_row(&ran, limit));
            }
            report_health(slot, plugin, plugin.health().record(ticket, &ran), metrics);
            results.extend(ran);
        }
        (results, None)
    }

    fn check_prefix(&self, route: &Route, plugin: &Plugin, outcome: Outcome) -> Result<Outcome, PluginError> {
        let inside = |subject: &str| {
            if route.allowed_prefix.is_empty() {
                return !crate::subject::reserved(subject);
            }
            subject == route.allowed_prefix
                || subject.strip_prefix(route.allowed_prefix.as_str()).is_some_and(|rest| rest.starts_with('.'))
        };
        let events: Vec<&Event> = match &outcome {
            Outcome::Keep(event) => vec![event],
            Outcome::Split(events) => events.iter().collect(),
            _ => Vec::new(),
        };
        if let Some(bad) = events.iter().find(|e| !inside(&e.subject)) {
            let message = if route.allowed_prefix.is_empty() {
                format!(
                    "plugin `{}` emitted subject `{}`, which NATS keeps for its own APIs and replies (`$…`, `_INBOX.…`); a route lets plugins publish there only with an `allowed_prefix` that names it",
                    plugin.name(),
                    bad.subject
                )
            } else {
                format!(
                    "plugin `{}` emitted subject `{}` outside the route's allowed prefix `{}`",
                    plugin.name(),
                    bad.subject,
                    route.allowed_prefix
                )
            };
            return Err(PluginError { kind: ErrorKind::InvalidSubject, message });
        }
        Ok(outcome)
    }
}

/// Subject of a route that sets none; change capture's events use [`DEFAULT_POSTGRES_SUBJECT`].
pub const DEFAULT_SUBJECT: &str = "weir.{entity}.{op}";
/// Subject of change capture's events on a route that sets none.
pub const DEFAULT_POSTGRES_SUBJECT: &str = "weir.{schema}.{table}.{op}";
/// Dead-letter subject of a route that sets none.
pub const DEFAULT_DLQ_SUBJECT: &str = "weir.dlq.{entity}";

/// A route's name in logs and metrics: its own, or `route-<n>` (counting from 1).
pub fn route_name(index: usize, config: &RouteConfig) -> String {
    config.name.clone().unwrap_or_else(|| format!("route-{}", index + 1))
}

fn build_route(index: usize, config: &RouteConfig, plugins: &PluginSet) -> anyhow::Result<Route> {
    let name = route_name(index, config);
    let template = config.subject.as_ref().map_or(DEFAULT_SUBJECT, |s| s.get_ref().as_str());
    let postgres_subject = match config.subject {
        Some(_) => None,
        None => Some(SubjectTemplate::parse(DEFAULT_POSTGRES_SUBJECT).map_err(anyhow::Error::msg)?),
    };
    let subject = SubjectTemplate::parse(template).map_err(|e| anyhow::anyhow!("route `{name}`: {e}"))?;
    let dlq = SubjectTemplate::parse(config.dlq_subject.as_deref().unwrap_or(DEFAULT_DLQ_SUBJECT))
        .map_err(|e| anyhow::anyhow!("route `{name}` dlq_subject: {e}"))?;
    let chain = config
        .plugins
        .iter()
        .map(|plugin| {
            plugins.get(plugin.get_ref()).cloned().ok_or_else(|| {
                anyhow::anyhow!("route `{name}` uses plugin `{}`, which is not loaded", plugin.get_ref())
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(prefix) = &config.allowed_prefix
        && !crate::subject::template_can_start_with(template, prefix)
    {
        tracing::warn!(
            route = %name,
            "the route's subject `{template}` never falls under its allowed_prefix `{prefix}`: an event a plugin keeps without moving it under the prefix fails as `invalid-subject`"
        );
    }
    Ok(Route {
        allowed_prefix: config.allowed_prefix.clone().unwrap_or_else(|| subject.literal_prefix()),
        name,
        source: config.matcher.source,
        entity: config.matcher.entity.clone(),
        // Events' ops are lowercase: `INSERT` in a config means `insert`.
        ops: config.matcher.op.iter().map(|op| op.to_ascii_lowercase()).collect(),
        chain,
        subject,
        postgres_subject,
        envelope: config.envelope,
        on_error: config.on_error,
        dlq,
        webhook: config.webhook.clone(),
    })
}

/// Event data embedded as JSON: the raw text when it is valid JSON (no re-encoding), otherwise
/// base64 under a `*_base64` key.
enum Embedded<'a> {
    Json(&'a serde_json::value::RawValue),
    Base64(String),
}

fn embed(bytes: &[u8]) -> Embedded<'_> {
    match serde_json::from_slice::<&serde_json::value::RawValue>(bytes) {
        Ok(raw) => Embedded::Json(raw),
        Err(_) => {
            use base64::Engine as _;
            Embedded::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

/// Where an event's `data` comes from, for its envelope: JSON text its source checked strictly
/// (HTTP's), or text no one checked as a whole (change capture writes rows itself and relies on
/// the envelope's check). Checked data that the plugins left byte for byte as it was is embedded
/// as it is; anything else is parsed once more, and embedded as base64 if it is not JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceData {
    Checked,
    Unchecked,
}

/// The Weir JSON envelope of an event, serialized: written field by field (the same bytes
/// serde_json writes for the fields in this order), so that data known to be JSON is copied in
/// without being parsed again. `data_is_json` says it is.
pub fn weir_envelope_bytes(event: &Event, data_is_json: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(envelope_capacity(event));
    out.extend_from_slice(b"{\"id\":");
    push_json_str(&mut out, &event.id);
    out.extend_from_slice(b",\"source\":");
    push_json_str(&mut out, &event.source);
    out.extend_from_slice(b",\"entity\":");
    push_json_str(&mut out, &event.entity);
    out.extend_from_slice(b",\"op\":");
    push_json_str(&mut out, &event.op);
    out.extend_from_slice(b",\"time\":");
    push_json_str(&mut out, &event.time);
    out.extend_from_slice(b",\"key\":");
    push_json_opt_str(&mut out, event.key.as_deref());
    if data_is_json {
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(event.data.trim_ascii());
    } else {
        match embed(&event.data) {
            Embedded::Json(raw) => {
                out.extend_from_slice(b",\"data\":");
                out.extend_from_slice(raw.get().as_bytes());
            }
            Embedded::Base64(text) => {
                out.extend_from_slice(b",\"data_base64\":");
                push_json_str(&mut out, &text);
            }
        }
    }
    out.extend_from_slice(b",\"old\":");
    match event.old.as_deref().map(embed) {
        Some(Embedded::Json(raw)) => out.extend_from_slice(raw.get().as_bytes()),
        Some(Embedded::Base64(text)) => {
            out.extend_from_slice(b"null,\"old_base64\":");
            push_json_str(&mut out, &text);
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"position\":");
    push_json_opt_str(&mut out, event.position.as_deref());
    out.push(b'}');
    out
}

/// `text` as a JSON string, escaped as serde_json escapes it.
fn push_json_str(out: &mut Vec<u8>, text: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

fn push_json_opt_str(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(text) => push_json_str(out, text),
        None => out.extend_from_slice(b"null"),
    }
}

/// Room for an envelope of `event`, so its buffer is sized once instead of grown by doubling.
fn envelope_capacity(event: &Event) -> usize {
    let parts =
        [&event.id, &event.source, &event.entity, &event.op, &event.time].iter().map(|part| part.len()).sum::<usize>()
            + event.key.as_ref().map_or(0, String::len)
            + event.position.as_ref().map_or(0, String::len);
    // Field names and punctuation fit in 160 bytes. Data that is not JSON (base64, a third
    // longer) grows it once; room for that on every event would hold memory for nothing.
    let data = event.data.len() + event.old.as_ref().map_or(0, Vec::len);
    160 + parts + data
}

/// `value` (an envelope of `event`) as JSON, in a buffer of [`envelope_capacity`].
/// Serializing borrowed strings and raw JSON cannot fail.
fn serialize_sized(value: &impl serde::Serialize, event: &Event) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(envelope_capacity(event));
    match serde_json::to_writer(&mut bytes, value) {
        Ok(()) => bytes,
        Err(_) => Vec::new(),
    }
}

fn cloudevent(event: &Event) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct CloudEvent<'a> {
        specversion: &'static str,
        id: &'a str,
        source: String,
        #[serde(rename = "type")]
        kind: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        subject: Option<&'a str>,
        time: &'a str,
        datacontenttype: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a serde_json::value::RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data_base64: Option<String>,
    }
    let (data, data_base64, datacontenttype) = match embed(&event.data) {
        Embedded::Json(raw) => (Some(raw), None, "application/json"),
        Embedded::Base64(text) => (None, Some(text), "application/octet-stream"),
    };
    let envelope = CloudEvent {
        specversion: "1.0",
        id: &event.id,
        source: format!("/weir/{}/{}", event.source, event.entity),
        kind: format!("weir.{}.{}", event.entity, event.op),
        subject: event.key.as_deref(),
        time: &event.time,
        datacontenttype,
        data,
        data_base64,
    };
    serialize_sized(&envelope, event)
}

/// The event fields its headers carry, owned: taken from an event that becomes a message (no
/// copies on the hot path), or copied from one that is kept (a dead letter's original).
struct HeaderFields {
    id: String,
    source: String,
    entity: String,
    op: String,
    position: Option<String>,
    key: Option<String>,
    own: Vec<(String, String)>,
}

impl HeaderFields {
    fn copied(event: &Event) -> HeaderFields {
        HeaderFields {
            id: event.id.clone(),
            source: event.source.clone(),
            entity: event.entity.clone(),
            op: event.op.clone(),
            position: event.position.clone(),
            key: event.key.clone(),
            own: event.headers.clone(),
        }
    }

    fn taken(event: &mut Event) -> HeaderFields {
        use std::mem::take;
        HeaderFields {
            id: take(&mut event.id),
            source: take(&mut event.source),
            entity: take(&mut event.entity),
            op: take(&mut event.op),
            position: event.position.take(),
            key: event.key.take(),
            own: take(&mut event.headers),
        }
    }
}

/// Whether `text` has a CR or LF. (A byte scan: `str::contains` with a char array takes the
/// general char-searching path, about 1 % of change capture's CPU with every header checked.)
fn has_line_break(text: &str) -> bool {
    text.bytes().any(|byte| byte == b'\r' || byte == b'\n')
}

/// [`header_value`] of an owned text: no copy unless it has line breaks.
fn owned_header_value(text: String) -> String {
    if has_line_break(&text) { header_value(&text) } else { text }
}

/// Host headers (which win over plugin headers of the same name), then the event's own.
fn headers_for(fields: HeaderFields, content_type: &'static str) -> Headers {
    let mut headers = Headers::with_capacity(fields.own.len());
    headers.append(HeaderName::from_static(MSG_ID), owned_header_value(fields.id));
    headers.append(HeaderName::from_static("Weir-Source"), owned_header_value(fields.source));
    headers.append(HeaderName::from_static("Weir-Entity"), owned_header_value(fields.entity));
    headers.append(HeaderName::from_static("Weir-Op"), owned_header_value(fields.op));
    headers.append(HeaderName::from_static("Content-Type"), content_type.to_string());
    if let Some(position) = fields.position {
        headers.append(HeaderName::from_static("Weir-Position"), owned_header_value(position));
    }
    if let Some(key) = fields.key {
        headers.append(HeaderName::from_static("Weir-Key"), owned_header_value(key));
    }
    for (name, value) in fields.own {
        // Plugins' headers are checked when they return; this also covers sources' own.
        if valid_header_name(&name)
            && !HOST_HEADERS.iter().any(|host| host.eq_ignore_ascii_case(&name))
            && let Ok(name) = HeaderName::try_from(name.as_str())
        {
            headers.append(name, owned_header_value(value));
        }
    }
    headers
}

/// The message for `event`; `data_is_json` when its data is known to be JSON text.
fn to_message(route: &Route, mut event: Event, data_is_json: bool) -> Message {
    let content_type =
        if route.envelope == Envelope::Cloudevents { "application/cloudevents+json" } else { "application/json" };
    // The payload first: it reads the fields the headers then take.
    let payload = match route.envelope {
        Envelope::Weir => weir_envelope_bytes(&event, data_is_json),
        Envelope::Data => std::mem::take(&mut event.data),
        Envelope::Cloudevents => cloudevent(&event),
    };
    let headers = headers_for(HeaderFields::taken(&mut event), content_type);
    Message { subject: event.subject.into(), headers, payload: payload.into() }
}

fn dead_letter(route: &Route, original: &Event, plugin: &Plugin, kind: &str, message: &str) -> Message {
    let mut headers = headers_for(HeaderFields::copied(original), "application/json");
    // A distinct id: a later successful retry of the same event must not be deduplicated
    // against its dead letter.
    headers.set(HeaderName::from_static(MSG_ID), header_value(&format!("dlq:{}", original.id)));
    for (name, value) in [
        ("Weir-Error", message.chars().take(1024).collect::<String>()),
        ("Weir-Error-Kind", kind.to_string()),
        ("Weir-Plugin", plugin.name().to_string()),
        ("Weir-Plugin-Version", plugin.info().version_label()),
        ("Weir-Route", route.name.clone()),
        ("Weir-Original-Subject", original.subject.clone()),
    ] {
        headers.set(HeaderName::from_static(name), header_value(&value));
    }
    Message {
        subject: route.dlq.render(original).into(),
        headers,
        payload: weir_envelope_bytes(original, false).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn line_breaks_in_header_values_become_spaces() {
        assert_eq!(header_value("a\r\nb\nc\rd"), "a  b c d");
        assert_eq!(owned_header_value("été\n".to_string()), "été ");
        let plain = "order-1001 ✓".to_string();
        assert_eq!(owned_header_value(plain.clone()), plain);
    }

    fn event(entity: &str, op: &str) -> Event {
        Event {
            id: "e1".into(),
            source: "http".into(),
            entity: entity.into(),
            op: op.into(),
            key: Some("k.1".into()),
            time: "t".into(),
            subject: String::new(),
            headers: vec![("Nats-Msg-Id".into(), "spoofed".into()), ("x-a".into(), "1".into())],
            data: br#"{"a":1}"#.to_vec(),
            old: None,
            position: None,
        }
    }

    #[test]
    fn templates_render_sanitized_tokens() {
        let template = SubjectTemplate::parse("shop.{entity}.{op}.{key}").unwrap();
        assert_eq!(template.render(&event("orders", "insert")), "shop.orders.insert.k_1");
        assert_eq!(template.literal_prefix(), "shop");
        let pg = SubjectTemplate::parse("weir.{schema}.{table}.{op}").unwrap();
        assert_eq!(pg.render(&event("public.orders", "update")), "weir.public.orders.update");
        assert_eq!(pg.render(&event("orders", "")), "weir.public.orders._");
        let mut keyless = event("a.b c", "x*");
        keyless.key = None;
        let all = SubjectTemplate::parse("{source}.{entity}.{key}.{op}").unwrap();
        assert_eq!(all.render(&keyless), "http.a_b_c._.x_");
        assert!(SubjectTemplate::parse("a..b").unwrap_err().contains("empty token"));
        assert!(SubjectTemplate::parse("a.x{op}").unwrap_err().contains("not a placeholder"));
        assert!(SubjectTemplate::parse("a.*").unwrap_err().contains("wildcard"));
    }

    #[test]
    fn ops_in_a_route_match_whatever_their_case() {
        let text = "[nats]\nurl = \"nats://127.0.0.1:4222\"\n[[routes]]\nmatch = { op = [\"INSERT\", \"Update\"] }\n";
        let config = crate::config::Config::parse(text, "weir.toml").unwrap();
        let pipeline = Pipeline::new(&config, Arc::new(PluginSet::empty())).unwrap();
        assert_eq!(pipeline.route_for(&event("orders", "insert")), Some(0));
        assert_eq!(pipeline.route_for(&event("orders", "update")), Some(0));
        assert_eq!(pipeline.route_for(&event("orders", "delete")), None);
    }

    #[test]
    fn a_batch_is_taken_up_to_the_failure_that_quarantines() {
        let results: Vec<Result<(), ()>> = vec![Err(()), Ok(()), Err(()), Err(()), Err(()), Ok(())];
        assert_eq!(end_at_failures_in_a_row(&results, 3), 5);
        assert_eq!(end_at_failures_in_a_row(&results, 4), 6);
        assert_eq!(end_at_failures_in_a_row(&results, 1), 1);
        assert_eq!(end_at_failures_in_a_row::<(), ()>(&[], 2), 0);
    }

    #[test]
    fn globs() {
        assert!(glob_matches("orders*", "orders_archive"));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("public.*", "public.orders"));
        assert!(glob_matches("*.orders", "shop.orders"));
        assert!(glob_matches("a*c*e", "abcde"));
        assert!(!glob_matches("orders", "orders2"));
        assert!(!glob_matches("a*c", "abd"));
    }

    fn weir_envelope(event: &Event) -> Value {
        serde_json::from_slice(&weir_envelope_bytes(event, false)).unwrap()
    }

    #[test]
    fn host_headers_win_and_the_envelope_embeds_data() {
        let mut e = event("orders", "insert");
        e.subject = "weir.orders.insert".into();
        e.headers.push(("bad name".into(), "dropped".into()));
        e.entity = "orders\r\nInjected: 1".into();
        let headers = headers_for(HeaderFields::copied(&e), "application/json");
        assert_eq!(headers.get("Nats-Msg-Id"), Some("e1"));
        assert_eq!(headers.get("x-a"), Some("1"));
        assert_eq!(headers.get("Weir-Entity"), Some("orders  Injected: 1"));
        let names: Vec<&str> = headers.iter().map(|(name, _)| name).collect();
        assert!(!names.contains(&"bad name") && !names.contains(&"Injected"), "{names:?}");
        assert_eq!(headers.len(), 7, "spoofed id and bad name left out: {headers:?}");
        assert_eq!(headers_for(HeaderFields::taken(&mut e.clone()), "application/json"), headers);
        let envelope = weir_envelope(&e);
        assert_eq!(envelope["data"], json!({"a": 1}));
        assert_eq!(envelope["key"], "k.1");
        e.data = b"\xff".to_vec();
        assert_eq!(weir_envelope(&e)["data_base64"], "/w==");
    }

    /// The envelope as serde_json writes a struct of its fields: what the writer must match.
    fn envelope_by_serde(event: &Event) -> Vec<u8> {
        use serde_json::value::RawValue;
        #[derive(serde::Serialize)]
        struct Envelope<'a> {
            id: &'a str,
            source: &'a str,
            entity: &'a str,
            op: &'a str,
            time: &'a str,
            key: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            data: Option<&'a RawValue>,
            #[serde(skip_serializing_if = "Option::is_none")]
            data_base64: Option<String>,
            old: Option<&'a RawValue>,
            #[serde(skip_serializing_if = "Option::is_none")]
            old_base64: Option<String>,
            position: Option<&'a str>,
        }
        fn json_or_base64(bytes: &[u8]) -> (Option<&RawValue>, Option<String>) {
            match serde_json::from_slice::<&RawValue>(bytes) {
                Ok(raw) => (Some(raw), None),
                Err(_) => {
                    use base64::Engine as _;
                    (None, Some(base64::engine::general_purpose::STANDARD.encode(bytes)))
                }
            }
        }
        let (data, data_base64) = json_or_base64(&event.data);
        let (old, old_base64) = event.old.as_deref().map_or((None, None), json_or_base64);
        serde_json::to_vec(&Envelope {
            id: &event.id,
            source: &event.source,
            entity: &event.entity,
            op: &event.op,
            time: &event.time,
            key: event.key.as_deref(),
            data,
            data_base64,
            old,
            old_base64,
            position: event.position.as_deref(),
        })
        .unwrap()
    }

    #[test]
    fn the_envelope_is_written_as_serde_json_would_write_it() {
        let mut e = event("orders \"eu\"\\", "insert");
        e.id = "id\u{1}\t\u{2028}é".into();
        e.key = None;
        e.data = b" {\"a\": [1, \"\\u00e9\"]}\n".to_vec();
        let checked_path = weir_envelope_bytes(&e, true);
        assert_eq!(String::from_utf8(checked_path.clone()).unwrap(), String::from_utf8(envelope_by_serde(&e)).unwrap());
        assert_eq!(weir_envelope_bytes(&e, false), checked_path);
        e.key = Some("k\n".into());
        e.position = Some("0/16B3748".into());
        for old in [None, Some(b"{\"a\":0}".to_vec()), Some(b"not json".to_vec())] {
            for data in [b"{}".to_vec(), b"\xff\x00".to_vec(), b"".to_vec(), b"1 2".to_vec()] {
                e.old = old.clone();
                e.data = data;
                let written = weir_envelope_bytes(&e, false);
                assert_eq!(String::from_utf8(written).unwrap(), String::from_utf8(envelope_by_serde(&e)).unwrap());
            }
        }
    }
}
