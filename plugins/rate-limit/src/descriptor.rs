//! Which rules a request matches and the bucket key (digest) it falls into per rule.

use crate::config::{Descriptor, Rule};
use crate::table::Digest;
use sha2::{Digest as _, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;

/// How many digests `digest` remembers before it starts afresh.
const DIGESTS_KEPT: usize = 1024;

thread_local! {
    /// Digests by their input. A client sends the same values request after request, and
    /// SHA-256 was about a quarter of this plugin's instructions per request
    /// (docs/decisions/1500). Bounded: emptied when full, so values a client makes up
    /// cost memory only up to the bound.
    static DIGESTS: RefCell<HashMap<Vec<u8>, Digest>> = RefCell::new(HashMap::new());
}

/// What the plugin knows about a request, read lazily from the host.
pub trait RequestFacts {
    fn path(&self) -> Option<String>;
    fn header(&self, name: &str) -> Option<String>;
    /// The client's address as the host reports it (`ip:port` or `[v6]:port`).
    fn source_address(&self) -> Option<String>;
}

/// Whether `path` starts with `prefix`, ignoring the query string (a plain string prefix,
/// like Envoy's `prefix` route match).
pub fn path_matches(prefix: &str, path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or("");
    path.starts_with(prefix)
}

pub fn rule_matches(rule: &Rule, facts: &dyn RequestFacts) -> bool {
    let Some(path) = facts.path() else { return false };
    if !path_matches(&rule.path_prefix, &path) {
        return false;
    }
    match &rule.header {
        None => true,
        Some(h) => match (facts.header(&h.name), &h.value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(got), Some(want)) => &got == want,
        },
    }
}

/// The address without its port: `1.2.3.4:80` -> `1.2.3.4`, `[::1]:80` -> `::1`.
pub fn strip_port(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match address.rsplit_once(':') {
        Some((ip, port)) if !ip.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => ip,
        _ => address,
    }
}

/// The values of the rule's descriptors, or `None` when one of them is missing (then
/// the rule does not apply to this request).
pub fn descriptor_values(rule: &Rule, facts: &dyn RequestFacts) -> Option<Vec<String>> {
    rule.descriptors
        .iter()
        .map(|d| match d {
            Descriptor::RemoteAddress => facts.source_address().map(|a| strip_port(&a).to_string()),
            Descriptor::Header(h) | Descriptor::Claim(h) => facts.header(h),
            Descriptor::PathPrefix => Some(rule.path_prefix.clone()),
        })
        .collect()
}

/// The bucket's digest: SHA-256 over the rule name and the length-prefixed values, cut to
/// 128 bits. Length prefixes keep ("ab","c") and ("a","bc") apart; a cryptographic hash
/// keeps a client from choosing values that land in another client's bucket.
pub fn digest(rule_name: &str, values: &[String]) -> Digest {
    let mut input = Vec::with_capacity(4 + rule_name.len() + values.iter().map(|v| 4 + v.len()).sum::<usize>());
    input.extend_from_slice(&(rule_name.len() as u32).to_le_bytes());
    input.extend_from_slice(rule_name.as_bytes());
    for v in values {
        input.extend_from_slice(&(v.len() as u32).to_le_bytes());
        input.extend_from_slice(v.as_bytes());
    }
    DIGESTS.with(|kept| {
        if let Some(d) = kept.borrow().get(&input) {
            return *d;
        }
        let full = Sha256::digest(&input);
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        let mut kept = kept.borrow_mut();
        if kept.len() >= DIGESTS_KEPT {
            kept.clear();
        }
        kept.insert(input, out);
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use std::collections::HashMap;

    struct Facts(&'static str, HashMap<&'static str, &'static str>, &'static str);
    impl RequestFacts for Facts {
        fn path(&self) -> Option<String> {
            Some(self.0.to_string())
        }
        fn header(&self, name: &str) -> Option<String> {
            self.1.get(name).map(|s| s.to_string())
        }
        fn source_address(&self) -> Option<String> {
            Some(self.2.to_string())
        }
    }

    fn rule(json: &str) -> Rule {
        parse(format!(r#"{{"rules":[{json}]}}"#).as_bytes()).unwrap().rules.remove(0)
    }

    #[test]
    fn match_by_prefix_and_header() {
        let r = rule(r#"{"name":"a","match":{"path_prefix":"/api","header":{"name":"x-t","value":"acme"}},"rate":{"tokens":1}}"#);
        let hit = Facts("/api/v1?x=/other", HashMap::from([("x-t", "acme")]), "1.1.1.1:2");
        let wrong_value = Facts("/api/v1", HashMap::from([("x-t", "other")]), "1.1.1.1:2");
        let no_header = Facts("/api/v1", HashMap::new(), "1.1.1.1:2");
        let other_path = Facts("/static/api", HashMap::from([("x-t", "acme")]), "1.1.1.1:2");
        assert!(rule_matches(&r, &hit));
        assert!(!rule_matches(&r, &wrong_value));
        assert!(!rule_matches(&r, &no_header));
        assert!(!rule_matches(&r, &other_path));
    }

    #[test]
    fn descriptor_values_from_every_source() {
        let r = rule(
            r#"{"name":"a","match":{"path_prefix":"/p"},"descriptors":[{"source":"remote_address"},
            {"source":"header","name":"x-c"},{"source":"path_prefix"},{"source":"claim"}],"rate":{"tokens":1}}"#,
        );
        let f = Facts("/p/x", HashMap::from([("x-c", "c1"), ("x-meshgate-sub", "alice")]), "10.0.0.9:5555");
        assert_eq!(descriptor_values(&r, &f).unwrap(), vec!["10.0.0.9", "c1", "/p", "alice"]);
        let missing = Facts("/p/x", HashMap::from([("x-c", "c1")]), "10.0.0.9:5555");
        assert_eq!(descriptor_values(&r, &missing), None);
    }

    #[test]
    fn ports_are_stripped_from_v4_and_v6() {
        assert_eq!(strip_port("127.0.0.1:41644"), "127.0.0.1");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("pipe"), "pipe");
    }

    #[test]
    fn digests_separate_rules_and_value_boundaries() {
        let ab_c = digest("r", &["ab".into(), "c".into()]);
        let a_bc = digest("r", &["a".into(), "bc".into()]);
        assert_ne!(ab_c, a_bc);
        assert_ne!(digest("r1", &[]), digest("r2", &[]));
        assert_eq!(digest("r", &["x".into()]), digest("r", &["x".into()]));
    }

    #[test]
    fn remembered_digests_are_the_computed_ones_and_stay_bounded() {
        let sha = |input: &[u8]| -> Digest { Sha256::digest(input)[..16].try_into().unwrap() };
        let mut input = 1u32.to_le_bytes().to_vec();
        input.extend_from_slice(b"r");
        input.extend_from_slice(&2u32.to_le_bytes());
        input.extend_from_slice(b"ab");
        assert_eq!(digest("r", &["ab".into()]), sha(&input));
        assert_eq!(digest("r", &["ab".into()]), sha(&input)); // the remembered one
        for i in 0..DIGESTS_KEPT + 10 {
            let d = digest("flood", &[i.to_string()]);
            assert_eq!(d, digest("flood", &[i.to_string()]));
        }
        assert!(DIGESTS.with(|kept| kept.borrow().len()) <= DIGESTS_KEPT);
        assert_eq!(digest("r", &["ab".into()]), sha(&input));
    }
}
