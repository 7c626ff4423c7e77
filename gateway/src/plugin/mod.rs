//! The sandboxed plugin runtime: loads WebAssembly component plugins and runs batches of events
//! through them within per-plugin limits.
//!
//! One [`PluginRuntime`] (one wasmtime `Engine`) serves every plugin. Each plugin is compiled
//! once (or loaded from the sealed disk cache), pre-instantiated, and run on a small pool of
//! reused instances. An instance is discarded after any trap and recycled after
//! `recycle_after_calls` calls or when its memory passes `recycle_memory`. When a batch traps,
//! the events are re-run one at a time so only the event that traps fails.
//!
//! Calls are async: a plugin runs on the caller's task and, at every epoch tick, yields back to
//! the executor (or traps once its time limit has passed), so a slow plugin never holds an async
//! worker and the hot path needs no hop to a blocking thread.

pub(crate) mod bindings;
mod cache;
mod capped;
pub mod health;
mod host;
pub mod inspect;
pub mod registry;

pub use cache::CompileCache;
pub use health::{Health, Quarantine, QuarantinePolicy};
pub use inspect::{PluginInfo, SdkStamp, World};
pub use registry::{PluginSet, PluginSlot};

use crate::event::Event;
use capped::{LiftLimits, Outcomes, Output, OutputEvent, Overrun};
use host::{HostState, MemoryLimitExceeded};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, ComponentExportIndex, Func, Linker};
use wasmtime::{Config, Engine, Store, Trap, UpdateDeadline};

/// How many events of a failed batch are re-run at once.
const RERUN_CONCURRENCY: usize = 8;
/// How often the epoch advances; a call's time limit is enforced to within one tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// How long past its time limit a call waiting in a host call is given before it is dropped
/// (guest code is stopped by the epoch deadline, within a tick).
const WAIT_GRACE: Duration = Duration::from_millis(100);
/// Largest plugin file accepted.
pub const MAX_PLUGIN_BYTES: usize = 256 << 20;
/// Longest reject reason passed on; longer ones are cut.
const MAX_REASON_BYTES: usize = 1024;

/// Per-plugin limits. Defaults suit Rust and C plugins; JavaScript and Python plugins need
/// about 100 MiB of memory per instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Longest one call (one batch) may run.
    pub timeout: Duration,
    /// Most linear memory one instance may hold, in bytes.
    pub memory: usize,
    /// Most events one input event may turn into (`split`).
    pub max_outputs: usize,
    /// Most bytes the outputs of one input event may add up to.
    pub max_output_bytes: usize,
    /// Replace an instance after this many calls (0: never).
    pub recycle_after_calls: u64,
    /// Replace an instance once its memory reaches this many bytes.
    pub recycle_memory: usize,
    /// Most idle instances kept for reuse.
    pub max_idle_instances: usize,
    /// Most calls running at once, each on an instance of its own; more wait their turn. So at
    /// most this many plus `max_idle_instances` instances are alive, and host memory stays
    /// bounded by them times `memory` however many requests come in at once.
    pub max_concurrent_calls: usize,
    /// When failing events quarantine the plugin, and for how long.
    pub quarantine: QuarantinePolicy,
}

/// Default of [`Limits::max_concurrent_calls`]: two per core (a call may wait on the host), at
/// least four.
fn default_concurrent_calls() -> usize {
    std::thread::available_parallelism().map_or(4, |cores| (cores.get() * 2).max(4))
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_millis(200),
            memory: 128 << 20,
            max_outputs: 100,
            max_output_bytes: 1 << 20,
            recycle_after_calls: 100_000,
            recycle_memory: 96 << 20,
            max_idle_instances: 4,
            max_concurrent_calls: default_concurrent_calls(),
            quarantine: QuarantinePolicy::default(),
        }
    }
}

