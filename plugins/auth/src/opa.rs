//! The OPA side: the input document (shaped like OPA's Envoy integration) and the
//! decision, which a policy gives as a boolean or as an object.

use serde_json::{json, Map, Value};
use std::borrow::Cow;

/// What the request looked like, for the input document.
pub struct RequestView<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a [(String, String)],
}

/// Who the caller turned out to be.
#[derive(Clone, Debug, PartialEq)]
pub enum Identity {
    Jwt(Map<String, Value>),
    ApiKey(String),
}

impl Identity {
    pub fn method(&self) -> &'static str {
        match self {
            Identity::Jwt(_) => "jwt",
            Identity::ApiKey(_) => "api_key",
        }
    }

    /// The claims forwarded upstream; an API key's id stands in as `sub`.
    pub fn claims(&self) -> Map<String, Value> {
        match self {
            Identity::Jwt(c) => c.clone(),
            Identity::ApiKey(id) => Map::from_iter([("sub".to_string(), Value::String(id.clone()))]),
        }
    }

    /// One claim to forward (an API key's id stands in as `sub`), without copying the
    /// rest of the claims.
    pub fn claim(&self, name: &str) -> Option<Cow<'_, Value>> {
        match self {
            Identity::Jwt(c) => c.get(name).map(Cow::Borrowed),
            Identity::ApiKey(id) => (name == "sub").then(|| Cow::Owned(Value::String(id.clone()))),
        }
    }

    pub fn to_input(&self) -> Value {
        match self {
            Identity::Jwt(c) => json!({"method": "jwt", "claims": c}),
            Identity::ApiKey(id) => json!({"method": "api_key", "key_id": id}),
        }
    }
}

fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/a/b%20c?x=1` -> `["a", "b c"]` (what OPA-Envoy calls `parsed_path`).
pub fn parsed_path(path: &str) -> Vec<String> {
    let p = path.split(['?', '#']).next().unwrap_or("");
    let p = p.strip_prefix('/').unwrap_or(p);
    p.split('/').map(|s| percent_decode(s, false)).collect()
}

/// `?a=1&a=2&b` -> `{"a": ["1", "2"], "b": [""]}`.
pub fn parsed_query(path: &str) -> Map<String, Value> {
    let mut out = Map::new();
    let Some((_, q)) = path.split_once('?') else { return out };
    let q = q.split('#').next().unwrap_or("");
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let entry = out.entry(percent_decode(k, true)).or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(a) = entry {
            a.push(Value::String(percent_decode(v, true)));
        }
    }
    out
}

/// The body of `POST /v1/data/<path>`.
pub fn input_document(req: &RequestView, identity: &Identity) -> Value {
    let mut headers = Map::new();
    for (k, v) in req.headers {
        let k = k.to_ascii_lowercase();
        match headers.get_mut(&k) {
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(v);
            }
            _ => {
                headers.insert(k, Value::String(v.clone()));
            }
        }
    }
    json!({"input": {
        "attributes": {"request": {"http": {
            "method": req.method,
            "path": req.path,
            "host": req.host,
            "headers": headers,
        }}},
        "parsed_path": parsed_path(req.path),
        "parsed_query": parsed_query(req.path),
        "auth": identity.to_input(),
    }})
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Status of the denial (default 403); ignored when allowed.
    pub http_status: u32,
    /// Allowed: added to the upstream request. Denied: added to the response.
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
}

/// Parse OPA's answer. `Err` means OPA could not decide (the failure mode applies);
/// an undefined decision (no `result`) is a denial.
pub fn parse_decision(body: &[u8]) -> Result<Decision, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|_| "OPA answer is not JSON".to_string())?;
    let deny = |reason: &str| Decision {
        allowed: false,
        http_status: 403,
        headers: vec![],
        body: Some(json!({"error": "forbidden", "reason": reason}).to_string()),
    };
    let Some(result) = doc.get("result") else {
        return Ok(deny("policy decision undefined"));
    };
    match result {
        Value::Bool(true) => Ok(Decision { allowed: true, http_status: 200, headers: vec![], body: None }),
        Value::Bool(false) => Ok(deny("denied by policy")),
        Value::Object(m) => {
            let allowed = m.get("allowed").and_then(|a| a.as_bool()).ok_or("decision has no boolean 'allowed'")?;
            let http_status = match m.get("http_status") {
                None => 403,
                Some(s) => match s.as_u64() {
                    Some(n) if (200..=599).contains(&n) => n as u32,
                    _ => return Err("decision 'http_status' is not a status code".into()),
                },
            };
            let mut headers = Vec::new();
            if let Some(h) = m.get("headers") {
                let hm = h.as_object().ok_or("decision 'headers' is not an object")?;
                for (k, v) in hm {
                    let v = v.as_str().ok_or("decision header values must be strings")?;
                    if !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                        || v.bytes().any(|b| b < 0x20 && b != b'\t')
                    {
                        return Err(format!("decision header {k:?} is not a valid header"));
                    }
                    headers.push((k.to_ascii_lowercase(), v.to_string()));
                }
            }
            let body = match m.get("body") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => Some(other.to_string()),
            };
            let body = if allowed { body } else { body.or_else(|| deny("denied by policy").body) };
            Ok(Decision { allowed, http_status, headers, body })
        }
        _ => Err("decision is neither a boolean nor an object".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_claims_are_the_verified_ones_and_an_api_key_is_sub() {
        let jwt = Identity::Jwt(Map::from_iter([("sub".to_string(), json!("alice")), ("roles".to_string(), json!(["a"]))]));
        assert_eq!(jwt.claim("roles").as_deref(), Some(&json!(["a"])));
        assert_eq!(jwt.claim("email"), None);
        let key = Identity::ApiKey("ci-bot".into());
        assert_eq!(key.claim("sub").as_deref(), Some(&json!("ci-bot")));
        assert_eq!(key.claim("roles"), None);
    }

    #[test]
    fn input_follows_opa_envoy_shape() {
        let headers = vec![
            (":authority".to_string(), "api.local".to_string()),
            ("X-Trace".to_string(), "a".to_string()),
            ("x-trace".to_string(), "b".to_string()),
        ];
        let req = RequestView { method: "GET", path: "/api/v1/a%20b?q=1&q=2&flag&sp=a+b", host: "api.local", headers: &headers };
        let doc = input_document(&req, &Identity::ApiKey("ci".into()));
        let input = &doc["input"];
        assert_eq!(input["attributes"]["request"]["http"]["method"], "GET");
        assert_eq!(input["attributes"]["request"]["http"]["headers"]["x-trace"], "a, b");
        assert_eq!(input["parsed_path"], json!(["api", "v1", "a b"]));
        assert_eq!(input["parsed_query"], json!({"q": ["1", "2"], "flag": [""], "sp": ["a b"]}));
        assert_eq!(input["auth"], json!({"method": "api_key", "key_id": "ci"}));
    }

    #[test]
    fn root_path_and_broken_escapes() {
        assert_eq!(parsed_path("/"), vec![""]);
        assert_eq!(parsed_path("/a%zz/%4"), vec!["a%zz", "%4"]);
        assert!(parsed_query("/x").is_empty());
    }

    #[test]
    fn boolean_decisions() {
        assert!(parse_decision(br#"{"result": true}"#).unwrap().allowed);
        let d = parse_decision(br#"{"result": false}"#).unwrap();
        assert_eq!((d.allowed, d.http_status), (false, 403));
        let undefined = parse_decision(b"{}").unwrap();
        assert!(!undefined.allowed);
        assert!(undefined.body.unwrap().contains("undefined"));
    }

    #[test]
    fn object_decisions() {
        let d = parse_decision(
            br#"{"result": {"allowed": false, "http_status": 418, "headers": {"X-Policy": "teapot"}, "body": "short and stout"}}"#,
        )
        .unwrap();
        assert_eq!(
            d,
            Decision {
                allowed: false,
                http_status: 418,
                headers: vec![("x-policy".into(), "teapot".into())],
                body: Some("short and stout".into())
            }
        );
        let a = parse_decision(br#"{"result": {"allowed": true, "headers": {"x-tier": "gold"}}}"#).unwrap();
        assert!(a.allowed);
        assert_eq!(a.headers, vec![("x-tier".to_string(), "gold".to_string())]);
    }

    #[test]
    fn broken_decisions_are_errors() {
        for bad in [
            &b"not json"[..],
            br#"{"result": 3}"#,
            br#"{"result": {"http_status": 403}}"#,
            br#"{"result": {"allowed": false, "http_status": 42}}"#,
            br#"{"result": {"allowed": true, "headers": {"x": 1}}}"#,
            br#"{"result": {"allowed": true, "headers": {"x": "a\nb"}}}"#,
        ] {
            assert!(parse_decision(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
