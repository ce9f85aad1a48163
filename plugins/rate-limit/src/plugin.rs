//! The proxy-wasm contexts: configuration and ticks in the root context, one decision
//! per request in the HTTP context.

use crate::config::{self, Config};
use crate::decision::{decide, Quota};
use crate::descriptor::RequestFacts;
use crate::table::{CasMismatch, SharedStore, SlotTable};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, Status};
use std::cell::{OnceCell, RefCell};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(RateLimitRoot::default()) });
}}

/// Slots the tick looks at per period, so one tick stays short whatever the table size.
const EVICTION_CHUNK: u32 = 1024;

struct HostSharedData;

impl SharedStore for HostSharedData {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|_| CasMismatch)
    }
}

fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

fn counter(name: &str) -> Option<u32> {
    hostcalls::define_metric(MetricType::Counter, name).ok()
}

fn bump(metric: Option<u32>) {
    if let Some(id) = metric {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

struct Metrics {
    allowed: Option<u32>,
    limited: Option<u32>,
    degraded: Option<u32>,
    evicted: Option<u32>,
    per_rule: Vec<(Option<u32>, Option<u32>)>,
}

impl Metrics {
    fn define(config: &Config) -> Self {
        Metrics {
            allowed: counter("meshgate_rate_limit.allowed"),
            limited: counter("meshgate_rate_limit.limited"),
            degraded: counter("meshgate_rate_limit.degraded"),
            evicted: counter("meshgate_rate_limit.evicted"),
            per_rule: config
                .rules
                .iter()
                .map(|r| {
                    (
                        counter(&format!("meshgate_rate_limit.rule.{}.allowed", r.name)),
                        counter(&format!("meshgate_rate_limit.rule.{}.limited", r.name)),
                    )
                })
                .collect(),
        }
    }
}

struct Shared {
    config: Config,
    table: SlotTable,
    metrics: Metrics,
}

#[derive(Default)]
struct RateLimitRoot {
    shared: Option<Rc<Shared>>,
    eviction_cursor: u32,
}

impl Context for RateLimitRoot {}

impl RootContext for RateLimitRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hostcalls::get_buffer(proxy_wasm::types::BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config = match config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log(LogLevel::Critical, &format!("rate-limit: {e}"));
                return false;
            }
        };
        let namespace = hostcalls::get_property(vec!["plugin_name"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        // The table needs no setup: a slot key never written reads as a free slot
        // (decision 0600), so a plugin push costs no shared-data writes here.
        let table = SlotTable::new(&namespace, config.table_size);
        log(
            LogLevel::Info,
            &format!(
                "rate-limit: configured {} rule(s), table '{}' of {} slots",
                config.rules.len(),
                namespace,
                table.size()
            ),
        );
        let _ = hostcalls::set_tick_period(Duration::from_secs(config.tick_seconds));
        let metrics = Metrics::define(&config);
        self.shared = Some(Rc::new(Shared { config, table, metrics }));
        true
    }

    fn on_tick(&mut self) {
        let Some(shared) = &self.shared else { return };
        let (evicted, next) = shared.table.evict_idle(&HostSharedData, self.eviction_cursor, EVICTION_CHUNK, now_ns());
        self.eviction_cursor = next;
        if evicted > 0 {
            if let Some(id) = shared.metrics.evicted {
                let _ = hostcalls::increment_metric(id, evicted as i64);
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(Box::new(RateLimitStream { shared, quota: None, limited: false }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct RateLimitStream {
    shared: Rc<Shared>,
    quota: Option<Quota>,
    limited: bool,
}

/// The request as the rules see it. Each fact is read from the host at most once per
/// request: several rules (or a rule's match and its descriptors) often ask for the same
/// path or header, and every read is a host crossing plus a copy into the plugin.
#[derive(Default)]
struct HostRequest {
    path: OnceCell<Option<String>>,
    source_address: OnceCell<Option<String>>,
    headers: RefCell<Vec<(String, Option<String>)>>,
}

impl RequestFacts for HostRequest {
    fn path(&self) -> Option<String> {
        self.path
            .get_or_init(|| hostcalls::get_map_value(proxy_wasm::types::MapType::HttpRequestHeaders, ":path").ok().flatten())
            .clone()
    }
    fn header(&self, name: &str) -> Option<String> {
        if let Some((_, v)) = self.headers.borrow().iter().find(|(n, _)| n == name) {
            return v.clone();
        }
        let v = hostcalls::get_map_value(proxy_wasm::types::MapType::HttpRequestHeaders, name).ok().flatten();
        self.headers.borrow_mut().push((name.to_string(), v.clone()));
        v
    }
    fn source_address(&self) -> Option<String> {
        self.source_address
            .get_or_init(|| {
                hostcalls::get_property(vec!["source", "address"])
                    .ok()
                    .flatten()
                    .and_then(|b| String::from_utf8(b).ok())
            })
            .clone()
    }
}

impl Context for RateLimitStream {}

impl HttpContext for RateLimitStream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let s = &self.shared;
        let verdict = decide(&s.config, &s.table, &HostSharedData, &HostRequest::default(), now_ns());
        for r in &verdict.rules {
            let (a, l) = s.metrics.per_rule[r.rule_index];
            bump(if r.allowed { a } else { l });
            if r.degraded {
                bump(s.metrics.degraded);
            }
        }
        bump(if verdict.allowed { s.metrics.allowed } else { s.metrics.limited });
        self.quota = verdict.quota;
        if verdict.allowed {
            return Action::Continue;
        }
        self.limited = true;
        let quota = self.quota.as_ref().expect("a refusal names its rule");
        let mut headers = quota.headers(true);
        headers.push(("content-type", "application/json".into()));
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let body = quota.body();
        if let Err(status) = hostcalls::send_http_response(429, pairs, Some(body.as_bytes())) {
            log(LogLevel::Error, &format!("rate-limit: send_local_response failed: {status:?}"));
            return Action::Continue;
        }
        Action::Pause
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        // The local 429 already carries the headers (and Envoy runs this callback over it).
        if self.limited {
            return Action::Continue;
        }
        if let Some(q) = &self.quota {
            for (name, value) in q.headers(false) {
                let r = hostcalls::set_map_value(proxy_wasm::types::MapType::HttpResponseHeaders, name, Some(&value));
                if let Err(Status::NotFound) | Err(Status::BadArgument) = r {
                    break;
                }
            }
        }
        Action::Continue
    }
}
