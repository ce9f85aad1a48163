"""Instructions per request of the plugins' share, counted by valgrind: a figure that
does not drift with this shared machine's speed.

Run: .venv/bin/python bench/chain_instructions.py [--compare TREE] [-n 1000]

Each variant runs `bench/plugin_chain.py`'s request (rate-limit + auth through
`PluginChain`, no sockets) in a child process under `valgrind --tool=callgrind`, twice:
with 200 requests and with 200 + n. The difference over n is the instructions one request
executes (start-up and warm-up cancel out). Printed per request:

- the request with plugins, and without (the part that exists without plugins);
- the plugins' share, the difference;
- with `--compare TREE` (another checkout with its extension built, e.g. a git worktree
  of the previous commit and `.venv/bin/python setup.py build_ext --inplace` in it), the
  same for that tree, and this tree's share over that tree's.

Needs valgrind (`apt-get install valgrind`). Each run takes about a minute: instructions
are counted, not timed, so one round is enough. The count is not CPU time (cache misses
and branch mispredictions are not in it), so `bench/sidecar_bench.py` stays the measure of
the targets; this one tells whether a change made the path shorter.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARM_UP = 200


async def child(variant: str, n: int, plugins: Path, cache: Path) -> None:
    from aiohttp.test_utils import make_mocked_request
    from opentelemetry.sdk.trace import TracerProvider
    from plugin_chain import UPSTREAM_HEADERS, Transport, through  # bench/ is on sys.path
    from wasm_host import API_KEY, new_services, rate_limit_and_auth

    from meshgate.gateway.filters import PluginChain
    from meshgate.gateway.proxy import strip_hop_by_hop
    from meshgate.gateway.tracing import id_generator, light_server_span, w3c_context
    from meshgate.gateway.wasm import PluginHost

    specs = rate_limit_and_auth(plugins)
    if specs is None:
        raise SystemExit(f"rate_limit.wasm and auth.wasm not in {plugins}: make setup")
    services = new_services(True, cache)
    # Valgrind runs the guest tens of times slower: a callback must not hit the CPU
    # deadline (a trap would end the run with an error, not a smaller count).
    services.callback_deadline_s = 60.0
    hosts = [await PluginHost.create(spec, services) for spec in specs]
    ids = id_generator(TracerProvider())
    request = make_mocked_request("GET", "/api/items?id=7", transport=Transport(), headers={
        "host": "svc", "user-agent": "wrk", "x-api-key": API_KEY})

    async def one() -> None:
        span = light_server_span(request.headers, ids)
        w3c, headers = w3c_context(span), strip_hop_by_hop(request.headers)
        response_headers = strip_hop_by_hop(UPSTREAM_HEADERS)
        if variant == "without":
            return
        chain = PluginChain.start(hosts, request, span, 1 << 20, w3c)
        await through(chain, headers, request, response_headers)
        chain.finish()

    for _ in range(WARM_UP + n):
        await one()
    for host in hosts:
        await host.close()
    services.close()


def under_callgrind(script: str, args: list[str], tree: Path, out: str = "/dev/null") -> str:
    """Runs `script args` with `tree`'s meshgate under callgrind (its counts to `out`):
    valgrind's report."""
    cmd = ["valgrind", "--tool=callgrind", "--smc-check=all-non-file",
           f"--callgrind-out-file={out}", sys.executable, script, *args]
    # A fixed hash seed: string hashing decides dict layouts, and with it a few thousand
    # instructions a request between otherwise identical runs.
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if run.returncode != 0:
        raise SystemExit(f"valgrind run failed in {tree}:\n{run.stderr[-2000:]}")
    return run.stderr


def instructions(tree: Path, variant: str, n: int, plugins: Path, cache: Path) -> int:
    """Instructions the child executes with `tree`'s meshgate (and this tree's bench
    scripts, so a tree from before this bench can be compared)."""
    report = under_callgrind(__file__, ["--child", variant, "-n", str(n), "--plugins",
                                        str(plugins), "--cache", str(cache)], tree)
    found = re.search(r"Collected : (\d+)", report)
    if found is None:
        raise SystemExit(f"no instruction count in valgrind's report:\n{report[-2000:]}")
    return int(found.group(1))


def per_request(tree: Path, variant: str, n: int, plugins: Path, cache: Path) -> float:
    return (instructions(tree, variant, n, plugins, cache)
            - instructions(tree, variant, 0, plugins, cache)) / n


def measure(tree: Path, n: int, plugins: Path, cache: Path) -> tuple[float, float]:
    # Compiled first, once per tree (its engine may name the cache files its own way) and
    # under valgrind as well: every counted run then loads the modules from the cache, and
    # the compile is in none. A module compiled outside valgrind would not do: valgrind
    # hides CPU features (AVX-512) from wasmtime, which then rejects the cached code and
    # compiles again in every run, on threads whose spinning counts differently each time.
    under_callgrind(__file__, ["--child", "with", "-n", "0", "--plugins", str(plugins),
                               "--cache", str(cache)], tree)
    with_plugins = per_request(tree, "with", n, plugins, cache)
    without = per_request(tree, "without", n, plugins, cache)
    print(f"{tree}: {with_plugins:,.0f} instructions per request with the plugins, "
          f"{without:,.0f} without; plugins' share {with_plugins - without:,.0f}", flush=True)
    return with_plugins, without


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plugins", type=Path, default=REPO / "build/plugins")
    parser.add_argument("-n", type=int, default=1000, help="requests counted per run")
    parser.add_argument("--compare", type=Path, help="another tree, measured the same way")
    parser.add_argument("--child", choices=("with", "without"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args.child, args.n, args.plugins, args.cache))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: apt-get install valgrind")
    with tempfile.TemporaryDirectory() as cache:  # modules compiled once, then loaded
        this = measure(REPO, args.n, args.plugins.resolve(), Path(cache))
        if args.compare is not None:
            other = measure(args.compare.resolve(), args.n, args.plugins.resolve(),
                            Path(cache))
            ratio = (this[0] - this[1]) / (other[0] - other[1])
            print(f"plugins' share, this tree / compare tree: {ratio:.3f}")


if __name__ == "__main__":
    main()
