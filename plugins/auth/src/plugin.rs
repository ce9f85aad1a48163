//! The proxy-wasm contexts of the auth plugin. The root context validates the
//! configuration and keeps the JWKS fresh (shared with the other workers through shared
//! data); the HTTP context authenticates, asks OPA, and forwards or refuses.

use crate::apikey;
use crate::config::{self, Config, Upstream};
use crate::jwk::{parse_jwks, Jwk};
use crate::jwt;
use crate::opa::{input_document, parse_decision, Decision, Identity, RequestView};
use meshgate_tracing::{HostFunctions, SpanKind, SpanRecord, SpanStatus, Tracer};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(AuthRoot::default()) });
}}

/// Wait after a failed JWKS fetch before the next try.
const JWKS_RETRY_NS: u64 = 5_000_000_000;
/// Largest JWKS or OPA answer read.
const MAX_CALLOUT_BODY: usize = 256 * 1024;

fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

fn counter(name: &str) -> Option<u32> {
    hostcalls::define_metric(MetricType::Counter, name).ok()
}

fn bump(id: Option<u32>) {
    if let Some(id) = id {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

struct Metrics {
    allowed: Option<u32>,
    unauthenticated: Option<u32>,
    forbidden: Option<u32>,
    opa_failure: Option<u32>,
}

struct Shared {
    config: Config,
    /// The API keys this configuration recognised, by the key presented.
    known_keys: apikey::KnownKeys,
    metrics: Metrics,
    /// One tracer for the VM's life: it remembers a host without `wasi:tracing`.
    tracer: Tracer<HostFunctions>,
}

/// The JWKS fetched from `jwks_uri`, mirrored from shared data
/// (`meshgate.auth.<plugin>.jwks` = fetch time u64 LE + the JWKS JSON).
#[derive(Default)]
struct KeyCache {
    shared_key: String,
    keys: Vec<Jwk>,
    cas: Option<u32>,
    fetched_ns: u64,
    retry_after_ns: u64,
}

impl KeyCache {
    /// Load what another worker fetched, if it changed.
    fn sync(&mut self) {
        let Ok((Some(value), cas)) = hostcalls::get_shared_data(&self.shared_key) else { return };
        if cas == self.cas || value.len() < 8 {
            return;
        }
        let fetched = u64::from_le_bytes(value[..8].try_into().unwrap());
        if let Ok(keys) = serde_json::from_slice::<Value>(&value[8..]).map_err(|e| e.to_string()).and_then(|v| parse_jwks(&v)) {
            self.keys = keys;
            self.fetched_ns = fetched;
        }
        self.cas = cas;
    }

    /// Take a fetched JWKS body; shares it with the other workers when it parses.
    fn store(&mut self, body: &[u8], now: u64) -> Result<usize, String> {
        let doc: Value = serde_json::from_slice(body).map_err(|_| "JWKS is not JSON".to_string())?;
        let keys = parse_jwks(&doc)?;
        if keys.is_empty() {
            return Err("JWKS holds no usable key".into());
        }
        let mut value = now.to_le_bytes().to_vec();
        value.extend_from_slice(body);
        let _ = hostcalls::set_shared_data(&self.shared_key, Some(&value), None);
        let n = keys.len();
        self.keys = keys;
        self.fetched_ns = now;
        self.cas = hostcalls::get_shared_data(&self.shared_key).ok().and_then(|(_, c)| c);
        Ok(n)
    }
}

fn get_request(up: &Upstream, method: &str, extra: &[(&str, String)], body: Option<&[u8]>) -> Result<u32, String> {
    let mut headers: Vec<(&str, &str)> = vec![(":method", method), (":path", &up.path), (":authority", &up.authority)];
    for (k, v) in extra {
        headers.push((k, v.as_str()));
    }
    hostcalls::dispatch_http_call(&up.cluster, headers, body, vec![], Duration::from_millis(up.timeout_ms))
        .map_err(|s| format!("dispatch to cluster '{}' failed: {s:?}", up.cluster))
}

fn fetch_jwks(up: &Upstream) -> Result<u32, String> {
    get_request(up, "GET", &[("accept", "application/json".into())], None)
}

fn callout_body(size: usize) -> Vec<u8> {
    hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size.min(MAX_CALLOUT_BODY))
        .ok()
        .flatten()
        .unwrap_or_default()
}

fn callout_status() -> Option<u32> {
    hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status").ok().flatten().and_then(|s| s.parse().ok())
}

#[derive(Default)]
struct AuthRoot {
    shared: Option<Rc<Shared>>,
    keys: Rc<RefCell<KeyCache>>,
    fetching: Option<u32>,
}

impl Context for AuthRoot {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        if self.fetching != Some(token) {
            return;
        }
        self.fetching = None;
        let now = now_ns();
        let mut cache = self.keys.borrow_mut();
        let result = match callout_status() {
            Some(200) => cache.store(&callout_body(body_size), now),
            other => Err(format!("JWKS endpoint answered {other:?}")),
        };
        match result {
            Ok(n) => log(LogLevel::Info, &format!("auth: loaded {n} key(s) from the JWKS endpoint")),
            Err(e) => {
                cache.retry_after_ns = now + JWKS_RETRY_NS;
                log(LogLevel::Warn, &format!("auth: JWKS refresh failed: {e}"));
            }
        }
    }
}

