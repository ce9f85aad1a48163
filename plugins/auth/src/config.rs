//! The auth plugin's JSON configuration, validated field by field.

use crate::apikey::{parse_hex32, ApiKey};
use crate::jwk::{parse_jwks, Alg, Jwk};
use crate::jwt::Policy;
pub use meshgate_config::ConfigError;
use meshgate_config::{err, header_name, object, only_keys};
use serde_json::{Map, Value};

#[derive(Clone, Debug)]
pub struct Config {
    pub jwt: Option<JwtConfig>,
    pub api_keys: Option<ApiKeys>,
    /// claim name -> request header forwarded upstream after authentication.
    pub forward_claims: Vec<(String, String)>,
    pub remove_credentials: bool,
    pub opa: Option<Opa>,
    pub realm: String,
}

#[derive(Clone, Debug)]
pub struct JwtConfig {
    pub policy: Policy,
    pub inline_keys: Vec<Jwk>,
    pub jwks_uri: Option<Upstream>,
    pub refresh_seconds: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub timeout_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeys {
    pub header: String,
    pub keys: Vec<ApiKey>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opa {
    pub upstream: Upstream,
    /// Fail open (allow) when OPA is unreachable, slow or answers an error.
    pub fail_open: bool,
}

fn string(m: &Map<String, Value>, at: &str, key: &str) -> Result<Option<String>, ConfigError> {
    match m.get(key) {
        None => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => err(&format!("{at}{key}"), "must be a non-empty string"),
    }
}

fn uint(m: &Map<String, Value>, at: &str, key: &str, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    match m.get(key) {
        None => Ok(default),
        Some(v) => match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => err(&format!("{at}{key}"), format!("must be an integer from {min} to {max}")),
        },
    }
}

fn boolean(m: &Map<String, Value>, at: &str, key: &str, default: bool) -> Result<bool, ConfigError> {
    match m.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => err(&format!("{at}{key}"), "must be true or false"),
    }
}


fn upstream(v: &Value, at: &str, default_path: Option<&str>, default_timeout: u64) -> Result<Upstream, ConfigError> {
    let m = object(v, at)?;
    let p = format!("{at}.");
    let cluster = string(m, &p, "cluster")?.map_or_else(|| err(&format!("{p}cluster"), "is required"), Ok)?;
    let authority = string(m, &p, "authority")?.unwrap_or_else(|| cluster.clone());
    let path = match (string(m, &p, "path")?, default_path) {
        (Some(path), _) => path,
        (None, Some(d)) => d.to_string(),
        (None, None) => return err(&format!("{p}path"), "is required"),
    };
    let timeout_ms = uint(m, &p, "timeout_ms", default_timeout, 1, 60_000)?;
    Ok(Upstream { cluster, authority, path, timeout_ms })
}

pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
    let root: Value = serde_json::from_slice(bytes)
        .map_err(|e| ConfigError { field: "(root)".into(), reason: format!("not valid JSON: {e}") })?;
    let m = object(&root, "(root)")?;
    only_keys(m, "", &["jwt", "api_keys", "forward_claims", "remove_credentials", "opa", "realm"])?;
    let jwt = m.get("jwt").map(|v| parse_jwt(v, "jwt")).transpose()?;
    let api_keys = m.get("api_keys").map(|v| parse_api_keys(v, "api_keys")).transpose()?;
    if jwt.is_none() && api_keys.is_none() {
        return err("jwt", "at least one of jwt and api_keys is required");
    }
    let mut forward_claims = Vec::new();
    if let Some(fc) = m.get("forward_claims") {
        for (claim, header) in object(fc, "forward_claims")? {
            let f = format!("forward_claims.{claim}");
            let h = header.as_str().map_or_else(|| err(&f, "must be a header name string"), Ok)?;
            forward_claims.push((claim.clone(), header_name(h, &f)?));
        }
    }
    let opa = match m.get("opa") {
        None => None,
        Some(v) => {
            let om = object(v, "opa")?;
            only_keys(om, "opa", &["cluster", "authority", "path", "timeout_ms", "failure_mode"])?;
            let mut up = upstream(v, "opa", None, 500)?;
            let rule = up.path.trim_matches('/').to_string();
            if rule.is_empty() || !rule.split('/').all(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')) {
                return err("opa.path", "must be a policy path such as meshgate/authz/allow");
            }
            up.path = format!("/v1/data/{rule}");
            let fail_open = match om.get("failure_mode").map(|f| f.as_str()) {
                None | Some(Some("closed")) => false,
                Some(Some("open")) => true,
                Some(_) => return err("opa.failure_mode", "must be \"closed\" or \"open\""),
            };
            Some(Opa { upstream: up, fail_open })
        }
    };
    Ok(Config {
        jwt,
        api_keys,
        forward_claims,
        remove_credentials: boolean(m, "", "remove_credentials", false)?,
        opa,
        realm: string(m, "", "realm")?.unwrap_or_else(|| "meshgate".into()),
    })
}

