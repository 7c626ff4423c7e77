//! `weir run` and `weir check`: wiring config, plugins, pipeline, sink and HTTP source together.

use crate::config::Config;
use crate::http::{AppState, HttpSettings};
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::plugin::{CompileCache, PluginRuntime, PluginSet, RuntimeOptions};
use crate::sink::Sink;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

async fn shutdown_signal(state: Arc<AppState>) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
        () = terminate => tracing::info!("SIGTERM received; shutting down"),
    }
    state.draining.store(true, Ordering::Relaxed);
}

/// Runs the gateway until SIGINT or SIGTERM, then drains for up to `drain`.
pub fn run(config_path: &Path, drain: Duration) -> anyhow::Result<()> {
    let config = Arc::new(Config::load(config_path)?);
    let runtime = Arc::new(PluginRuntime::new(RuntimeOptions { cache_dir: CompileCache::default_dir() })?);
    let plugins =
        Arc::new(PluginSet::load(&runtime, &config).map_err(|problems| anyhow::anyhow!(problems.join("\n")))?);
    let pipeline = Arc::new(Pipeline::new(&config, plugins.clone())?);
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let outcome = tokio.block_on(async move {
        let sink = Sink::connect(&config).await?;
        let listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.http.listen))?;
        let address = listener.local_addr()?;
        let settings = HttpSettings {
            max_body: config.http.max_body,
            body_timeout: config.http.body_timeout,
            max_in_flight: config.http.max_in_flight,
            tokens: config.http.tokens.clone(),
            idempotency_ttl: config.replay_window(),
        };
        let metrics = Arc::new(Metrics::new(config.postgres.is_some()));
        plugins.report(&metrics);
        if !config.plugins.watch.is_zero() {
            tokio::spawn(plugins.watch(runtime, metrics.clone(), config.plugins.watch));
        }
        let (stop_source, source_stopped) = tokio::sync::watch::channel(false);
        let (postgres_status, postgres_task) = match &config.postgres {
            Some(pg) => {
                let status = Arc::new(crate::postgres::SourceStatus::default());
                tokio::spawn(crate::postgres::source::report_metrics(pg.clone(), metrics.clone(), status.clone()));
                let parts = (pipeline.clone(), metrics.clone(), status.clone());
                (Some(status), Some(start_postgres_source(config.clone(), parts, source_stopped)?))
            }
            None => (None, None),
        };
        let state = AppState::new(pipeline, sink, settings, metrics, postgres_status);
        let state_for_router = state.clone();
        tracing::info!("weir listening on http://{address}");
        // Change capture stops together with the HTTP drain, and both share one drain timeout
        // from the signal: one after the other, a stop could take twice `--drain-timeout`.
        let stop_source = Arc::new(stop_source);
        let signalled: Arc<std::sync::OnceLock<tokio::time::Instant>> = Arc::default();
        let signal = {
            let (stop_source, signalled) = (stop_source.clone(), signalled.clone());
            async move {
                shutdown_signal(state).await;
                let _ = signalled.set(tokio::time::Instant::now());
                let _ = stop_source.send(true);
            }
        };
        let server = crate::http::serve(
            listener,
            crate::http::router(state_for_router),
            config.http.header_timeout,
            signal,
            drain,
        );
        match postgres_task {
            None => server.await?,
            Some(mut task) => {
                tokio::pin!(server);
                tokio::select! {
                    served = &mut server => {
                        served?;
                        let _ = stop_source.send(true);
                        let deadline = signalled.get().copied().unwrap_or_else(tokio::time::Instant::now) + drain;
                        match tokio::time::timeout_at(deadline, &mut task).await {
                            Ok(Ok(Err(error))) => return Err(error),
                            Ok(Err(_)) => {
                                return Err(anyhow::anyhow!("the PostgreSQL source's thread panicked while stopping (see stderr)"));
                            }
                            Ok(Ok(Ok(()))) => {}
                            Err(_) => tracing::warn!("PostgreSQL source did not stop within the drain timeout"),
                        }
                    }
                    stopped = &mut task => {
                        // Only a fatal problem ends the source by itself: stop the gateway too,
                        // so a supervisor sees it instead of a gateway that silently lost its source.
                        return match stopped {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(error)) => Err(error),
                            Err(_) => Err(anyhow::anyhow!("the PostgreSQL source stopped unexpectedly (its thread panicked; see stderr)")),
                        };
                    }
                }
            }
        }
        tracing::info!("drained; exiting");
        Ok(())
    });
    // Every way out, fatal ones included, removes the PostgreSQL TLS tunnels' directories.
    tokio.block_on(crate::postgres::close_tunnels());
    // Not a plain drop, which waits for every blocking task: a plugin file being compiled for a
    // reload (seconds) would keep the process past its drain timeout.
    tokio.shutdown_timeout(Duration::from_millis(100));
    outcome
}

