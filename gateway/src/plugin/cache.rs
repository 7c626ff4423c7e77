//! On-disk cache of compiled plugins, so a restart does not recompile (2–9 s per JS or Python
//! plugin).
//!
//! An entry is keyed by the SHA-256 of the `.wasm` file and the engine's compatibility hash, and
//! sealed with an HMAC under a key that only this cache directory holds. Deserializing compiled
//! code is unsafe — the bytes are executed — so an entry whose seal does not verify is never
//! deserialized: it is recompiled and overwritten.

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
const MAGIC: &[u8; 8] = b"WEIRCC01";
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

    fn entry_path(&self, wasm: &[u8]) -> PathBuf {
        let digest = hex::encode(Sha256::digest(wasm));
        self.dir.join(format!("{digest}-{}.cwasm", self.engine_hash))
    }

    fn mac(&self, artifact: &[u8]) -> HmacSha256 {
        let Ok(mut mac) = <HmacSha256 as Mac>::new_from_slice(&self.key) else {
            unreachable!("HMAC accepts keys of any length")
        };
        mac.update(MAGIC);
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
        let path = self.entry_path(wasm);
        match self.read_sealed(&path) {
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
        if let Err(error) = self.write_sealed(&path, &component) {
            tracing::warn!(path = %path.display(), error = %format!("{error:#}"), "could not store compiled plugin in the cache");
        }
        Ok(component)
    }

    fn read_sealed(&self, path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
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
        self.mac(artifact)
            .verify_slice(seal)
            .map_err(|_| anyhow::anyhow!("cache entry seal does not verify; it was not written by this cache"))?;
        Ok(Some(artifact.to_vec()))
    }

    fn write_sealed(&self, path: &Path, component: &Component) -> anyhow::Result<()> {
        let artifact = component.serialize().map_err(anyhow::Error::from)?;
        let seal = self.mac(&artifact).finalize().into_bytes();
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
        return Ok(key);
    }
    let key: [u8; 32] = rand::random();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).with_context(|| format!("cannot create cache key {}", path.display()))?;
    file.write_all(&key).with_context(|| format!("cannot write cache key {}", path.display()))?;
    Ok(key)
}