impl Limits {
    /// The defaults with a config's or command line's `timeout_ms` and `memory_mb` applied; the
    /// recycling mark follows the memory limit at three quarters.
    pub fn with_overrides(timeout_ms: Option<u64>, memory_mb: Option<usize>) -> Limits {
        let mut limits = Limits::default();
        if let Some(ms) = timeout_ms {
            limits.timeout = Duration::from_millis(ms);
        }
        if let Some(mb) = memory_mb {
            limits.memory = mb << 20;
            limits.recycle_memory = limits.memory / 4 * 3;
        }
        limits
    }
}

/// Why a plugin file could not be loaded. Each message is one line that says what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read plugin file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// Over [`MAX_PLUGIN_BYTES`].
    #[error("plugin file is {0} bytes; the limit is {MAX_PLUGIN_BYTES}")]
    TooLarge(usize),
    /// Not WebAssembly at all.
    #[error("not a WebAssembly file; a plugin is a .wasm component built for wasm32-wasip2")]
    NotWasm,
    /// A core module rather than a component.
    #[error(
        "this is a core WebAssembly module, not a component; build with `--target wasm32-wasip2` (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule,
    /// Malformed or failed to compile.
    #[error("invalid plugin: {0}")]
    Invalid(String),
    /// Built against a WIT version this host does not support.
    #[error(
        "plugin was built against weir:plugin@{found}, but this weir supports weir:plugin@{supported}; upgrade weir or rebuild the plugin with a matching SDK"
    )]
    UnsupportedWit { found: String, supported: String },
    /// Not a Weir plugin.
    #[error(
        "not a Weir plugin: it exports [{}]; a plugin exports weir:plugin/transform-handler or weir:plugin/filter-handler (build it with a Weir SDK, world `transform` or `filter`)",
        exports.join(", ")
    )]
    WrongWorld { exports: Vec<String> },
    /// Imports something the host does not offer.
    #[error(
        "plugin imports `{name}`, which Weir does not offer; plugins may import only weir:plugin/host and WASI 0.2 interfaces"
    )]
    UnknownImport { name: String },
    /// The plugin refused its config.
    #[error("plugin refused its config: {0}")]
    ConfigRefused(String),
    /// Instantiation or `configure` trapped or timed out.
    #[error("plugin failed while starting: {0}")]
    StartFailed(PluginError),
}

/// What kind of failure a plugin had on an event; stable names for metrics and DLQ headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The call ran past the plugin's time limit.
    Timeout,
    /// The plugin tried to grow its memory past its limit.
    MemoryLimit,
    /// The plugin exhausted its stack (unbounded recursion).
    StackOverflow,
    /// Any other trap: a panic, `unreachable`, an out-of-bounds access.
    Trap,
    /// The outputs of one event exceeded `max_outputs` or `max_output_bytes`.
    OutputLimit,
    /// The plugin emitted a subject that is not a literal NATS subject.
    InvalidSubject,
    /// The plugin returned the wrong number of results.
    InvalidOutput,
    /// A new instance refused the config or failed to start.
    StartFailed,
}

impl ErrorKind {
    /// The stable name, e.g. `timeout`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::MemoryLimit => "memory-limit",
            ErrorKind::StackOverflow => "stack-overflow",
            ErrorKind::Trap => "trap",
            ErrorKind::OutputLimit => "output-limit",
            ErrorKind::InvalidSubject => "invalid-subject",
            ErrorKind::InvalidOutput => "invalid-output",
            ErrorKind::StartFailed => "start-failed",
        }
    }
}

/// A plugin failure on one event (or on the instance that was to handle it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}", kind = kind.as_str())]
pub struct PluginError {
    /// What went wrong.
    pub kind: ErrorKind,
    /// Details for people.
    pub message: String,
}

impl PluginError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        PluginError { kind, message: message.into() }
    }
}

/// What a plugin decided for one event, after the host's checks.
#[allow(clippy::large_enum_variant)] // `Keep` is the common case; boxing it would cost an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Publish nothing.
    Drop,
    /// Publish this event.
    Keep(Event),
    /// Publish these events, in order (never empty: an empty split is `Drop`).
    Split(Vec<Event>),
    /// Refused by the plugin, with its reason.
    Reject(String),
}

