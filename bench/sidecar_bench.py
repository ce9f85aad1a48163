"""Sidecar throughput and latency against Envoy, same machine, same upstream, one run.

    .venv/bin/python bench/sidecar_bench.py [--seconds 10] [--connections 16]

Starts meshgate's control server, one aiohttp upstream, the sidecar (one process, one
event loop) and Envoy (`--concurrency 1`), all fed by the same control server and the
same plugins (rate-limit with a limit no run reaches, and auth with an API key), then
drives each with `wrk -t1` (from Debian: `apt-get install wrk`) and prints requests/s,
p50/p99 and the ratios the sidecar is held to. For the sidecars, also their CPU per
request and, from their /metrics, the garbage collections in each round: the pause a
request and the collections per 1,000 requests. Not a test: numbers vary with the load
the machine has; the ratios compare runs made minutes apart on the same machine.

`--compare TREE` adds a second sidecar, from another checkout, to the same rounds, and
prints this tree's req/s over that one's. `--compare .` with `--gc-young-threshold` and
`--compare-gc-young-threshold` sets two settings of the same code against each other.
The first sidecar started keeps a small edge (same code on both sides: 1.01-1.02 in
decision 2200's runs), so a comparison is run twice with the sides swapped.

`--compare-plugins DIR` adds, on the same sidecar, a listener whose rate-limit and auth
come from DIR's `rate_limit.wasm` and `auth.wasm` (another build of the plugins), loaded
in the same rounds; it prints that listener's req/s over the plugged one's.

`--listener PLUGINS` (repeatable) adds, on the same sidecar, a listener running PLUGINS, a
comma-separated list of `rate-limit`, `auth` and `noop` (a plugin that does nothing), each
an instance of its own, configured as the plugged listener's. It prints each one's CPU a
request over the bare listener's, as for the plugged one: `noop` against `noop,noop`
shows what any plugin costs a request before its own work, and
`rate-limit,auth,rate-limit,auth` what a second pair adds to the first.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Below the kernel's ephemeral range, where wrk's and the proxies' own connections cannot
# take a port a sidecar is yet to bind (the tests' ports, for the same reason).
from tests.support.ports import free_port  # noqa: E402

PY = sys.executable
API_KEY = "bench-key"
UPSTREAM = """
import sys
from aiohttp import web
async def ok(request):
    return web.Response(body=b"ok" * 32)
