#!/usr/bin/env bash
# The whole suite: Rust unit tests of the plugins, OPA's policy tests, then pytest
# (unit, integration against real Envoy/OPA/gRPC on loopback, e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> Rust unit tests (plugins, host target)"
cargo test --quiet --manifest-path plugins/Cargo.toml --target x86_64-unknown-linux-gnu
if compgen -G "policies/*.rego" > /dev/null; then
  echo "==> OPA policy tests"
  .tools/opa test policies/ -v
fi
echo "==> pytest"
.venv/bin/pytest -q -p no:cacheprovider tests "$@"
# The host's unit tests again through the ctypes crossings, the reference the compiled
# ones (decision 1000) must match.
if [ "$#" -eq 0 ]; then
  echo "==> pytest tests/unit/wasm through the ctypes crossings"
  MESHGATE_WASM_CROSSING=ctypes .venv/bin/pytest -q -p no:cacheprovider tests/unit/wasm
fi
