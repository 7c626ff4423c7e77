//! What each plugin store holds: the deny-all WASI context, the memory limiter, and the plugin's
//! log output (host `log` import, stdout and stderr) routed into the gateway log.

use super::bindings::{Level, transform::weir::plugin};
use bytes::Bytes;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Longest log line kept from a plugin; the rest is cut off and marked.
const MAX_LOG_LINE: usize = 4096;

/// The data of one plugin store.
pub struct HostState {
    pub(super) plugin: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limiter: MemoryLimiter,
    /// When the current call began; its time limit counts from here.
    pub(super) call_started: std::time::Instant,
}

impl HostState {
    /// A store's data for plugin `plugin` with a memory cap of `memory_limit` bytes. WASI is
    /// linked in full so that language runtimes load, but grants nothing: no preopened
    /// directories, no environment or arguments, no network, no stdin.
    pub fn new(plugin: Arc<str>, memory_limit: usize) -> Self {
        let wasi = WasiCtxBuilder::new()
            .stdout(PluginOutput::new(plugin.clone(), Stream::Stdout))
            .stderr(PluginOutput::new(plugin.clone(), Stream::Stderr))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .max_random_size(64 * 1024)
            .build();
        // Host objects a plugin holds (streams, pollables) are not in its memory limit: a plugin
        // that never drops them is stopped here instead (a normal one holds a handful).
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_HOST_RESOURCES);
        HostState {
            plugin,
            wasi,
            table,
            limiter: MemoryLimiter::new(memory_limit),
            call_started: std::time::Instant::now(),
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl plugin::types::Host for HostState {}

impl plugin::host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        let message = truncate(&message);
        let plugin = &*self.plugin;
        match level {
            Level::Trace => tracing::trace!(target: "weir::plugin", plugin, "{message}"),
            Level::Debug => tracing::debug!(target: "weir::plugin", plugin, "{message}"),
            Level::Info => tracing::info!(target: "weir::plugin", plugin, "{message}"),
            Level::Warn => tracing::warn!(target: "weir::plugin", plugin, "{message}"),
            Level::Error => tracing::error!(target: "weir::plugin", plugin, "{message}"),
        }
    }
}

fn truncate(message: &str) -> std::borrow::Cow<'_, str> {
    if message.len() <= MAX_LOG_LINE {
        return message.into();
    }
    let mut end = MAX_LOG_LINE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [truncated {} bytes]", &message[..end], message.len() - end).into()
}

/// The error a memory grow beyond the cap traps with; the runtime recognises it to report
/// `memory-limit` rather than a generic trap.
#[derive(Debug, thiserror::Error)]
#[error("plugin tried to grow its memory to {desired} bytes; its limit is {limit} bytes (raise `memory_mb`)")]
pub struct MemoryLimitExceeded {
    pub desired: usize,
    pub limit: usize,
}

/// Caps linear memory and table growth of a store and remembers how much memory it holds, so
/// the runtime can recycle instances that only ever grow (some language runtimes never free).
pub struct MemoryLimiter {
    limit: usize,
    /// Bytes of linear memory the store's instances hold now, summed over memories.
    pub(super) memory_bytes: usize,
    /// Table elements the store holds now, summed over tables.
    table_elements: usize,
}

/// Most table elements a plugin's instance may hold, over all its tables: more means a hostile
/// or broken plugin. A total, since a component may have many tables (each element costs the
/// host memory outside the plugin's `memory_mb`).
const MAX_TABLE_ELEMENTS: usize = 1_000_000;

impl MemoryLimiter {
    fn new(limit: usize) -> Self {
        MemoryLimiter { limit, memory_bytes: 0, table_elements: 0 }
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, max: Option<usize>) -> wasmtime::Result<bool> {
        // Past the memory's own maximum the grow fails anyway (-1): count nothing for it.
        if max.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        let total = self.memory_bytes - current.min(self.memory_bytes) + desired;
        if total > self.limit {
            return Err(wasmtime::Error::new(MemoryLimitExceeded { desired: total, limit: self.limit }));
        }
        self.memory_bytes = total;
        Ok(true)
    }

    fn table_growing(&mut self, current: usize, desired: usize, max: Option<usize>) -> wasmtime::Result<bool> {
        // Past the table's own maximum the grow fails anyway (-1): count nothing for it.
        if max.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        let total = self.table_elements - current.min(self.table_elements) + desired;
        if total > MAX_TABLE_ELEMENTS {
            return Err(wasmtime::Error::msg(format!(
                "plugin tried to hold {total} table elements over its tables; the limit is {MAX_TABLE_ELEMENTS}"
            )));
        }
        self.table_elements = total;
        Ok(true)
    }

    fn memories(&self) -> usize {
        // Components built from dynamically linked runtimes (Python) carry a dozen core modules.
        64
    }

    fn tables(&self) -> usize {
        // As many as memories, with room: wasmtime's default is 10 000.
        256
    }
}