app = web.Application()
app.router.add_route("*", "/{tail:.*}", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def plugin(name: str) -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/meshgate/cargo-target"))
    for candidate in (REPO / "build/plugins" / name, target / "wasm32-wasip1/release" / name):
        if candidate.is_file():
            return candidate
    raise SystemExit(f"plugin {name} not built: run `make setup` first")


EXTRA_KINDS = ("rate-limit", "auth", "noop")


def mesh_config(ports: dict[str, int], compare_plugins: Path | None = None,
                extra: tuple[tuple[str, ...], ...] = ()) -> dict[str, object]:
    """The benches' mesh. `compare_plugins` adds, on the sidecar only, a listener whose
    rate-limit and auth are that directory's build; each of `extra` (`--listener`) one
    `extra-I` running those plugin kinds, at port `extra_I`."""
    key_sha = hashlib.sha256(API_KEY.encode()).hexdigest()
    route = [{"name": "all", "prefix": "/", "cluster": "upstream"}]
    config: dict[str, Any] = {
        "listeners": [
            {"name": "bare", "port": ports["bare"], "routes": route},
            {
                "name": "plugged",
                "port": ports["plugged"],
                "routes": route,
                "plugins": ["rate-limit", "auth"],
            },
        ],  # fmt: skip
        "clusters": [{"name": "upstream", "endpoints": [f"127.0.0.1:{ports['upstream']}"]}],
        "plugins": [
            {
                "name": "rate-limit",
                "wasm": str(plugin("rate_limit.wasm")),
                "config": {
                    "rules": [{"name": "all", "rate": {"tokens": 1_000_000_000, "per_seconds": 1}}]
                },
            },
            {
                "name": "auth",
                "wasm": str(plugin("auth.wasm")),
                "config": {"api_keys": {"keys": [{"id": "bench", "sha256": key_sha}]}},
            },
        ],  # fmt: skip
        "nodes": [
            {"cluster": "meshgate-sidecar", "listeners": ["bare", "plugged"]},
            {"cluster": "envoy", "listeners": ["plugged"], "ports": {"plugged": ports["envoy"]}},
            # The sidecar started from --compare's tree, on ports of its own.
            {"cluster": "sidecar-compare", "listeners": ["bare", "plugged"],
             "ports": {"bare": ports["cmp_bare"], "plugged": ports["cmp_plugged"]}},
        ],
    }
    if compare_plugins is not None:
        config["listeners"].append({"name": "plugged-b", "port": ports["plugged_b"],
                                    "routes": route, "plugins": ["rate-limit-b", "auth-b"]})
        config["plugins"] += [{**spec, "name": f"{spec['name']}-b",
                               "wasm": str(compare_plugins / Path(spec["wasm"]).name)}
                              for spec in config["plugins"][:2]]
        config["nodes"][0]["listeners"].append("plugged-b")
    base = {spec["name"]: spec for spec in config["plugins"][:2]}
    if extra:
        base["noop"] = {"name": "noop", "wasm": str(plugin("noop.wasm"))}
    for i, kinds in enumerate(extra):
        names = [f"{kind}-x{i}-{j}" for j, kind in enumerate(kinds)]
        config["plugins"] += [{**base[kind], "name": name}
                              for kind, name in zip(kinds, names, strict=True)]
        config["listeners"].append({"name": f"extra-{i}", "port": ports[f"extra_{i}"],
                                    "routes": route, "plugins": names})
        config["nodes"][0]["listeners"].append(f"extra-{i}")
    return config


def extra_target(index: int, kinds: tuple[str, ...]) -> str:
    return f"sidecar, extra-{index} ({' + '.join(kinds)})"


def listener_plugins(text: str) -> tuple[str, ...]:
    """`--listener`'s argument: plugin kinds, comma-separated."""
    kinds = tuple(k.strip() for k in text.split(","))
    unknown = [k for k in kinds if k not in EXTRA_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{text!r}: plugins are a comma-separated list of {', '.join(EXTRA_KINDS)}")
    return kinds


@contextlib.contextmanager
def process(args: list[str], log: Path, tree: Path = REPO) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=tree,
                                env=env)  # fmt: skip
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ok(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(url, headers={"x-api-key": API_KEY})
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} never answered 200")


def wrk_args(url: str, seconds: int, connections: int) -> list[str]:
    return ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
            "-H", f"x-api-key: {API_KEY}", url]  # fmt: skip


def wrk(url: str, seconds: int, connections: int) -> dict[str, float]:
    out = subprocess.run(wrk_args(url, seconds, connections), capture_output=True, text=True,
                         timeout=seconds + 60, check=True).stdout
    return wrk_figures(out)


def wrk_figures(out: str) -> dict[str, float]:
    """wrk's report (with `--latency`) as req/s, p50 and p99 ms, non-2xx and requests."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def pct(p: str) -> float:
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return {"rps": rps, "p50_ms": pct("50"), "p99_ms": pct("99"),
            "non_2xx": float(errors.group(1)) if errors else 0.0, "requests": total}  # fmt: skip


def sidecar_args(xds_port: int, admin_port: int, node_id: str,
                 cluster: str = "meshgate-sidecar") -> list[str]:
    """A sidecar's command line after the interpreter."""
    return ["-m", "meshgate.gateway.app", "--xds", f"127.0.0.1:{xds_port}",
            "--node-id", node_id, "--node-cluster", cluster, "--admin-port", str(admin_port),
            "--log-level", "WARNING"]  # fmt: skip


def add_threshold_option(parser: argparse.ArgumentParser, whose: str = "the sidecar's",
                         flag: str = "--gc-young-threshold", note: str = "") -> None:
    """The benches' option passing a sidecar's `--gc-young-threshold` (`threshold_args`)."""
    parser.add_argument(flag, type=int, metavar="N",
                        help=f"{whose} --gc-young-threshold (default: its own){note}")


def threshold_args(gc_young_threshold: int | None) -> list[str]:
    """The sidecar's `--gc-young-threshold` option (None: none, the sidecar's default)."""
    if gc_young_threshold is None:
        return []
    return ["--gc-young-threshold", str(gc_young_threshold)]


