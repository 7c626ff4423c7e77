//! Plugins by name, each replaceable while the gateway runs: a watcher reloads a plugin when its
//! file changes, keeps the serving version when the new file fails to load, and unloads the
//! plugin when its file is deleted (routes using it then answer 503 until the file is back).

use super::{Limits, LoadError, Plugin, PluginRuntime};
use crate::config::Config;
use crate::metrics::Metrics;
use arc_swap::ArcSwapOption;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// What a plugin file looked like at one check. Any difference means "look again"; the inode
/// catches a replacement by rename that keeps size and modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FileStamp {
    Present { modified: Option<SystemTime>, len: u64, inode: u64, device: u64 },
    Missing,
    Unreadable(String),
}

impl FileStamp {
    fn of(path: &Path) -> FileStamp {
        match std::fs::metadata(path) {
            Ok(meta) => FileStamp::Present {
                modified: meta.modified().ok(),
                len: meta.len(),
                inode: meta.ino(),
                device: meta.dev(),
            },
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => FileStamp::Missing,
            Err(error) => FileStamp::Unreadable(error.to_string()),
        }
    }
}

/// The watcher's memory of one file.
#[derive(Debug)]
struct Watched {
    /// The stamp the serving state was decided on.
    acted_on: FileStamp,
    /// The stamp seen at the previous check: a change is acted on only once it has held still
    /// for one whole interval, so a file still being copied in is not loaded half-written.
    last_seen: FileStamp,
    /// Why the newest file is not serving, when it is not.
    problem: Option<String>,
}

/// One plugin name and the version serving under it.
pub struct PluginSlot {
    name: String,
    file: PathBuf,
    config: String,
    limits: Limits,
    current: ArcSwapOption<Plugin>,
    watched: Mutex<Watched>,
}

impl PluginSlot {
    /// The name routes use.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The serving version, if any. Callers keep the `Arc` for a whole call, so a reload never
    /// changes the plugin under an event that is already running.
    pub fn current(&self) -> Option<Arc<Plugin>> {
        self.current.load_full()
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn load(&self, runtime: &PluginRuntime) -> Result<Plugin, LoadError> {
        runtime.load_file(&self.name, &self.file, &self.config, self.limits.clone())
    }

    /// Looks at the file once and loads, keeps or unloads accordingly.
    fn check(&self, runtime: &PluginRuntime, metrics: &Metrics) {
        let stamp = FileStamp::of(&self.file);
        {
            let mut watched = self.watched();
            let settled = stamp == watched.last_seen;
            watched.last_seen = stamp.clone();
            if !settled || stamp == watched.acted_on {
                return;
            }
            watched.acted_on = stamp.clone();
        }
        // Not held while a new file compiles: `/readyz` reads the state meanwhile.
        let problem = self.act_on(stamp, runtime, metrics);
        let unloaded = self.current.load().is_none();
        let mut watched = self.watched();
        if problem.is_some() && unloaded {
            // Nothing serves: try again at the next check even if the file stays the same, so a
            // passing failure (I/O, memory) does not leave the plugin unloaded for good.
            watched.acted_on = FileStamp::Missing;
        }
        watched.problem = problem;
    }

    /// Loads, keeps or unloads for a file that changed; returns why the newest file is not
    /// serving, if it is not.
    fn act_on(&self, stamp: FileStamp, runtime: &PluginRuntime, metrics: &Metrics) -> Option<String> {
        match stamp {
            FileStamp::Missing => {
                if self.current.swap(None).is_some() {
                    tracing::warn!(plugin = %self.name, file = %self.file.display(), "plugin file removed; the plugin is unloaded and routes using it answer 503 until the file is back");
                    metrics.plugin_reload(&self.name, "removed");
                    metrics.set_plugin_loaded(&self.name, false);
                    metrics.set_plugin_quarantine_state(&self.name, false);
                }
                Some(format!("file {} does not exist", self.file.display()))
            }
            FileStamp::Unreadable(error) => {
                let problem = format!("cannot read {}: {error}", self.file.display());
                // Retried at every check while nothing serves: reported once per reason.
                if self.watched().problem.as_deref() != Some(problem.as_str()) {
                    tracing::error!(plugin = %self.name, file = %self.file.display(), %error, "cannot read the plugin file; the serving version stays");
                    metrics.plugin_reload(&self.name, "refused");
                }
                Some(problem)
            }
            FileStamp::Present { .. } => {
                let before = self.current();
                match self.load(runtime) {
                    Ok(plugin) => {
                        let old = before.as_ref().map(|p| p.info().version_label());
                        // Touched or copied over with the same bytes: nothing to swap.
                        if old.as_deref() != Some(plugin.info().version_label().as_str()) {
                            tracing::info!(plugin = %self.name, from = old.as_deref().unwrap_or("none"), to = %plugin.info().version_label(), "plugin reloaded; events already running finish on the old version");
                            let lifted = before.as_ref().is_some_and(|old| old.health().quarantine().is_some());
                            self.current.store(Some(Arc::new(plugin)));
                            metrics.plugin_reload(&self.name, "loaded");
                            metrics.set_plugin_loaded(&self.name, true);
                            metrics.set_plugin_quarantine_state(&self.name, false);
                            if lifted {
                                tracing::info!(plugin = %self.name, "the new version is not quarantined; its events run again");
                            }
                        }
                        None
                    }
                    Err(error) => {
                        let problem = format!("new file refused: {error}");
                        // A file retried at every check is reported once, not once a second.
                        if self.watched().problem.as_deref() != Some(problem.as_str()) {
                            let serving = if before.is_some() {
                                "the previous version keeps serving"
                            } else {
                                "the plugin stays unloaded"
                            };
                            tracing::error!(plugin = %self.name, file = %self.file.display(), %error, "new plugin file refused; {serving}");
                            metrics.plugin_reload(&self.name, "refused");
                        }
                        Some(problem)
                    }
                }
            }
        }
    }
}

/// Every plugin the config names, by name.
pub struct PluginSet {
    slots: BTreeMap<String, Arc<PluginSlot>>,
}

impl PluginSet {
    /// No plugins, for tests of routes that use none.
    #[cfg(test)]
    pub(crate) fn empty() -> PluginSet {
        PluginSet { slots: BTreeMap::new() }
    }