/// Most bytes a plugin may write to stdout or stderr in one call (what `check-write` says).
const WRITE_BUDGET: usize = 64 * 1024;

/// Most host objects (streams, pollables, …) one plugin instance may hold at once.
const MAX_HOST_RESOURCES: usize = 10_000;

#[derive(Clone, Copy, Debug)]
enum Stream {
    Stdout,
    Stderr,
}

/// A plugin's stdout or stderr: complete lines go to the gateway log tagged with the plugin.
#[derive(Clone)]
struct PluginOutput {
    plugin: Arc<str>,
    stream: Stream,
    pending: Arc<Mutex<Vec<u8>>>,
}

impl PluginOutput {
    fn new(plugin: Arc<str>, stream: Stream) -> Self {
        PluginOutput { plugin, stream, pending: Arc::new(Mutex::new(Vec::new())) }
    }

    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = truncate(text.trim_end_matches('\r'));
        let plugin = &*self.plugin;
        match self.stream {
            Stream::Stdout => tracing::info!(target: "weir::plugin", plugin, stream = "stdout", "{text}"),
            Stream::Stderr => tracing::warn!(target: "weir::plugin", plugin, stream = "stderr", "{text}"),
        }
    }

    fn write_bytes(&self, bytes: &[u8]) {
        // A poisoned lock only means another writer panicked mid-line; keep logging.
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        pending.extend_from_slice(bytes);
        // Lines taken with a moving start and the buffer shifted once: draining line by line
        // moved the rest each time (quadratic in a write of many short lines).
        let mut start = 0;
        while let Some(newline) = pending[start..].iter().position(|b| *b == b'\n') {
            let line = &pending[start..start + newline];
            // Empty lines say nothing; a write of newlines alone logs nothing.
            if !line.is_empty() && line != b"\r" {
                self.emit(line);
            }
            start += newline + 1;
        }
        pending.drain(..start);
        if pending.len() > MAX_LOG_LINE {
            let line = std::mem::take(&mut *pending);
            self.emit(&line);
        }
    }
}

impl IsTerminal for PluginOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for PluginOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for PluginOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for PluginOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        // WASI lets a writer send at most what `check-write` allowed; a plugin sending more in
        // one call (work no time limit can interrupt, being host code) is stopped.
        if bytes.len() > WRITE_BUDGET {
            return Err(StreamError::trap(&format!(
                "plugin wrote {} bytes at once to stdout or stderr; check-write allows {WRITE_BUDGET}",
                bytes.len()
            )));
        }
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_BUDGET)
    }
}

impl tokio::io::AsyncWrite for PluginOutput {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        // A partial write is allowed here: the rest comes in the next call.
        let taken = &buf[..buf.len().min(WRITE_BUDGET)];
        self.write_bytes(taken);
        Poll::Ready(Ok(taken.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Drop for PluginOutput {
    fn drop(&mut self) {
        // The last clone flushes an unterminated final line.
        if Arc::strong_count(&self.pending) == 1 {
            let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
            if !pending.is_empty() {
                self.emit(&pending);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter as _;

    #[test]
    fn output_is_logged_by_line_and_a_write_past_the_budget_is_refused() {
        let mut output = PluginOutput::new("p".into(), Stream::Stdout);
        assert!(output.write(Bytes::from(vec![b'\n'; WRITE_BUDGET + 1])).is_err());
        output.write(Bytes::from_static(b"one\n\n\ntwo\nthr")).unwrap();
        assert_eq!(*output.pending.lock().unwrap(), b"thr", "complete lines are taken, the rest waits");
        // Many short lines in one write: linear, not one shift of the buffer per line.
        output.write(Bytes::from(b"x\n".repeat(WRITE_BUDGET / 2))).unwrap();
        assert!(output.pending.lock().unwrap().is_empty());
        let host = HostState::new("p".into(), 1 << 20);
        assert_eq!(host.table.max_capacity(), MAX_HOST_RESOURCES);
    }

    #[test]
    fn table_elements_are_capped_over_all_tables_together() {
        let mut limiter = MemoryLimiter::new(16 << 20);
        // Two tables of 600 000 each: the second passes the total, though alone it is under.
        assert!(limiter.table_growing(0, 600_000, None).is_ok());
        let error = limiter.table_growing(0, 600_000, None).unwrap_err();
        assert!(error.to_string().contains("1200000 table elements"), "{error}");
        // Growing the first table counts only what it adds.
        assert!(limiter.table_growing(600_000, 900_000, None).is_ok());
        assert!(limiter.table_growing(900_000, 1_000_001, None).is_err());
        // A grow past the table's own maximum fails without being counted.
        assert!(!limiter.table_growing(900_000, 950_000, Some(900_000)).unwrap());
        assert!(limiter.table_growing(900_000, 1_000_000, None).is_ok());
    }
}
