"""Where a plugged sidecar request's extra CPU goes, by library and function, sampled by
perf: the native view of what `bench/sidecar_bench.py` counts by subtraction.

Run: .venv/bin/python bench/sidecar_perf.py [--seconds 5] [--rounds 2] [--top 25]
     [--connections 16]
(needs wrk and perf: `apt-get install wrk linux-perf`; perf must be allowed to sample
the sidecar, which root is)

The control server, the upstream and the sidecar start as in `bench/sidecar_bench.py`,
the sidecar pinned to CPU 0 and the rest off it. For each listener, bare and with
rate-limit + auth, in interleaved rounds, `perf record -e cpu-clock` samples the sidecar
while `wrk` loads the listener. A sample stands for 1/RATE s of the sidecar's CPU; over
wrk's request count, that is µs a request. Printed, as medians over the rounds:

- per library (perf's shared object), the bare request's µs, the plugged one's, and
  the difference. The plugins' compiled code is named by plugin: wasmtime maps it from
  the module cache's files, named by the binary's sha256;
- the functions whose µs grew most from bare to plugged.

`cpu-clock` is the kernel's software clock, so this works on virtual CPUs that expose no
hardware counters (this project's machines), with some skid at the edges of functions.
Sampling costs the sidecar a little CPU of its own, in both listeners alike, so the
totals run above `bench/sidecar_bench.py`'s; the differences are the figures to read.
What it answers: whether a plugged request's extra time is the plugins' own code, the
host's crossings, or the rest of the data path running slower after them (decision
3100).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from sidecar_bench import (
    PY,
    REPO,
    pinned_proxies,
    process,
    sidecar_args,
    start_mesh,
    wait_ok,
    wrk_args,
    wrk_figures,
)

TARGETS = ("bare", "plugged")
RATE = 2000  # samples a second of CPU
#: `perf report --stdio -F sample,dso,sym`: a sample count, the object, `[.]`/`[k]`, the symbol.
ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+\[[.k]\]\s+(.*\S)\s*$")


def plugin_names() -> dict[str, str]:
    """The built plugins by sha256, which names their files in the module cache
    (`SHA256-ENGINE.cwasm`)."""
    return {hashlib.sha256(wasm.read_bytes()).hexdigest(): f"plugin {wasm.stem}"
            for wasm in (REPO / "build/plugins").glob("*.wasm")}


def library(dso: str, plugins: dict[str, str]) -> str:
    name = Path(dso).name
    plugin = plugins.get(name.partition("-")[0])
    if plugin is not None:
        return plugin
    if name.endswith(".cwasm") or name.startswith(("perf-", "[JIT]")) or name == "[unknown]":
        return "other compiled wasm"
    return name


def samples(data: Path, plugins: dict[str, str]) -> Counter[tuple[str, str]]:
    """Samples by (library, function) in one perf recording."""
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "--stdio",
         "-F", "sample,dso,sym"],
        capture_output=True, text=True, check=True).stdout  # fmt: skip
    counts: Counter[tuple[str, str]] = Counter()
    for line in out.splitlines():
        found = ROW.match(line)
        if found:
            count, dso, sym = found.groups()
            counts[(library(dso, plugins), sym[:90])] += int(count)
    return counts


def record(pid: int, url: str, seconds: int, connections: int, data: Path) -> float:
    """One window: the sidecar sampled into `data` while wrk loads `url`; wrk's requests."""
    perf = subprocess.Popen(
        ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(RATE), "-p", str(pid),
         "-o", str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(0.5)  # perf attached; the idle sidecar takes no samples meanwhile
    try:
        out = subprocess.run(wrk_args(url, seconds, connections), capture_output=True,
                             text=True, timeout=seconds + 60, check=True).stdout
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=60)
    return wrk_figures(out)["requests"]


def per_request(counts: Counter[tuple[str, str]], requests: float) -> dict[tuple[str, str], float]:
    us = 1e6 / RATE / requests
    return {key: n * us for key, n in counts.items()}


def medians(rounds: list[dict[tuple[str, str], float]]) -> dict[tuple[str, str], float]:
    keys = set().union(*rounds)
    return {k: statistics.median(r.get(k, 0.0) for r in rounds) for k in keys}


def by_library(figures: dict[tuple[str, str], float]) -> Counter[str]:
    libraries: Counter[str] = Counter()
    for (lib, _), us in figures.items():
        libraries[lib] += us
    return libraries


def print_rows(title: str, bare: dict[str, float], plugged: dict[str, float],
               top: int) -> None:
    print(f"\n{title:58}{'bare':>9}{'plugged':>9}{'extra':>9}")
    keys = sorted(set(bare) | set(plugged), key=lambda k: bare.get(k, 0) - plugged.get(k, 0))
    for key in keys[:top]:
        b, p = bare.get(key, 0.0), plugged.get(key, 0.0)
        print(f"{key[:58]:58}{b:9.2f}{p:9.2f}{p - b:9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--top", type=int, default=25, help="functions to print")
    args = parser.parse_args()
    for tool in ("perf", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install linux-perf wrk")
    plugins = plugin_names()
    tmp = Path(tempfile.mkdtemp(prefix="meshgate-perf-"))
    pin = pinned_proxies(True)
    figures: dict[str, list[dict[tuple[str, str], float]]] = {t: [] for t in TARGETS}
    with contextlib.ExitStack() as stack:
        ports = start_mesh(stack, tmp)
        sidecar = stack.enter_context(process(
            [*pin, PY, *sidecar_args(ports["xds"], ports["admin"], "perf-bench")],
            tmp / "sidecar.log"))  # fmt: skip
        urls = {t: f"http://127.0.0.1:{ports[t]}/" for t in TARGETS}
        for url in urls.values():
            wait_ok(url)
        for url in urls.values():  # warm-up: plugins started, caches filled
            subprocess.run(wrk_args(url, 2, args.connections), capture_output=True, check=True)
        for i in range(args.rounds):
            for target, url in urls.items():
                data = tmp / f"{target}{i}.data"
                requests = record(sidecar.pid, url, args.seconds, args.connections, data)
                figures[target].append(per_request(samples(data, plugins), requests))
                print(f"round {i} {target}: {requests:.0f} requests", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    bare, plugged = medians(figures["bare"]), medians(figures["plugged"])
    print(f"\nsampled CPU µs a request, cpu-clock at {RATE} Hz, wrk -c{args.connections}, "
          f"medians of {args.rounds} round(s)")
    libs_bare, libs_plugged = by_library(bare), by_library(plugged)
    total_bare, total_plugged = sum(libs_bare.values()), sum(libs_plugged.values())
    print(f"all: bare {total_bare:.1f}, plugged {total_plugged:.1f}, "
          f"extra {total_plugged - total_bare:.1f}")
    print_rows("library", libs_bare, libs_plugged, 12)
    print_rows("function (library)", {f"{s} ({lib})": v for (lib, s), v in bare.items()},
               {f"{s} ({lib})": v for (lib, s), v in plugged.items()}, args.top)


if __name__ == "__main__":
    main()