    /// Loads every plugin the config names (in routes or in its own section). Every problem is
    /// collected, one line per plugin: the gateway starts only with all of them loaded.
    pub fn load(runtime: &PluginRuntime, config: &Config) -> Result<PluginSet, Vec<String>> {
        let mut names = config.used_plugins();
        for name in config.plugins.entries.keys() {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        let mut slots = BTreeMap::new();
        let mut problems = Vec::new();
        for name in names {
            let Some(file) = config.plugin_file(&name) else {
                problems.push(format!("plugin `{name}`: no file; set [plugins.{name}] file or plugins.dir"));
                continue;
            };
            let section = config.plugins.entries.get(&name);
            let stamp = FileStamp::of(&file);
            let slot = PluginSlot {
                limits: section.map(|s| s.limits()).unwrap_or_default(),
                config: section.map_or_else(|| "{}".to_string(), |s| s.config_json()),
                name: name.clone(),
                file,
                current: ArcSwapOption::empty(),
                watched: Mutex::new(Watched { acted_on: stamp.clone(), last_seen: stamp, problem: None }),
            };
            match slot.load(runtime) {
                Ok(plugin) => {
                    tracing::info!(plugin = %name, file = %slot.file.display(), world = plugin.info().world.as_str(), version = %plugin.info().version_label(), "plugin loaded");
                    slot.current.store(Some(Arc::new(plugin)));
                    slots.insert(name, Arc::new(slot));
                }
                Err(error) => problems.push(format!("plugin `{name}` ({}): {error}", slot.file.display())),
            }
        }
        if problems.is_empty() { Ok(PluginSet { slots }) } else { Err(problems) }
    }

    /// The slot named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<PluginSlot>> {
        self.slots.get(name)
    }

    /// Every slot, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<PluginSlot>> {
        self.slots.values()
    }

    /// Reports each plugin's state in `metrics` (`weir_plugin_loaded`, `weir_plugin_quarantined`).
    pub fn report(&self, metrics: &Metrics) {
        for slot in self.slots.values() {
            metrics.set_plugin_loaded(slot.name(), slot.current.load().is_some());
            let quarantined = slot.current().is_some_and(|plugin| plugin.health().quarantine().is_some());
            metrics.set_plugin_quarantine_state(slot.name(), quarantined);
        }
    }

    /// Per plugin: the serving version, its quarantine if any, and, when the newest file is not
    /// serving, why.
    pub fn status(&self) -> Value {
        let mut status = serde_json::Map::new();
        for slot in self.slots.values() {
            let current = slot.current();
            let version = current.as_ref().map(|plugin| plugin.info().version_label());
            let mut entry = json!({"loaded": version.is_some(), "version": version});
            if let Some(quarantine) = current.and_then(|plugin| plugin.health().quarantine()) {
                entry["quarantine"] = json!({
                    "retry_after_ms": u64::try_from(quarantine.retry_after.as_millis()).unwrap_or(u64::MAX),
                    "last_error": quarantine.last_error,
                });
            }
            if let Some(problem) = &slot.watched().problem {
                entry["problem"] = json!(problem);
            }
            status.insert(slot.name.clone(), entry);
        }
        Value::Object(status)
    }

    /// Checks every plugin file once (blocking: a changed file is compiled here).
    pub fn check_files(&self, runtime: &PluginRuntime, metrics: &Metrics) {
        for slot in self.slots.values() {
            slot.check(runtime, metrics);
        }
    }

    /// Checks the plugin files every `interval` until the task is dropped. Compiling runs on a
    /// blocking thread so requests keep being served meanwhile.
    pub async fn watch(self: Arc<Self>, runtime: Arc<PluginRuntime>, metrics: Arc<Metrics>, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let (set, runtime, metrics) = (self.clone(), runtime.clone(), metrics.clone());
            if let Err(error) = tokio::task::spawn_blocking(move || set.check_files(&runtime, &metrics)).await {
                tracing::error!(%error, "plugin file check failed; trying again at the next interval");
            }
        }
    }
}
