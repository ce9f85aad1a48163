"""The declarative config model: `meshgate.yaml` parsed, validated and resolved.

This module knows nothing of Envoy or gRPC. Errors name the field (as a dotted path) and
the reason, so an operator can fix the file without reading code.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DEFAULT_CONFIG_NAME = "default.yaml"


class ConfigError(ValueError):
    """A config that cannot be served; the message names the source, field and reason."""


@dataclass(frozen=True)
class HeaderMatch:
    name: str
    exact: str | None = None
    present: bool | None = None


@dataclass(frozen=True)
class Route:
    name: str
    cluster: str
    prefix: str | None = None
    path: str | None = None
    headers: tuple[HeaderMatch, ...] = ()
    timeout_s: float | None = None
    prefix_rewrite: str | None = None


@dataclass(frozen=True)
class Listener:
    name: str
    address: str
    port: int
    routes: tuple[Route, ...]
    plugins: tuple[str, ...] = ()
    request_timeout_s: float | None = None
    request_headers_timeout_s: float | None = None


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


@dataclass(frozen=True)
class Cluster:
    name: str
    endpoints: tuple[Endpoint, ...]
    lb_policy: str = "round_robin"
    connect_timeout_s: float = 1.0
    http2: bool = False


@dataclass(frozen=True)
class Plugin:
    name: str
    wasm_path: Path
    wasm: bytes = field(repr=False)
    sha256: str
    configuration: str
    root_id: str
    vm_id: str
    fail_open: bool


@dataclass(frozen=True)
class GrpcService:
    """A target that proxyless gRPC clients dial as `xds:///<name>`."""

    name: str
    cluster: str
    timeout_s: float | None = None


@dataclass(frozen=True)
class NodeSelector:
    """Which listeners a proxy gets, chosen by node id and/or node cluster."""

    listeners: tuple[str, ...]
    node_id: str | None = None
    node_cluster: str | None = None
    ports: tuple[tuple[str, int], ...] = ()

    def matches(self, node_id: str, node_cluster: str) -> bool:
        if self.node_id is not None and self.node_id != node_id:
            return False
        return self.node_cluster is None or self.node_cluster == node_cluster


@dataclass(frozen=True)
class MeshConfig:
    listeners: tuple[Listener, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    plugins: tuple[Plugin, ...] = ()
    grpc_services: tuple[GrpcService, ...] = ()
    nodes: tuple[NodeSelector, ...] = ()
    source: str = "<memory>"

    def plugin(self, name: str) -> Plugin:
        return next(p for p in self.plugins if p.name == name)

    def selector_for(self, node_id: str, node_cluster: str) -> NodeSelector | None:
        """The first matching `nodes:` entry; None means the node gets every listener."""
        return next((s for s in self.nodes if s.matches(node_id, node_cluster)), None)


_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m)$")
_SCHEMA: dict[str, Any] | None = None


def _schema() -> dict[str, Any]:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = json.loads(resources.files("meshgate.xds").joinpath("schema.json").read_text())
    return _SCHEMA


def parse_duration(text: str) -> float:
    number, unit = _DURATION.match(text).groups()  # type: ignore[union-attr]
    return float(number) * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def load_file(path: Path) -> MeshConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return load_text(text, source=str(path), base_dir=path.parent)


def load_default() -> MeshConfig:
    """The embedded demo config; plugin paths are relative to the current directory."""
    text = resources.files("meshgate.xds").joinpath(DEFAULT_CONFIG_NAME).read_text()
    return load_text(text, source="<embedded default>", base_dir=Path.cwd())


def load_text(text: str, *, source: str, base_dir: Path) -> MeshConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or exc
        raise ConfigError(f"{source}{where}: not valid YAML: {reason}") from exc
    return from_dict(raw if raw is not None else {}, source=source, base_dir=base_dir)


def from_dict(raw: Any, *, source: str, base_dir: Path) -> MeshConfig:
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(_schema()).iter_errors(raw)
    )
    if error is not None:
        raise ConfigError(f"{source}: {_path(error.absolute_path)}: {error.message}")
    config = MeshConfig(
        listeners=tuple(
            _listener(item, i, source) for i, item in enumerate(raw.get("listeners", []))
        ),
        clusters=tuple(_cluster(item) for item in raw.get("clusters", [])),
        plugins=tuple(
            _plugin(item, i, source, base_dir) for i, item in enumerate(raw.get("plugins", []))
        ),
        grpc_services=tuple(_grpc_service(item) for item in raw.get("grpc_services", [])),
        nodes=tuple(_node(item) for item in raw.get("nodes", [])),
        source=source,
    )
    _check_references(config, source)
    return config


def _route(raw: dict[str, Any], index: int, where: str) -> Route:
    if ("prefix" in raw) == ("path" in raw):
        raise ConfigError(f"{where}.routes[{index}]: give exactly one of 'prefix' or 'path'")
    return Route(
        name=raw.get("name", f"route-{index}"),
        cluster=raw["cluster"],
        prefix=raw.get("prefix"),
        path=raw.get("path"),
        headers=tuple(HeaderMatch(h["name"].lower(), h.get("exact"), h.get("present"))
                      for h in raw.get("headers", [])),
        timeout_s=parse_duration(raw["timeout"]) if "timeout" in raw else None,
        prefix_rewrite=raw.get("prefix_rewrite"),
    )


def _listener(raw: dict[str, Any], index: int, source: str) -> Listener:
    return Listener(
        name=raw["name"],
        address=raw.get("address", "127.0.0.1"),
        port=raw["port"],
        routes=tuple(_route(r, i, f"{source}: listeners[{index}]")
                     for i, r in enumerate(raw["routes"])),
        plugins=tuple(raw.get("plugins", [])),
        request_timeout_s=(
            parse_duration(raw["request_timeout"]) if "request_timeout" in raw else None
        ),
        request_headers_timeout_s=(
            parse_duration(raw["request_headers_timeout"])
            if "request_headers_timeout" in raw else None
        ),
    )


def _cluster(raw: dict[str, Any]) -> Cluster:
    endpoints = []
    for text in raw["endpoints"]:
        host, port = text.rsplit(":", 1)
        endpoints.append(Endpoint(host, int(port)))
    return Cluster(
        name=raw["name"],
        endpoints=tuple(endpoints),
        lb_policy=raw.get("lb_policy", "round_robin"),
        connect_timeout_s=parse_duration(raw.get("connect_timeout", "1s")),
        http2=raw.get("http2", False),
    )


def _plugin(raw: dict[str, Any], index: int, source: str, base_dir: Path) -> Plugin:
    path = Path(raw["wasm"])
    if not path.is_absolute():
        path = base_dir / path
    try:
        wasm = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{source}: plugins[{index}].wasm: cannot read {path}: {exc.strerror}"
        ) from exc
    if not wasm.startswith(b"\0asm"):
        raise ConfigError(f"{source}: plugins[{index}].wasm: {path} is not a WebAssembly binary")
    config = raw.get("config", {})
    return Plugin(
        name=raw["name"],
        wasm_path=path,
        wasm=wasm,
        sha256=hashlib.sha256(wasm).hexdigest(),
        configuration=config if isinstance(config, str) else json.dumps(config, sort_keys=True),
        root_id=raw.get("root_id", raw["name"]),
        vm_id=raw.get("vm_id", raw["name"]),
        fail_open=raw.get("failure_policy", "fail_closed") == "fail_open",
    )


def _grpc_service(raw: dict[str, Any]) -> GrpcService:
    timeout = raw.get("timeout")
    return GrpcService(raw["name"], raw["cluster"], parse_duration(timeout) if timeout else None)


def _node(raw: dict[str, Any]) -> NodeSelector:
    return NodeSelector(
        listeners=tuple(raw["listeners"]),
        node_id=raw.get("id"),
        node_cluster=raw.get("cluster"),
        ports=tuple(sorted(raw.get("ports", {}).items())),
    )


def _duplicates(names: list[str]) -> list[str]:
    return sorted({n for n in names if names.count(n) > 1})


def _check_references(config: MeshConfig, source: str) -> None:
    problems: list[str] = []
    for kind, items in (("listeners", config.listeners), ("clusters", config.clusters),
                        ("plugins", config.plugins), ("grpc_services", config.grpc_services)):
        for name in _duplicates([item.name for item in items]):
            problems.append(f"{kind}: name '{name}' is used more than once")
    clusters = {c.name for c in config.clusters}
    plugins = {p.name for p in config.plugins}
    listeners = {item.name for item in config.listeners}
    for i, listener in enumerate(config.listeners):
        for j, route in enumerate(listener.routes):
            if route.cluster not in clusters:
                problems.append(f"listeners[{i}].routes[{j}].cluster: no cluster named "
                                f"'{route.cluster}'")
        for j, plugin in enumerate(listener.plugins):
            if plugin not in plugins:
                problems.append(f"listeners[{i}].plugins[{j}]: no plugin named '{plugin}'")
    for i, service in enumerate(config.grpc_services):
        if service.cluster not in clusters:
            problems.append(f"grpc_services[{i}].cluster: no cluster named '{service.cluster}'")
    for i, node in enumerate(config.nodes):
        if node.node_id is None and node.node_cluster is None:
            problems.append(f"nodes[{i}]: give 'id' or 'cluster' (or both) to select proxies")
        for name in node.listeners:
            if name not in listeners:
                problems.append(f"nodes[{i}].listeners: no listener named '{name}'")
        for name, _ in node.ports:
            if name not in node.listeners:
                problems.append(f"nodes[{i}].ports.{name}: not one of this entry's listeners")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
