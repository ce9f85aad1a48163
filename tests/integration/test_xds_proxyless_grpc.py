"""A grpcio client dialling `xds:///greeter` gets its config from meshgate and reaches a
real gRPC backend; it is never sent an HTTP filter it would reject."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from tests.support.ports import free_port
from tests.support.stack import Stack

METHOD = "/meshgate.test.Echo/Say"

CLIENT = textwrap.dedent(f"""
    import grpc, sys
    with grpc.insecure_channel("xds:///greeter") as channel:
        say = channel.unary_unary("{METHOD}")
        for i in range(3):
            print(say(b"ping-%d" % i, timeout=20).decode(), flush=True)
""")


@pytest.fixture
def grpc_backend() -> Iterator[int]:
    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"backend says " + request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "meshgate.test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


def test_grpc_xds_client_reaches_backend(tmp_path: Path, grpc_backend: int) -> None:
    config = {
        "listeners": [{"name": "ingress", "port": free_port(), "plugins": ["noop"],
                       "routes": [{"prefix": "/", "cluster": "greeter-backend"}]}],
        "clusters": [{"name": "greeter-backend", "http2": True,
                      "endpoints": [f"127.0.0.1:{grpc_backend}"]}],
        "plugins": [{"name": "noop", "wasm": str(tmp_path / "noop.wasm")}],
        "grpc_services": [{"name": "greeter", "cluster": "greeter-backend", "timeout": "10s"}],
    }
    # The smallest module that is a WebAssembly binary; it is served, never run here.
    (tmp_path / "noop.wasm").write_bytes(b"\0asm\x01\0\0\0")
    with Stack(tmp_path, config) as stack:
        bootstrap = tmp_path / "grpc-bootstrap.json"
        bootstrap.write_text(json.dumps({
            "xds_servers": [{"server_uri": f"127.0.0.1:{stack.xds_port}",
                             "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": "grpc-client-0", "cluster": "grpc-clients"},
        }))
        env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap)}
        done = subprocess.run([sys.executable, "-c", CLIENT], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split("\n")[:3] == [f"backend says ping-{i}" for i in range(3)]
        connected = [line for line in stack.server_log().splitlines()
                     if "proxy grpc-client-0" in line and "connected" in line]
        assert connected and "gRPC" in connected[0]