def pinned_proxies(pin: bool) -> list[str]:
    """With `pin`, this process (and so what it starts from now on: wrk, the upstream, the
    control server) leaves CPU 0, and the answer is the prefix that starts a proxy on it."""
    if not pin:
        return []
    os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))
    return ["taskset", "-c", "0"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux /proc), to divide by requests:
    on 2 shared cores req/s alone cannot tell the sidecar's cost from its neighbours'."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_mesh(stack: contextlib.ExitStack, tmp: Path, compare_plugins: Path | None = None,
               extra: tuple[tuple[str, ...], ...] = ()) -> dict[str, int]:
    """A free port for every part, `tmp`/meshgate.yaml (`mesh_config`), and the upstream
    and the control server started (stopped with `stack`). The sidecars and Envoy are the
    caller's."""
    import yaml

    names = ("upstream", "bare", "plugged", "envoy", "xds", "http", "admin", "envoy_admin",
             "cmp_bare", "cmp_plugged", "cmp_admin", "plugged_b",
             *(f"extra_{i}" for i in range(len(extra))))  # fmt: skip
    found: set[int] = set()
    while len(found) < len(names):  # a probed port is free again: one may come back
        found.add(free_port())
    ports = dict(zip(names, found, strict=True))
    (tmp / "meshgate.yaml").write_text(yaml.safe_dump(mesh_config(ports, compare_plugins,
                                                                  extra)))
    stack.enter_context(process([PY, "-c", UPSTREAM, str(ports["upstream"])], tmp / "up.log"))
    stack.enter_context(process(
        [PY, "-m", "meshgate.cli", "serve", "--config", str(tmp / "meshgate.yaml"),
         "--xds-port", str(ports["xds"]), "--http-port", str(ports["http"])],
        tmp / "cs.log"))  # fmt: skip
    return ports


def run(
    seconds: int,
    connections: int,
    profile: Path | None = None,
    envoy: bool = True,
    rounds: int = 1,
    uvloop: bool = True,
    compare: Path | None = None,
    pin: bool = False,
    gc_young_threshold: int | None = None,
    compare_gc_young_threshold: int | None = None,
    compare_plugins: Path | None = None,
    extra: tuple[tuple[str, ...], ...] = (),
) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, float]]],
           dict[str, tuple[float, float]]]:
    """The medians over the rounds per target, each round's figures, and this tree's
    plugin batches (`plugin_batches`)."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    from meshgate.envoy import find_envoy
    from meshgate.xds.bootstrap import envoy_bootstrap

    tmp = Path(tempfile.mkdtemp(prefix="meshgate-bench-"))
    proxy_cpu = pinned_proxies(pin)
    with contextlib.ExitStack() as stack:
        ports = start_mesh(stack, tmp, compare_plugins=compare_plugins, extra=extra)
        bootstrap = envoy_bootstrap(
            node_id="envoy-bench",
            node_cluster="envoy",
            xds_host="127.0.0.1",
            xds_port=ports["xds"],
            admin_port=ports["envoy_admin"],
            delta=False,
        )
        (tmp / "envoy.json").write_text(json.dumps(bootstrap))
        def sidecar(cluster: str, admin: int, tree: Path, prof: Path | None, log: str,
                    extra: list[str]) -> int:
            return stack.enter_context(process(
                [*proxy_cpu, PY, *(["-m", "cProfile", "-o", str(prof)] if prof else []),
                 *sidecar_args(ports["xds"], admin, f"{cluster}-bench", cluster),
                 *([] if uvloop else ["--no-uvloop"]), *extra],
                tmp / log, tree)).pid  # fmt: skip

        main_pid = sidecar("meshgate-sidecar", ports["admin"], REPO, profile, "sidecar.log",
                           threshold_args(gc_young_threshold))
        cmp_pid = 0
        if compare is not None:
            cmp_pid = sidecar("sidecar-compare", ports["cmp_admin"], compare, None, "compare.log",
                              threshold_args(compare_gc_young_threshold))
        stack.enter_context(process(
            [*proxy_cpu, find_envoy(), "-c", str(tmp / "envoy.json"), "--concurrency", "1",
             "-l", "error", "--use-dynamic-base-id"], tmp / "envoy.log"))  # fmt: skip
        targets = {
            "sidecar (bare)": f"http://127.0.0.1:{ports['bare']}/",
            "sidecar (rate-limit + auth)": f"http://127.0.0.1:{ports['plugged']}/",
            "envoy 1 worker (rate-limit + auth)": f"http://127.0.0.1:{ports['envoy']}/",
        }
        if not envoy:
            del targets["envoy 1 worker (rate-limit + auth)"]
        if compare_plugins is not None:
            targets[PLUGINS_B] = f"http://127.0.0.1:{ports['plugged_b']}/"
        for i, kinds in enumerate(extra):
            targets[extra_target(i, kinds)] = f"http://127.0.0.1:{ports[f'extra_{i}']}/"
        if compare is not None:
            targets["compare: sidecar (bare)"] = f"http://127.0.0.1:{ports['cmp_bare']}/"
            targets["compare: sidecar (rate-limit + auth)"] = (
                f"http://127.0.0.1:{ports['cmp_plugged']}/")
        for url in targets.values():
            wait_ok(url)
        for url in targets.values():
            wrk(url, 2, connections)  # warm up: JIT-less, but pools and caches fill
        # Rounds interleave the targets so a burst of load from elsewhere on the machine
        # hits all of them alike; each figure is the median over the rounds. Every other
        # round runs them in reverse, so no target always follows the same one.
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for round_index in range(rounds):
            order = list(targets.items())
            for name, url in order[::-1] if round_index % 2 else order:
                pid = cmp_pid if name.startswith("compare") else main_pid
                admin = ports["cmp_admin"] if name.startswith("compare") else ports["admin"]
                sidecar_target = "sidecar" in name
                cpu0 = cpu_seconds(pid) if sidecar_target else 0.0
                gc0 = gc_totals(admin) if sidecar_target else None
                r = wrk(url, seconds, connections)
                # The sidecar process's CPU per request (all its threads), in µs.
                r["cpu_us"] = ((cpu_seconds(pid) - cpu0) / r["requests"] * 1e6
                               if sidecar_target else float("nan"))
                r["gc_us"], r["gc_per_k"] = gc_per_request(gc0, admin, r["requests"])
                runs[name].append(r)
        results = {
            name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            for name, rs in runs.items()
        }
        batches = plugin_batches(ports["admin"])
    shutil.rmtree(tmp, ignore_errors=True)
    return results, runs, batches


def scrape(admin_port: int) -> str:
    """A sidecar's /metrics, in the classic text format."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def plugin_batches(admin_port: int) -> dict[str, tuple[float, float]]:
    """This tree's sidecar's plugin batches over the whole run (warm-up included), the
    closing ones (`meshgate_sidecar_plugin_finish_batch_requests`) as "finish" and the
    request-headers phases' (`..._request_batch_requests`) as "request": (batches, mean
    plugged requests a batch)."""
    text = scrape(admin_port)
    batches = {}
    for kind in ("finish", "request"):
        found = dict(re.findall(
            rf"meshgate_sidecar_plugin_{kind}_batch_requests_(sum|count) (\S+)", text))
        count, total = float(found.get("count", 0)), float(found.get("sum", 0))
        batches[kind] = (count, total / count if count else 0.0)
    return batches


