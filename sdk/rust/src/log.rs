//! Logging into the gateway's log, tagged with the plugin's name.
//!
//! Inside the gateway these call the host import `weir:plugin/host.log`; in native tests they
//! print to stderr.

/// Severity of a log line (the WIT `level` enum, in its order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Level {
    /// Very detailed tracing.
    Trace = 0,
    /// Debugging detail.
    Debug = 1,
    /// Normal operation.
    Info = 2,
    /// Something unexpected the plugin handled.
    Warn = 3,
    /// Something failed.
    Error = 4,
}

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod host {
    // The canonical ABI of `log: func(level: level, message: string)`: the enum as an i32, then
    // the string as pointer and length into this module's memory.
    #[link(wasm_import_module = "weir:plugin/host@0.1.0")]
    unsafe extern "C" {
        #[link_name = "log"]
        fn host_log(level: i32, ptr: *const u8, len: usize);
    }

    pub fn log(level: super::Level, message: &str) {
        // SAFETY: the pointer and length describe a live, valid UTF-8 string for the whole call;
        // the host copies it out before returning.
        unsafe { host_log(level as i32, message.as_ptr(), message.len()) }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod host {
    pub fn log(level: super::Level, message: &str) {
        eprintln!("[{level:?}] {message}");
    }
}

/// Writes `message` at `level`.
pub fn log(level: Level, message: &str) {
    host::log(level, message)
}

/// Writes `message` at trace level.
pub fn trace(message: &str) {
    log(Level::Trace, message)
}
/// Writes `message` at debug level.
pub fn debug(message: &str) {
    log(Level::Debug, message)
}
/// Writes `message` at info level.
pub fn info(message: &str) {
    log(Level::Info, message)
}
/// Writes `message` at warn level.
pub fn warn(message: &str) {
    log(Level::Warn, message)
}
/// Writes `message` at error level.
pub fn error(message: &str) {
    log(Level::Error, message)
}