/// Runs the PostgreSQL source on a thread and single-threaded runtime of its own, with a NATS
/// connection of its own, so reading the slot, building messages and the connection's I/O
/// hand work to each other without crossing threads (a fifth less CPU per change than on the
/// shared runtime: docs/benchmarks.md). Change capture is sequential, so it loses no
/// parallelism. Resolves with the source's outcome.
fn start_postgres_source(
    config: Arc<Config>,
    (pipeline, metrics, status): (Arc<Pipeline>, Arc<Metrics>, Arc<crate::postgres::SourceStatus>),
    stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<anyhow::Result<()>>> {
    let (done, outcome) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("weir-postgres".into())
        .spawn(move || {
            let finished = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(tokio) => tokio.block_on(async move {
                    let Some(pg) = &config.postgres else { return Ok(()) };
                    let mut stopped = stopped;
                    // NATS was reachable a moment ago (the main connection is up): a failure here
                    // is an outage, waited out like any other, not a reason to stop the gateway.
                    let sink = loop {
                        match Sink::connect_publisher(&config).await {
                            Ok(sink) => break sink,
                            Err(error) => {
                                tracing::warn!(error = %format!("{error:#}"), "PostgreSQL source: cannot connect to NATS yet; retrying");
                                tokio::select! {
                                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                                    _ = stopped.changed() => return Ok(()),
                                }
                            }
                        }
                    };
                    // Only the first connection is ever set: the source keeps this one.
                    let _ = status.nats.set(sink.client().clone());
                    crate::postgres::PostgresSource::new(pg.clone(), pipeline, sink, metrics, status).run(stopped).await
                }),
                Err(error) => Err(anyhow::anyhow!("cannot start the PostgreSQL source's runtime: {error}")),
            };
            let _ = done.send(finished);
        })
        .map_err(|e| anyhow::anyhow!("cannot start the PostgreSQL source's thread: {e}"))?;
    Ok(outcome)
}

/// `weir check`: every problem with the config, plugins, NATS and the stream, one per line.
/// Returns the exit code.
pub fn check(config_path: &Path) -> i32 {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(error) => {
            println!("{error}");
            return 1;
        }
    };
    println!("ok    config {}", config_path.display());
    let mut problems = Vec::new();
    match PluginRuntime::new(RuntimeOptions { cache_dir: CompileCache::default_dir() }) {
        Ok(runtime) => match PluginSet::load(&runtime, &config) {
            Ok(plugins) => {
                for slot in plugins.iter() {
                    if let Some(plugin) = slot.current() {
                        println!(
                            "ok    plugin {} ({}, {})",
                            slot.name(),
                            plugin.info().world.as_str(),
                            plugin.info().version_label()
                        );
                    }
                }
                if let Err(error) = Pipeline::new(&config, Arc::new(plugins)) {
                    problems.push(format!("{error:#}"));
                }
            }
            Err(mut found) => problems.append(&mut found),
        },
        Err(error) => problems.push(format!("cannot start the plugin runtime: {error:#}")),
    }
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(tokio) => {
            let (found, nats) = tokio.block_on(check_nats(&config));
            problems.extend(found);
            if let Some(pg) = &config.postgres {
                problems.extend(tokio.block_on(crate::postgres::setup::check(pg, nats.as_ref())));
                tokio.block_on(crate::postgres::close_tunnels());
            }
        }
        Err(error) => problems.push(format!("cannot start the async runtime: {error}")),
    }
    for problem in &problems {
        println!("error {problem}");
    }
    if problems.is_empty() { 0 } else { 1 }
}

/// The NATS part of `weir check`: its problems, and the client for the checks after it.
async fn check_nats(config: &Config) -> (Vec<String>, Option<async_nats::Client>) {
    let client = match crate::sink::connect_client(config).await {
        Ok(client) => client,
        Err(error) => return (vec![format!("{error:#}")], None),
    };
    println!("ok    NATS connected");
    let Some(js) = &config.jetstream else {
        println!("note  no [jetstream]: core NATS publishing is at-most-once");
        return (Vec::new(), Some(client));
    };
    let context = async_nats::jetstream::new(client.clone());
    let want = crate::sink::stream_config(js);
    let (mut problems, subjects) = match context.get_stream(&js.stream).await {
        Ok(mut stream) => match stream.info().await {
            Ok(info) => {
                let differences = crate::sink::stream_differences(&want, &info.config);
                if differences.is_empty() {
                    println!("ok    stream {} matches the config", js.stream);
                }
                let problems = differences
                    .into_iter()
                    .map(|d| format!("stream {} differs from [jetstream] ({d}); change the config or update the stream with `nats stream edit`", js.stream))
                    .collect();
                (problems, info.config.subjects.clone())
            }
            Err(error) => (vec![format!("cannot read stream {}: {error}", js.stream)], js.subjects.clone()),
        },
        Err(error) if crate::sink::stream_not_found(&error) => {
            println!("note  stream {} does not exist yet; `weir run` creates it", js.stream);
            (Vec::new(), js.subjects.clone())
        }
        // JetStream not enabled on the server, no permission, a timeout: `weir run` would fail.
        Err(error) => (
            vec![format!(
                "cannot look up stream {}: {error} (is JetStream enabled on the server? start nats-server with -js)",
                js.stream
            )],
            js.subjects.clone(),
        ),
    };
    for gap in crate::sink::subjects_outside_stream(config, &subjects) {
        // Another stream may take it (dead letters kept apart, say): the server knows.
        match context.stream_by_subject(gap.sample.as_str()).await {
            Ok(stream) => println!("ok    {} is captured by stream {stream}", gap.sample),
            Err(_) if gap.plugins_may_change_it => println!("warn  {}", gap.message),
            Err(_) => problems.push(gap.message),
        }
    }
    (problems, Some(client))
}
