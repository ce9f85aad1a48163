//! meshgate's auth plugin: JWT (RS256/ES256/HS256) or API-key authentication, then an
//! optional OPA decision. Configuration: docs/plugins.md.
//!
//! The modules hold the logic and are unit-tested on the host; `plugin` is the thin
//! proxy-wasm layer, compiled only for wasm32.

pub mod apikey;
pub mod config;
pub mod jwk;
pub mod jwt;
pub mod opa;

#[cfg(test)]
mod config_tests;
#[cfg(test)]
mod jwt_tests;

#[cfg(target_arch = "wasm32")]
mod plugin;

// Small blocks freed by one request serve the next (decision 2600); one thread a VM.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
#[global_allocator]
static ALLOCATOR: meshgate_alloc::SizeClassCache = meshgate_alloc::SizeClassCache::new();
