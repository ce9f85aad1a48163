from __future__ import annotations

from pathlib import Path

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from google.protobuf import any_pb2

from meshgate.xds import resources as r
from meshgate.xds.config import from_dict
from meshgate.xds.server import ControlServer, ServerAddress


def test_plugin_binaries_are_advertised_at_the_advertise_host(tmp_path: Path) -> None:
    (tmp_path / "p.wasm").write_bytes(b"\0asm\x01\0\0\0")
    config = from_dict({
        "listeners": [{"name": "l", "port": 1, "plugins": ["p"],
                       "routes": [{"prefix": "/", "cluster": "c"}]}],
        "clusters": [{"name": "c", "endpoints": ["127.0.0.1:2"]}],
        "plugins": [{"name": "p", "wasm": "p.wasm"}],
    }, source="t", base_dir=tmp_path)
    server = ControlServer(config, ServerAddress("0.0.0.0", 1, 18001, "10.1.2.3"))
    snapshot = server.cache.snapshot_for(base_pb2.Node(id="e", cluster="envoy"))
    cluster = cluster_pb2.Cluster()
    any_pb2.Any.FromString(snapshot.of_type(r.CLUSTER)["meshgate_plugins"].any_bytes) \
        .Unpack(cluster)
    address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert (address.socket_address.address, address.socket_address.port_value) == (
        "10.1.2.3", 18001)
    assert server.plugins.get(config.plugins[0].sha256) == b"\0asm\x01\0\0\0"
