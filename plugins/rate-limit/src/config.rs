//! The rate-limit plugin's JSON configuration, validated field by field so that a bad
//! configuration is refused with the field's path and the reason.

use crate::bucket::Limit;
pub use meshgate_config::ConfigError;
use meshgate_config::{err, object, only_keys};
use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub rules: Vec<Rule>,
    pub table_size: u32,
    pub tick_seconds: u64,
    pub on_table_full: TableFull,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableFull {
    Allow,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub path_prefix: String,
    pub header: Option<HeaderMatch>,
    pub descriptors: Vec<Descriptor>,
    pub limit: Limit,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    pub name: String,
    /// `None`: the header only has to be present.
    pub value: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Descriptor {
    /// The client's IP address (property `source.address`, port removed).
    RemoteAddress,
    /// A request header's value.
    Header(String),
    /// The rule's path prefix (one bucket per rule and prefix).
    PathPrefix,
    /// A verified claim forwarded as a header by the auth plugin (runs before this one).
    Claim(String),
}

fn string(v: &Value, field: &str) -> Result<String, ConfigError> {
    match v.as_str() {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        Some(_) => err(field, "must not be empty"),
        None => err(field, "must be a string"),
    }
}

fn positive(v: &Value, field: &str, max: u64) -> Result<u64, ConfigError> {
    match v.as_u64() {
        Some(n) if n >= 1 && n <= max => Ok(n),
        _ => err(field, format!("must be an integer from 1 to {max}")),
    }
}


fn header_name(v: &Value, field: &str) -> Result<String, ConfigError> {
    meshgate_config::header_name(&string(v, field)?, field)
}

pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
    let root: Value = serde_json::from_slice(bytes)
        .map_err(|e| ConfigError { field: "(root)".into(), reason: format!("not valid JSON: {e}") })?;
    let m = object(&root, "(root)")?;
    only_keys(m, "", &["rules", "table_size", "tick_seconds", "on_table_full"])?;
    let rules_v = m.get("rules").map_or_else(|| err("rules", "is required"), Ok)?;
    let rules_a = rules_v.as_array().map_or_else(|| err("rules", "must be a list"), Ok)?;
    if rules_a.is_empty() {
        return err("rules", "must hold at least one rule");
    }
    let mut rules = Vec::new();
    for (i, r) in rules_a.iter().enumerate() {
        let rule = parse_rule(r, &format!("rules[{i}]"))?;
        if rules.iter().any(|o: &Rule| o.name == rule.name) {
            return err(&format!("rules[{i}].name"), format!("duplicate rule name '{}'", rule.name));
        }
        rules.push(rule);
    }
    let table_size = match m.get("table_size") {
        Some(v) => positive(v, "table_size", 1 << 20)? as u32,
        None => 8192,
    };
    let tick_seconds = match m.get("tick_seconds") {
        Some(v) => positive(v, "tick_seconds", 3600)?,
        None => 10,
    };
    let on_table_full = match m.get("on_table_full").map(|v| v.as_str()) {
        None | Some(Some("allow")) => TableFull::Allow,
        Some(Some("deny")) => TableFull::Deny,
        Some(_) => return err("on_table_full", "must be \"allow\" or \"deny\""),
    };
    Ok(Config { rules, table_size, tick_seconds, on_table_full })
}

fn parse_rule(v: &Value, at: &str) -> Result<Rule, ConfigError> {
    let m = object(v, at)?;
    only_keys(m, at, &["name", "match", "descriptors", "rate", "burst"])?;
    let f = |k: &str| format!("{at}.{k}");
    let name = string(m.get("name").unwrap_or(&Value::Null), &f("name"))?;
    if name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return err(&f("name"), "must be 1-64 letters, digits, '-' or '_'");
    }
    let (path_prefix, header) = match m.get("match") {
        None => ("/".to_string(), None),
        Some(mv) => parse_match(mv, &f("match"))?,
    };
    let mut descriptors = Vec::new();
    if let Some(dv) = m.get("descriptors") {
        let da = dv.as_array().map_or_else(|| err(&f("descriptors"), "must be a list"), Ok)?;
        for (j, d) in da.iter().enumerate() {
            descriptors.push(parse_descriptor(d, &format!("{at}.descriptors[{j}]"))?);
        }
    }
    let rate = object(m.get("rate").map_or_else(|| err(&f("rate"), "is required"), Ok)?, &f("rate"))?;
    only_keys(rate, &f("rate"), &["tokens", "per_seconds"])?;
    let tokens = positive(rate.get("tokens").unwrap_or(&Value::Null), &f("rate.tokens"), 1 << 32)?;
    let per_seconds = match rate.get("per_seconds") {
        Some(p) => positive(p, &f("rate.per_seconds"), 86_400 * 366)?,
        None => 1,
    };
    let burst = match m.get("burst") {
        Some(b) => positive(b, &f("burst"), 1 << 32)?,
        None => tokens,
    };
    Ok(Rule { name, path_prefix, header, descriptors, limit: Limit { tokens, per_seconds, burst } })
}

