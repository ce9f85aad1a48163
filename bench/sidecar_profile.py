"""Where a loaded sidecar's CPU goes, sampled: the plugins' share of a plugged request
by attribution, beside the share `bench/sidecar_bench.py` gets by subtraction.

Run: .venv/bin/python bench/sidecar_profile.py [--seconds 5] [--rounds 2] [--pin] [--floor]
                                              [--outside N]
(needs wrk, which `make bench` installs, and py-spy, which `make setup` installs; py-spy
reads the sidecar's memory, so it needs ptrace rights over it, which root has).

The control server, the upstream and the sidecar start as in `bench/sidecar_bench.py`.
For each listener, bare and with rate-limit + auth, in interleaved rounds, `wrk -c16`
loads it and `py-spy record --nonblocking` samples the sidecar's Python stacks for
`--seconds`, skipping idle threads. A sample is a moment the process was on a CPU; its
weight in µs a request is (1 / rate) over wrk's requests in the window.

The plugin path is every sample with a frame of the plugin chain (`PluginChain`, the
closing batch and the stream info in `gateway/filters.py`) or of
the proxy-wasm host (`gateway/wasm/`): the callbacks into wasm, the host functions,
the data path's work for the plugins. Native code (the compiled crossings, wasmtime,
the guests) counts in the Python frame that called it. Where the compiled driver runs,
`PluginChain.start` and its three per-request phases are C methods (decision 2600) with
no frame of their own: a sample in one has the data path's frame at the line that calls
it (found in `gateway/proxy.py` by its syntax tree) and counts for the method called.

`--floor` also samples a listener with two plugins that do nothing (`plugins/noop`):
every callback still runs, as Envoy drives them, so what that listener's plugin path
costs is the host's and the proxy-wasm SDK's part, under any pair of SDK plugins.

`--outside N` prints the N lines off the plugin path (innermost frame) whose samples grew
most from the bare listener to the plugged one (and the no-op one with `--floor`): where
the rest of the request runs slower after the plugins ran.

Subtracting the bare request's CPU from the plugged one's also counts what is not the
plugins' code but differs between the two loads: the kernel's share of socket writes,
epoll and the loop's passes change with the request rate. The attributed share does not
see those; both are printed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidecar_bench import (  # noqa: E402
    PY,
    REPO,
    add_threshold_option,
    pinned_proxies,
    process,
    sidecar_args,
    start_mesh,
    threshold_args,
    wait_ok,
    wrk_args,
    wrk_figures,
)

RATE = 1000  # samples a second
CHAIN_METHODS = ("start", "begin_request_headers", "begin_response_headers",
                 "begin_whole_response_body")
PLUGIN_FRAME = re.compile(
    r"\((meshgate/gateway/wasm/|meshgate/gateway/filters\.py)"
    r"|^(PluginChain\.|FinishBatch\.|_log_finish_errors |_stream_info )")


def chain_call_lines() -> dict[int, str]:
    """`gateway/proxy.py`'s lines inside a call of PluginChain's compiled methods, each
    with the method's name: a sample at one is in the method (it has no frame)."""
    import ast

    source = (REPO / "meshgate/gateway/proxy.py").read_text()
    lines: dict[int, str] = {}
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in CHAIN_METHODS):
            for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                lines[line] = f"PluginChain.{node.func.attr} (compiled)"
    return lines


CHAIN_LINES = chain_call_lines()
PROXY_LINE = re.compile(r"\(meshgate/gateway/proxy\.py:(\d+)\)$")


def plugin_frame(names: list[str]) -> str | None:
    """The outermost frame of `names` (a stack, outermost first) on the plugin path."""
    for name in names:
        if PLUGIN_FRAME.search(name):
            return re.sub(r":\d+\)$", ")", name)
        at = PROXY_LINE.search(name)
        if at is not None and int(at.group(1)) in CHAIN_LINES:
            return CHAIN_LINES[int(at.group(1))]
    return None


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).is_file():
        raise SystemExit("py-spy not found: run `make setup` (it installs the bench extra)")
    return found


