//! JWT verification against keys generated at test time (no private key is committed).

use crate::jwk::{parse_jwks, Alg, Jwk};
use crate::jwt::{verify, Policy};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};
use sha2::Sha256;
use std::sync::OnceLock;

const NOW: u64 = 1_800_000_000;

struct Keys {
    rsa: rsa::RsaPrivateKey,
    ec: p256::ecdsa::SigningKey,
    hmac: Vec<u8>,
}

fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| {
        let mut rng = rand::thread_rng();
        let hmac: Vec<u8> = (0..32).map(|_| rand::Rng::gen(&mut rng)).collect();
        Keys {
            rsa: rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap(),
            ec: p256::ecdsa::SigningKey::random(&mut rng),
            hmac,
        }
    })
}

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn jwks() -> Value {
    let k = keys();
    let pubk = k.rsa.to_public_key();
    let point = k.ec.verifying_key().to_encoded_point(false);
    json!({"keys": [
        {"kty": "RSA", "kid": "rsa-1", "n": b64(&pubk.n().to_bytes_be()), "e": b64(&pubk.e().to_bytes_be())},
        {"kty": "EC", "kid": "ec-1", "crv": "P-256", "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())},
        {"kty": "oct", "kid": "hs-1", "k": b64(&k.hmac)},
        {"kty": "OKP", "kid": "ed-1", "crv": "Ed25519", "x": "AA"}
    ]})
}

fn parsed_keys() -> Vec<Jwk> {
    parse_jwks(&jwks()).unwrap()
}

fn policy() -> Policy {
    Policy {
        issuer: Some("https://idp.test".into()),
        audiences: vec!["meshgate".into()],
        algorithms: vec![Alg::RS256, Alg::ES256, Alg::HS256],
        clock_skew_seconds: 30,
        max_token_bytes: 8192,
        require_exp: true,
    }
}

fn claims() -> Value {
    json!({"iss": "https://idp.test", "aud": "meshgate", "sub": "alice", "exp": NOW + 60, "nbf": NOW - 60})
}

fn sign(alg: &str, header: Value, claims: &Value) -> String {
    let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let sig = match alg {
        "RS256" => rsa::pkcs1v15::SigningKey::<Sha256>::new(keys().rsa.clone()).sign(input.as_bytes()).to_vec(),
        "ES256" => {
            let s: p256::ecdsa::Signature = keys().ec.sign(input.as_bytes());
            s.to_bytes().to_vec()
        }
        "HS256" => hs256(&keys().hmac, input.as_bytes()),
        _ => Vec::new(),
    };
    format!("{input}.{}", b64(&sig))
}

fn hs256(secret: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    m.update(msg);
    m.finalize().into_bytes().to_vec()
}

fn token(alg: &str, kid: &str, claims: &Value) -> String {
    sign(alg, json!({"alg": alg, "typ": "JWT", "kid": kid}), claims)
}

fn reason(t: &str) -> String {
    verify(t, &parsed_keys(), &policy(), NOW).unwrap_err().reason
}

#[test]
fn valid_tokens_of_each_algorithm() {
    for (alg, kid) in [("RS256", "rsa-1"), ("ES256", "ec-1"), ("HS256", "hs-1")] {
        let c = verify(&token(alg, kid, &claims()), &parsed_keys(), &policy(), NOW).unwrap();
        assert_eq!(c["sub"], "alice", "{alg}");
    }
}

#[test]
fn token_without_kid_is_tried_against_fitting_keys() {
    let t = sign("ES256", json!({"alg": "ES256"}), &claims());
    assert!(verify(&t, &parsed_keys(), &policy(), NOW).is_ok());
}

#[test]
fn time_claims_with_skew() {
    let mut c = claims();
    c["exp"] = json!(NOW - 31);
    assert_eq!(reason(&token("RS256", "rsa-1", &c)), "token expired");
    c["exp"] = json!(NOW - 29); // inside the skew
    assert!(verify(&token("RS256", "rsa-1", &c), &parsed_keys(), &policy(), NOW).is_ok());
    let mut c = claims();
    c["nbf"] = json!(NOW + 120);
    assert_eq!(reason(&token("RS256", "rsa-1", &c)), "token not valid yet (nbf)");
    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(reason(&token("RS256", "rsa-1", &c)), "token has no exp claim");
    let mut c = claims();
    c["exp"] = json!("tomorrow");
    assert_eq!(reason(&token("RS256", "rsa-1", &c)), "exp claim is not a number");
}

#[test]
fn issuer_and_audience() {
    let mut c = claims();
    c["iss"] = json!("https://evil.test");
    assert_eq!(reason(&token("ES256", "ec-1", &c)), "issuer not accepted");
    let mut c = claims();
    c["aud"] = json!(["other", "meshgate"]);
    assert!(verify(&token("ES256", "ec-1", &c), &parsed_keys(), &policy(), NOW).is_ok());
    c["aud"] = json!(["other"]);
    assert_eq!(reason(&token("ES256", "ec-1", &c)), "audience not accepted");
}

#[test]
fn alg_none_is_refused_in_any_spelling() {
    for alg in ["none", "None", "NONE"] {
        let t = format!("{}.{}.", b64(json!({"alg": alg}).to_string().as_bytes()), b64(claims().to_string().as_bytes()));
        assert_eq!(reason(&t), "alg none is not accepted");
        assert_eq!(reason(&format!("{t}AAAA")), "alg none is not accepted");
    }
}

#[test]
fn algorithm_confusion_rsa_key_as_hmac_secret() {
    // The attacker signs with HS256 using the RSA public key's bytes as the secret and
    // names the RSA key's kid: the key type forbids HS256.
    let pubk = keys().rsa.to_public_key();
    let header = json!({"alg": "HS256", "kid": "rsa-1"});
    let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims().to_string().as_bytes()));
    for secret in [pubk.n().to_bytes_be(), jwks()["keys"][0].to_string().into_bytes()] {
        let t = format!("{input}.{}", b64(&hs256(&secret, input.as_bytes())));
        assert_eq!(reason(&t), "key \"rsa-1\" cannot verify HS256 (algorithm mismatch)");
    }
    // And an RS256 token re-labelled ES256 fails too.
    let t = token("RS256", "rsa-1", &claims());
    let relabelled = format!("{}.{}", b64(json!({"alg": "ES256", "kid": "rsa-1"}).to_string().as_bytes()), t.split_once('.').unwrap().1);
    assert!(reason(&relabelled).contains("algorithm mismatch"));
}