fn parse_match(v: &Value, at: &str) -> Result<(String, Option<HeaderMatch>), ConfigError> {
    let m = object(v, at)?;
    only_keys(m, at, &["path_prefix", "header"])?;
    let prefix = match m.get("path_prefix") {
        Some(p) => string(p, &format!("{at}.path_prefix"))?,
        None => "/".to_string(),
    };
    if !prefix.starts_with('/') {
        return err(&format!("{at}.path_prefix"), "must start with '/'");
    }
    let header = match m.get("header") {
        None => None,
        Some(h) => {
            let hm = object(h, &format!("{at}.header"))?;
            only_keys(hm, &format!("{at}.header"), &["name", "value"])?;
            let name = header_name(hm.get("name").unwrap_or(&Value::Null), &format!("{at}.header.name"))?;
            let value = match hm.get("value") {
                None => None,
                Some(x) => Some(
                    x.as_str().map_or_else(|| err(&format!("{at}.header.value"), "must be a string"), |s| Ok(s.to_string()))?,
                ),
            };
            Some(HeaderMatch { name, value })
        }
    };
    Ok((prefix, header))
}

fn parse_descriptor(v: &Value, at: &str) -> Result<Descriptor, ConfigError> {
    let m = object(v, at)?;
    let source = m.get("source").and_then(|s| s.as_str()).unwrap_or("");
    let field = |k: &str| format!("{at}.{k}");
    match source {
        "remote_address" => {
            only_keys(m, at, &["source"])?;
            Ok(Descriptor::RemoteAddress)
        }
        "path_prefix" => {
            only_keys(m, at, &["source"])?;
            Ok(Descriptor::PathPrefix)
        }
        "header" => {
            only_keys(m, at, &["source", "name"])?;
            Ok(Descriptor::Header(header_name(m.get("name").unwrap_or(&Value::Null), &field("name"))?))
        }
        "claim" => {
            only_keys(m, at, &["source", "header"])?;
            let h = match m.get("header") {
                Some(h) => header_name(h, &field("header"))?,
                None => "x-meshgate-sub".to_string(),
            };
            Ok(Descriptor::Claim(h))
        }
        _ => err(&field("source"), "must be one of: remote_address, header, path_prefix, claim"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_parses_with_defaults() {
        let c = parse(
            br#"{"rules":[{"name":"per-ip","match":{"path_prefix":"/api","header":{"name":"X-Tenant"}},
                 "descriptors":[{"source":"remote_address"},{"source":"header","name":"x-client"},
                                {"source":"path_prefix"},{"source":"claim"}],
                 "rate":{"tokens":10,"per_seconds":60},"burst":20}]}"#,
        )
        .unwrap();
        let r = &c.rules[0];
        assert_eq!(r.path_prefix, "/api");
        assert_eq!(r.header, Some(HeaderMatch { name: "x-tenant".into(), value: None }));
        assert_eq!(r.descriptors[3], Descriptor::Claim("x-meshgate-sub".into()));
        assert_eq!(r.limit, Limit { tokens: 10, per_seconds: 60, burst: 20 });
        assert_eq!((c.table_size, c.tick_seconds, c.on_table_full), (8192, 10, TableFull::Allow));
    }

    #[test]
    fn burst_defaults_to_tokens_and_period_to_one_second() {
        let c = parse(br#"{"rules":[{"name":"a","rate":{"tokens":5}}]}"#).unwrap();
        assert_eq!(c.rules[0].limit, Limit { tokens: 5, per_seconds: 1, burst: 5 });
        assert_eq!(c.rules[0].path_prefix, "/");
    }

    fn error_of(json: &str) -> ConfigError {
        parse(json.as_bytes()).unwrap_err()
    }

    #[test]
    fn errors_name_the_field_and_the_reason() {
        let e = error_of(r#"{"rules":[{"name":"a","rate":{"tokens":0}}]}"#);
        assert_eq!(e.field, "rules[0].rate.tokens");
        assert!(e.reason.contains("from 1"), "{}", e.reason);
        assert_eq!(error_of("{").field, "(root)");
        assert_eq!(error_of(r#"{"rules":[]}"#).field, "rules");
        assert_eq!(error_of(r#"{"rules":[{"rate":{"tokens":1}}]}"#).field, "rules[0].name");
        assert_eq!(error_of(r#"{"rules":[{"name":"a b","rate":{"tokens":1}}]}"#).field, "rules[0].name");
        assert_eq!(
            error_of(r#"{"rules":[{"name":"a","rate":{"tokens":1}},{"name":"a","rate":{"tokens":1}}]}"#).field,
            "rules[1].name"
        );
        assert_eq!(
            error_of(r#"{"rules":[{"name":"a","rate":{"tokens":1},"descriptors":[{"source":"cookie"}]}]}"#).field,
            "rules[0].descriptors[0].source"
        );
        assert_eq!(
            error_of(r#"{"rules":[{"name":"a","rate":{"tokens":1},"match":{"path_prefix":"api"}}]}"#).field,
            "rules[0].match.path_prefix"
        );
        assert_eq!(error_of(r#"{"rules":[{"name":"a","rate":{"tokens":1}}],"burts":3}"#).field, "burts");
        assert_eq!(
            error_of(r#"{"rules":[{"name":"a","rate":{"tokens":1}}],"on_table_full":"maybe"}"#).field,
            "on_table_full"
        );
    }
}