def sample(pid: int, url: str, seconds: int, out: Path) -> float:
    """Sample the sidecar under wrk's load; wrk's requests in the sampled window."""
    wrk = subprocess.Popen(wrk_args(url, seconds + 2, 16), stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    subprocess.run([py_spy(), "record", "--nonblocking", "-r", str(RATE), "-d", str(seconds),
                    "-f", "raw", "-o", str(out), "-p", str(pid)],
                   capture_output=True, check=True)  # fmt: skip
    return wrk_figures(wrk.communicate(timeout=seconds + 60)[0])["rps"] * seconds


def frames(line: str) -> tuple[list[str], int]:
    stack, count = line.rsplit(" ", 1)
    # Paths from the package: `(.../site-packages/aiohttp/x.py:1)` → `(aiohttp/x.py:1)`.
    stack = stack.replace(f"({REPO}/", "(")
    return [re.sub(r"\(/\S*?/(site-packages|python3\.\d+)/", "(", f)
            for f in stack.split(";")], int(count)


class Round(NamedTuple):
    """One listener's samples in one round (in samples, or µs a request once scaled)."""

    total: float
    plugin: float
    #: The plugin path's samples by its outermost frame.
    outer: collections.Counter[str]
    #: The other samples by their innermost frame and line: where the rest of the request
    #: runs slower (or faster) when plugins ran between.
    outside: collections.Counter[str]

    def scaled(self, per: float) -> Round:
        return Round(self.total * per, self.plugin * per,
                     collections.Counter({k: v * per for k, v in self.outer.items()}),
                     collections.Counter({k: v * per for k, v in self.outside.items()}))


def attribute(dump: Path) -> Round:
    total = plugin = 0
    outer: collections.Counter[str] = collections.Counter()
    outside: collections.Counter[str] = collections.Counter()
    for line in dump.read_text().splitlines():
        names, count = frames(line)
        total += count
        hit = plugin_frame(names)
        if hit is not None:
            plugin += count
            outer[hit] += count
        elif names:
            outside[names[-1]] += count
    return Round(total, plugin, outer, outside)


def run(seconds: int, rounds: int, pin: bool, gc_young_threshold: int | None = None,
        floor: bool = False) -> dict[str, list[Round]]:
    """Per listener, each round's (µs a request sampled, of it on the plugin path, by frame)."""
    tmp = Path(tempfile.mkdtemp(prefix="meshgate-profile-"))
    proxy_cpu = pinned_proxies(pin)
    # The floor is the benches' first extra listener (`sidecar_bench.py --listener`).
    ports_of = {"bare": "bare", "plugged": "plugged", **({"floor": "extra_0"} if floor else {})}
    results: dict[str, list[Round]] = {name: [] for name in ports_of}
    with contextlib.ExitStack() as stack:
        ports = start_mesh(stack, tmp, extra=(("noop", "noop"),) if floor else ())
        sidecar = stack.enter_context(process(
            [*proxy_cpu, PY, *sidecar_args(ports["xds"], ports["admin"], "profile-bench"),
             *threshold_args(gc_young_threshold)],
            tmp / "sidecar.log", REPO))
        urls = {name: f"http://127.0.0.1:{ports[port]}/" for name, port in ports_of.items()}
        for url in urls.values():
            wait_ok(url, 120)
            sample(sidecar.pid, url, 2, tmp / "warm.txt")
        for r in range(rounds):
            for name, url in urls.items():
                dump = tmp / f"{name}{r}.txt"
                requests = sample(sidecar.pid, url, seconds, dump)
                results[name].append(attribute(dump).scaled(1e6 / RATE / requests))
    shutil.rmtree(tmp, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pin", action="store_true",
                        help="the sidecar on CPU 0, wrk and the upstream on the others")
    parser.add_argument("--floor", action="store_true",
                        help="also sample a listener whose two plugins do nothing")
    parser.add_argument("--outside", type=int, default=0, metavar="N",
                        help="also print the N lines off the plugin path that grew most "
                        "from the bare request to the plugged one")
    add_threshold_option(parser)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    results = run(args.seconds, args.rounds, args.pin, args.gc_young_threshold, args.floor)
    bare = statistics.median(r.total for r in results["bare"])
    plugged = statistics.median(r.total for r in results["plugged"])
    plugin = statistics.median(r.plugin for r in results["plugged"])
    print(f"py-spy at {RATE} Hz, wrk -t1 -c16, {args.seconds} s a sample, median of "
          f"{args.rounds} interleaved round(s)" + (", sidecar pinned to CPU 0" if args.pin else ""))
    print(f"sampled CPU µs a request: bare {bare:.0f}, rate-limit + auth {plugged:.0f}")
    print(f"  per round: bare {[round(r.total) for r in results['bare']]}, "
          f"plugged {[round(r.total) for r in results['plugged']]}")
    per_round = [round(r.plugin, 1) for r in results["plugged"]]
    print(f"plugins, attributed: {plugin:.1f} µs a plugged request, {plugin / bare:.1%} of a "
          f"bare request (target <= 20 %; per round {per_round})")
    extra = plugged - bare
    print(f"plugins, by subtraction: {extra:.1f} µs, {extra / bare:.1%} of bare")
    print(f"stray plugin-path samples on the bare listener: "
          f"{statistics.median(r.plugin for r in results['bare']):.1f} µs a request")
    print_frames(results["plugged"], "a plugged request")
    if args.floor:
        floor = statistics.median(r.plugin for r in results["floor"])
        floor_total = statistics.median(r.total for r in results["floor"])
        print(f"two no-op plugins, sampled CPU µs a request: {floor_total:.0f}; by "
              f"subtraction {floor_total - bare:.1f} µs, {(floor_total - bare) / bare:.1%} of bare")
        print(f"two no-op plugins, attributed: {floor:.1f} µs a request, {floor / bare:.1%} of "
              f"a bare request (per round {[round(r.plugin, 1) for r in results['floor']]}); "
              f"rate-limit + auth above that floor: {plugin - floor:.1f} µs")
        print_frames(results["floor"], "a no-op request")
    if args.outside:
        print_outside(results, args.outside)


def print_outside(results: dict[str, list[Round]], n: int) -> None:
    """Where the samples off the plugin path grew from the bare listener to the others:
    what the plugins cost the rest of the request (its code and data pushed out of the
    caches while they ran, decision 2700)."""
    bare = mean_of([r.outside for r in results["bare"]])
    others = [name for name in results if name != "bare"]
    grown = {name: mean_of([r.outside for r in results[name]]) for name in others}
    lines = set(bare).union(*grown.values())
    ranked = sorted(lines, key=lambda k: bare[k] - grown["plugged"][k])
    print(f"off the plugin path, µs a request (mean of the rounds): the {n} lines that grew "
          f"most, innermost frame")
    print("      bare" + "".join(f"{name:>10}" for name in others))
    for key in ranked[:n]:
        print(f"  {bare[key]:8.2f}" + "".join(f"{grown[name][key]:10.2f}" for name in others)
              + f"  {key}")


def mean_of(counters: list[collections.Counter[str]]) -> collections.Counter[str]:
    summed: collections.Counter[str] = collections.Counter()
    for c in counters:
        summed.update(c)
    return collections.Counter({k: v / len(counters) for k, v in summed.items()})


def print_frames(rounds: list[Round], what: str) -> None:
    print(f"plugin path by its outermost frame, µs {what} (mean of the rounds):")
    for name, us in mean_of([r.outer for r in rounds]).most_common(12):
        print(f"  {us:6.1f}  {name}")


if __name__ == "__main__":
    main()
