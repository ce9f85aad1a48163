//! JSON Web Keys (RFC 7517) for the three algorithms meshgate verifies.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rsa::{BigUint, RsaPublicKey};
use serde_json::Value;

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Smallest HMAC secret accepted, in bytes (RFC 7518 3.2: at least the hash size).
pub const MIN_HMAC_BYTES: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    RS256,
    ES256,
    HS256,
}

impl Alg {
    pub fn parse(s: &str) -> Option<Alg> {
        match s {
            "RS256" => Some(Alg::RS256),
            "ES256" => Some(Alg::ES256),
            "HS256" => Some(Alg::HS256),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Alg::RS256 => "RS256",
            Alg::ES256 => "ES256",
            Alg::HS256 => "HS256",
        }
    }
}

#[derive(Clone, Debug)]
pub enum KeyMaterial {
    Rsa(RsaPublicKey),
    Ec(p256::ecdsa::VerifyingKey),
    Hmac(Vec<u8>),
}

#[derive(Clone, Debug)]
pub struct Jwk {
    pub kid: Option<String>,
    /// The `alg` the key is restricted to, if the JWK names one.
    pub alg: Option<Alg>,
    pub material: KeyMaterial,
}

impl Jwk {
    /// Whether this key may verify a signature made with `alg`. The key type decides,
    /// never the token: an RSA public key is never an HMAC secret (algorithm confusion).
    pub fn accepts(&self, alg: Alg) -> bool {
        let family = matches!(
            (&self.material, alg),
            (KeyMaterial::Rsa(_), Alg::RS256) | (KeyMaterial::Ec(_), Alg::ES256) | (KeyMaterial::Hmac(_), Alg::HS256)
        );
        family && self.alg.is_none_or(|a| a == alg)
    }
}

pub fn b64url(field: &str, s: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD.decode(s).map_err(|_| format!("{field}: not unpadded base64url"))
}

fn member<'a>(key: &'a Value, name: &str) -> Result<&'a str, String> {
    key.get(name).and_then(|v| v.as_str()).ok_or_else(|| format!("{name}: missing or not a string"))
}

/// Parse one JWK. `Ok(None)` for keys of other types or uses, which a JWKS may contain.
pub fn parse_jwk(key: &Value) -> Result<Option<Jwk>, String> {
    if !key.is_object() {
        return Err("must be an object".into());
    }
    if key.get("use").and_then(|u| u.as_str()).is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    let kid = match key.get("kid") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("kid: must be a string".into()),
    };
    let alg = match key.get("alg").and_then(|a| a.as_str()) {
        None => None,
        Some(a) => match Alg::parse(a) {
            Some(a) => Some(a),
            None => return Ok(None),
        },
    };
    let material = match member(key, "kty")? {
        "RSA" => {
            let n = b64url("n", member(key, "n")?)?;
            let e = b64url("e", member(key, "e")?)?;
            let rsa = RsaPublicKey::new(BigUint::from_bytes_be(&n), BigUint::from_bytes_be(&e))
                .map_err(|err| format!("n/e: not a usable RSA public key ({err})"))?;
            let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
            if bits < MIN_RSA_BITS {
                return Err(format!("n: RSA modulus shorter than {MIN_RSA_BITS} bits"));
            }
            KeyMaterial::Rsa(rsa)
        }
        "EC" => {
            if member(key, "crv")? != "P-256" {
                return Ok(None);
            }
            let x = b64url("x", member(key, "x")?)?;
            let y = b64url("y", member(key, "y")?)?;
            if x.len() != 32 || y.len() != 32 {
                return Err("x/y: P-256 coordinates must be 32 bytes".into());
            }
            let point = p256::EncodedPoint::from_affine_coordinates(x.as_slice().into(), y.as_slice().into(), false);
            let vk = p256::ecdsa::VerifyingKey::from_encoded_point(&point)
                .map_err(|_| "x/y: not a point on P-256".to_string())?;
            KeyMaterial::Ec(vk)
        }
        "oct" => {
            let k = b64url("k", member(key, "k")?)?;
            if k.len() < MIN_HMAC_BYTES {
                return Err(format!("k: HMAC secret shorter than {MIN_HMAC_BYTES} bytes"));
            }
            KeyMaterial::Hmac(k)
        }
        _ => return Ok(None),
    };
    Ok(Some(Jwk { kid, alg, material }))
}

/// Parse a JWKS document `{"keys": [...]}`; errors name the key's index.
pub fn parse_jwks(doc: &Value) -> Result<Vec<Jwk>, String> {
    let keys = doc.get("keys").and_then(|k| k.as_array()).ok_or("keys: missing or not a list")?;
    let mut out = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        if let Some(jwk) = parse_jwk(k).map_err(|e| format!("keys[{i}].{e}"))? {
            out.push(jwk);
        }
    }
    Ok(out)
}