impl RootContext for AuthRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default();
        let config = match config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log(LogLevel::Critical, &format!("auth: {e}"));
                return false;
            }
        };
        let plugin = hostcalls::get_property(vec!["plugin_name"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_else(|| "auth".into());
        self.keys.borrow_mut().shared_key = format!("meshgate.auth.{plugin}.jwks");
        if config.jwt.as_ref().is_some_and(|j| j.jwks_uri.is_some()) {
            let _ = hostcalls::set_tick_period(Duration::from_secs(1));
        }
        let metrics = Metrics {
            allowed: counter("meshgate_auth.allowed"),
            unauthenticated: counter("meshgate_auth.unauthenticated"),
            forbidden: counter("meshgate_auth.forbidden"),
            opa_failure: counter("meshgate_auth.opa_failure"),
        };
        log(
            LogLevel::Info,
            &format!(
                "auth: configured (jwt: {}, api keys: {}, opa: {})",
                config.jwt.is_some(),
                config.api_keys.as_ref().map_or(0, |k| k.keys.len()),
                config.opa.as_ref().map_or("off".to_string(), |o| o.upstream.path.clone())
            ),
        );
        self.shared = Some(Rc::new(Shared {
            config,
            known_keys: apikey::KnownKeys::default(),
            metrics,
            tracer: Tracer::host(),
        }));
        true
    }

    fn on_tick(&mut self) {
        let Some(shared) = &self.shared else { return };
        let Some(jwt) = &shared.config.jwt else { return };
        let Some(up) = &jwt.jwks_uri else { return };
        let now = now_ns();
        let mut cache = self.keys.borrow_mut();
        cache.sync();
        let due = cache.fetched_ns == 0 || now >= cache.fetched_ns + jwt.refresh_seconds * 1_000_000_000;
        if due && self.fetching.is_none() && now >= cache.retry_after_ns {
            match fetch_jwks(up) {
                Ok(token) => self.fetching = Some(token),
                Err(e) => {
                    cache.retry_after_ns = now + JWKS_RETRY_NS;
                    log(LogLevel::Warn, &format!("auth: JWKS refresh: {e}"));
                }
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AuthStream {
            shared: self.shared.clone()?,
            keys: self.keys.clone(),
            start_ns: 0,
            pending: Pending::Nothing,
            method: "none",
            authorization_sent: None,
            api_key_sent: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

enum Pending {
    Nothing,
    Jwks { call: u32, token: String },
    Opa { call: u32, identity: Identity },
}

/// What a step did with the request.
enum Next {
    Continue,
    Paused,
    Responded,
}

struct AuthStream {
    shared: Rc<Shared>,
    keys: Rc<RefCell<KeyCache>>,
    start_ns: u64,
    pending: Pending,
    method: &'static str,
    /// Whether the request carried these headers (`None`: not looked at), so that
    /// `remove_credentials` removes only what is there.
    authorization_sent: Option<bool>,
    api_key_sent: Option<bool>,
}

fn request_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpRequestHeaders, name).ok().flatten()
}

fn set_request_header(name: &str, value: Option<&str>) {
    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value);
}

/// A claim as a header value, or `None` if it cannot be one.
fn claim_header_value(v: &Value) -> Option<String> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(|i| i.is_string()) => {
            items.iter().filter_map(|i| i.as_str()).collect::<Vec<_>>().join(",")
        }
        Value::Null => return None,
        other => other.to_string(),
    };
    (!s.bytes().any(|b| b < 0x20 || b == 0x7f)).then_some(s)
}

fn quoted(s: &str) -> String {
    s.chars().filter(|c| *c != '"' && *c != '\\' && !c.is_control()).collect()
}

impl AuthStream {
    fn tracer_finish(&self, outcome: &str, status: u32) {
        let tracer = &self.shared.tracer;
        if !tracer.recording() {
            return;
        }
        let span = SpanRecord::new("meshgate.auth", SpanKind::Internal, self.start_ns, now_ns())
            .attribute("auth.method", self.method)
            .attribute("auth.outcome", outcome)
            .attribute("http.response.status_code", status as i64)
            .status(if status < 400 { SpanStatus::Ok } else { SpanStatus::Error(outcome.to_string()) });
        let _ = tracer.record_span(&span);
    }

