//! Typed calls to meshgate's `wasi:tracing` host interface, reached through proxy-wasm
//! foreign functions (byte encodings in docs/internals.md, WIT in
//! meshgate/otel/wit/tracing.wit).
//!
//! Hosts without the interface (Envoy) answer `NotFound`; every call here then returns
//! `None` or does nothing, so a plugin carries on without tracing.
//!
//! ```ignore
//! let tracer = meshgate_tracing::Tracer::host();
//! let start = now_unix_nanos();
//! // ... the plugin's work ...
//! let span = SpanRecord::new("auth.verify", SpanKind::Internal, start, now_unix_nanos())
//!     .attribute("auth.method", "jwt")
//!     .status(SpanStatus::Ok);
//! tracer.record_span(&span);
//! ```

use serde_json::{json, Map, Value};

pub const GET_PARENT_SPAN: &str = "wasi:tracing/get-parent-span";
pub const RECORD_SPAN: &str = "wasi:tracing/record-span";
pub const ADD_EVENT: &str = "wasi:tracing/add-event";

/// How a foreign function is called; `Err(())` covers NotFound and every other failure.
pub trait ForeignFunctions {
    fn call(&self, name: &str, args: &[u8]) -> Result<Vec<u8>, ()>;
}

/// The request's current span, as the host reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: String,
    pub span_id: String,
    pub flags: u8,
    pub trace_state: Option<String>,
}