/// Where compiled plugins are cached and other engine-wide options.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    /// Directory for the compiled-plugin cache; `None` disables it.
    pub cache_dir: Option<PathBuf>,
}

/// The engine shared by every plugin, its linker and the compile cache.
pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<HostState>,
    cache: Option<CompileCache>,
}

impl PluginRuntime {
    /// Creates the engine (hardened settings, epoch interruption) and starts its epoch ticker.
    pub fn new(options: RuntimeOptions) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .max_wasm_stack(512 << 10)
            .concurrency_support(false)
            .wasm_backtrace_details(wasmtime::WasmBacktraceDetails::Disable)
            .cranelift_opt_level(wasmtime::OptLevel::Speed)
            .memory_init_cow(true)
            // Proposals no plugin toolchain needs: a smaller surface to trust. GC, threads, stack
            // switching and component-model async are not compiled in at all (crate features).
            .wasm_memory64(false)
            .wasm_custom_page_sizes(false)
            .wasm_wide_arithmetic(false);
        let engine = Engine::new(&config).map_err(anyhow::Error::from)?;
        spawn_epoch_ticker(&engine)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(anyhow::Error::from)?;
        bindings::transform::Transform::add_to_linker::<_, wasmtime::component::HasSelf<HostState>>(
            &mut linker,
            |state| state,
        )
        .map_err(anyhow::Error::from)?;

        let cache = match options.cache_dir {
            Some(dir) => match CompileCache::open(&dir, &engine) {
                Ok(cache) => Some(cache),
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "plugin compile cache disabled");
                    None
                }
            },
            None => None,
        };
        Ok(PluginRuntime { engine, linker, cache })
    }

    /// Loads the plugin in `path` under `name` (used in logs and errors).
    pub fn load_file(&self, name: &str, path: &Path, config: &str, limits: Limits) -> Result<Plugin, LoadError> {
        let bytes = read_plugin_file(path)?;
        self.load(name, &bytes, config, limits)
    }

    /// Compiles (or takes from the cache), links and configures a plugin, and keeps its first
    /// instance ready. Every problem is reported before any event reaches the plugin.
    pub fn load(&self, name: &str, bytes: &[u8], config: &str, limits: Limits) -> Result<Plugin, LoadError> {
        if bytes.len() > MAX_PLUGIN_BYTES {
            return Err(LoadError::TooLarge(bytes.len()));
        }
        let info = inspect::inspect(bytes)?;
        let component = self.compile(bytes)?;
        let instance_pre = self.linker.instantiate_pre(&component).map_err(|error| unknown_import(&error))?;
        let pre = match info.world {
            World::Transform => handle_export(&instance_pre).and_then(|handle| {
                bindings::transform::TransformPre::new(instance_pre).map(|pre| Pre::Transform(pre, handle))
            }),
            World::Filter => bindings::filter::FilterPre::new(instance_pre).map(Pre::Filter),
        }
        .map_err(|error| {
            LoadError::Invalid(format!("exports do not match world `{}`: {error}", info.world.as_str()))
        })?;
        let calls =
            tokio::sync::Semaphore::new(limits.max_concurrent_calls.clamp(1, tokio::sync::Semaphore::MAX_PERMITS));
        let plugin = Plugin {
            name: Arc::from(name),
            info,
            pre,
            engine: self.engine.clone(),
            config: config.to_string(),
            health: Health::new(limits.quarantine, limits.timeout),
            limits,
            idle: Mutex::new(Vec::new()),
            calls,
            stats: Stats::default(),
        };
        let first = block_on(plugin.new_instance()).map_err(|error| match error.kind {
            ErrorKind::StartFailed if error.message.starts_with(CONFIG_REFUSED) => {
                LoadError::ConfigRefused(error.message[CONFIG_REFUSED.len()..].to_string())
            }
            _ => LoadError::StartFailed(error),
        })?;
        plugin.release(first);
        Ok(plugin)
    }

    fn compile(&self, bytes: &[u8]) -> Result<Component, LoadError> {
        let compile = || Component::new(&self.engine, bytes).map_err(anyhow::Error::from);
        let component = match &self.cache {
            Some(cache) => cache.load_or_compile(&self.engine, bytes, compile),
            None => compile(),
        };
        component.map_err(|error| LoadError::Invalid(format!("{error:#}")))
    }
}