def gc_totals(admin_port: int) -> tuple[float, float] | None:
    """The sidecar's garbage collections and seconds spent in them so far, all
    generations (None: a sidecar that does not export them, e.g. an older tree's)."""
    text = scrape(admin_port)
    counts = re.findall(r"meshgate_sidecar_gc_collections_total\{[^}]*\} (\S+)", text)
    pauses = re.findall(r"meshgate_sidecar_gc_pause_seconds_total\{[^}]*\} (\S+)", text)
    if not counts:
        return None
    return sum(map(float, counts)), sum(map(float, pauses))


def gc_per_request(before: tuple[float, float] | None, admin_port: int,
                   requests: float) -> tuple[float, float]:
    """(µs of gc pause a request, collections per 1,000 requests) since `before`."""
    after = gc_totals(admin_port) if before is not None else None
    if before is None or after is None:
        return float("nan"), float("nan")
    return ((after[1] - before[1]) / requests * 1e6,
            (after[0] - before[0]) / requests * 1000)


PLUGINS_B = "sidecar (--compare-plugins build)"


def cpu_over(results: dict[str, dict[str, float]], name: str,
             bare: str = "sidecar (bare)") -> float:
    """A listener's CPU a request over its sidecar's bare listener's, in µs."""
    return results[name]["cpu_us"] - results[bare]["cpu_us"]


def over_bare(results: dict[str, dict[str, float]], name: str) -> str:
    """`cpu_over`, in µs and as a share of bare."""
    extra, bare = cpu_over(results, name), results["sidecar (bare)"]["cpu_us"]
    return f"{extra:.1f} CPU µs a request, {extra / bare:.1%} of bare"


