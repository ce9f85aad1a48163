"""Envoy bootstrap that fetches everything else from meshgate over ADS."""

from __future__ import annotations

from typing import Any


def envoy_bootstrap(
    *,
    node_id: str,
    node_cluster: str,
    xds_host: str,
    xds_port: int,
    admin_port: int,
    delta: bool = False,
) -> dict[str, Any]:
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": node_cluster},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "meshgate_xds"}}],
            },
            "lds_config": ads,
            "cds_config": ads,
        },
        "static_resources": {
            "clusters": [{
                "name": "meshgate_xds",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/"
                                 "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {
                            "connection_keepalive": {"interval": "10s", "timeout": "5s"}}},
                    }
                },
                "load_assignment": {
                    "cluster_name": "meshgate_xds",
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                        "socket_address": {"address": xds_host, "port_value": xds_port}}}}]}],
                },
            }]
        },
    }