impl SpanContext {
    /// The W3C `traceparent` header value.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags)
    }

    /// Parse `00-<32 hex>-<16 hex>-<2 hex>` optionally followed by `\n<tracestate>`.
    pub fn parse(bytes: &[u8]) -> Option<SpanContext> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (parent, state) = match text.split_once('\n') {
            Some((p, s)) => (p, Some(s.to_string()).filter(|s| !s.is_empty())),
            None => (text, None),
        };
        let parts: Vec<&str> = parent.trim().split('-').collect();
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if parts.len() != 4 || parts[0] != "00" || !hex(parts[1], 32) || !hex(parts[2], 16) || !hex(parts[3], 2) {
            return None;
        }
        if parts[1].bytes().all(|b| b == b'0') || parts[2].bytes().all(|b| b == b'0') {
            return None;
        }
        Some(SpanContext {
            trace_id: parts[1].to_ascii_lowercase(),
            span_id: parts[2].to_ascii_lowercase(),
            flags: u8::from_str_radix(parts[3], 16).ok()?,
            trace_state: state,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

impl SpanKind {
    fn as_str(self) -> &'static str {
        match self {
            SpanKind::Internal => "internal",
            SpanKind::Server => "server",
            SpanKind::Client => "client",
            SpanKind::Producer => "producer",
            SpanKind::Consumer => "consumer",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpanStatus {
    Unset,
    Ok,
    Error(String),
}

/// One finished span, sent in one host crossing.
#[derive(Clone, Debug, PartialEq)]
pub struct SpanRecord {
    pub name: String,
    pub kind: SpanKind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Map<String, Value>,
    pub status: SpanStatus,
}

impl SpanRecord {
    pub fn new(name: &str, kind: SpanKind, start_unix_nanos: u64, end_unix_nanos: u64) -> Self {
        SpanRecord {
            name: name.to_string(),
            kind,
            start_unix_nanos,
            end_unix_nanos,
            attributes: Map::new(),
            status: SpanStatus::Unset,
        }
    }

    /// Add an attribute (strings, integers, floats and booleans).
    pub fn attribute(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.attributes.insert(key.to_string(), value.into());
        self
    }

    pub fn status(mut self, status: SpanStatus) -> Self {
        self.status = status;
        self
    }

    /// The JSON argument of `wasi:tracing/record-span`.
    pub fn encode(&self) -> Vec<u8> {
        let (code, message) = match &self.status {
            SpanStatus::Unset => ("unset", ""),
            SpanStatus::Ok => ("ok", ""),
            SpanStatus::Error(m) => ("error", m.as_str()),
        };
        json!({
            "name": self.name,
            "kind": self.kind.as_str(),
            "start_unix_nanos": self.start_unix_nanos,
            "end_unix_nanos": self.end_unix_nanos,
            "attributes": self.attributes,
            "status": {"code": code, "message": message},
        })
        .to_string()
        .into_bytes()
    }
}

/// The JSON argument of `wasi:tracing/add-event`.
pub fn encode_event(span_id: &str, name: &str, time_unix_nanos: u64, attributes: &Map<String, Value>) -> Vec<u8> {
    json!({"span_id": span_id, "name": name, "time_unix_nanos": time_unix_nanos, "attributes": attributes})
        .to_string()
        .into_bytes()
}

/// The `wasi:tracing` interface over some way of calling foreign functions.
pub struct Tracer<F: ForeignFunctions> {
    ffi: F,
}

impl<F: ForeignFunctions> Tracer<F> {
    pub fn new(ffi: F) -> Self {
        Tracer { ffi }
    }

    /// The request's current span; `None` where the host has no tracing.
    pub fn get_parent_span(&self) -> Option<SpanContext> {
        SpanContext::parse(&self.ffi.call(GET_PARENT_SPAN, &[]).ok()?)
    }

    /// Record one finished span (a child of the request's span); its span id, if any.
    pub fn record_span(&self, span: &SpanRecord) -> Option<String> {
        let out = self.ffi.call(RECORD_SPAN, &span.encode()).ok()?;
        let id = String::from_utf8(out).ok()?.trim().to_string();
        (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    }

    /// Add an event to a span recorded earlier; does nothing without tracing.
    pub fn add_event(&self, span_id: &str, name: &str, time_unix_nanos: u64, attributes: &Map<String, Value>) {
        let _ = self.ffi.call(ADD_EVENT, &encode_event(span_id, name, time_unix_nanos, attributes));
    }
}

/// Foreign functions of the proxy-wasm host the plugin runs in.
#[cfg(target_arch = "wasm32")]
pub struct HostFunctions;

#[cfg(target_arch = "wasm32")]
impl ForeignFunctions for HostFunctions {
    fn call(&self, name: &str, args: &[u8]) -> Result<Vec<u8>, ()> {
        let args = if args.is_empty() { None } else { Some(args) };
        match proxy_wasm::hostcalls::call_foreign_function(name, args) {
            Ok(out) => Ok(out.unwrap_or_default()),
            Err(_) => Err(()),
        }
    }
}

#[cfg(target_arch = "wasm32")]
impl Tracer<HostFunctions> {
    pub fn host() -> Self {
        Tracer::new(HostFunctions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A host with tracing: answers fixed values and remembers the arguments.
    struct Fake {
        enabled: bool,
        calls: RefCell<Vec<(String, Vec<u8>)>>,
    }

    impl ForeignFunctions for &Fake {
        fn call(&self, name: &str, args: &[u8]) -> Result<Vec<u8>, ()> {
            if !self.enabled {
                return Err(()); // what Envoy does: NotFound
            }
            self.calls.borrow_mut().push((name.to_string(), args.to_vec()));
            Ok(match name {
                GET_PARENT_SPAN => b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\nvendor=x".to_vec(),
                RECORD_SPAN => b"b7ad6b7169203331".to_vec(),
                _ => Vec::new(),
            })
        }
    }

    #[test]
    fn parent_span_is_parsed_with_trace_state() {
        let fake = Fake { enabled: true, calls: RefCell::default() };
        let p = Tracer::new(&fake).get_parent_span().unwrap();
        assert_eq!(p.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.flags, 1);
        assert_eq!(p.trace_state.as_deref(), Some("vendor=x"));
        assert_eq!(p.traceparent(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    }

    #[test]
    fn record_span_sends_the_documented_json() {
        let fake = Fake { enabled: true, calls: RefCell::default() };
        let span = SpanRecord::new("auth", SpanKind::Internal, 5, 9)
            .attribute("auth.method", "jwt")
            .attribute("n", 3)
            .status(SpanStatus::Error("denied".into()));
        let id = Tracer::new(&fake).record_span(&span);
        assert_eq!(id.as_deref(), Some("b7ad6b7169203331"));
        let calls = fake.calls.borrow();
        let v: Value = serde_json::from_slice(&calls[0].1).unwrap();
        assert_eq!(calls[0].0, RECORD_SPAN);
        assert_eq!(v["kind"], "internal");
        assert_eq!(v["start_unix_nanos"], 5);
        assert_eq!(v["attributes"]["n"], 3);
        assert_eq!(v["status"], json!({"code": "error", "message": "denied"}));
    }

    #[test]
    fn without_host_support_everything_is_quiet() {
        let fake = Fake { enabled: false, calls: RefCell::default() };
        let t = Tracer::new(&fake);
        assert_eq!(t.get_parent_span(), None);
        assert_eq!(t.record_span(&SpanRecord::new("x", SpanKind::Client, 1, 2)), None);
        t.add_event("b7ad6b7169203331", "e", 3, &Map::new());
    }

    #[test]
    fn malformed_parents_are_refused() {
        for bad in ["", "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "00-xyz-00f067aa0ba902b7-01"] {
            assert_eq!(SpanContext::parse(bad.as_bytes()), None, "{bad}");
        }
    }
}