fn read_plugin_file(path: &Path) -> Result<Vec<u8>, LoadError> {
    let read_error = |reason: String| LoadError::Read { path: path.to_path_buf(), reason };
    let metadata = std::fs::metadata(path).map_err(|e| read_error(e.to_string()))?;
    if metadata.len() > MAX_PLUGIN_BYTES as u64 {
        return Err(LoadError::TooLarge(usize::try_from(metadata.len()).unwrap_or(usize::MAX)));
    }
    std::fs::read(path).map_err(|e| read_error(e.to_string()))
}

/// Names the import wasmtime could not satisfy (its message quotes it in backticks).
fn unknown_import(error: &wasmtime::Error) -> LoadError {
    let text = format!("{error:#}");
    let name = text.split('`').nth(1).map(str::to_string).unwrap_or(text);
    LoadError::UnknownImport { name }
}

fn spawn_epoch_ticker(engine: &Engine) -> anyhow::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("weir-epoch".into())
        .spawn(move || {
            // Stops by itself once the engine is gone.
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .map_err(|e| anyhow::anyhow!("cannot start the plugin epoch thread: {e}"))?;
    Ok(())
}

const CONFIG_REFUSED: &str = "config refused: ";

enum Pre {
    /// With the export index of `handle`, which is called without bindgen's wrapper: its
    /// results are lifted under the output limits ([`capped`]).
    Transform(bindings::transform::TransformPre<HostState>, ComponentExportIndex),
    Filter(bindings::filter::FilterPre<HostState>),
}

/// The export index of a transform's `handle`.
fn handle_export(pre: &wasmtime::component::InstancePre<HostState>) -> wasmtime::Result<ComponentExportIndex> {
    let component = pre.component();
    let interface = component
        .get_export_index(None, "weir:plugin/transform-handler@0.1.0")
        .ok_or_else(|| wasmtime::format_err!("no export `weir:plugin/transform-handler@0.1.0`"))?;
    component
        .get_export_index(Some(&interface), "handle")
        .ok_or_else(|| wasmtime::format_err!("no function `handle` in `weir:plugin/transform-handler`"))
}

/// `handle`'s type as the host calls it: events lowered from the host's own, outcomes lifted
/// under the output limits.
type TransformHandle<'a> = wasmtime::component::TypedFunc<(&'a [Event],), (Outcomes,)>;

enum Handler {
    Transform(Func),
    Filter(bindings::filter::Filter),
}

enum RawResults {
    /// Checked by the host's rules.
    Transform(Vec<Result<Outcome, PluginError>>),
    Filter(Vec<bool>),
}

struct Instance {
    store: Store<HostState>,
    handler: Handler,
    calls: u64,
}

/// Counters of one plugin's instance life cycle.
#[derive(Debug, Default)]
pub struct Stats {
    /// Instances created, the first included.
    pub instances_created: AtomicU64,
    /// Instances replaced because of `recycle_after_calls` or `recycle_memory`.
    pub instances_recycled: AtomicU64,
    /// Calls that failed (each discards its instance).
    pub failed_calls: AtomicU64,
}

/// A loaded plugin: compiled, linked, configured, with a pool of reusable instances.
pub struct Plugin {
    name: Arc<str>,
    info: PluginInfo,
    pre: Pre,
    engine: Engine,
    config: String,
    limits: Limits,
    idle: Mutex<Vec<Instance>>,
    /// Room for calls running at once (`max_concurrent_calls`).
    calls: tokio::sync::Semaphore,
    stats: Stats,
    health: Health,
}

