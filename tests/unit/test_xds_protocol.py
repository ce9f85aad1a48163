"""The ADS state machine, driven request by request, without a network."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2 as d
from google.rpc import status_pb2

from meshgate.xds import resources as r
from meshgate.xds.protocol import ProxyStream
from meshgate.xds.snapshot import Snapshot, SotwBodyCache


def snap(clusters: list[str], routes: str = "rc", endpoint_port: int = 1) -> Snapshot:
    return Snapshot.build({
        r.CLUSTER: {c: cluster_pb2.Cluster(name=c, type=cluster_pb2.Cluster.EDS)
                    for c in clusters},
        r.ENDPOINT: {c: endpoint_pb2.ClusterLoadAssignment(cluster_name=f"{c}:{endpoint_port}")
                     for c in clusters},
        r.LISTENER: {"l": listener_pb2.Listener(name="l", stat_prefix=routes)},
        r.ROUTE: {routes: route_pb2.RouteConfiguration(name=routes,
                                                       validate_clusters={"value": True})},
        r.EXTENSION_CONFIG: {},
    })


def sotw(stream: ProxyStream, type_url: str, names: list[str] = (), version: str = "",  # type: ignore[assignment]
         nonce: str = "", error: str = "") -> list[d.DiscoveryResponse]:
    request = d.DiscoveryRequest(type_url=type_url, resource_names=list(names),
                                 version_info=version, response_nonce=nonce)
    if error:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return [d.DiscoveryResponse.FromString(b) for b in stream.on_request(request)]


def names(response: d.DiscoveryResponse) -> list[str]:
    out = []
    for packed in response.resources:
        kind = {r.CLUSTER: cluster_pb2.Cluster, r.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
                r.LISTENER: listener_pb2.Listener, r.ROUTE: route_pb2.RouteConfiguration}[
            packed.type_url]()
        packed.Unpack(kind)
        out.append(getattr(kind, "name", "") or kind.cluster_name.split(":")[0])
    return out


def ack(stream: ProxyStream, response: d.DiscoveryResponse, names_: list[str] = ()  # type: ignore[assignment]
        ) -> list[d.DiscoveryResponse]:
    return sotw(stream, response.type_url, names_, response.version_info, response.nonce)


def new_stream(snapshot: Snapshot, delta: bool = False) -> ProxyStream:
    return ProxyStream(snapshot, delta=delta, bodies=SotwBodyCache())


def test_wildcard_cds_then_named_eds_then_ack() -> None:
    stream = new_stream(snap(["a", "b"]))
    [cds] = sotw(stream, r.CLUSTER)
    assert names(cds) == ["a", "b"] and cds.version_info and cds.nonce
    assert ack(stream, cds) == []
    [eds] = sotw(stream, r.ENDPOINT, ["a"])
    assert names(eds) == ["a"]
    assert stream.type_status()["CDS"]["state"] == "ACKED"
    assert stream.type_status()["EDS"]["state"] == "SENT"


def test_nack_is_recorded_and_not_resent_until_config_changes() -> None:
    stream = new_stream(snap(["a"]))
    [lds] = sotw(stream, r.LISTENER)
    assert sotw(stream, r.LISTENER, nonce=lds.nonce, error="bad listener l") == []
    status = stream.type_status()["LDS"]
    assert status["state"] == "NACKED" and status["last_nack"]["error"] == "bad listener l"
    assert status["last_nack"]["resources"] == ["l"]
    assert sotw(stream, r.LISTENER, nonce=lds.nonce, error="bad listener l") == []
    assert stream.type_status()["LDS"]["responses"] == 1
    pushed = stream.on_snapshot(snap(["a"], routes="rc2"))
    assert [d.DiscoveryResponse.FromString(b).type_url for b in pushed] == [r.LISTENER]


def test_stale_nonce_is_ignored_in_sotw() -> None:
    stream = new_stream(snap(["a"]))
    [first] = sotw(stream, r.CLUSTER)
    [second] = [d.DiscoveryResponse.FromString(b) for b in stream.on_snapshot(snap(["a", "b"]))]
    assert sotw(stream, r.CLUSTER, version=first.version_info, nonce=first.nonce,
                error="late nack of the old one") == []
    assert "last_nack" not in stream.type_status()["CDS"]
    assert ack(stream, second) == []
    assert stream.type_status()["CDS"]["state"] == "ACKED"


def test_resources_requested_before_they_exist_are_pushed_when_they_appear() -> None:
    stream = new_stream(snap(["a"]))
    assert sotw(stream, r.ENDPOINT, ["later"]) == []
    [pushed] = [d.DiscoveryResponse.FromString(b) for b in stream.on_snapshot(snap(["a", "later"]))]
    assert pushed.type_url == r.ENDPOINT and names(pushed) == ["later"]


def test_sotw_reconnect_with_current_version_gets_no_response() -> None:
    first = new_stream(snap(["a"]))
    [cds] = sotw(first, r.CLUSTER)
    again = new_stream(snap(["a"]))
    assert sotw(again, r.CLUSTER, version=cds.version_info) == []
    assert again.type_status()["CDS"]["state"] == "ACKED"
    other = new_stream(snap(["a", "b"]))
    [fresh] = sotw(other, r.CLUSTER, version=cds.version_info)
    assert names(fresh) == ["a", "b"] and fresh.version_info != cds.version_info


def test_routing_waits_for_new_clusters_and_removed_clusters_retire_after_routes_ack() -> None:
    stream = new_stream(snap(["old"], routes="rc"))
    for type_url, subscribed in ((r.CLUSTER, []), (r.ENDPOINT, ["old"]), (r.LISTENER, []),
                                 (r.ROUTE, ["rc"])):
        [response] = sotw(stream, type_url, subscribed)
        ack(stream, response, subscribed)
    pushed = [d.DiscoveryResponse.FromString(b) for b in stream.on_snapshot(snap(["new"], "rc2"))]
    # Clusters go first, still carrying the one the live routes use; routing is held.
    assert [p.type_url for p in pushed] == [r.CLUSTER, r.ENDPOINT]
    assert names(pushed[0]) == ["new", "old"]
    assert ack(stream, pushed[0]) == []  # no endpoints sent for "new" yet: routes still held
    eds, lds, rds = sotw(stream, r.ENDPOINT, ["new", "old"], nonce=pushed[1].nonce)
    assert sorted(names(eds)) == ["new", "old"]
    assert (lds.type_url, rds.type_url) == (r.LISTENER, r.ROUTE)
    assert ack(stream, lds) == []
    [rds2] = sotw(stream, r.ROUTE, ["rc2"], nonce=rds.nonce)
    final_cds, final_eds = ack(stream, rds2, ["rc2"])
    assert final_cds.type_url == r.CLUSTER and names(final_cds) == ["new"]
    assert final_eds.type_url == r.ENDPOINT and names(final_eds) == ["new"]


def test_eds_is_resent_after_cds_push_even_if_unchanged() -> None:
    stream = new_stream(snap(["a"]))
    [cds] = sotw(stream, r.CLUSTER)
    ack(stream, cds)
    [eds] = sotw(stream, r.ENDPOINT, ["a"])
    ack(stream, eds, ["a"])
    pushed = [d.DiscoveryResponse.FromString(b) for b in stream.on_snapshot(snap(["a", "b"]))]
    # A changed CDS makes Envoy re-warm clusters, which wait for an EDS response.
    assert [p.type_url for p in pushed] == [r.CLUSTER, r.ENDPOINT]
    assert names(pushed[1]) == ["a"] and pushed[1].version_info == eds.version_info


# -- delta ---------------------------------------------------------------------------------

def delta(stream: ProxyStream, type_url: str, subscribe: list[str] = (),  # type: ignore[assignment]
          unsubscribe: list[str] = (), nonce: str = "", error: str = "",  # type: ignore[assignment]
          initial: dict[str, str] | None = None) -> list[d.DeltaDiscoveryResponse]:
    request = d.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=list(subscribe),
                                      resource_names_unsubscribe=list(unsubscribe),
                                      response_nonce=nonce,
                                      initial_resource_versions=initial or {})
    if error:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return [d.DeltaDiscoveryResponse.FromString(b) for b in stream.on_request(request)]


def test_delta_sends_only_changes_and_removals() -> None:
    stream = new_stream(snap(["a", "b"]), delta=True)
    [first] = delta(stream, r.CLUSTER)
    assert sorted(x.name for x in first.resources) == ["a", "b"]
    delta(stream, r.CLUSTER, nonce=first.nonce)
    pushed = [d.DeltaDiscoveryResponse.FromString(b) for b in stream.on_snapshot(snap(["a", "c"]))]
    assert [x.name for x in pushed[0].resources] == ["c"]
    assert list(pushed[0].removed_resources) == ["b"]


def test_delta_initial_resource_versions_skip_what_the_proxy_has() -> None:
    snapshot = snap(["a", "b"])
    versions = {n: v.version for n, v in snapshot.of_type(r.CLUSTER).items()}
    stream = new_stream(snapshot, delta=True)
    assert delta(stream, r.CLUSTER, initial=versions) == []
    assert stream.type_status()["CDS"]["state"] == "ACKED"
    stale = new_stream(snapshot, delta=True)
    [response] = delta(stale, r.CLUSTER, initial={"a": versions["a"], "gone": "x"})
    assert [x.name for x in response.resources] == ["b"]
    assert list(response.removed_resources) == ["gone"]


def test_delta_stale_nonce_still_applies_subscriptions_and_nack_is_recorded() -> None:
    stream = new_stream(snap(["a", "b"]), delta=True)
    [eds] = delta(stream, r.ENDPOINT, ["a"])
    [more] = delta(stream, r.ENDPOINT, ["b"], nonce="999")
    assert [x.name for x in more.resources] == ["b"]
    assert delta(stream, r.ENDPOINT, nonce=eds.nonce, error="endpoint a is bad") == []
    assert stream.type_status()["EDS"]["last_nack"]["resources"] == ["a"]
    # Re-subscribing to a known resource asks for it again (warming clusters do this).
    [again] = delta(stream, r.ENDPOINT, ["a"], nonce=more.nonce)
    assert [x.name for x in again.resources] == ["a"]


def test_large_updates_are_split_below_the_message_limit() -> None:
    snapshot = snap([f"c{i}" for i in range(40)])
    limit = 600
    stream = ProxyStream(snapshot, delta=True, bodies=SotwBodyCache(), max_bytes=limit)
    responses = stream.on_request(d.DeltaDiscoveryRequest(type_url=r.ENDPOINT,
                                                          resource_names_subscribe=["*"]))
    assert len(responses) > 1 and all(len(b) <= limit + 200 for b in responses)
    names_sent = [x.name for b in responses
                  for x in d.DeltaDiscoveryResponse.FromString(b).resources]
    assert sorted(names_sent) == sorted(f"c{i}" for i in range(40))
    sotw_stream = ProxyStream(snapshot, delta=False, bodies=SotwBodyCache(), max_bytes=limit)
    parts = sotw_stream.on_request(d.DiscoveryRequest(
        type_url=r.ENDPOINT, resource_names=[f"c{i}" for i in range(40)]))
    assert len(parts) > 1
    # CDS is full-state in SotW: never split, or the proxy would delete clusters.
    [whole] = sotw_stream.on_request(d.DiscoveryRequest(type_url=r.CLUSTER))
    assert len(d.DiscoveryResponse.FromString(whole).resources) == 40
