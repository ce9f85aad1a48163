"""Control-server benchmark: config change → every simulated ADS client ACKed, control
server RSS with many streams, and build + serialise time of a large snapshot.

Run: .venv/bin/python bench/xds_bench.py [--clients 100 1000]

Each figure is printed with a baseline measured in the same run:
- fan-out latency against the same change with a single client;
- RSS with N streams against the same server idle (no streams);
- snapshot build (translate + version + serialise once) against plain protobuf
  serialisation of the same messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from meshgate.xds import resources as r  # noqa: E402
from meshgate.xds import translate  # noqa: E402
from meshgate.xds.config import from_dict  # noqa: E402
from meshgate.xds.snapshot import Snapshot  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

LISTENERS, CLUSTERS = 4, 20


def mesh(generation: int, listeners: int = LISTENERS, clusters: int = CLUSTERS,
         routes_per_listener: int = 5) -> dict[str, Any]:
    return {
        "listeners": [{
            "name": f"l{i}", "port": 20000 + i, "request_timeout": f"{10 + generation}s",
            "routes": [{"name": f"r{i}-{j}", "prefix": f"/p{j}/",
                        "cluster": f"c{(i * routes_per_listener + j) % clusters}",
                        "timeout": f"{1 + generation}s"}
                       for j in range(routes_per_listener)],
        } for i in range(listeners)],
        "clusters": [{"name": f"c{k}", "connect_timeout": f"{1 + generation}s",
                      "endpoints": [f"127.0.0.1:{30000 + generation * 100 + k % 90}",
                                    f"127.0.0.2:{30000 + k % 90}"]}
                     for k in range(clusters)],
    }


class Client:
    """A minimal SotW ADS client: subscribes CDS/LDS wildcard, EDS/RDS by name, ACKs all."""

    def __init__(self, index: int) -> None:
        self.node = base_pb2.Node(id=f"bench-{index}", cluster="bench", user_agent_name="envoy")
        self.queue: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        self.acked: dict[str, float] = {}
        self.names = {r.CLUSTER: [], r.LISTENER: [],
                      r.ENDPOINT: [f"c{k}" for k in range(CLUSTERS)],
                      r.ROUTE: [f"l{i}.routes" for i in range(LISTENERS)]}
        self.ready = asyncio.Event()

    async def _requests(self) -> Any:
        first = True
        while True:
            request = await self.queue.get()
            if first:
                request.node.CopyFrom(self.node)
                first = False
            yield request

    async def run(self, channel: grpc.aio.Channel) -> None:
        for type_url in (r.CLUSTER, r.ENDPOINT, r.LISTENER, r.ROUTE):
            self.queue.put_nowait(discovery_pb2.DiscoveryRequest(
                type_url=type_url, resource_names=self.names[type_url]))
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        async for response in stub.StreamAggregatedResources(self._requests()):
            self.queue.put_nowait(discovery_pb2.DiscoveryRequest(
                type_url=response.type_url, version_info=response.version_info,
                response_nonce=response.nonce, resource_names=self.names[response.type_url]))
            self.acked[response.type_url] = time.perf_counter()
            if len(self.acked) == 4:
                self.ready.set()


async def fan_out(clients: int, server_pid: int, config_path: Path, xds_port: int
                  ) -> tuple[list[float], int]:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{xds_port}")
                for _ in range(max(1, clients // 100))]
    fleet = [Client(i) for i in range(clients)]
    tasks = [asyncio.create_task(c.run(channels[i % len(channels)]))
             for i, c in enumerate(fleet)]
    await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in fleet)), 120)
    await asyncio.sleep(1.0)
    rss = rss_kib(server_pid)
    for c in fleet:
        c.acked.clear()
    start = time.perf_counter()
    config_path.write_text(yaml.safe_dump(mesh(int(start) % 50 + 1)))
    while any(len(c.acked) < 4 for c in fleet):
        if time.perf_counter() - start > 60:
            raise TimeoutError("clients did not converge in 60 s")
        await asyncio.sleep(0.01)
    latencies = [max(c.acked.values()) - start for c in fleet]
    for task in tasks:
        task.cancel()
    for channel in channels:
        await channel.close()
    return latencies, rss


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_server(workdir: Path) -> tuple[subprocess.Popen[bytes], Path, int]:
    config_path = workdir / "meshgate.yaml"
    config_path.write_text(yaml.safe_dump(mesh(0)))
    xds_port, http_port = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "meshgate.cli", "serve", "--config", str(config_path),
         "--xds-port", str(xds_port), "--http-port", str(http_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            import urllib.request
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    return server, config_path, xds_port


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def bench_fan_out(sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for clients in [1, *sizes]:
        with tempfile.TemporaryDirectory() as tmp:
            server, config_path, port = start_server(Path(tmp))
            try:
                idle = rss_kib(server.pid)
                latencies, rss = asyncio.run(fan_out(clients, server.pid, config_path, port))
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(10)
        out[clients] = {"p50_s": statistics.median(latencies),
                        "p99_s": percentile(latencies, 99), "max_s": max(latencies),
                        "rss_mib": rss / 1024, "idle_rss_mib": idle / 1024}
    return out


def bench_snapshot(routes: int = 10_000, clusters: int = 1_000) -> dict[str, float]:
    raw = mesh(0, listeners=10, clusters=clusters, routes_per_listener=routes // 10)
    config = from_dict(raw, source="bench", base_dir=REPO)
    server = translate.PluginServer("127.0.0.1", 18001)
    start = time.perf_counter()
    resources = translate.for_proxy(config, server, node_id="n", node_cluster="c")
    snapshot = Snapshot.build(resources)
    built = time.perf_counter() - start
    start = time.perf_counter()
    for by_name in resources.values():
        for message in by_name.values():
            r.pack(message).SerializeToString()
    plain = time.perf_counter() - start
    count = sum(len(v) for v in snapshot.resources.values())
    return {"build_s": built, "plain_serialise_s": plain, "resources": count}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    snap = bench_snapshot()
    print(f"snapshot, 10k routes + 1k clusters ({snap['resources']} resources): "
          f"build+version+serialise {snap['build_s']:.3f} s (target <= 1 s); "
          f"plain protobuf serialise of the same {snap['plain_serialise_s']:.3f} s; "
          f"ratio {snap['build_s'] / snap['plain_serialise_s']:.1f}x")
    results = bench_fan_out(args.clients)
    base = results[1]
    print(f"baseline, 1 client: config change -> ACKed in {base['p99_s'] * 1000:.0f} ms; "
          f"server RSS idle {base['idle_rss_mib']:.0f} MiB")
    for clients in args.clients:
        row = results[clients]
        print(f"{clients} clients: change -> all ACKed p50 {row['p50_s'] * 1000:.0f} ms, "
              f"p99 {row['p99_s'] * 1000:.0f} ms, max {row['max_s'] * 1000:.0f} ms "
              f"({row['p99_s'] / base['p99_s']:.1f}x the 1-client baseline); "
              f"server RSS {row['rss_mib']:.0f} MiB "
              f"({row['rss_mib'] / row['idle_rss_mib']:.1f}x idle)")
    print(json.dumps({"snapshot": snap, "fan_out": results}))


if __name__ == "__main__":
    os.chdir(REPO)
    main()
