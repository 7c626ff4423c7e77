//! The one place the host generates bindings from `wit/plugin.wit`.
//!
//! The generated `event` record is the gateway's own [`crate::event::Event`], so batches are
//! lowered straight from the gateway's events without conversion. The filter world reuses the transform world's `host` bindings, so the
//! `log` import is implemented once.

/// Bindings of world `transform` (and of the shared `types` and `host` interfaces).
pub mod transform {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "transform",
        additional_derives: [PartialEq, Eq],
        // Calls into the plugin are async so a long one yields to the executor at each epoch
        // tick instead of holding an async worker; the host's own imports stay synchronous.
        exports: { default: async },
    });
}

/// Bindings of world `filter`.
pub mod filter {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "filter",
        exports: { default: async },
        with: {
            "weir:plugin/host": super::transform::weir::plugin::host,
            "weir:plugin/types": super::transform::weir::plugin::types,
        },
    });
}

pub use transform::weir::plugin::host::Level;
