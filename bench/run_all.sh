#!/usr/bin/env bash
# Every benchmark, one after another; each prints its figures beside a baseline measured
# in the same run. Not part of `make test`: they take minutes and want a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
for bench in bench/*_bench.py; do
  echo "==> $bench"
  .venv/bin/python "$bench"
done
