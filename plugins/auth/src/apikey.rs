//! API keys: the configuration holds SHA-256 hashes, never the keys themselves.

use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub sha256: [u8; 32],
}

/// The id of the key whose hash matches `presented`, comparing every hash in constant time.
pub fn identify<'a>(keys: &'a [ApiKey], presented: &str) -> Option<&'a str> {
    position(keys, presented).map(|i| keys[i].id.as_str())
}

fn position(keys: &[ApiKey], presented: &str) -> Option<usize> {
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut found = None;
    for (i, k) in keys.iter().enumerate() {
        let diff = k.sha256.iter().zip(digest.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 && found.is_none() {
            found = Some(i);
        }
    }
    found
}

/// How many recognised keys `KnownKeys` remembers before it starts afresh.
pub const KNOWN_KEPT: usize = 1024;

/// `identify` for one configuration's keys, remembering the keys it recognised: a client
/// sends the same key on every request, and hashing it was about a tenth of this plugin's
/// instructions per request (docs/decisions/1500). Unrecognised keys are not remembered,
/// so trying keys fills nothing. The memory lives with the configuration it was built for:
/// a key removed from the configuration stops working with the next configuration.
#[derive(Default)]
pub struct KnownKeys {
    ids: RefCell<HashMap<String, usize>>,
}

impl KnownKeys {
    pub fn identify<'a>(&self, keys: &'a [ApiKey], presented: &str) -> Option<&'a str> {
        if let Some(&i) = self.ids.borrow().get(presented) {
            return keys.get(i).map(|k| k.id.as_str());
        }
        let i = position(keys, presented)?;
        let mut ids = self.ids.borrow_mut();
        if ids.len() >= KNOWN_KEPT {
            ids.clear();
        }
        ids.insert(presented.to_string(), i);
        Some(keys[i].id.as_str())
    }

    pub fn len(&self) -> usize {
        self.ids.borrow().len()
    }
}

pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_recognised_by_hash_only() {
        // sha256("s3cret-key")
        let h = Sha256::digest(b"s3cret-key");
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        let keys = vec![ApiKey { id: "ci-bot".into(), sha256: parse_hex32(&hex).unwrap() }];
        assert_eq!(identify(&keys, "s3cret-key"), Some("ci-bot"));
        assert_eq!(identify(&keys, "s3cret-kez"), None);
        assert_eq!(identify(&keys, ""), None);
        assert_eq!(parse_hex32("zz"), None);
        assert_eq!(parse_hex32(&"g".repeat(64)), None);
    }

    #[test]
    fn known_keys_answer_as_identify_and_remember_only_recognised_ones() {
        let key = |id: &str, secret: &str| ApiKey { id: id.into(), sha256: Sha256::digest(secret.as_bytes()).into() };
        let keys = vec![key("a", "ka"), key("b", "kb")];
        let known = KnownKeys::default();
        for _ in 0..2 {
            assert_eq!(known.identify(&keys, "kb"), Some("b"));
            assert_eq!(known.identify(&keys, "ka"), Some("a"));
            assert_eq!(known.identify(&keys, "kc"), None);
        }
        assert_eq!(known.len(), 2);
        let many: Vec<ApiKey> = (0..KNOWN_KEPT + 5).map(|i| key(&i.to_string(), &format!("k{i}"))).collect();
        for i in 0..KNOWN_KEPT + 5 {
            assert_eq!(known.identify(&many, &format!("k{i}")), Some(i.to_string().as_str()));
        }
        assert!(known.len() <= KNOWN_KEPT);
    }
}
