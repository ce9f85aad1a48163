"""The plugins' share of one sidecar request, as the data path drives them, without sockets.

Run: .venv/bin/python bench/plugin_chain.py [--plugins build/plugins] [-n 3000] [--rounds 7]
     [--evict MB] [--scatter MB] [--batch B] [--per-address]
     .venv/bin/python bench/plugin_chain.py --train N

One request is what `DataPath` does around the upstream exchange when a listener has
plugins: the `PluginChain` of rate-limit + auth over an aiohttp request (start, request
headers, response headers, the response body read whole, finish), with the sidecar's
`wasi:tracing` set-up and no exporter. Printed per request, medians of interleaved rounds:

- the chain with the compiled stream driver (decision 1100), and with the Python driver
  it replaces (`HttpStream._call`, `PluginHost._invoke_all`), swapped in the same process;
- the part of the request that exists without plugins (span, W3C context, header copies),
  for scale.

Under load the sidecar spends about twice these figures: between two plugged requests
it runs the rest of the data path, and the plugins start on caches that work has
refilled. `--evict MB` writes to every cache line of a MB-sized buffer before each
request, outside the timed part, so each request starts that cold. `--scatter MB` writes
one byte in every 4 KiB page of a MB-sized buffer before each request: that also evicts
address translations (the TLB), which a contiguous buffer of a few MB does not and the
loaded sidecar's other work does. Compare with `bench/sidecar_bench.py`'s CPU µs/req.

`--batch B` adds a variant, in the same rounds: B requests run phase by phase (all their
request headers, then all their response headers...) with the buffers written once per
batch, as a data path would that gathered the requests one event-loop pass brings: the
first request of a batch starts cold, the others find the plugins' code and data where
the first left them (decision 1800).

`--train N` times nothing: it runs N requests through the compiled driver, the data
path's, one in eight without the API key (auth's 401 reply). It is the training run of
the profile-guided build of the compiled crossings (`setup.py build_pgo`, decision 2700).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from opentelemetry.sdk.trace import TracerProvider
from wasm_host import API_KEY, new_services, rate_limit_and_auth  # bench/ is on sys.path

from meshgate.gateway import wasm
from meshgate.gateway.filters import PluginChain, PluginReplied
from meshgate.gateway.proxy import strip_hop_by_hop
from meshgate.gateway.tracing import id_generator, light_server_span, w3c_context
from meshgate.gateway.wasm import PluginHost
from meshgate.gateway.wasm import stream as stream_module
from meshgate.gateway.wasm.stream import HttpStream

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_HEADERS = CIMultiDict([("content-type", "application/octet-stream"),
                                ("content-length", "64"), ("server", "upstream"),
                                ("date", "Mon, 23 Nov 2026 10:00:00 GMT")])
BODY = b"ok" * 32


class Transport:
    """The two addresses the data path asks a connection for."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000),
                "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def is_closing(self) -> bool:
        return False


def python_driver() -> Callable[[], None]:
    """Swap the Python driver in; returns the undo."""
    saved = (stream_module._drive, stream_module._invoke_all, wasm.drive_phase,
             wasm.finish_streams, wasm.finish_across)
    stream_module._drive = HttpStream._call
    stream_module._invoke_all = PluginHost._invoke_all
    wasm.drive_phase = stream_module.drive_phase_py
    wasm.finish_streams = stream_module.finish_streams_py
    wasm.finish_across = stream_module.finish_across_py

    def undo() -> None:
        (stream_module._drive, stream_module._invoke_all, wasm.drive_phase,
         wasm.finish_streams, wasm.finish_across) = saved

    return undo



async def through(chain: PluginChain, headers: CIMultiDict[str], request: Any,
                  response_headers: CIMultiDict[str]) -> None:
    """The three phases as `DataPath` runs them: awaited only if a plugin paused."""
    rest = chain.begin_request_headers("GET", "/api/items?id=7", headers, request)
    if rest is not None:
        await rest
    rest = chain.begin_response_headers(200, response_headers)
    if rest is not None:
        await rest
    out = chain.begin_whole_response_body(BODY)
    if not isinstance(out, bytes):
        await out


async def plugged_phases(hosts: list[PluginHost], ids: Any, request: Any) -> PluginChain:
    """One request through the chain's phases, as the data path runs them (a plugin's
    local reply ends its phases, as there): the chain, to finish."""
    span = light_server_span(request.headers, ids)
    chain = PluginChain.start(hosts, request, span, 1 << 20, w3c_context(span))
    try:
        await through(chain, strip_hop_by_hop(request.headers), request,
                      strip_hop_by_hop(UPSTREAM_HEADERS))
    except PluginReplied:
        pass
    return chain


async def plugged_request(hosts: list[PluginHost], ids: Any, request: Any) -> None:
    (await plugged_phases(hosts, ids, request)).finish()


#: The closing batch's size in the training run: about what a loaded sidecar's holds.
TRAIN_BATCH = 5


