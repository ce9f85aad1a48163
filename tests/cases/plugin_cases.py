"""One table of (request -> expected response) cases for meshgate's plugins.

Plain data, no data plane in sight: the Envoy integration test and the sidecar's run the
same list. A case names a *scenario*: the plugins a listener runs, in order, with their
JSON configurations. Configurations and headers hold placeholders (`tests.cases.material`)
that become real keys and tokens at run time.

Upstream names used in configurations, which every data plane's harness must provide:
  "opa"       a real OPA server loaded with policies/authz.rego and policies/data.json
  "opa-down"  a loopback port where nothing listens
  "opa-slow"  an HTTP server that answers `{"result": true}` only after 2 seconds
  "jwks"      an HTTP server answering GET /.well-known/jwks.json with `Material.jwks()`
The route upstream is an echo server answering JSON {"headers": {...}, "path": ...}
with the request it received, which `Expect.upstream_headers` looks at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tests.cases.material import AUDIENCE, ISSUER, ApiKey, Bearer, Jwt

PRESENT = "<present>"  # in Expect.headers: the header must be there, any value


@dataclass(frozen=True)
class PluginUse:
    plugin: str  # "rate_limit" or "auth": the build output build/plugins/<plugin>.wasm
    config: dict[str, Any]


@dataclass(frozen=True)
class Request:
    method: str = "GET"
    path: str = "/"
    headers: dict[str, Any] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Expect:
    status: int
    # Response headers that must be there (value, or PRESENT) or absent (None).
    headers: dict[str, str | None] = field(default_factory=dict)
    # Keys that must appear in the JSON body with these values (a subset check).
    body_json: dict[str, Any] | None = None
    # Request headers as the upstream received them (value, PRESENT, or None: absent).
    upstream_headers: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    name: str
    scenario: str
    request: Request
    expect: Expect
    # Send the request this many times; the expectation is about the last response.
    repeat: int = 1


# -- scenarios ------------------------------------------------------------------------

_JWT = {
    "issuer": ISSUER,
    "audiences": [AUDIENCE],
    "jwks": "$jwks",
    "clock_skew_seconds": 30,
}
_API_KEYS = {
    "header": "x-api-key",
    "keys": [{"id": "ci-bot", "sha256": "$api-key-sha256:ci-bot"}],
}
_AUTH = {
    "jwt": _JWT,
    "api_keys": _API_KEYS,
    "forward_claims": {"sub": "x-meshgate-sub", "roles": "x-meshgate-roles"},
    "remove_credentials": True,
}


def _auth_with_opa(path: str, cluster: str = "opa", failure_mode: str = "closed",
                   timeout_ms: int = 1000) -> dict[str, Any]:
    return {**_AUTH, "opa": {"cluster": cluster, "path": path, "timeout_ms": timeout_ms,
                             "failure_mode": failure_mode}}


SCENARIOS: dict[str, list[PluginUse]] = {
    "rate-limit": [PluginUse("rate_limit", {"rules": [
        {"name": "per-client", "descriptors": [{"source": "header", "name": "x-client"}],
         "rate": {"tokens": 1, "per_seconds": 60}, "burst": 3},
        {"name": "per-address", "match": {"path_prefix": "/by-address"},
         "descriptors": [{"source": "remote_address"}, {"source": "path_prefix"}],
         "rate": {"tokens": 1, "per_seconds": 60}, "burst": 2},
    ]})],
    "jwt": [PluginUse("auth", _AUTH)],
    "jwks-uri": [PluginUse("auth", {
        "jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["RS256", "ES256"],
                "jwks_uri": {"cluster": "jwks", "path": "/.well-known/jwks.json",
                             "refresh_seconds": 60, "timeout_ms": 2000}},
        "forward_claims": {"sub": "x-meshgate-sub"},
    })],
    "opa-bool": [PluginUse("auth", _auth_with_opa("meshgate/authz/allow"))],
    "opa-object": [PluginUse("auth", _auth_with_opa("meshgate/authz/decision"))],
    "opa-down-closed": [PluginUse("auth", _auth_with_opa("meshgate/authz/allow", "opa-down"))],
    "opa-down-open": [
        PluginUse("auth", _auth_with_opa("meshgate/authz/allow", "opa-down", "open")),
    ],
    "opa-slow-closed": [
        PluginUse("auth", _auth_with_opa("meshgate/authz/allow", "opa-slow", timeout_ms=300)),
    ],
    "opa-slow-open": [
        PluginUse("auth", _auth_with_opa("meshgate/authz/allow", "opa-slow", "open", 300)),
    ],
    "auth-then-rate-limit": [
        PluginUse("auth", _AUTH),
        PluginUse("rate_limit", {"rules": [
            {"name": "per-subject",
             "descriptors": [{"source": "claim", "header": "x-meshgate-sub"}],
             "rate": {"tokens": 1, "per_seconds": 60}, "burst": 1},
        ]}),
    ],
}


# -- cases ----------------------------------------------------------------------------

def _bearer(**kw: Any) -> dict[str, Any]:
    return {"authorization": Bearer(Jwt(**kw))}


_UNAUTHORIZED = {"error": "unauthorized"}
_INVALID = 'Bearer realm="meshgate", error="invalid_token"'


def _rejected(name: str, reason: str, **jwt: Any) -> Case:
    return Case(name, "jwt", Request(path="/api/x", headers=_bearer(**jwt)),
                Expect(401, headers={"www-authenticate": PRESENT},
                       body_json={**_UNAUTHORIZED, "reason": reason}))


CASES: list[Case] = [
    # Rate limit: headers on allowed responses, 429 once the burst is spent.
    Case("rate-limit/allowed-carries-ratelimit-headers", "rate-limit",
         Request(path="/a", headers={"x-client": "c-headers"}),
         Expect(200, headers={"ratelimit-limit": "3", "ratelimit-remaining": "2",
                              "ratelimit-reset": "60", "retry-after": None})),
    Case("rate-limit/remaining-counts-down", "rate-limit",
         Request(path="/a", headers={"x-client": "c-countdown"}),
         Expect(200, headers={"ratelimit-remaining": "0", "ratelimit-reset": "180"}), repeat=3),
    Case("rate-limit/over-burst-is-429", "rate-limit",
         Request(path="/a", headers={"x-client": "c-over"}),
         Expect(429, headers={"retry-after": "60", "ratelimit-limit": "3",
                              "ratelimit-remaining": "0", "ratelimit-reset": "180",
                              "content-type": "application/json"},
                body_json={"error": "rate_limited", "rule": "per-client",
                           "retry_after_seconds": 60}), repeat=4),
    Case("rate-limit/clients-have-separate-buckets", "rate-limit",
         Request(path="/a", headers={"x-client": "c-other"}),
         Expect(200, headers={"ratelimit-remaining": "2"})),
    Case("rate-limit/no-descriptor-no-limit", "rate-limit", Request(path="/a"),
         Expect(200, headers={"ratelimit-limit": None}), repeat=5),
    Case("rate-limit/remote-address-and-prefix", "rate-limit", Request(path="/by-address/x"),
         Expect(429, headers={"retry-after": "60"}, body_json={"rule": "per-address"}), repeat=3),

    # JWT: valid tokens of every algorithm; claims forwarded, credentials removed.
    Case("jwt/rs256-valid", "jwt", Request(path="/api/x", headers=_bearer()),
         Expect(200, upstream_headers={"x-meshgate-sub": "alice", "authorization": None})),
    Case("jwt/es256-valid", "jwt",
         Request(path="/api/x", headers=_bearer(alg="ES256", kid="ec-1", claims={"sub": "erin"})),
         Expect(200, upstream_headers={"x-meshgate-sub": "erin"})),
    Case("jwt/hs256-valid", "jwt",
         Request(path="/api/x", headers=_bearer(alg="HS256", kid="hs-1", claims={"sub": "hal"})),
         Expect(200, upstream_headers={"x-meshgate-sub": "hal"})),
    Case("jwt/list-claim-forwarded-comma-joined", "jwt",
         Request(path="/api/x", headers=_bearer(claims={"roles": ["reader", "writer"]})),
         Expect(200, upstream_headers={"x-meshgate-roles": "reader,writer"})),
    Case("jwt/client-cannot-spoof-forwarded-claims", "jwt",
         Request(path="/api/x", headers={**_bearer(), "x-meshgate-sub": "mallory",
                                         "x-meshgate-roles": "admin"}),
         Expect(200, upstream_headers={"x-meshgate-sub": "alice", "x-meshgate-roles": None})),
    Case("jwt/expiry-inside-clock-skew-accepted", "jwt",
         Request(path="/api/x", headers=_bearer(exp_in=-10)), Expect(200)),
    _rejected("jwt/expired", "token expired", exp_in=-120),
    _rejected("jwt/nbf-in-future", "token not valid yet (nbf)", nbf_in=600),
    _rejected("jwt/missing-exp", "token has no exp claim", exp_in=None),
    _rejected("jwt/wrong-issuer", "issuer not accepted", claims={"iss": "https://evil.test"}),
    _rejected("jwt/wrong-audience", "audience not accepted", claims={"aud": "someone-else"}),
    _rejected("jwt/alg-none", "alg none is not accepted", alg="none", signer="unsigned"),
    _rejected("jwt/alg-confusion-rsa-public-key-as-hmac",
              'key "rsa-1" cannot verify HS256 (algorithm mismatch)',
              alg="HS256", kid="rsa-1", signer="rsa-public-as-hmac"),
    _rejected("jwt/unknown-kid", 'unknown kid "rsa-9"', kid="rsa-9"),
    _rejected("jwt/bad-base64", "malformed token: header is not base64url", mangle="bad-base64"),
    _rejected("jwt/oversize", "token larger than 8192 bytes", mangle="oversize"),
    Case("jwt/missing-token", "jwt", Request(path="/api/x"),
         Expect(401, headers={"www-authenticate": 'Bearer realm="meshgate"'},
                body_json={**_UNAUTHORIZED, "reason": "missing credentials"})),
    Case("jwt/not-bearer-scheme", "jwt",
         Request(path="/api/x", headers={"authorization": "Basic YWxpY2U6c2VjcmV0"}),
         Expect(401, headers={"www-authenticate": PRESENT},
                body_json={"reason": "authorization header is not a Bearer token"})),
    Case("jwt/error-challenge-names-the-problem", "jwt",
         Request(path="/api/x", headers=_bearer(exp_in=-120)),
         Expect(401, headers={
             "www-authenticate": _INVALID + ', error_description="token expired"'})),

    # API keys.
    Case("api-key/good", "jwt", Request(path="/api/x", headers={"x-api-key": ApiKey("ci-bot")}),
         Expect(200, upstream_headers={"x-meshgate-sub": "ci-bot", "x-api-key": None})),
    Case("api-key/unknown", "jwt",
         Request(path="/api/x", headers={"x-api-key": ApiKey("no-such-key")}),
         Expect(401, headers={"www-authenticate": PRESENT},
                body_json={**_UNAUTHORIZED, "reason": "API key not recognised"})),

    # JWKS fetched from a URL through the host's HTTP callout.
    Case("jwks-uri/rs256-valid", "jwks-uri", Request(path="/api/x", headers=_bearer()),
         Expect(200, upstream_headers={"x-meshgate-sub": "alice"})),
    Case("jwks-uri/es256-valid", "jwks-uri",
         Request(path="/api/x", headers=_bearer(alg="ES256", kid="ec-1")), Expect(200)),
    Case("jwks-uri/hs256-not-allowed", "jwks-uri",
         Request(path="/api/x", headers=_bearer(alg="HS256", kid="hs-1")),
         Expect(401, body_json={"reason": "alg HS256 is not allowed"})),

    # OPA: boolean decisions.
    Case("opa-bool/allow-reader", "opa-bool",
         Request(path="/api/items", headers=_bearer(claims={"roles": ["reader"]})),
         Expect(200, upstream_headers={"x-meshgate-sub": "alice"})),
    Case("opa-bool/deny-without-role", "opa-bool",
         Request(path="/api/items", headers=_bearer()),
         Expect(403, body_json={"error": "forbidden", "reason": "denied by policy"})),
    Case("opa-bool/deny-reader-writing", "opa-bool",
         Request(method="POST", path="/api/items", headers=_bearer(claims={"roles": ["reader"]}),
                 body=b'{"name": "x"}'),
         Expect(403)),
    Case("opa-bool/writer-scope-writes", "opa-bool",
         Request(method="DELETE", path="/api/items/1",
                 headers=_bearer(claims={"scope": "openid writer"})),
         Expect(200)),
    Case("opa-bool/api-key-reader", "opa-bool",
         Request(path="/api/items?page=2", headers={"x-api-key": ApiKey("ci-bot")}),
         Expect(200)),
    Case("opa-bool/unauthenticated-never-reaches-opa", "opa-bool", Request(path="/public/x"),
         Expect(401)),

    # OPA: object decisions (status, headers, body chosen by the policy).
    Case("opa-object/allow-adds-request-headers", "opa-object",
         Request(path="/api/items", headers=_bearer(claims={"roles": ["admin"]})),
         Expect(200, upstream_headers={"x-meshgate-tier": "gold"})),
    Case("opa-object/deny-403-with-policy-header", "opa-object",
         Request(path="/api/items", headers=_bearer()),
         Expect(403, headers={"x-meshgate-policy": "meshgate.authz",
                              "content-type": "application/json"},
                body_json={"error": "forbidden", "reason": "denied by meshgate.authz"})),
    Case("opa-object/deny-custom-status", "opa-object",
         Request(path="/teapot", headers=_bearer()),
         Expect(418, body_json={"error": "teapot"})),

    # OPA unreachable.
    Case("opa-down/fail-closed-503", "opa-down-closed",
         Request(path="/api/items", headers=_bearer(claims={"roles": ["admin"]})),
         Expect(503, body_json={"error": "unavailable"})),
    Case("opa-down/fail-open-200", "opa-down-open",
         Request(path="/api/items", headers=_bearer()),
         Expect(200, upstream_headers={"x-meshgate-sub": "alice"})),
    Case("opa-down/fail-open-still-authenticates", "opa-down-open",
         Request(path="/api/items", headers=_bearer(exp_in=-120)), Expect(401)),

    # OPA slower than the configured timeout.
    Case("opa-slow/fail-closed-503", "opa-slow-closed",
         Request(path="/api/items", headers=_bearer(claims={"roles": ["admin"]})),
         Expect(503, body_json={"error": "unavailable"})),
    Case("opa-slow/fail-open-200", "opa-slow-open",
         Request(path="/api/items", headers=_bearer()),
         Expect(200, upstream_headers={"x-meshgate-sub": "alice"})),

    # Auth forwards the verified subject; rate limit keys its buckets on it.
    Case("chain/subject-bucket-spent", "auth-then-rate-limit",
         Request(path="/api/x", headers=_bearer(claims={"sub": "sam"})),
         Expect(429, body_json={"rule": "per-subject"}), repeat=2),
    Case("chain/other-subject-unaffected", "auth-then-rate-limit",
         Request(path="/api/x", headers=_bearer(claims={"sub": "tess"})),
         Expect(200, headers={"ratelimit-remaining": "0"},
                upstream_headers={"x-meshgate-sub": "tess"})),
]
