//! meshgate's rate-limit plugin: token buckets keyed by request descriptors, shared by
//! every worker of a proxy through proxy-wasm shared data. Configuration: docs/plugins.md.
//!
//! The modules below hold the logic and are unit-tested on the host; `plugin` is the thin
//! proxy-wasm layer, compiled only for wasm32.

pub mod bucket;
pub mod config;
pub mod decision;
pub mod descriptor;
pub mod table;

#[cfg(target_arch = "wasm32")]
mod plugin;

// Small blocks freed by one request serve the next (decision 2600); one thread a VM.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
#[global_allocator]
static ALLOCATOR: meshgate_alloc::SizeClassCache = meshgate_alloc::SizeClassCache::new();