async def train(n: int, hosts: list[PluginHost], ids: Any, request: Any) -> None:
    """`n` requests, one in eight turned away by auth, closed in batches as the data
    path closes them: the profile the compiled crossings are laid out by."""
    keyless = make_mocked_request("GET", "/api/items?id=7", transport=Transport(),
                                  headers={"host": "svc", "user-agent": "wrk"})
    for start in range(0, n, TRAIN_BATCH):
        chains = [await plugged_phases(hosts, ids, keyless if i % 8 == 7 else request)
                  for i in range(start, min(n, start + TRAIN_BATCH))]
        if wasm.finish_across([chain.streams for chain in chains]) is not None:
            raise SystemExit("a plugin failed while closing: the training run stops")
    print(f"trained on {n} requests through rate-limit + auth")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plugins", type=Path, default=REPO / "build/plugins")
    parser.add_argument("-n", type=int, default=3000, help="requests per round and variant")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-address", action="store_true",
                        help="rate-limit by client address (a `source.address` property read "
                        "a request) instead of one global bucket")
    parser.add_argument("--evict", type=int, default=0, metavar="MB",
                        help="write a buffer this large before each request (cold caches)")
    parser.add_argument("--scatter", type=int, default=0, metavar="MB",
                        help="write a byte per 4 KiB page of a buffer this large before each "
                        "request (cold TLB)")
    parser.add_argument("--batch", type=int, default=1, metavar="B",
                        help="also run the compiled driver B requests at a time, phase by "
                        "phase, the buffers written once per batch")
    parser.add_argument("--train", type=int, default=0, metavar="N",
                        help="only run N requests through the compiled driver, untimed "
                        "(the profile-guided build's training run)")
    args = parser.parse_args()
    specs = rate_limit_and_auth(args.plugins, args.per_address)
    if specs is None:
        raise SystemExit(f"rate_limit.wasm and auth.wasm not in {args.plugins}: make setup")
    services = new_services(tracing=True)
    hosts = [await PluginHost.create(spec, services) for spec in specs]
    ids = id_generator(TracerProvider())
    request = make_mocked_request("GET", "/api/items?id=7", transport=Transport(), headers={
        "host": "svc", "user-agent": "wrk", "x-api-key": API_KEY})
    if args.train:
        await train(args.train, hosts, ids, request)
        for host in hosts:
            await host.close()
        services.close()
        return

    async def without_plugins() -> tuple[Any, Any, CIMultiDict[str]]:
        span = light_server_span(request.headers, ids)
        return span, w3c_context(span), strip_hop_by_hop(request.headers)

    async def with_plugins() -> None:
        await plugged_request(hosts, ids, request)

    def at_once(settled: object) -> None:
        # A begin_* phase answers None (the body, for the body) when no plugin paused.
        if settled is not None and not isinstance(settled, bytes):
            raise SystemExit("a plugin paused: batches assume they decide at once")

    async def batch_with_plugins() -> None:
        started = [await without_plugins() for _ in range(args.batch)]
        chains = [PluginChain.start(hosts, request, span, 1 << 20, w3c)
                  for span, w3c, _ in started]
        for chain, (_, _, headers) in zip(chains, started, strict=True):
            at_once(chain.begin_request_headers("GET", "/api/items?id=7", headers, request))
        for chain in chains:
            at_once(chain.begin_response_headers(200, strip_hop_by_hop(UPSTREAM_HEADERS)))
        for chain in chains:
            at_once(chain.begin_whole_response_body(BODY))
        for chain in chains:
            chain.finish()

    async def without_plugins_batch() -> None:
        for _ in range(args.batch):
            await without_plugins()

    async def python_driven() -> None:
        undo = python_driver()
        try:
            await with_plugins()
        finally:
            undo()

    variants: dict[str, Callable[[], Awaitable[Any]]] = {
        "compiled driver": with_plugins, "Python driver": python_driven,
        "no plugins": without_plugins}
    # How many requests one call of each variant runs.
    size = dict.fromkeys(variants, 1)
    if args.batch > 1:
        batched = f"batches of {args.batch}"
        variants[batched], size[batched] = batch_with_plugins, args.batch
        # Its own base: the part without plugins warms across a batch too.
        variants[f"no plugins, {batched}"] = without_plugins_batch
        size[f"no plugins, {batched}"] = args.batch
    us: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        for _ in range(200):
            await fn()
    evict = bytearray(args.evict << 20)
    lines = len(evict[::64])
    scatter = bytearray(args.scatter << 20)
    pages = len(scatter[::4096])
    for _ in range(args.rounds):
        for name, fn in variants.items():
            spent = 0.0
            calls = args.n // size[name]
            for _ in range(calls):
                if lines:
                    evict[::64] = bytes([spent > 0]) * lines  # every cache line written
                if pages:
                    scatter[::4096] = bytes([spent > 0]) * pages  # every page written
                t0 = time.perf_counter()
                await fn()
                spent += time.perf_counter() - t0
            us[name].append(spent / (calls * size[name]) * 1e6)
    med = {name: statistics.median(v) for name, v in us.items()}
    base = med["no plugins"]
    cold = f", {args.evict} MB written before each" if args.evict else ""
    cold += f", a byte per page of {args.scatter} MB written before each" if pages else ""
    print(f"rate-limit + auth through PluginChain, µs per request, median of {args.rounds} "
          f"interleaved rounds of {args.n}{cold}")
    for name, value in med.items():
        print(f"  {name:16} {value:7.1f}")
    compiled, python = med["compiled driver"] - base, med["Python driver"] - base
    print(f"plugins' share: {compiled:.1f} µs compiled driver, {python:.1f} µs Python driver "
          f"(ratio {compiled / python:.2f})")
    if args.batch > 1:
        batched_share = (med[f"batches of {args.batch}"]
                         - med[f"no plugins, batches of {args.batch}"])
        print(f"in batches of {args.batch}: {batched_share:.1f} µs a request "
              f"({batched_share / compiled:.2f} of one at a time)")
    for host in hosts:
        await host.close()
    services.close()


if __name__ == "__main__":
    asyncio.run(main())
