#!/usr/bin/env bash
# Every benchmark, one after another; each prints its figures beside a baseline measured
# in the same run. Not part of `make test`: they take minutes and want a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
run() { echo "==> $*"; .venv/bin/python "$@"; }
run bench/xds_bench.py
run bench/wasm_callpath.py
run bench/wasm_host.py --plugins build/plugins
run bench/plugin_chain.py --plugins build/plugins
if command -v valgrind >/dev/null; then
  run bench/chain_instructions.py
  run bench/sidecar_instructions.py
fi
run bench/sidecar_bench.py --seconds 5 --rounds 3
run bench/host_bookkeeping.py --rounds 3
run bench/sidecar_profile.py --rounds 3
if command -v perf >/dev/null; then
  run bench/sidecar_perf.py --rounds 2
fi
