//! On-disk cache of compiled plugins, so a restart does not recompile (2–9 s per JS or Python
//! plugin).
//!
//! An entry is keyed by the SHA-256 of the `.wasm` file and the engine's compatibility hash, and
//! sealed with an HMAC of its name and contents under a key that only this cache directory holds
//! (a file of this user's, readable by no one else; another is replaced). Deserializing compiled
//! code is unsafe — the bytes are executed — so an entry whose seal does not verify (forged, or a
//! genuine entry of another plugin copied under this one's name) is never deserialized: it is
//! recompiled and overwritten.

use anyhow::Context as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

type HmacSha256 = Hmac<Sha256>;

/// Format marker; bump when the entry layout changes.
const MAGIC: &[u8; 8] = b"WEIRCC02";
const MAC_LEN: usize = 32;

/// A directory of sealed, compiled components.
pub struct CompileCache {
    dir: PathBuf,
    key: [u8; 32],
    engine_hash: String,
}

impl CompileCache {
    /// Opens (creating if needed) the cache in `dir` for `engine`.
    pub fn open(dir: &Path, engine: &Engine) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create plugin cache directory {}", dir.display()))?;
        let key = load_or_create_key(&dir.join("cache.key"))?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(CompileCache { dir: dir.to_path_buf(), key, engine_hash: format!("{:016x}", hasher.finish()) })
    }

    /// The default location: `$WEIR_CACHE_DIR`, else `$XDG_CACHE_HOME/weir`, else
    /// `$HOME/.cache/weir`; `None` when none of them is set.
    pub fn default_dir() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("WEIR_CACHE_DIR") {
            return Some(PathBuf::from(dir));
        }
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
            return Some(PathBuf::from(dir).join("weir"));
        }
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache").join("weir"))
    }

    /// The entry's file name: which plugin and engine it was compiled for.
    fn entry_name(&self, wasm: &[u8]) -> String {
        format!("{}-{}.cwasm", hex::encode(Sha256::digest(wasm)), self.engine_hash)
    }

    fn mac(&self, name: &str, artifact: &[u8]) -> HmacSha256 {
        let Ok(mut mac) = <HmacSha256 as Mac>::new_from_slice(&self.key) else {
            unreachable!("HMAC accepts keys of any length")
        };
        mac.update(MAGIC);
        mac.update(&(name.len() as u64).to_le_bytes());
        mac.update(name.as_bytes());
        mac.update(artifact);
        mac
    }

    /// The component compiled from `wasm`: from the cache when a sealed entry exists, else
    /// compiled (by `compile`) and stored. Cache trouble is logged, never fatal.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        wasm: &[u8],
        compile: impl FnOnce() -> anyhow::Result<Component>,
    ) -> anyhow::Result<Component> {
        let name = self.entry_name(wasm);
        let path = self.dir.join(&name);
        match self.read_sealed(&path, &name) {
            Ok(Some(artifact)) => {
                // SAFETY: the artifact verified against this cache's HMAC key, so it is the
                // exact output of `Component::serialize` by this program for an engine with the
                // same compatibility hash; wasmtime re-checks the engine settings on load.
                #[allow(unsafe_code)]
                let loaded = unsafe { Component::deserialize(engine, &artifact) };
                match loaded {
                    Ok(component) => return Ok(component),
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "discarding unusable plugin cache entry")
                    }
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(path = %path.display(), error = %format!("{error:#}"), "ignoring plugin cache entry")
            }
        }
        let component = compile()?;
        if let Err(error) = self.write_sealed(&path, &name, &component) {
            tracing::warn!(path = %path.display(), error = %format!("{error:#}"), "could not store compiled plugin in the cache");
        }
        Ok(component)
    }

    fn read_sealed(&self, path: &Path, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error).context("cannot read cache entry"),
        };
        let Some(rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
            anyhow::bail!("cache entry has an unknown format");
        };
        if rest.len() < MAC_LEN {
            anyhow::bail!("cache entry is truncated");
        }
        let (seal, artifact) = rest.split_at(MAC_LEN);
        self.mac(name, artifact)
            .verify_slice(seal)
            .map_err(|_| anyhow::anyhow!("cache entry seal does not verify; it was not written by this cache"))?;
        Ok(Some(artifact.to_vec()))
    }

    fn write_sealed(&self, path: &Path, name: &str, component: &Component) -> anyhow::Result<()> {
        let artifact = component.serialize().map_err(anyhow::Error::from)?;
        let seal = self.mac(name, &artifact).finalize().into_bytes();
        let mut file = tempfile::NamedTempFile::new_in(&self.dir).context("cannot create cache temp file")?;
        file.write_all(MAGIC)?;
        file.write_all(&seal)?;
        file.write_all(&artifact)?;
        file.persist(path).context("cannot move cache entry into place")?;
        Ok(())
    }
}

fn load_or_create_key(path: &Path) -> anyhow::Result<[u8; 32]> {
    if let Ok(bytes) = std::fs::read(path)
        && let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice())
    {
        match key_is_private(path) {
            Ok(()) => return Ok(key),
            // Whoever could write it could seal entries: a new key makes them all recompile.
            Err(why) => {
                tracing::warn!(path = %path.display(), "not using the plugin cache key ({why}); making a new one")
            }
        }
    }
    let key: [u8; 32] = rand::random();
    let dir = path.parent().unwrap_or(Path::new("."));
    // A new file (created readable by its owner only) moved into place, whoever owned the old one.
    let mut file = tempfile::NamedTempFile::new_in(dir).context("cannot create cache key temp file")?;
    file.write_all(&key).with_context(|| format!("cannot write cache key {}", path.display()))?;
    file.persist(path).with_context(|| format!("cannot create cache key {}", path.display()))?;
    Ok(key)
}

/// Whether the key file is this user's own regular file, readable and writable by no one else.
#[cfg(unix)]
fn key_is_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if !meta.file_type().is_file() {
        return Err("not a regular file".into());
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err("owned by another user".into());
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!("mode {:o}: others may read or write it", meta.mode() & 0o777));
    }
    Ok(())
}

#[cfg(not(unix))]
fn key_is_private(_path: &Path) -> Result<(), String> {
    Ok(())
}
