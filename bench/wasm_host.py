"""Benchmark the proxy-wasm host: per-callback and per-request cost, cold vs cached start.

Run: .venv/bin/python bench/wasm_host.py [--plugins build/plugins] [-n 3000]

Prints µs figures and ratios against baselines measured in the same run:
- a no-op plugin's request (headers, response headers, log/done/delete: 6 callbacks)
  through the host vs the same six callbacks through wasmtime-py's ``Func.__call__``;
- rate-limit + auth (if built, ``bash plugins/build.sh build/plugins``) per request;
- plugin start with an empty module cache (compile) vs a warm one (deserialise), and the
  first request after a cached start (the "plugin push" path).

``--baseline DIR`` compares another build of the two plugins (e.g. the previous commit's,
``git stash; bash plugins/build.sh /tmp/base; git stash pop``) with ``--plugins`` in the
same run: rounds alternate between the two, and medians of the rounds are printed.

The ``wasi:tracing`` foreign functions are registered as the sidecar registers them
without an OTLP endpoint: nothing exports spans, so ``record-span`` answers NotFound
(decision 1300). ``--exported``: a provider whose processor takes every span (and drops
it), so plugin spans are built as with an exporter; ``--no-tracing``: no functions at
all, as in Envoy.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import wasmtime
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from meshgate.gateway.wasm import HeaderMap, HostServices, PluginHost, PluginSpec, StreamInfo
from meshgate.gateway.wasm.shared import SharedDataStore
from meshgate.otel import WasiTracing

NOOP = """
(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32)))
"""

API_KEY = "bench-secret"


def request_headers() -> HeaderMap:
    return HeaderMap([(":method", "GET"), (":path", "/api/items?id=7"), (":authority", "svc"),
                      (":scheme", "http"), ("user-agent", "bench"), ("x-api-key", API_KEY),
                      ("x-request-id", "0b7f6f0e-7d1c-4a43-9d8e-3f0c1f5f1a10")])


async def one_request(hosts: list[PluginHost]) -> None:
    info = StreamInfo(source_address="127.0.0.1:40000", destination_address="127.0.0.1:8080")
    streams = [h.new_stream(info) for h in hosts]
    headers = request_headers()
    for s in streams:
        await s.request_headers(headers, True)
    response = HeaderMap([(":status", "200"), ("content-type", "text/plain")])
    for s in reversed(streams):
        await s.response_headers(response, True)
    for s in streams:
        s.finish()


async def per_request_us(hosts: list[PluginHost], n: int) -> float:
    for _ in range(50):
        await one_request(hosts)
    t0 = time.perf_counter()
    for _ in range(n):
        await one_request(hosts)
    return (time.perf_counter() - t0) / n * 1e6


async def bare_request_us(n: int) -> float:
    """The host-independent part: building the maps and awaiting, with no plugin."""
    async def nothing(*_a: object) -> None:
        return None

    t0 = time.perf_counter()
    for _ in range(n):
        StreamInfo(source_address="127.0.0.1:40000")
        request_headers()
        HeaderMap([(":status", "200")])
        await nothing()
        await nothing()
    return (time.perf_counter() - t0) / n * 1e6


def generic_noop_request_us(n: int) -> float:
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    inst = wasmtime.Instance(store, wasmtime.Module(engine, NOOP), [])
    ex = inst.exports(store)
    create, reqh, resph = ex["proxy_on_context_create"], ex["proxy_on_request_headers"], \
        ex["proxy_on_response_headers"]
    on_log, on_done, on_delete = ex["proxy_on_log"], ex["proxy_on_done"], ex["proxy_on_delete"]
    t0 = time.perf_counter()
    for i in range(n):
        create(store, i + 2, 1)
        reqh(store, i + 2, 7, 1)
        resph(store, i + 2, 2, 1)
        on_log(store, i + 2)
        on_done(store, i + 2)
        on_delete(store, i + 2)
    return (time.perf_counter() - t0) / n * 1e6


def rate_limit_and_auth(plugins: Path, per_address: bool = False) -> list[PluginSpec] | None:
    """The two plugins, configured as the benches run them: one global bucket, or with
    `per_address` a bucket per client address (the plugin reads `source.address`)."""
    rl, auth = plugins / "rate_limit.wasm", plugins / "auth.wasm"
    if not (rl.exists() and auth.exists()):
        return None
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    auth_conf = {"api_keys": {"header": "x-api-key", "keys": [{"id": "bench", "sha256": digest}]}}
    rule: dict[str, object] = {"name": "all", "rate": {"tokens": 1_000_000_000}}
    if per_address:
        rule["descriptors"] = [{"source": "remote_address"}]
    rl_conf = {"rules": [rule]}
    return [PluginSpec("rate_limit", rl.read_bytes(), json.dumps(rl_conf).encode(),
                       root_id="rate_limit", vm_id="rate_limit"),
            PluginSpec("auth", auth.read_bytes(), json.dumps(auth_conf).encode(),
                       root_id="auth", vm_id="auth")]


async def start_times(spec: PluginSpec,
                      cache_dir: Path) -> tuple[float, float, float, float]:
    """(cold start ms, cached start ms, cached start + first request ms, the same for a
    module already in memory).

    Cold: a fresh process's first plugin (new engine, import table linked, module
    compiled). Cached: a plugin push to a running sidecar whose module is in the disk
    cache (deserialised from disk, instantiated, configured). In memory: a push of a
    binary the sidecar already runs (a configuration change), up to its first request.
    """
    services = new_services(True, cache_dir)
    t0 = time.perf_counter()
    host = await PluginHost.create(spec, services)
    cold = (time.perf_counter() - t0) * 1e3
    await host.close()
    services.module_cache.forget()  # only the disk cache holds it now
    t0 = time.perf_counter()
    host = await PluginHost.create(spec, services)
    cached = (time.perf_counter() - t0) * 1e3
    await one_request([host])
    first = (time.perf_counter() - t0) * 1e3
    await host.close()
    t0 = time.perf_counter()
    host = await PluginHost.create(spec, services)
    await one_request([host])
    in_memory = (time.perf_counter() - t0) * 1e3
    await host.close()
    services.close()
    return cold, cached, first, in_memory


class _Dropped(SpanExporter):
    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def new_services(tracing: bool, cache_dir: Path | None = None,
                 exported: bool = False) -> HostServices:
    services = HostServices(module_cache_dir=cache_dir)
    if tracing:
        # The sidecar's set-up: an SDK provider, exporting nothing without an OTLP
        # endpoint (then record-span answers NotFound, decision 1300).
        provider = TracerProvider()
        if exported:
            provider.add_span_processor(BatchSpanProcessor(_Dropped()))  # as the sidecar
        services.foreign_functions.update(WasiTracing(provider).functions())
    return services


async def push_ms(spec: PluginSpec, services: HostServices) -> float:
    """A plugin push whose module is in the disk cache, up to its first request's end.

    The plugin is new to the process: its shared data starts empty, as for a first push
    (what the rate limiter once set up at configure time, decision 0101, shows here).
    """
    services.shared_data = SharedDataStore()
    services.module_cache.forget()  # from the disk cache, not from memory
    t0 = time.perf_counter()
    host = await PluginHost.create(spec, services)
    await one_request([host])
    ms = (time.perf_counter() - t0) * 1e3
    await host.close()
    return ms


#: The three tracing set-ups by label: (wasi:tracing registered, spans exported).
SETUPS = {"not exported": (True, False), "spans exported": (True, True),
          "no wasi:tracing": (False, False)}


def _tracing_label(args: argparse.Namespace) -> str:
    return ("no wasi:tracing" if args.no_tracing else "spans exported" if args.exported
            else "not exported")


async def compare(args: argparse.Namespace) -> None:
    """Baseline vs candidate plugins, alternating rounds in one process."""
    sets = {"baseline": rate_limit_and_auth(args.baseline),
            "candidate": rate_limit_and_auth(args.plugins)}
    if any(v is None for v in sets.values()):
        raise SystemExit(f"need rate_limit.wasm and auth.wasm in {args.baseline} and "
                         f"{args.plugins}")
    services = new_services(not args.no_tracing, exported=args.exported)
    hosts = {k: [await PluginHost.create(s, services) for s in v]  # type: ignore[union-attr]
             for k, v in sets.items()}
    caches = {k: tempfile.TemporaryDirectory() for k in sets}
    push_services = {k: new_services(not args.no_tracing, Path(caches[k].name), args.exported)
                     for k in sets}
    for k, specs in sets.items():
        for spec in specs:  # type: ignore[union-attr]
            await push_ms(spec, push_services[k])  # compiles into the cache
    per_req: dict[tuple[str, str], list[float]] = {}
    push: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for k in sets:
            rl, auth = hosts[k]
            for label, group in (("rate-limit + auth", [rl, auth]), ("rate-limit", [rl]),
                                 ("auth", [auth])):
                per_req.setdefault((label, k), []).append(await per_request_us(group, args.n))
            for spec in sets[k]:  # type: ignore[union-attr]
                push.setdefault((spec.name, k), []).extend(
                    [await push_ms(spec, push_services[k]) for _ in range(5)])
    print(f"per request, µs (median of {args.rounds} rounds of {args.n}; "
          f"tracing {_tracing_label(args)})")
    for label in ("rate-limit + auth", "rate-limit", "auth"):
        b = statistics.median(per_req[(label, "baseline")])
        c = statistics.median(per_req[(label, "candidate")])
        bmin = min(per_req[(label, "baseline")])
        cmin = min(per_req[(label, "candidate")])
        print(f"  {label:18s} baseline {b:7.1f} (min {bmin:6.1f})  candidate {c:7.1f}"
              f" (min {cmin:6.1f})  candidate/baseline {c / b:5.2f} (min {cmin / bmin:5.2f})")
    print("plugin push (cached module) to end of first request, ms (median; min)")
    for name in ("rate_limit", "auth"):
        b, c = push[(name, "baseline")], push[(name, "candidate")]
        print(f"  {name:18s} baseline {statistics.median(b):5.2f} ({min(b):4.2f})"
              f"  candidate {statistics.median(c):5.2f} ({min(c):4.2f})"
              f"  candidate/baseline {statistics.median(c) / statistics.median(b):5.2f}")
    for k in sets:
        for h in hosts[k]:
            await h.close()
        push_services[k].close()
        caches[k].cleanup()
    services.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plugins", type=Path, default=Path("build/plugins"))
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another build of the plugins to compare in the same run")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-tracing", action="store_true",
                        help="no wasi:tracing functions (as in Envoy)")
    parser.add_argument("--exported", action="store_true",
                        help="plugin spans built as with an exporter (and dropped)")
    parser.add_argument("-n", type=int, default=3000)
    args = parser.parse_args()
    if args.baseline is not None:
        await compare(args)
        return
    n = args.n

    services = new_services(not args.no_tracing, exported=args.exported)
    noop = await PluginHost.create(PluginSpec("noop", bytes(wasmtime.wat2wasm(NOOP))), services)
    specs = rate_limit_and_auth(args.plugins)
    pair = [await PluginHost.create(s, services) for s in specs] if specs else []
    # The same pair under the two other tracing set-ups, in the same rounds.
    others = {label: new_services(tracing, exported=exported)
              for label, (tracing, exported) in SETUPS.items() if label != _tracing_label(args)}
    other_pairs = {label: [await PluginHost.create(s, svc) for s in specs] if specs else []
                   for label, svc in others.items()}
    # Rounds interleave every measurement; medians of the rounds are printed (this
    # machine's speed drifts by tens of percent within minutes).
    runs: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        runs.setdefault("bare", []).append(await bare_request_us(n))
        runs.setdefault("noop", []).append(await per_request_us([noop], n))
        runs.setdefault("generic", []).append(generic_noop_request_us(n))
        if pair:
            runs.setdefault("pair", []).append(await per_request_us(pair, n))
            for label, hosts in other_pairs.items():
                runs.setdefault(label, []).append(await per_request_us(hosts, n))
    bare, host_noop, generic = (statistics.median(runs[k]) for k in ("bare", "noop", "generic"))
    print(f"medians of {args.rounds} interleaved rounds of {n} requests")
    print(f"bare request (maps + awaits, no plugin)   {bare:8.1f} µs")
    print(f"no-op plugin, 6 callbacks, meshgate host  {host_noop:8.1f} µs"
          f"  ({(host_noop - bare) / 6:5.1f} µs per callback above bare)")
    print(f"no-op plugin, 6 callbacks, Func.__call__  {generic:8.1f} µs"
          f"  ratio generic/host {generic / host_noop:5.2f}x")
    if not pair:
        print(f"rate-limit + auth: not built under {args.plugins} (skipped)")
    else:
        pair_us = statistics.median(runs["pair"])
        print(f"rate-limit + auth, per request            {pair_us:8.1f} µs"
              f"  = {pair_us / host_noop:5.1f}x the no-op plugin (tracing {_tracing_label(args)})")
        for label in other_pairs:
            us = statistics.median(runs[label])
            print(f"  the same, {label:20s}           {us:8.1f} µs  = {us / pair_us:5.2f}x")
    for spec in [*(specs or []), noop.spec]:
        times = []
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as d:
                times.append(await start_times(spec, Path(d)))
        cold, cached, first, in_memory = (statistics.median(t[i] for t in times)
                                          for i in range(4))
        print(f"{spec.name:10s} start: cold {cold:7.1f} ms  cached {cached:6.2f} ms"
              f"  (cold/cached {cold / cached:5.1f}x)  cached+first request {first:6.2f} ms"
              f"  same binary again+first request {in_memory:6.2f} ms")
    for h in [*pair, noop, *(h for hosts in other_pairs.values() for h in hosts)]:
        await h.close()
    for svc in [services, *others.values()]:
        svc.close()


if __name__ == "__main__":
    asyncio.run(main())
