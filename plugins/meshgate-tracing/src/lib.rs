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

use serde_json::{Map, Value};
use std::cell::Cell;

pub const GET_PARENT_SPAN: &str = "wasi:tracing/get-parent-span";
pub const RECORD_SPAN: &str = "wasi:tracing/record-span";
pub const ADD_EVENT: &str = "wasi:tracing/add-event";

/// Why a foreign function call gave no result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The host has no function of that name (Envoy's answer to `wasi:tracing/*`).
    NotFound,
    /// The host has it, but the call failed.
    Failed,
}

/// How a foreign function is called.
pub trait ForeignFunctions {
    fn call(&self, name: &str, args: &[u8]) -> Result<Vec<u8>, CallError>;
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

    /// The JSON argument of `wasi:tracing/record-span`. Written straight into bytes: a
    /// plugin records a span per request, and building a `Value` tree first cost more
    /// than the writing.
    pub fn encode(&self) -> Vec<u8> {
        let (code, message) = match &self.status {
            SpanStatus::Unset => ("unset", ""),
            SpanStatus::Ok => ("ok", ""),
            SpanStatus::Error(m) => ("error", m.as_str()),
        };
        let mut out = Vec::with_capacity(160 + self.name.len() + 48 * self.attributes.len());
        out.extend_from_slice(b"{\"name\":");
        json_string(&mut out, &self.name);
        out.extend_from_slice(b",\"kind\":\"");
        out.extend_from_slice(self.kind.as_str().as_bytes());
        out.extend_from_slice(b"\",\"start_unix_nanos\":");
        json_u64(&mut out, self.start_unix_nanos);
        out.extend_from_slice(b",\"end_unix_nanos\":");
        json_u64(&mut out, self.end_unix_nanos);
        out.extend_from_slice(b",\"attributes\":");
        json_object(&mut out, &self.attributes);
        out.extend_from_slice(b",\"status\":{\"code\":\"");
        out.extend_from_slice(code.as_bytes());
        out.extend_from_slice(b"\",\"message\":");
        json_string(&mut out, message);
        out.extend_from_slice(b"}}");
        out
    }
}

fn json_string(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping, without a Value in between; writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn json_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn json_object(out: &mut Vec<u8>, m: &Map<String, Value>) {
    out.push(b'{');
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_string(out, k);
        out.push(b':');
        match v {
            Value::String(s) => json_string(out, s),
            other => {
                let _ = serde_json::to_writer(&mut *out, other);
            }
        }
    }
    out.push(b'}');
}

/// The JSON argument of `wasi:tracing/add-event`.
pub fn encode_event(span_id: &str, name: &str, time_unix_nanos: u64, attributes: &Map<String, Value>) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + name.len() + 48 * attributes.len());
    out.extend_from_slice(b"{\"span_id\":");
    json_string(&mut out, span_id);
    out.extend_from_slice(b",\"name\":");
    json_string(&mut out, name);
    out.extend_from_slice(b",\"time_unix_nanos\":");
    json_u64(&mut out, time_unix_nanos);
    out.extend_from_slice(b",\"attributes\":");
    json_object(&mut out, attributes);
    out.push(b'}');
    out
}

/// The `wasi:tracing` interface over some way of calling foreign functions.
///
/// Keep one `Tracer` per configuration: once the host has answered that it does not
/// record spans (`record-span` NotFound: Envoy, or meshgate's sidecar when nothing
/// exports spans), the tracer remembers it, `record_span` and `add_event` return at once,
/// and `recording()` tells the plugin it need not time its work for spans at all.
/// `get_parent_span` keeps asking: the trace context propagates either way.
pub struct Tracer<F: ForeignFunctions> {
    ffi: F,
    not_recording: Cell<bool>,
}

impl<F: ForeignFunctions> Tracer<F> {
    pub fn new(ffi: F) -> Self {
        Tracer { ffi, not_recording: Cell::new(false) }
    }

    /// False once the host has answered `record-span` with NotFound (until then: true):
    /// a host without `wasi:tracing` (Envoy), or meshgate's sidecar when nothing exports
    /// spans. A plugin skips the work of building spans then; the answer holds for this
    /// `Tracer`'s life (a plugin makes one per configuration).
    pub fn recording(&self) -> bool {
        !self.not_recording.get()
    }

    /// The request's current span; `None` where the host has no tracing or no parent.
    pub fn get_parent_span(&self) -> Option<SpanContext> {
        // Asked even when spans are not recorded: the trace context still propagates
        // (e.g. to an http_call). NotFound here may also mean "no parent span".
        SpanContext::parse(&self.ffi.call(GET_PARENT_SPAN, &[]).ok()?)
    }

