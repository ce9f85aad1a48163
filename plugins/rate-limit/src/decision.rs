//! One request against every matching rule: the verdict and the headers to show.

use crate::bucket::Outcome;
use crate::config::{Config, Rule, TableFull};
use crate::descriptor::{descriptor_values, digest, rule_matches, RequestFacts};
use crate::table::{SharedStore, SlotTable, TakeResult};

/// What a rule did to this request, for metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleResult {
    pub rule_index: usize,
    pub allowed: bool,
    /// Decided without a bucket (table full or CAS contention) under `on_table_full`.
    pub degraded: bool,
}

/// The RateLimit-* headers of the most restrictive rule that applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quota {
    pub rule: String,
    pub limit: u64,
    pub remaining: u64,
    pub reset_seconds: u64,
    pub retry_after_seconds: u64,
}

impl Quota {
    pub fn headers(&self, limited: bool) -> Vec<(&'static str, String)> {
        let mut h = vec![
            ("ratelimit-limit", self.limit.to_string()),
            ("ratelimit-remaining", self.remaining.to_string()),
            ("ratelimit-reset", self.reset_seconds.to_string()),
        ];
        if limited {
            h.push(("retry-after", self.retry_after_seconds.to_string()));
        }
        h
    }

    /// The short JSON body of a 429. Written by hand: rule names are validated to
    /// `A-Z a-z 0-9 - _` (config.rs), so nothing needs escaping, and the plugin then
    /// carries no JSON serialiser at all (smaller binary, faster plugin push).
    pub fn body(&self) -> String {
        format!(
            "{{\"error\":\"rate_limited\",\"rule\":\"{}\",\"retry_after_seconds\":{}}}",
            self.rule, self.retry_after_seconds
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub quota: Option<Quota>,
    pub rules: Vec<RuleResult>,
}

fn quota(rule: &Rule, o: &Outcome) -> Quota {
    Quota {
        rule: rule.name.clone(),
        limit: rule.limit.burst,
        remaining: o.remaining,
        reset_seconds: o.reset_seconds,
        retry_after_seconds: o.retry_after_seconds,
    }
}

/// Apply the rules in order; the first rule that refuses ends the walk (tokens already
/// taken by earlier rules stay taken, as with several independent limiters in a row).
pub fn decide(
    config: &Config,
    table: &SlotTable,
    store: &dyn SharedStore,
    facts: &dyn RequestFacts,
    now_ns: u64,
) -> Verdict {
    let mut verdict = Verdict { allowed: true, quota: None, rules: Vec::new() };
    for (i, rule) in config.rules.iter().enumerate() {
        if !rule_matches(rule, facts) {
            continue;
        }
        let Some(values) = descriptor_values(rule, facts) else { continue };
        let d = digest(&rule.name, &values);
        match table.take(store, &d, &rule.limit, now_ns) {
            TakeResult::Decided(o) => {
                verdict.rules.push(RuleResult { rule_index: i, allowed: o.allowed, degraded: false });
                let q = quota(rule, &o);
                if !o.allowed {
                    verdict.allowed = false;
                    verdict.quota = Some(q);
                    return verdict;
                }
                if verdict.quota.as_ref().is_none_or(|cur| q.remaining < cur.remaining) {
                    verdict.quota = Some(q);
                }
            }
            TakeResult::TableFull | TakeResult::Contended => {
                let allowed = config.on_table_full == TableFull::Allow;
                verdict.rules.push(RuleResult { rule_index: i, allowed, degraded: true });
                if !allowed {
                    verdict.allowed = false;
                    verdict.quota = Some(Quota {
                        rule: rule.name.clone(),
                        limit: rule.limit.burst,
                        remaining: 0,
                        reset_seconds: 1,
                        retry_after_seconds: 1,
                    });
                    return verdict;
                }
            }
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::table::tests::MemStore;
    use std::collections::HashMap;

    struct Req(&'static str, HashMap<&'static str, &'static str>);
    impl RequestFacts for Req {
        fn path(&self) -> Option<String> {
            Some(self.0.into())
        }
        fn header(&self, n: &str) -> Option<String> {
            self.1.get(n).map(|s| s.to_string())
        }
        fn source_address(&self) -> Option<String> {
            Some("127.0.0.1:1000".into())
        }
    }

    const CONF: &str = r#"{"rules":[
        {"name":"global","rate":{"tokens":100,"per_seconds":60},"burst":100},
        {"name":"per-user","match":{"path_prefix":"/api"},"descriptors":[{"source":"claim"}],
         "rate":{"tokens":1,"per_seconds":60},"burst":2}]}"#;

    #[test]
    fn most_restrictive_rule_is_reported_and_first_refusal_wins() {
        let c = parse(CONF.as_bytes()).unwrap();
        let store = MemStore::default();
        let t = SlotTable::new("t", 64);
        let alice = Req("/api/x", HashMap::from([("x-meshgate-sub", "alice")]));
        let v1 = decide(&c, &t, &store, &alice, 0);
        assert!(v1.allowed);
        assert_eq!(v1.quota.as_ref().unwrap().rule, "per-user");
        assert_eq!(v1.quota.as_ref().unwrap().remaining, 1);
        assert!(decide(&c, &t, &store, &alice, 0).allowed);
        let v3 = decide(&c, &t, &store, &alice, 0);
        assert!(!v3.allowed);
        let q = v3.quota.unwrap();
        assert_eq!(q.retry_after_seconds, 60);
        assert_eq!(
            q.headers(true),
            vec![
                ("ratelimit-limit", "2".to_string()),
                ("ratelimit-remaining", "0".to_string()),
                ("ratelimit-reset", "120".to_string()),
                ("retry-after", "60".to_string()),
            ]
        );
        // Another user has her own bucket; a request without the claim skips the rule.
        let bob = Req("/api/x", HashMap::from([("x-meshgate-sub", "bob")]));
        assert!(decide(&c, &t, &store, &bob, 0).allowed);
        let anon = decide(&c, &t, &store, &Req("/api/x", HashMap::new()), 0);
        assert_eq!(anon.quota.unwrap().rule, "global");
    }

    #[test]
    fn unmatched_request_has_no_quota() {
        let c = parse(br#"{"rules":[{"name":"a","match":{"path_prefix":"/a"},"rate":{"tokens":1}}]}"#).unwrap();
        let store = MemStore::default();
        let t = SlotTable::new("t", 8);
        let v = decide(&c, &t, &store, &Req("/b", HashMap::new()), 0);
        assert_eq!(v, Verdict { allowed: true, quota: None, rules: vec![] });
    }

    #[test]
    fn table_full_follows_configuration() {
        for (mode, allowed) in [("allow", true), ("deny", false)] {
            let conf = format!(
                r#"{{"rules":[{{"name":"a","descriptors":[{{"source":"header","name":"k"}}],"rate":{{"tokens":1,"per_seconds":60}}}}],
                "table_size":1,"on_table_full":"{mode}"}}"#
            );
            let c = parse(conf.as_bytes()).unwrap();
            let store = MemStore::default();
            let t = SlotTable::new("t", 1);
            assert!(decide(&c, &t, &store, &Req("/", HashMap::from([("k", "1")])), 0).allowed);
            let v = decide(&c, &t, &store, &Req("/", HashMap::from([("k", "2")])), 0);
            assert_eq!(v.allowed, allowed, "{mode}");
            assert!(v.rules[0].degraded);
        }
    }

    #[test]
    fn body_is_short_json() {
        let q = Quota { rule: "r".into(), limit: 1, remaining: 0, reset_seconds: 3, retry_after_seconds: 2 };
        let v: serde_json::Value = serde_json::from_str(&q.body()).unwrap();
        assert_eq!(v, serde_json::json!({"error": "rate_limited", "rule": "r", "retry_after_seconds": 2}));
    }
}
