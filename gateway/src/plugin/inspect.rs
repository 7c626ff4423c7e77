//! Reading what a plugin file is without running it: component or not, world, WIT version, SDK
//! stamp, imports and exports. Used at load and by `weir plugin inspect`.

use super::LoadError;
use serde::Serialize;
use sha2::{Digest, Sha256};
use wasmparser::{Parser, Payload};

/// The WIT package version this host implements.
pub const WIT_VERSION: &str = "0.1.0";
/// Name of the custom section the SDKs stamp their versions into.
pub const META_SECTION: &str = "weir:plugin-meta";

/// Which world a plugin targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum World {
    /// Keeps or drops events.
    Filter,
    /// Returns an outcome per event.
    Transform,
}

impl World {
    /// The world's name in the WIT.
    pub fn as_str(self) -> &'static str {
        match self {
            World::Filter => "filter",
            World::Transform => "transform",
        }
    }
}

/// What the SDK that built the plugin recorded about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SdkStamp {
    /// SDK name, e.g. `weir-sdk-rust`.
    pub sdk: String,
    /// SDK version.
    pub sdk_version: String,
    /// WIT package the SDK was built against, e.g. `weir:plugin@0.1.0`.
    pub wit: String,
}

/// Everything `weir plugin inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    /// Which world the plugin targets.
    pub world: World,
    /// WIT version of the interface it exports.
    pub wit_version: String,
    /// The SDK stamp, when the plugin was built with a Weir SDK that records one.
    pub sdk: Option<SdkStamp>,
    /// Interfaces the plugin imports.
    pub imports: Vec<String>,
    /// Names the plugin exports.
    pub exports: Vec<String>,
    /// File size in bytes.
    pub size: usize,
    /// SHA-256 of the file, hex.
    pub sha256: String,
}

impl PluginInfo {
    /// A short version label for logs and headers: `sha256` prefix plus SDK version if known.
    pub fn version_label(&self) -> String {
        format!("sha256:{}", &self.sha256[..12.min(self.sha256.len())])
    }
}

/// Checks the 8-byte header: a component, not a core module and not something else.
pub fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm);
    }
    // Bytes 6..8 are the layer: 0 for a core module, 1 for a component.
    match (bytes[6], bytes[7]) {
        (1, 0) => Ok(()),
        (0, 0) => Err(LoadError::CoreModule),
        _ => Err(LoadError::NotWasm),
    }
}

/// Reads a plugin file's structure without compiling it.
pub fn inspect(bytes: &[u8]) -> Result<PluginInfo, LoadError> {
    check_header(bytes)?;
    let mut imports = Vec::new();
    let mut exports = Vec::new();
    let mut sdk = None;
    // Nested modules and components repeat the same payload kinds; only depth 1 (the outer
    // component) carries the plugin's own imports and exports.
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| LoadError::Invalid(format!("malformed component: {e}")))?;
        match payload {
            Payload::Version { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(section) if depth == 1 => {
                for import in section {
                    let import = import.map_err(|e| LoadError::Invalid(format!("malformed import: {e}")))?;
                    imports.push(import.name.name.to_string());
                }
            }
            Payload::ComponentExportSection(section) if depth == 1 => {
                for export in section {
                    let export = export.map_err(|e| LoadError::Invalid(format!("malformed export: {e}")))?;
                    exports.push(export.name.name.to_string());
                }
            }
            Payload::CustomSection(section) if section.name() == META_SECTION => {
                sdk = serde_json::from_slice::<SdkStamp>(section.data()).ok();
            }
            _ => {}
        }
    }
    let (world, wit_version) = world_of(&exports)?;
    Ok(PluginInfo {
        world,
        wit_version,
        sdk,
        imports,
        exports,
        size: bytes.len(),
        sha256: hex::encode(Sha256::digest(bytes)),
    })
}

/// Finds the Weir handler interface among the exports and checks its version.
fn world_of(exports: &[String]) -> Result<(World, String), LoadError> {
    for name in exports {
        let Some(rest) = name.strip_prefix("weir:plugin/") else { continue };
        let (interface, version) = rest.split_once('@').unwrap_or((rest, ""));
        let world = match interface {
            "transform-handler" => World::Transform,
            "filter-handler" => World::Filter,
            _ => continue,
        };
        if !compatible(version) {
            return Err(LoadError::UnsupportedWit { found: version.to_string(), supported: WIT_VERSION.to_string() });
        }
        return Ok((world, version.to_string()));
    }
    Err(LoadError::WrongWorld { exports: exports.to_vec() })
}

/// Semver compatibility with [`WIT_VERSION`]: for 0.x the minor is the breaking part, and an
/// older patch or minor of the same line loads (changes are additive).
fn compatible(version: &str) -> bool {
    let parts = |v: &str| -> Option<(u64, u64, u64)> {
        let mut it = v.split(['.', '-', '+']).map(str::parse::<u64>);
        Some((it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?))
    };
    let (Some(found), Some(ours)) = (parts(version), parts(WIT_VERSION)) else { return false };
    if ours.0 == 0 { found.0 == 0 && found.1 == ours.1 } else { found.0 == ours.0 && found.1 <= ours.1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_tell_components_from_modules_and_junk() {
        assert!(matches!(check_header(b"\0asm\x01\0\0\0"), Err(LoadError::CoreModule)));
        assert!(matches!(check_header(b"\0asm\x0d\0\x01\0"), Ok(())));
        assert!(matches!(check_header(b"hello world"), Err(LoadError::NotWasm)));
        assert!(matches!(check_header(b""), Err(LoadError::NotWasm)));
    }

    #[test]
    fn versions_of_the_same_line_are_compatible() {
        assert!(compatible("0.1.0"));
        assert!(compatible("0.1.7"));
        assert!(!compatible("0.2.0"));
        assert!(!compatible("1.0.0"));
        assert!(!compatible("garbage"));
    }

    #[test]
    fn world_comes_from_the_handler_export() {
        let exports = vec!["weir:plugin/transform-handler@0.1.0".to_string()];
        assert_eq!(world_of(&exports).ok(), Some((World::Transform, "0.1.0".to_string())));
        let newer = vec!["weir:plugin/filter-handler@1.0.0".to_string()];
        assert!(matches!(world_of(&newer), Err(LoadError::UnsupportedWit { .. })));
        let other = vec!["run".to_string()];
        assert!(matches!(world_of(&other), Err(LoadError::WrongWorld { .. })));
    }
}
