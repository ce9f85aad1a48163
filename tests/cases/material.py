"""Keys, tokens and API keys for the plugin cases, generated at run time (nothing secret is
committed). `Material.resolve` turns the placeholders used in `plugin_cases` into real
values: a scenario's plugin configuration and a case's request headers are plain data
until then.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ISSUER = "https://idp.meshgate.test"
AUDIENCE = "meshgate"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_bytes(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


@dataclass(frozen=True)
class Jwt:
    """A JWT to mint when the case runs.

    `claims` are laid over a valid default set (iss, aud, sub, exp in 5 minutes, nbf a
    minute ago); a claim set to None is removed. `exp_in`/`nbf_in` are seconds from now.
    `signer` picks the key: "auto" (the one matching `alg`), "rsa-public-as-hmac" (the
    classic algorithm-confusion forgery), "unsigned" (alg none, empty signature).
    `mangle`: "bad-base64" breaks the header's encoding; "oversize" pads a claim so the
    token exceeds 8 KiB.
    """

    alg: str = "RS256"
    kid: str | None = "rsa-1"
    claims: dict[str, Any] = field(default_factory=dict)
    exp_in: int | None = 300
    nbf_in: int | None = -60
    signer: str = "auto"
    mangle: str | None = None


@dataclass(frozen=True)
class Bearer:
    """An `Authorization: Bearer <jwt>` header value."""

    jwt: Jwt


@dataclass(frozen=True)
class ApiKey:
    """The plain value of a named API key (`Material.api_keys`), or a wrong one."""

    name: str


class Material:
    """Fresh keys for one test run."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.hmac_secret = secrets.token_bytes(32)
        self.api_keys = {"ci-bot": "mgk_" + secrets.token_urlsafe(24),
                         "deploy-bot": "mgk_" + secrets.token_urlsafe(24)}

    # -- keys -------------------------------------------------------------------------

    def jwks(self, *, include_hmac: bool = True) -> dict[str, Any]:
        rsa_pub = self.rsa.public_key().public_numbers()
        ec_pub = self.ec.public_key().public_numbers()
        keys = [
            {"kty": "RSA", "kid": "rsa-1", "use": "sig", "n": b64url(_int_bytes(rsa_pub.n)),
             "e": b64url(_int_bytes(rsa_pub.e))},
            {"kty": "EC", "kid": "ec-1", "crv": "P-256",
             "x": b64url(ec_pub.x.to_bytes(32, "big")), "y": b64url(ec_pub.y.to_bytes(32, "big"))},
        ]
        if include_hmac:
            keys.append({"kty": "oct", "kid": "hs-1", "k": b64url(self.hmac_secret)})
        return {"keys": keys}

    def api_key_hash(self, name: str) -> str:
        return hashlib.sha256(self.api_keys[name].encode()).hexdigest()

    # -- tokens -----------------------------------------------------------------------

    def mint(self, spec: Jwt) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now}
        if spec.exp_in is not None:
            claims["exp"] = now + spec.exp_in
        if spec.nbf_in is not None:
            claims["nbf"] = now + spec.nbf_in
        for k, v in spec.claims.items():
            if v is None:
                claims.pop(k, None)
            else:
                claims[k] = v
        header: dict[str, Any] = {"alg": spec.alg, "typ": "JWT"}
        if spec.kid is not None:
            header["kid"] = spec.kid
        if spec.mangle == "oversize":
            claims["padding"] = "x" * 9000
        head = b64url(json.dumps(header).encode())
        body = b64url(json.dumps(claims).encode())
        signing_input = f"{head}.{body}".encode()
        signature = self._sign(spec, signing_input)
        token = f"{head}.{body}.{b64url(signature)}"
        if spec.mangle == "bad-base64":
            token = "*" + token[1:]
        return token

    def _sign(self, spec: Jwt, data: bytes) -> bytes:
        if spec.signer == "unsigned":
            return b""
        if spec.signer == "rsa-public-as-hmac":
            pem = self.rsa.public_key().public_bytes(Encoding.PEM,
                                                     PublicFormat.SubjectPublicKeyInfo)
            return hmac.new(pem, data, hashlib.sha256).digest()
        if spec.alg == "RS256":
            return self.rsa.sign(data, padding.PKCS1v15(), hashes.SHA256())
        if spec.alg == "ES256":
            r, s = decode_dss_signature(self.ec.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        if spec.alg == "HS256":
            return hmac.new(self.hmac_secret, data, hashlib.sha256).digest()
        raise ValueError(f"cannot sign {spec.alg}")

    # -- placeholders -----------------------------------------------------------------

    def resolve(self, value: Any) -> Any:
        """Replace placeholders: "$jwks", "$api-key-sha256:<name>", Bearer, ApiKey."""
        if isinstance(value, Bearer):
            return "Bearer " + self.mint(value.jwt)
        if isinstance(value, ApiKey):
            return self.api_keys.get(value.name, "mgk_not-a-key")
        if value == "$jwks":
            return self.jwks()
        if isinstance(value, str) and value.startswith("$api-key-sha256:"):
            return self.api_key_hash(value.split(":", 1)[1])
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        return value