    /// Record one finished span (a child of the request's span); its span id, if any.
    pub fn record_span(&self, span: &SpanRecord) -> Option<String> {
        if self.not_recording.get() {
            return None;
        }
        let out = match self.ffi.call(RECORD_SPAN, &span.encode()) {
            Ok(out) => out,
            Err(CallError::NotFound) => {
                self.not_recording.set(true);
                return None;
            }
            Err(CallError::Failed) => return None,
        };
        let id = std::str::from_utf8(&out).ok()?.trim();
        (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
    }

    /// Add an event to a span recorded earlier; does nothing when spans are not recorded.
    pub fn add_event(&self, span_id: &str, name: &str, time_unix_nanos: u64, attributes: &Map<String, Value>) {
        if self.not_recording.get() {
            return;
        }
        let _ = self.ffi.call(ADD_EVENT, &encode_event(span_id, name, time_unix_nanos, attributes));
    }
}

/// Foreign functions of the proxy-wasm host the plugin runs in.
#[cfg(target_arch = "wasm32")]
pub struct HostFunctions;

#[cfg(target_arch = "wasm32")]
impl ForeignFunctions for HostFunctions {
    fn call(&self, name: &str, args: &[u8]) -> Result<Vec<u8>, CallError> {
        let args = if args.is_empty() { None } else { Some(args) };
        match proxy_wasm::hostcalls::call_foreign_function(name, args) {
            Ok(out) => Ok(out.unwrap_or_default()),
            Err(proxy_wasm::types::Status::NotFound) => Err(CallError::NotFound),
            Err(_) => Err(CallError::Failed),
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
    use serde_json::json;
    use std::cell::RefCell;

    /// A host with tracing: answers fixed values and remembers the arguments.
    struct Fake {
        enabled: bool,
        calls: RefCell<Vec<(String, Vec<u8>)>>,
    }

    impl ForeignFunctions for &Fake {
        fn call(&self, name: &str, args: &[u8]) -> Result<Vec<u8>, CallError> {
            if !self.enabled {
                self.calls.borrow_mut().push((name.to_string(), args.to_vec()));
                return Err(CallError::NotFound); // what Envoy does
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
        assert!(t.recording());
        assert_eq!(t.get_parent_span(), None);
        assert_eq!(t.record_span(&SpanRecord::new("x", SpanKind::Client, 1, 2)), None);
        t.add_event("b7ad6b7169203331", "e", 3, &Map::new());
    }

    #[test]
    fn a_host_without_record_span_is_asked_only_once() {
        let fake = Fake { enabled: false, calls: RefCell::default() };
        let t = Tracer::new(&fake);
        assert_eq!(t.record_span(&SpanRecord::new("x", SpanKind::Internal, 1, 2)), None);
        assert!(!t.recording());
        assert_eq!(t.record_span(&SpanRecord::new("x", SpanKind::Internal, 3, 4)), None);
        t.add_event("b7ad6b7169203331", "e", 3, &Map::new());
        assert_eq!(fake.calls.borrow().len(), 1);
    }

    /// meshgate's sidecar with nothing exporting spans: no record-span, but the request's
    /// trace context is still there to propagate.
    struct ParentOnly;

    impl ForeignFunctions for ParentOnly {
        fn call(&self, name: &str, _args: &[u8]) -> Result<Vec<u8>, CallError> {
            match name {
                GET_PARENT_SPAN => Ok(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_vec()),
                _ => Err(CallError::NotFound),
            }
        }
    }

    #[test]
    fn the_parent_span_outlives_a_host_that_does_not_record() {
        let t = Tracer::new(ParentOnly);
        assert_eq!(t.record_span(&SpanRecord::new("x", SpanKind::Internal, 1, 2)), None);
        assert!(!t.recording());
        let parent = t.get_parent_span().expect("the trace context still propagates");
        assert_eq!(parent.span_id, "00f067aa0ba902b7");
    }

    #[test]
    fn encoded_span_is_the_documented_json_with_escaping() {
        let span = SpanRecord::new("a\"b\\c\n", SpanKind::Server, 0, u64::MAX)
            .attribute("s", "x\u{1}y")
            .attribute("i", -3)
            .attribute("f", 1.5)
            .attribute("b", true)
            .status(SpanStatus::Ok);
        let v: Value = serde_json::from_slice(&span.encode()).unwrap();
        assert_eq!(
            v,
            json!({"name": "a\"b\\c\n", "kind": "server", "start_unix_nanos": 0u64,
                   "end_unix_nanos": u64::MAX,
                   "attributes": {"s": "x\u{1}y", "i": -3, "f": 1.5, "b": true},
                   "status": {"code": "ok", "message": ""}})
        );
        let e: Value = serde_json::from_slice(&encode_event("b7ad6b7169203331", "ev", 7, &Map::new())).unwrap();
        assert_eq!(e, json!({"span_id": "b7ad6b7169203331", "name": "ev", "time_unix_nanos": 7, "attributes": {}}));
    }

    #[test]
    fn malformed_parents_are_refused() {
        for bad in ["", "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "00-xyz-00f067aa0ba902b7-01"] {
            assert_eq!(SpanContext::parse(bad.as_bytes()), None, "{bad}");
        }
    }
}