    fn respond(&self, status: u32, headers: Vec<(String, String)>, body: String, outcome: &str) -> Next {
        let mut pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        if !headers.iter().any(|(k, _)| k == "content-type") {
            let ct = if serde_json::from_str::<Value>(&body).is_ok() { "application/json" } else { "text/plain" };
            pairs.push(("content-type", ct));
        }
        if let Err(s) = hostcalls::send_http_response(status, pairs, Some(body.as_bytes())) {
            log(LogLevel::Error, &format!("auth: send_local_response failed: {s:?}"));
        }
        self.tracer_finish(outcome, status);
        Next::Responded
    }

    fn unauthenticated(&self, reason: &str, token_presented: bool) -> Next {
        bump(self.shared.metrics.unauthenticated);
        let c = &self.shared.config;
        let realm = quoted(&c.realm);
        let challenge = if c.jwt.is_some() {
            if token_presented {
                format!("Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{}\"", quoted(reason))
            } else {
                format!("Bearer realm=\"{realm}\"")
            }
        } else {
            let header = c.api_keys.as_ref().map_or("x-api-key", |k| k.header.as_str());
            format!("ApiKey realm=\"{realm}\", header=\"{header}\"")
        };
        let body = json!({"error": "unauthorized", "reason": reason}).to_string();
        self.respond(401, vec![("www-authenticate".into(), challenge)], body, "unauthenticated")
    }

    /// Step 1: find and check the credentials.
    fn authenticate(&mut self) -> Next {
        let shared = self.shared.clone();
        let c = &shared.config;
        // Headers this plugin vouches for must never come from the client: `allow` sets
        // or removes every one of them before the request goes upstream (one host call
        // each, instead of a removal here and a second write there), and the OPA input
        // leaves them out. A refused request never reaches the upstream.
        // Without JWT the Authorization header plays no part: no need to read it.
        let authorization = if c.jwt.is_some() { request_header("authorization") } else { None };
        if c.jwt.is_some() {
            self.authorization_sent = Some(authorization.is_some());
        }
        if let (Some(_), Some(value)) = (&c.jwt, &authorization) {
            self.method = "jwt";
            let token = match value.split_once(' ') {
                Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty() => t.trim().to_string(),
                _ => return self.unauthenticated("authorization header is not a Bearer token", true),
            };
            return self.verify_jwt(token);
        }
        if let Some(ak) = &c.api_keys {
            let presented = request_header(&ak.header);
            self.api_key_sent = Some(presented.is_some());
            if let Some(presented) = presented {
                self.method = "api_key";
                return match shared.known_keys.identify(&ak.keys, &presented) {
                    Some(id) => self.authorize(Identity::ApiKey(id.to_string())),
                    None => self.unauthenticated("API key not recognised", true),
                };
            }
        }
        self.unauthenticated("missing credentials", false)
    }

    fn verify_jwt(&mut self, token: String) -> Next {
        let shared = self.shared.clone();
        let jwt_cfg = shared.config.jwt.as_ref().expect("checked by the caller");
        let mut cache = self.keys.borrow_mut();
        // Only a fetched JWKS lives in shared data; with inline keys alone there is
        // nothing to look up.
        if jwt_cfg.jwks_uri.is_some() {
            cache.sync();
        }
        if jwt_cfg.inline_keys.is_empty() && cache.keys.is_empty() {
            let up = jwt_cfg.jwks_uri.as_ref().expect("config requires keys or a jwks_uri");
            drop(cache);
            return match fetch_jwks(up) {
                Ok(call) => {
                    self.pending = Pending::Jwks { call, token };
                    Next::Paused
                }
                Err(e) => {
                    log(LogLevel::Warn, &format!("auth: {e}"));
                    self.respond(503, vec![], json!({"error": "unavailable", "reason": "signing keys unavailable"}).to_string(), "jwks_unavailable")
                }
            };
        }
        let now = now_ns() / 1_000_000_000;
        let verified = jwt::verify_in(&token, &[&jwt_cfg.inline_keys, &cache.keys], &jwt_cfg.policy, now);
        drop(cache);
        match verified {
            Ok(claims) => self.authorize(Identity::Jwt(claims)),
            Err(e) => self.unauthenticated(&e.reason, true),
        }
    }