fn parse_jwt(v: &Value, at: &str) -> Result<JwtConfig, ConfigError> {
    let m = object(v, at)?;
    only_keys(
        m,
        at,
        &["issuer", "audiences", "jwks", "jwks_uri", "algorithms", "clock_skew_seconds", "max_token_bytes", "require_exp"],
    )?;
    let p = format!("{at}.");
    let issuer = string(m, &p, "issuer")?;
    let mut audiences = Vec::new();
    if let Some(a) = m.get("audiences") {
        let list = a.as_array().map_or_else(|| err(&format!("{p}audiences"), "must be a list of strings"), Ok)?;
        for (i, x) in list.iter().enumerate() {
            let s = x.as_str().map_or_else(|| err(&format!("{p}audiences[{i}]"), "must be a string"), Ok)?;
            audiences.push(s.to_string());
        }
    }
    let mut algorithms = vec![Alg::RS256, Alg::ES256, Alg::HS256];
    if let Some(a) = m.get("algorithms") {
        let list = a.as_array().map_or_else(|| err(&format!("{p}algorithms"), "must be a list"), Ok)?;
        algorithms.clear();
        for (i, x) in list.iter().enumerate() {
            match x.as_str().and_then(Alg::parse) {
                Some(alg) => algorithms.push(alg),
                None => return err(&format!("{p}algorithms[{i}]"), "must be one of RS256, ES256, HS256"),
            }
        }
        if algorithms.is_empty() {
            return err(&format!("{p}algorithms"), "must not be empty");
        }
    }
    let inline_keys = match m.get("jwks") {
        None => Vec::new(),
        Some(j) => parse_jwks(j).map_or_else(|e| err(&format!("{p}jwks"), e), Ok)?,
    };
    let (jwks_uri, refresh_seconds) = match m.get("jwks_uri") {
        None => (None, 0),
        Some(u) => {
            let um = object(u, &format!("{p}jwks_uri"))?;
            only_keys(um, &format!("{p}jwks_uri"), &["cluster", "authority", "path", "timeout_ms", "refresh_seconds"])?;
            let up = upstream(u, &format!("{p}jwks_uri"), None, 2000)?;
            (Some(up), uint(um, &format!("{p}jwks_uri."), "refresh_seconds", 300, 5, 86_400)?)
        }
    };
    if inline_keys.is_empty() && jwks_uri.is_none() {
        return err(&format!("{p}jwks"), "one of jwks (with at least one usable key) and jwks_uri is required");
    }
    let policy = Policy {
        issuer,
        audiences,
        algorithms,
        clock_skew_seconds: uint(m, &p, "clock_skew_seconds", 30, 0, 600)?,
        max_token_bytes: uint(m, &p, "max_token_bytes", 8192, 64, 65_536)? as usize,
        require_exp: boolean(m, &p, "require_exp", true)?,
    };
    Ok(JwtConfig { policy, inline_keys, jwks_uri, refresh_seconds })
}

fn parse_api_keys(v: &Value, at: &str) -> Result<ApiKeys, ConfigError> {
    let m = object(v, at)?;
    only_keys(m, at, &["header", "keys"])?;
    let header = match m.get("header").and_then(|h| h.as_str()) {
        Some(h) => header_name(h, &format!("{at}.header"))?,
        None => "x-api-key".into(),
    };
    let list = m.get("keys").and_then(|k| k.as_array()).map_or_else(|| err(&format!("{at}.keys"), "is required (a list)"), Ok)?;
    let mut keys = Vec::new();
    for (i, k) in list.iter().enumerate() {
        let f = format!("{at}.keys[{i}]");
        let km = object(k, &f)?;
        only_keys(km, &f, &["id", "sha256"])?;
        let id = string(km, &format!("{f}."), "id")?.map_or_else(|| err(&format!("{f}.id"), "is required"), Ok)?;
        let hex = km.get("sha256").and_then(|h| h.as_str()).unwrap_or("");
        let sha256 = parse_hex32(hex).map_or_else(|| err(&format!("{f}.sha256"), "must be 64 hex digits (SHA-256 of the key)"), Ok)?;
        keys.push(ApiKey { id, sha256 });
    }
    if keys.is_empty() {
        return err(&format!("{at}.keys"), "must hold at least one key");
    }
    Ok(ApiKeys { header, keys })
}