impl Plugin {
    /// The name it was loaded under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the file is: world, versions, imports.
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// The limits it runs under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Instance life-cycle counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// This version's failure record and quarantine.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Starts the clock of one call: the plugin is checked at the next epoch tick.
    fn start_call(&self, store: &mut Store<HostState>) {
        store.data_mut().call_started = Instant::now();
        store.set_epoch_deadline(1);
    }

    async fn new_instance(&self) -> Result<Instance, PluginError> {
        self.stats.instances_created.fetch_add(1, Ordering::Relaxed);
        let mut store = Store::new(&self.engine, HostState::new(self.name.clone(), self.limits.memory));
        store.limiter(|state| &mut state.limiter);
        let timeout = self.limits.timeout;
        // At each tick: trap once the call has run past its limit, otherwise let other tasks
        // run and check again at the next tick.
        store.epoch_deadline_callback(move |store| {
            Ok(if store.data().call_started.elapsed() >= timeout {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        self.start_call(&mut store);
        let as_start_failure = |failure: PluginError| {
            PluginError::new(ErrorKind::StartFailed, format!("{}: {}", failure.kind.as_str(), failure.message))
        };
        let start_failed = |error: wasmtime::Error| as_start_failure(self.classify(&error));
        let start = async {
            Ok(match &self.pre {
                Pre::Transform(pre, handle_index) => {
                    let instance = pre.instance_pre().instantiate_async(&mut store).await.map_err(start_failed)?;
                    let handler = bindings::transform::Transform::new(&mut store, &instance).map_err(start_failed)?;
                    let handle = instance
                        .get_func(&mut store, *handle_index)
                        .ok_or_else(|| wasmtime::format_err!("the instance has no `handle` function"))
                        .and_then(|handle| handle.typed::<(&[Event],), (Outcomes,)>(&store).map(|_| handle))
                        .map_err(start_failed)?;
                    let configured = handler
                        .weir_plugin_transform_handler()
                        .call_configure(&mut store, &self.config)
                        .await
                        .map_err(start_failed)?;
                    (Handler::Transform(handle), configured)
                }
                Pre::Filter(pre) => {
                    let handler = pre.instantiate_async(&mut store).await.map_err(start_failed)?;
                    let configured = handler
                        .weir_plugin_filter_handler()
                        .call_configure(&mut store, &self.config)
                        .await
                        .map_err(start_failed)?;
                    (Handler::Filter(handler), configured)
                }
            })
        };
        let (handler, configured) = match self.within_time(start).await {
            Some(started) => started?,
            None => return Err(as_start_failure(self.timed_out())),
        };
        configured.map_err(|reason| PluginError::new(ErrorKind::StartFailed, format!("{CONFIG_REFUSED}{reason}")))?;
        Ok(Instance { store, handler, calls: 0 })
    }

    async fn acquire(&self) -> Result<Instance, PluginError> {
        let idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop();
        match idle {
            Some(instance) => Ok(instance),
            None => self.new_instance().await,
        }
    }

    /// Returns a healthy instance to the pool, or lets it go when it is due for recycling.
    fn release(&self, instance: Instance) {
        let worn_out = self.limits.recycle_after_calls > 0 && instance.calls >= self.limits.recycle_after_calls;
        let bloated = instance.store.data().limiter.memory_bytes >= self.limits.recycle_memory;
        if worn_out || bloated {
            self.stats.instances_recycled.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(plugin = %self.name, calls = instance.calls, memory = instance.store.data().limiter.memory_bytes, "recycling plugin instance");
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < self.limits.max_idle_instances {
            idle.push(instance);
        }
    }

    /// Runs `call` into the plugin under its time limit by the wall clock too. The epoch deadline
    /// stops guest code that runs too long, but not a wait inside a host call (a WASI sleep or
    /// poll: no guest code runs there to be interrupted). Past the limit and some grace, the call
    /// is dropped, and its instance with it. `None`: it was stopped.
    async fn within_time<T>(&self, call: impl std::future::Future<Output = T>) -> Option<T> {
        // Outside a tokio runtime (the last-resort executor of `block_on`) there is no timer.
        if tokio::runtime::Handle::try_current().is_err() {
            return Some(call.await);
        }
        tokio::time::timeout(self.limits.timeout + WAIT_GRACE, call).await.ok()
    }

    fn timed_out(&self) -> PluginError {
        PluginError::new(
            ErrorKind::Timeout,
            format!("plugin `{}` ran past its time limit of {:?} (raise `timeout_ms`)", self.name, self.limits.timeout),
        )
    }

    fn classify(&self, error: &wasmtime::Error) -> PluginError {
        if let Some(limit) = error.chain().find_map(|cause| cause.downcast_ref::<MemoryLimitExceeded>()) {
            return PluginError::new(ErrorKind::MemoryLimit, limit.to_string());
        }
        match error.chain().find_map(|cause| cause.downcast_ref::<Trap>()) {
            Some(Trap::Interrupt) => self.timed_out(),
            Some(Trap::StackOverflow) => PluginError::new(
                ErrorKind::StackOverflow,
                format!("plugin `{}` exhausted its stack (unbounded recursion?)", self.name),
            ),
            Some(trap) => PluginError::new(ErrorKind::Trap, format!("plugin `{}` trapped: {trap}", self.name)),
            None => PluginError::new(ErrorKind::Trap, format!("plugin `{}` failed: {}", self.name, error.root_cause())),
        }
    }

    /// One call on one instance; a failure discards the instance.
    async fn call(&self, events: &[Event]) -> Result<RawResults, PluginError> {
        // Waiting for room is not the plugin's time: its clock starts below. (The semaphore is
        // never closed, so an error cannot happen; going ahead would be harmless anyway.)
        let _room = self.calls.acquire().await.ok();
        let mut instance = self.acquire().await?;
        self.start_call(&mut instance.store);
        instance.calls += 1;
        let Instance { store, handler, .. } = &mut instance;
        let handle = async {
            match handler {
                Handler::Transform(handle) => {
                    let handle: TransformHandle<'_> = handle.typed(&*store)?;
                    let limits = LiftLimits {
                        results: events.len(),
                        max_outputs: self.limits.max_outputs,
                        max_output_bytes: self.limits.max_output_bytes,
                    };
                    store.set_hostcall_fuel(results_fuel(events));
                    let (Outcomes(outcomes),) =
                        capped::with_limits(limits, handle.call_async(&mut *store, (events,))).await?;
                    Ok::<_, wasmtime::Error>(outcomes.map(|outcomes| {
                        RawResults::Transform(
                            events
                                .iter()
                                .zip(outcomes)
                                .map(|(input, outcome)| self.check_outcome(input, outcome.0))
                                .collect(),
                        )
                    }))
                }
                Handler::Filter(f) => {
                    let keep = f.weir_plugin_filter_handler().call_handle(&mut *store, events).await?;
                    Ok::<_, wasmtime::Error>(if keep.len() == events.len() {
                        Ok(RawResults::Filter(keep))
                    } else {
                        Err(keep.len())
                    })
                }
            }
        };
        let Some(result) = self.within_time(handle).await else {
            self.stats.failed_calls.fetch_add(1, Ordering::Relaxed);
            return Err(self.timed_out());
        };
        match result {
            Ok(Ok(results)) => {
                self.release(instance);
                Ok(results)
            }
            Ok(Err(returned)) => {
                self.stats.failed_calls.fetch_add(1, Ordering::Relaxed);
                Err(PluginError::new(
                    ErrorKind::InvalidOutput,
                    format!("plugin `{}` returned {returned} results for {} events", self.name, events.len()),
                ))
            }
            Err(error) => {
                self.stats.failed_calls.fetch_add(1, Ordering::Relaxed);
                Err(self.classify(&error))
            }
        }
    }

    /// Runs a batch through the plugin: one result per input event, in order. A failed call is
    /// retried one event at a time, so only the events that fail on their own get an error. The
    /// inputs are borrowed (the caller keeps them, e.g. for dead letters); a filter's kept event
    /// is a copy.
    pub async fn run(&self, events: &[Event]) -> Vec<Result<Outcome, PluginError>> {
        self.run_stopping(events, None).await
    }

    /// [`Plugin::run`], but once `stop_after` events in a row have failed (the number that
    /// quarantines the plugin), the rest are not run: the results end there, and the caller
    /// holds those events back instead of dead-lettering every one of a large batch.
    pub async fn run_stopping(&self, events: &[Event], stop_after: Option<u32>) -> Vec<Result<Outcome, PluginError>> {
        if events.is_empty() {
            return Vec::new();
        }
        let limit = stop_after.map_or(usize::MAX, |limit| usize::try_from(limit).unwrap_or(usize::MAX).max(1));
        match self.call(events).await {
            Ok(raw) => self.outcomes(events, raw),
            Err(error) if events.len() > 1 && error.kind != ErrorKind::StartFailed => {
                tracing::debug!(plugin = %self.name, %error, events = events.len(), "batch failed; re-running its events one at a time");
                // A few at once (each on an instance of its own), so several events that each
                // run to the time limit do not add up their waits.
                use futures::StreamExt as _;
                // Collected first: a lazy map here makes the future not `Send` (a closure
                // lifetime the compiler cannot generalise).
                let reruns: Vec<_> = events.iter().map(|event| self.run_one(event)).collect();
                let mut reruns = futures::stream::iter(reruns).buffered(RERUN_CONCURRENCY);
                let mut results = Vec::with_capacity(events.len());
                let mut failed_in_a_row = 0;
                while let Some(result) = reruns.next().await {
                    failed_in_a_row = if result.is_err() { failed_in_a_row + 1 } else { 0 };
                    results.push(result);
                    if failed_in_a_row >= limit {
                        break;
                    }
                }
                results
            }
            Err(error) => (0..limit.min(events.len())).map(|_| Err(error.clone())).collect(),
        }
    }

    /// One event on its own call.
    async fn run_one(&self, event: &Event) -> Result<Outcome, PluginError> {
        let one = std::slice::from_ref(event);
        match self.call(one).await {
            Ok(raw) => self.outcomes(one, raw).pop().unwrap_or_else(|| {
                Err(PluginError::new(ErrorKind::InvalidOutput, format!("plugin `{}` returned no result", self.name)))
            }),
            Err(error) => Err(error),
        }
    }

    /// [`Plugin::run`] for callers outside async code (tests, tools): blocks the thread.
    pub fn run_blocking(&self, events: Vec<Event>) -> Vec<Result<Outcome, PluginError>> {
        block_on(self.run(&events))
    }

    /// The checked outcome of each of `events` from one successful call.
    fn outcomes(&self, events: &[Event], raw: RawResults) -> Vec<Result<Outcome, PluginError>> {
        match raw {
            RawResults::Transform(outcomes) => outcomes,
            RawResults::Filter(keep) => events
                .iter()
                .zip(keep)
                .map(|(event, keep)| Ok(if keep { Outcome::Keep(event.clone()) } else { Outcome::Drop }))
                .collect(),
        }
    }

    /// Applies the host's rules to a transform's outcome for `input`: output caps (counted
    /// while lifting), read-only fields restored, split ids derived, subjects and headers
    /// validated.
    fn check_outcome(&self, input: &Event, outcome: Result<Output, Overrun>) -> Result<Outcome, PluginError> {
        match outcome {
            Err(Overrun::Outputs(count)) => Err(PluginError::new(
                ErrorKind::OutputLimit,
                format!(
                    "plugin `{}` split one event into {count} (limit `max_outputs` = {})",
                    self.name, self.limits.max_outputs
                ),
            )),
            Err(Overrun::Bytes) => Err(PluginError::new(
                ErrorKind::OutputLimit,
                format!(
                    "plugin `{}` produced more than {} bytes for one event (limit `max_output_bytes`)",
                    self.name, self.limits.max_output_bytes
                ),
            )),
            Ok(Output::Drop) => Ok(Outcome::Drop),
            Ok(Output::Reject(reason)) => {
                let mut reason = reason.0;
                if reason.len() > MAX_REASON_BYTES {
                    let mut end = MAX_REASON_BYTES;
                    while !reason.is_char_boundary(end) {
                        end -= 1;
                    }
                    reason.truncate(end);
                }
                Ok(Outcome::Reject(reason))
            }
            Ok(Output::Keep(event)) => Ok(Outcome::Keep(self.check_output(input, event, input.id.clone())?)),
            Ok(Output::Split(events)) => {
                if events.0.is_empty() {
                    return Ok(Outcome::Drop);
                }
                let events = events
                    .0
                    .into_iter()
                    .enumerate()
                    .map(|(index, event)| self.check_output(input, event, format!("{}:{index}", input.id)))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Outcome::Split(events))
            }
        }
    }

    fn check_output(&self, input: &Event, event: OutputEvent, id: String) -> Result<Event, PluginError> {
        let event = Event {
            id,
            source: input.source.clone(),
            entity: event.entity.0,
            op: event.op.0,
            key: event.key.map(|key| key.0),
            time: input.time.clone(),
            subject: event.subject.0,
            headers: event.headers.0.into_iter().map(|(name, value)| (name.0, value.0)).collect(),
            data: event.data.0,
            old: event.old.map(|old| old.0),
            position: input.position.clone(),
        };
        crate::subject::validate(&event.subject).map_err(|error| {
            PluginError::new(
                ErrorKind::InvalidSubject,
                format!("plugin `{}` emitted an invalid subject: {error}", self.name),
            )
        })?;
        let bad_header = event
            .headers
            .iter()
            .find(|(name, value)| !crate::pipeline::valid_header_name(name) || value.contains(['\r', '\n']));
        if let Some((name, _)) = bad_header {
            let shown: String = name.chars().take(64).collect();
            return Err(PluginError::new(
                ErrorKind::InvalidOutput,
                format!(
                    "plugin `{}` emitted header {shown:?}, which NATS cannot carry: a name is printable ASCII without spaces or `:`, a value has no line breaks",
                    self.name
                ),
            ));
        }
        Ok(event)
    }
}

/// wasmtime's own bound on what one call's results may copy (its default).
const DEFAULT_RESULTS_FUEL: usize = 128 << 20;

/// What one call's results may copy: wasmtime's default, or four times the batch's own bytes
/// when that is more. Each event's outputs are bounded by the output limits while they are
/// lifted; this bounds the batch, so that a batch of large rows whose outputs are about the
/// size of its inputs is not failed (and re-run event by event) for its size alone.
fn results_fuel(events: &[Event]) -> usize {
    let input_bytes: usize = events.iter().map(Event::payload_size).sum();
    DEFAULT_RESULTS_FUEL.max(input_bytes.saturating_mul(4))
}

/// Drives a plugin future to completion from synchronous code. Inside a multi-threaded tokio
/// runtime the worker is handed over for the duration; elsewhere a per-thread current-thread
/// runtime runs it, so WASI clocks and timers have a reactor.
fn block_on<F>(future: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| handle.block_on(future))
        }
        // A current-thread runtime cannot be blocked from inside; leave it for a moment.
        Ok(_) => std::thread::scope(|scope| match scope.spawn(|| local_block_on(future)).join() {
            Ok(output) => output,
            Err(panic) => std::panic::resume_unwind(panic),
        }),
        Err(_) => local_block_on(future),
    }
}

fn local_block_on<F: std::future::Future>(future: F) -> F::Output {
    thread_local! {
        static RUNTIME: std::io::Result<tokio::runtime::Runtime> =
            tokio::runtime::Builder::new_current_thread().enable_all().build();
    }
    RUNTIME.with(|runtime| match runtime {
        Ok(runtime) => runtime.block_on(future),
        // Without a runtime (out of file descriptors?) there is still a plain executor.
        Err(_) => futures::executor::block_on(future),
    })
}