def paired(runs: dict[str, list[dict[str, float]]], num: str, den: str) -> str:
    """The req/s ratio of two targets within each round (measured a few seconds apart,
    so less exposed to the machine's drift than a ratio of medians): median and range."""
    ratios = sorted(a["rps"] / b["rps"] for a, b in zip(runs[num], runs[den], strict=True))
    return (f"per round: median {statistics.median(ratios):.2f}, "
            f"range {ratios[0]:.2f}-{ratios[-1]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--profile", type=Path, help="run the sidecar under cProfile, stats here")
    parser.add_argument("--no-envoy", action="store_true", help="sidecar targets only")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians)")
    parser.add_argument("--no-uvloop", action="store_true", help="sidecar on asyncio's loop")
    parser.add_argument("--compare", type=Path, metavar="TREE",
                        help="also run a sidecar from another source tree (e.g. a `git "
                        "archive` of the previous commit), interleaved in the same rounds")
    add_threshold_option(parser, "this tree's sidecar's")
    add_threshold_option(parser, "the compare tree's sidecar's", "--compare-gc-young-threshold",
                         "; with --compare . two settings of the same code")
    parser.add_argument("--pin", action="store_true",
                        help="the proxies on CPU 0, wrk and the upstream on the others "
                        "(needs 2 CPUs or more)")
    parser.add_argument("--compare-plugins", type=Path, metavar="DIR",
                        help="also a listener of this sidecar whose rate_limit.wasm and "
                        "auth.wasm come from DIR, in the same rounds")
    parser.add_argument("--listener", type=listener_plugins, action="append", default=[],
                        metavar="PLUGINS", help="also a listener of this sidecar running "
                        f"these plugins (comma-separated: {', '.join(EXTRA_KINDS)}); "
                        "repeatable")
    args = parser.parse_args()
    results, runs, batches = run(args.seconds, args.connections, args.profile, not args.no_envoy,
                        args.rounds, not args.no_uvloop, args.compare, args.pin,
                        args.gc_young_threshold, args.compare_gc_young_threshold,
                        args.compare_plugins, tuple(args.listener))  # fmt: skip
    loop = "asyncio" if args.no_uvloop else "uvloop if installed"
    print(f"wrk -t1 -c{args.connections} -d{args.seconds}s, same upstream, one run, "
          f"median of {args.rounds} interleaved round(s), sidecar loop: {loop}"
          + (", proxies pinned to CPU 0" if args.pin else ""))  # fmt: skip
    print(f"{'target':40} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} "
          f"{'CPU µs/req':>10} {'GC µs/req':>9} {'GC/1k req':>9}")
    for name, r in results.items():
        print(f"{name:40} {r['rps']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{r['non_2xx']:8.0f} {r['cpu_us']:10.0f} {r['gc_us']:9.1f} {r['gc_per_k']:9.1f}")
    rps = {name: r["rps"] for name, r in results.items()}
    bare, plugged = rps["sidecar (bare)"], rps["sidecar (rate-limit + auth)"]
    envoy = rps.get("envoy 1 worker (rate-limit + auth)")
    plugged_name = "sidecar (rate-limit + auth)"
    print(f"sidecar with plugins / bare sidecar: {plugged / bare:.2f} (target >= 0.80; "
          f"{paired(runs, plugged_name, 'sidecar (bare)')})")
    print(f"plugins by subtraction: {over_bare(results, plugged_name)} (target <= 20 %)")
    for i, kinds in enumerate(args.listener):
        name = extra_target(i, kinds)
        print(f"{name} by subtraction: {over_bare(results, name)}")
    if envoy:
        print(f"sidecar with plugins / envoy:        {plugged / envoy:.2f} (target >= 0.40; "
              f"{paired(runs, plugged_name, 'envoy 1 worker (rate-limit + auth)')})")
    for kind, what in (("request", "request-headers phases"), ("finish", "closing callbacks")):
        count, mean = batches[kind]
        print(f"{what} batched: {count:.0f} batches, {mean:.2f} plugged requests each")
    if args.compare_plugins is not None:
        print(f"--compare-plugins build / this build: "
              f"{results[PLUGINS_B]['rps'] / plugged:.2f} "
              f"({paired(runs, PLUGINS_B, plugged_name)})")
    if args.compare is not None:
        c_bare, c_plugged = rps["compare: sidecar (bare)"], rps[
            "compare: sidecar (rate-limit + auth)"]
        print(f"compare tree: plugins / bare {c_plugged / c_bare:.2f}"
              + (f", plugins / envoy {c_plugged / envoy:.2f}" if envoy else ""))
        print(f"this tree / compare tree: bare {bare / c_bare:.2f} "
              f"({paired(runs, 'sidecar (bare)', 'compare: sidecar (bare)')}), "
              f"plugins {plugged / c_plugged:.2f} "
              f"({paired(runs, plugged_name, 'compare: sidecar (rate-limit + auth)')})")


if __name__ == "__main__":
    main()
