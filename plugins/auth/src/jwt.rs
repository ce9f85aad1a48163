//! JWS compact-serialisation JWT verification (RFC 7515 / 7519) for RS256, ES256, HS256.
//! The order is deliberate: size and shape first, then the header and the key, then the
//! signature, and only a verified payload is looked at for its claims.

use crate::jwk::{b64url, Alg, Jwk, KeyMaterial};
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Alg>,
    pub clock_skew_seconds: u64,
    pub max_token_bytes: usize,
    pub require_exp: bool,
}

/// Why a token was refused; `reason` goes into `www-authenticate` and the JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtError {
    pub reason: String,
}

fn fail<T>(reason: impl Into<String>) -> Result<T, JwtError> {
    Err(JwtError { reason: reason.into() })
}

fn json_object(part: &str, what: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = b64url(what, part).or_else(|_| fail(format!("malformed token: {what} is not base64url")))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => fail(format!("malformed token: {what} is not a JSON object")),
    }
}

fn signature_ok(key: &Jwk, alg: Alg, signing_input: &[u8], sig: &[u8]) -> bool {
    use rsa::signature::Verifier;
    match (&key.material, alg) {
        (KeyMaterial::Rsa(k), Alg::RS256) => {
            let vk = rsa::pkcs1v15::VerifyingKey::<Sha256>::new(k.clone());
            rsa::pkcs1v15::Signature::try_from(sig).is_ok_and(|s| vk.verify(signing_input, &s).is_ok())
        }
        (KeyMaterial::Ec(k), Alg::ES256) => {
            // JWS carries r||s (64 bytes), not DER.
            p256::ecdsa::Signature::from_slice(sig).is_ok_and(|s| k.verify(signing_input, &s).is_ok())
        }
        (KeyMaterial::Hmac(secret), Alg::HS256) => {
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return false };
            mac.update(signing_input);
            mac.verify_slice(sig).is_ok() // constant time
        }
        _ => false,
    }
}

fn numeric(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).map_or_else(|| fail(format!("{name} claim is not a number")), Ok),
    }
}

/// Verify `token` against `keys` at `now` (seconds since the epoch); the claims if valid.
pub fn verify(token: &str, keys: &[Jwk], policy: &Policy, now: u64) -> Result<Map<String, Value>, JwtError> {
    verify_in(token, &[keys], policy, now)
}

/// `verify` against several key sets at once (the configuration's inline keys and the
/// fetched JWKS), so a request need not copy the keys into one list.
pub fn verify_in(token: &str, key_sets: &[&[Jwk]], policy: &Policy, now: u64) -> Result<Map<String, Value>, JwtError> {
    let keys = || key_sets.iter().flat_map(|set| set.iter());
    if token.len() > policy.max_token_bytes {
        return fail(format!("token larger than {} bytes", policy.max_token_bytes));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 || parts[0].is_empty() || parts[1].is_empty() {
        return fail("malformed token: expected three dot-separated parts");
    }
    let header = json_object(parts[0], "header")?;
    let alg_name = header.get("alg").and_then(|a| a.as_str()).map_or_else(|| fail("malformed token: no alg"), Ok)?;
    if alg_name.eq_ignore_ascii_case("none") {
        return fail("alg none is not accepted");
    }
    let alg = Alg::parse(alg_name).map_or_else(|| fail(format!("alg {alg_name} is not supported")), Ok)?;
    if !policy.algorithms.contains(&alg) {
        return fail(format!("alg {alg_name} is not allowed"));
    }
    if header.contains_key("crit") {
        return fail("crit header parameters are not supported");
    }
    let candidates: Vec<&Jwk> = match header.get("kid") {
        Some(Value::String(kid)) => {
            let by_kid: Vec<&Jwk> = keys().filter(|k| k.kid.as_deref() == Some(kid)).collect();
            if by_kid.is_empty() {
                return fail(format!("unknown kid {kid:?}"));
            }
            let fitting: Vec<&Jwk> = by_kid.into_iter().filter(|k| k.accepts(alg)).collect();
            if fitting.is_empty() {
                return fail(format!("key {kid:?} cannot verify {alg_name} (algorithm mismatch)"));
            }
            fitting
        }
        Some(_) => return fail("malformed token: kid is not a string"),
        None => keys().filter(|k| k.accepts(alg)).collect(),
    };
    if candidates.is_empty() {
        return fail(format!("no key can verify {alg_name}"));
    }
    if parts[2].is_empty() {
        return fail("malformed token: empty signature");
    }
    let sig = b64url("signature", parts[2]).or_else(|_| fail("malformed token: signature is not base64url"))?;
    let signing_input = &token.as_bytes()[..parts[0].len() + 1 + parts[1].len()];
    if !candidates.iter().any(|k| signature_ok(k, alg, signing_input, &sig)) {
        return fail("invalid signature");
    }
    let claims = json_object(parts[1], "payload")?;
    let now_f = now as f64;
    let skew = policy.clock_skew_seconds as f64;
    match numeric(&claims, "exp")? {
        Some(exp) if now_f > exp + skew => return fail("token expired"),
        None if policy.require_exp => return fail("token has no exp claim"),
        _ => {}
    }
    if let Some(nbf) = numeric(&claims, "nbf")? {
        if now_f + skew < nbf {
            return fail("token not valid yet (nbf)");
        }
    }
    if let Some(iss) = &policy.issuer {
        if claims.get("iss").and_then(|v| v.as_str()) != Some(iss.as_str()) {
            return fail("issuer not accepted");
        }
    }
    if !policy.audiences.is_empty() {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => policy.audiences.contains(a),
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str().is_some_and(|a| policy.audiences.iter().any(|p| p == a))),
            _ => false,
        };
        if !ok {
            return fail("audience not accepted");
        }
    }
    Ok(claims)
}
