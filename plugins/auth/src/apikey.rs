//! API keys: the configuration holds SHA-256 hashes, never the keys themselves.

use sha2::{Digest, Sha256};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub sha256: [u8; 32],
}

/// The id of the key whose hash matches `presented`, comparing every hash in constant time.
pub fn identify<'a>(keys: &'a [ApiKey], presented: &str) -> Option<&'a str> {
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut found = None;
    for k in keys {
        let diff = k.sha256.iter().zip(digest.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 && found.is_none() {
            found = Some(k.id.as_str());
        }
    }
    found
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
}