#[test]
fn unknown_kid_bad_signature_and_disallowed_alg() {
    assert_eq!(reason(&token("RS256", "rsa-9", &claims())), "unknown kid \"rsa-9\"");
    let t = token("HS256", "hs-1", &claims());
    let tampered = format!("{}x", &t[..t.len() - 1]);
    assert!(["invalid signature", "malformed token: signature is not base64url"].contains(&reason(&tampered).as_str()));
    let mut other_payload = claims();
    other_payload["sub"] = json!("mallory");
    let parts: Vec<&str> = t.split('.').collect();
    let swapped = format!("{}.{}.{}", parts[0], b64(other_payload.to_string().as_bytes()), parts[2]);
    assert_eq!(reason(&swapped), "invalid signature");
    let mut p = policy();
    p.algorithms = vec![Alg::RS256];
    assert_eq!(verify(&t, &parsed_keys(), &p, NOW).unwrap_err().reason, "alg HS256 is not allowed");
    let ps = format!("{}.{}.AAAA", b64(json!({"alg": "PS256"}).to_string().as_bytes()), b64(b"{}"));
    assert_eq!(reason(&ps), "alg PS256 is not supported");
}

#[test]
fn malformed_and_oversize_tokens() {
    assert!(reason("abc").starts_with("malformed token"));
    assert!(reason("a.b.c.d").starts_with("malformed token"));
    let t = token("RS256", "rsa-1", &claims());
    assert_eq!(reason(&t[..t.rfind('.').unwrap() + 1]), "malformed token: empty signature");
    assert_eq!(reason("!!!.e30.AAAA"), "malformed token: header is not base64url");
    let t = token("RS256", "rsa-1", &claims());
    // Padding is not base64url-without-padding.
    let (h, rest) = t.split_once('.').unwrap();
    assert_eq!(reason(&format!("{h}=.{rest}")), "malformed token: header is not base64url");
    let notjson = format!("{}.{}", b64(b"[1,2]"), rest);
    assert_eq!(reason(&notjson), "malformed token: header is not a JSON object");
    let mut big = claims();
    big["pad"] = json!("x".repeat(9000));
    assert_eq!(reason(&token("RS256", "rsa-1", &big)), "token larger than 8192 bytes");
    let crit = sign("RS256", json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}), &claims());
    assert_eq!(reason(&crit), "crit header parameters are not supported");
}

#[test]
fn jwks_parsing_refuses_weak_keys_and_skips_foreign_ones() {
    assert_eq!(parsed_keys().len(), 3, "the OKP key is skipped");
    let short = json!({"keys": [{"kty": "oct", "k": b64(b"short")}]});
    assert!(parse_jwks(&short).unwrap_err().contains("keys[0].k"));
    let bad_point = json!({"keys": [{"kty": "EC", "crv": "P-256", "x": b64(&[1u8; 32]), "y": b64(&[2u8; 32])}]});
    assert!(parse_jwks(&bad_point).unwrap_err().contains("not a point"));
    let small_rsa = json!({"keys": [{"kty": "RSA", "n": b64(&[0xc5u8; 128]), "e": "AQAB"}]});
    assert!(parse_jwks(&small_rsa).unwrap_err().contains("2048"));
    let enc = json!({"keys": [{"kty": "oct", "use": "enc", "k": b64(&[1u8; 32])}]});
    assert!(parse_jwks(&enc).unwrap().is_empty());
}

#[test]
fn jwk_alg_restricts_the_key() {
    let mut doc = jwks();
    doc["keys"][2]["alg"] = json!("RS256"); // an oct key that claims RS256 is usable by nothing
    let ks = parse_jwks(&doc).unwrap();
    let t = token("HS256", "hs-1", &claims());
    assert!(verify(&t, &ks, &policy(), NOW).unwrap_err().reason.contains("algorithm mismatch"));
}
