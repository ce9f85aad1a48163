"""Conformance harness: the same request through real Envoy 1.40 and through meshgate's
sidecar, both configured by one meshgate control server with the same plugins, and a
comparison of what a client sees.

    with ConformancePlanes(tmp_path, listeners, plugins) as planes:
        envoy, sidecar = planes.send("headers", Request(path="/hello"))
        assert_same(envoy, sidecar)

One `meshgate.yaml` holds every listener; Envoy (node cluster "envoy", matching no `nodes:`
entry) binds the listeners' own ports, the sidecar (node cluster "meshgate-sidecar") binds
the ports its `nodes:` entry gives. Each listener's route goes to one deterministic
upstream (`ConformanceUpstream`) and may be named for plugin callouts.

What the comparison drops, and why (everything else must be equal, names lowercased):

response headers
  - `date`: a clock reading, differs by construction.
  - `server`: each proxy names itself (`envoy` vs the sidecar's own), and the upstream's
    `server` header is replaced by Envoy; what the proxy calls itself is not plugin
    behaviour.
  - `x-envoy-*` (e.g. `x-envoy-upstream-service-time`): Envoy-internal timing/debugging,
    which the sidecar does not claim to emulate.
  - `x-meshgate-error`: the sidecar's own diagnostic header on replies it makes itself
    (e.g. `wasm_fail_stream` on a plugin's fail-closed 503), the counterpart of Envoy's
    response-code details, which Envoy keeps in its access log. Each proxy's own
    namespace is dropped alike; decision 0400 records it.
  - `x-request-id`: a random id per request.
  - hop-by-hop headers (`connection`, `keep-alive`, `transfer-encoding`, `te`, `trailer`,
    `upgrade`, `proxy-authenticate`, `proxy-authorization`, RFC 9110 §7.6.1): they
    describe one connection, not the message; a proxy may reframe a body (chunked vs
    length) as it likes.
  - `content-length` only when the bodies are equal: then it carries no information beyond
    the framing choice above. When bodies differ it is kept, so the diff shows it.

request headers as the upstream saw them (the upstream echoes them in its JSON body)
  - `host`: each plane listens on its own port, so `host: 127.0.0.1:<port>` differs by
    construction.
  - `x-request-id`, `x-envoy-*`, `x-forwarded-proto`: added by Envoy for its own routing
    and tracing; `x-forwarded-for`: the sidecar appends the client address and Envoy, as
    meshgate configures it, does not (a data-path difference, not a plugin one; pinned
    by `test_conformance_forwarding.py` and recorded in decision 0400);
    `traceparent`/`tracestate`: the planes' own spans; hop-by-hop and framing headers
    (`content-length`, `transfer-encoding`) as above: the sidecar re-frames a request body
    as chunked where Envoy keeps the client's content-length, so the upstream reads
    both (also recorded in decision 0400). What the *plugins* add or remove stays in the
    comparison.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support import http
from tests.support.ports import distinct_free_ports
from tests.support.stack import SIDECAR_CLUSTER, EnvoyHandle, SidecarHandle, Stack

HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer",
                        "upgrade", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection"})
DROPPED_RESPONSE = frozenset({"date", "server", "x-request-id",
                              "x-meshgate-error"}) | HOP_BY_HOP
DROPPED_UPSTREAM_REQUEST = frozenset({"host", "x-request-id", "x-forwarded-proto",
                                      "x-forwarded-for", "traceparent", "tracestate",
                                      "content-length"}) | HOP_BY_HOP


# -- the upstream ---------------------------------------------------------------------

class ConformanceUpstream:
    """A deterministic upstream on loopback (a thread; blocking tests can use it).

    - `GET /bytes/<n>`: n bytes (httpbin's shape): `next_bytes` if set, else random;
      sent after `bytes_delay_s` (a slow callout target).
    - `/say/<text>?repeat=N`: `text/plain` body, the text N times (for body rewriting).
    - `/status/<code>`: that status with a small JSON body.
    - `/reset`: the connection closed after the request is read, with no response.
    - anything else: JSON `{method, path, body_bytes, headers}` where `headers` are the
      request headers it received minus `DROPPED_UPSTREAM_REQUEST` and `x-envoy-*`.

    `seen` keeps every request's raw headers, so a test can show what a plane added.
    """

    def __init__(self) -> None:
        self.next_bytes: bytes | None = None
        self.bytes_delay_s = 0.0
        self.seen: list[dict[str, str]] = []
        self._lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                upstream._answer(self)

            do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ConformanceUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @staticmethod
    def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
        if "chunked" in handler.headers.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(handler.rfile.read(size))
                handler.rfile.readline()
        length = int(handler.headers.get("content-length") or 0)
        return handler.rfile.read(length) if length else b""

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        body = self._read_body(handler)
        headers = {k.lower(): v for k, v in handler.headers.items()}
        with self._lock:
            self.seen.append(headers)
        url = urlsplit(handler.path)
        if url.path == "/reset":
            handler.close_connection = True
            return
        status, content_type, payload = 200, "application/json", b""
        if url.path.startswith("/bytes/"):
            count = int(url.path.rsplit("/", 1)[1])
            with self._lock:
                chosen, delay = self.next_bytes, self.bytes_delay_s
            time.sleep(delay)
            payload = chosen if chosen is not None else random.randbytes(count)
            content_type = "application/octet-stream"
        elif url.path.startswith("/say/"):
            repeat = int(parse_qs(url.query).get("repeat", ["1"])[0])
            payload = (url.path[len("/say/"):] + "\n").encode() * repeat
            content_type = "text/plain"
        elif url.path.startswith("/status/"):
            status = int(url.path.rsplit("/", 1)[1])
            payload = json.dumps({"status": status}).encode()
        else:
            kept = {k: v for k, v in sorted(headers.items())
                    if k not in DROPPED_UPSTREAM_REQUEST and not k.startswith("x-envoy-")}
            payload = json.dumps({"method": handler.command, "path": handler.path,
                                  "body_bytes": len(body), "headers": kept},
                                 sort_keys=True).encode()
        handler.send_response(status)
        handler.send_header("content-type", content_type)
        handler.send_header("x-upstream", "conformance")
        handler.send_header("content-length", str(len(payload)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(payload)


# -- what a client sees ---------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    path: str = "/"
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None


@dataclass(frozen=True)
class Observed:
    """A reply reduced to what the comparison looks at (see the module docstring)."""

    status: int
    headers: dict[str, str]
    body: bytes
    raw_headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def normalise(reply: http.Reply, *, keep_content_length: bool) -> Observed:
    headers = {}
    for name, value in reply.headers.items():
        key = name.lower()
        if key in DROPPED_RESPONSE or key.startswith("x-envoy-"):
            continue
        if key == "content-length" and not keep_content_length:
            continue
        headers[key] = value
    return Observed(reply.status, dict(sorted(headers.items())), reply.body, dict(reply.headers))


def compare(envoy: http.Reply, sidecar: http.Reply) -> tuple[Observed, Observed]:
    same_body = envoy.body == sidecar.body
    return (normalise(envoy, keep_content_length=not same_body),
            normalise(sidecar, keep_content_length=not same_body))


def assert_same(envoy: Observed, sidecar: Observed, what: str = "") -> None:
    """Status, normalised headers and body must be identical; the message shows both."""
    problems = []
    if envoy.status != sidecar.status:
        problems.append(f"status: envoy {envoy.status}, sidecar {sidecar.status}")
    for name in sorted(set(envoy.headers) | set(sidecar.headers)):
        a, b = envoy.headers.get(name), sidecar.headers.get(name)
        if a != b:
            problems.append(f"header {name!r}: envoy {a!r}, sidecar {b!r}")
    if envoy.body != sidecar.body:
        problems.append(f"body: envoy {envoy.body[:300]!r}, sidecar {sidecar.body[:300]!r}")
    assert not problems, f"{what}: Envoy and the sidecar differ:\n  " + "\n  ".join(problems)


# -- both planes ----------------------------------------------------------------------

@dataclass(frozen=True)
class ListenerSpec:
    name: str
    plugins: list[str]
    route_timeout: str = "5s"
    # The conformance upstream, unless a test names one of its extra clusters.
    cluster: str = "conformance"
    # Listener timeouts (meshgate.yaml durations), when a test sets them.
    request_timeout: str | None = None
    request_headers_timeout: str | None = None


def planes_config(listeners: list[ListenerSpec], plugins: list[dict[str, Any]],
                  upstream_port: int, extra_clusters: dict[str, int] | None = None
                  ) -> tuple[dict[str, Any], dict[str, int]]:
    """A meshgate.yaml for both planes; returns it and listener -> sidecar port."""
    ports = distinct_free_ports(2 * len(listeners), avoid={upstream_port})
    envoy_ports = {item.name: ports.pop() for item in listeners}
    sidecar_ports = {item.name: ports.pop() for item in listeners}
    clusters = [{"name": "conformance", "endpoints": [f"127.0.0.1:{upstream_port}"],
                 "connect_timeout": "1s"}]
    for name, port in (extra_clusters or {}).items():
        clusters.append({"name": name, "endpoints": [f"127.0.0.1:{port}"],
                         "connect_timeout": "1s"})
    config: dict[str, Any] = {
        "listeners": [
            {"name": item.name, "port": envoy_ports[item.name], "plugins": item.plugins,
             "routes": [{"name": "all", "prefix": "/", "cluster": item.cluster,
                         "timeout": item.route_timeout}],
             **({"request_timeout": item.request_timeout} if item.request_timeout else {}),
             **({"request_headers_timeout": item.request_headers_timeout}
                if item.request_headers_timeout else {})}
            for item in listeners
        ],
        "clusters": clusters,
        "plugins": plugins,
        "nodes": [{"cluster": SIDECAR_CLUSTER, "listeners": [x.name for x in listeners],
                   "ports": sidecar_ports}],
    }
    return config, sidecar_ports


class ConformancePlanes:
    """A control server, one Envoy and one sidecar, all configured from one meshgate.yaml."""

    def __init__(self, tmp_path: Path, listeners: list[ListenerSpec],
                 plugins: list[dict[str, Any]], upstream: ConformanceUpstream,
                 extra_clusters: dict[str, int] | None = None,
                 envoy_args: tuple[str, ...] = ()) -> None:
        self.config, self.sidecar_ports = planes_config(listeners, plugins, upstream.port,
                                                        extra_clusters)
        self.upstream = upstream
        self.stack = Stack(tmp_path, self.config)
        self.envoy_args = envoy_args
        self.envoy: EnvoyHandle | None = None
        self.sidecar: SidecarHandle | None = None

    def __enter__(self) -> ConformancePlanes:
        self.stack.__enter__()
        try:
            self.sidecar = self.stack.start_sidecar("conformance-sidecar")
            self.envoy = self.stack.start_envoy("conformance-envoy", extra_args=self.envoy_args)
            self.stack.wait_converged()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None = None,
                 exc: BaseException | None = None, tb: TracebackType | None = None) -> None:
        self.stack.__exit__(exc_type, exc, tb)

    def envoy_url(self, listener: str) -> str:
        return self.stack.url(listener)

    def sidecar_url(self, listener: str) -> str:
        return self.stack.url(listener, "sidecar")

    def send_raw(self, listener: str, req: Request) -> tuple[http.Reply, http.Reply]:
        def one(base: str) -> http.Reply:
            return http.request(base + req.path, req.method, dict(req.headers), req.body,
                                timeout=15)

        return one(self.envoy_url(listener)), one(self.sidecar_url(listener))

    def send(self, listener: str, req: Request) -> tuple[Observed, Observed]:
        return compare(*self.send_raw(listener, req))

    def logs(self) -> str:
        """Both planes' logs, for assertion messages."""
        envoy = self.envoy.log()[-4000:] if self.envoy else ""
        sidecar = self.sidecar.log()[-4000:] if self.sidecar else ""
        return f"--- envoy ---\n{envoy}\n--- sidecar ---\n{sidecar}"
