//! What meshgate's plugins share when they validate their JSON configuration at
//! `on_configure`: an error that names the field and the reason (logged by the plugin,
//! which then refuses the configuration), and the checks every plugin needs.

use serde_json::{Map, Value};

/// A configuration error: where (a dotted field path) and why.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration: {}: {}", self.field, self.reason)
    }
}

pub fn err<T>(field: &str, reason: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError { field: field.to_string(), reason: reason.into() })
}

pub fn object<'a>(v: &'a Value, field: &str) -> Result<&'a Map<String, Value>, ConfigError> {
    v.as_object().map_or_else(|| err(field, "must be an object"), Ok)
}

/// Unknown keys are errors: a typo in an operator's config must not silently do nothing.
pub fn only_keys(m: &Map<String, Value>, field: &str, allowed: &[&str]) -> Result<(), ConfigError> {
    for k in m.keys() {
        if !allowed.contains(&k.as_str()) {
            let at = if field.is_empty() { k.clone() } else { format!("{field}.{k}") };
            return err(&at, format!("unknown field (expected one of: {})", allowed.join(", ")));
        }
    }
    Ok(())
}

/// A header name, lower-cased as both Envoy and meshgate's sidecar present them.
pub fn header_name(s: &str, field: &str) -> Result<String, ConfigError> {
    let lower = s.to_ascii_lowercase();
    if lower.is_empty() || !lower.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return err(field, "must be a header name (letters, digits, '-' and '_')");
    }
    Ok(lower)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_keys_name_the_field_and_the_expected_ones() {
        let v = json!({"rules": [], "rulez": 1});
        let e = only_keys(v.as_object().unwrap(), "", &["rules"]).unwrap_err();
        assert_eq!(e.to_string(), "invalid configuration: rulez: unknown field (expected one of: rules)");
        let e = only_keys(v.as_object().unwrap(), "opa", &["rules"]).unwrap_err();
        assert_eq!(e.field, "opa.rulez");
    }

    #[test]
    fn header_names_are_lower_cased_and_checked() {
        assert_eq!(header_name("X-Client", "f").unwrap(), "x-client");
        assert_eq!(header_name("bad header", "h").unwrap_err().field, "h");
        assert!(header_name("", "h").is_err());
        assert_eq!(object(&json!(1), "root").unwrap_err().reason, "must be an object");
    }
}