    /// Step 2: ask OPA, if configured.
    fn authorize(&mut self, identity: Identity) -> Next {
        let Some(opa) = &self.shared.config.opa else { return self.allow(&identity, &[]) };
        let mut headers: Vec<(String, String)> = hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default();
        // What the upstream will get: never the client's own forwarded-claim headers.
        let forwarded = &self.shared.config.forward_claims;
        headers.retain(|(k, _)| !forwarded.iter().any(|(_, h)| k.eq_ignore_ascii_case(h)));
        let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()).unwrap_or_default();
        let (method, path, host) = (find(":method"), find(":path"), find(":authority"));
        let view = RequestView { method: &method, path: &path, host: &host, headers: &headers };
        let body = input_document(&view, &identity).to_string();
        let mut extra = vec![("content-type", "application/json".to_string())];
        if let Some(parent) = self.shared.tracer.get_parent_span() {
            extra.push(("traceparent", parent.traceparent()));
        }
        match get_request(&opa.upstream, "POST", &extra, Some(body.as_bytes())) {
            Ok(call) => {
                self.pending = Pending::Opa { call, identity };
                Next::Paused
            }
            Err(e) => self.opa_failed(&identity, &e),
        }
    }

    fn opa_failed(&self, identity: &Identity, why: &str) -> Next {
        bump(self.shared.metrics.opa_failure);
        let fail_open = self.shared.config.opa.as_ref().is_some_and(|o| o.fail_open);
        log(LogLevel::Warn, &format!("auth: OPA check failed ({why}); failing {}", if fail_open { "open" } else { "closed" }));
        if fail_open {
            return self.allow(identity, &[]);
        }
        let body = json!({"error": "unavailable", "reason": "authorization service unavailable"}).to_string();
        self.respond(503, vec![], body, "opa_unavailable")
    }

    fn decided(&self, identity: &Identity, d: Decision) -> Next {
        if d.allowed {
            return self.allow(identity, &d.headers);
        }
        bump(self.shared.metrics.forbidden);
        self.respond(d.http_status, d.headers, d.body.unwrap_or_default(), "forbidden")
    }

    /// Step 3: forward the verified identity upstream.
    fn allow(&self, identity: &Identity, extra: &[(String, String)]) -> Next {
        let c = &self.shared.config;
        // Replacing a header drops every value the client sent under that name too.
        for (claim, header) in &c.forward_claims {
            match identity.claim(claim).as_deref().and_then(claim_header_value) {
                Some(v) => set_request_header(header, Some(&v)),
                None => set_request_header(header, None),
            }
        }
        for (k, v) in extra {
            set_request_header(k, Some(v));
        }
        if c.remove_credentials {
            if self.authorization_sent != Some(false) {
                set_request_header("authorization", None);
            }
            if let Some(ak) = &c.api_keys {
                if self.api_key_sent != Some(false) {
                    set_request_header(&ak.header, None);
                }
            }
        }
        bump(self.shared.metrics.allowed);
        self.tracer_finish("allowed", 200);
        Next::Continue
    }
}

impl Context for AuthStream {
    fn on_http_call_response(&mut self, call: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let pending = std::mem::replace(&mut self.pending, Pending::Nothing);
        let next = match pending {
            Pending::Jwks { call: c, token } if c == call => {
                let now = now_ns();
                let stored = match callout_status() {
                    Some(200) => self.keys.borrow_mut().store(&callout_body(body_size), now),
                    other => Err(format!("JWKS endpoint answered {other:?}")),
                };
                match stored {
                    Ok(_) => self.verify_jwt(token),
                    Err(e) => {
                        log(LogLevel::Warn, &format!("auth: JWKS fetch failed: {e}"));
                        self.keys.borrow_mut().retry_after_ns = now + JWKS_RETRY_NS;
                        let body = json!({"error": "unavailable", "reason": "signing keys unavailable"}).to_string();
                        self.respond(503, vec![], body, "jwks_unavailable")
                    }
                }
            }
            Pending::Opa { call: c, identity } if c == call => match callout_status() {
                Some(200) => match parse_decision(&callout_body(body_size)) {
                    Ok(d) => self.decided(&identity, d),
                    Err(e) => self.opa_failed(&identity, &e),
                },
                other => self.opa_failed(&identity, &format!("OPA answered {other:?}")),
            },
            other => {
                self.pending = other;
                return;
            }
        };
        if let Next::Continue = next {
            let _ = hostcalls::resume_http_request();
        }
    }
}

impl HttpContext for AuthStream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        // The start time only serves the span; where spans are not recorded, skip the call.
        if self.shared.tracer.recording() {
            self.start_ns = now_ns();
        }
        match self.authenticate() {
            Next::Continue => Action::Continue,
            Next::Paused | Next::Responded => Action::Pause,
        }
    }
}
