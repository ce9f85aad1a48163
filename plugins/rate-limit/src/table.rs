//! Buckets in proxy-wasm shared data: a fixed-size table of slots updated with
//! compare-and-swap, so every worker of one proxy shares the buckets, no token is spent
//! twice, and memory is bounded by the table size (see docs/decisions/0101 and 0600).
//!
//! Slot `i` lives under the key `<prefix><i>`; its value is 40 bytes:
//! `digest[16] | level u64 LE | updated_ns u64 LE | full_at_ns u64 LE`, or empty when
//! free. A bucket that has refilled to its burst is the same as no bucket, so a slot
//! whose `full_at_ns` has passed is free for any key: eviction loses nothing.
//!
//! A slot key that was never written reads as a free slot, so the table needs no setup.
//! Creating a key cannot be a compare-and-swap (proxy-wasm writes a missing key whatever
//! CAS is given), so creation is claimed first in a claim bitmap (one bit per slot, one
//! shared-data key per `CLAIM_SHARD` slots) that *is* updated with CAS: exactly one worker
//! wins the bit and writes the new key; everyone else re-reads the slot and CASes on it.

use crate::bucket::{BucketState, Limit, Outcome};

/// Distinct keys that may share one probe window before the table counts as full.
pub const PROBE: u32 = 8;
/// Attempts at a compare-and-swap before giving up on one request.
pub const MAX_CAS_ATTEMPTS: u32 = 32;
/// Slots per claim bitmap (1 KiB of value): the default table has one bitmap.
pub const CLAIM_SHARD: u32 = 8192;
const SLOT_LEN: usize = 40;

pub type Digest = [u8; 16];

/// The shared-data operations the table needs (the plugin passes proxy-wasm's).
pub trait SharedStore {
    /// Value and CAS token; `(None, None)` when the key was never written.
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Store `value` if `cas` still matches (`None`: unconditionally). `Err` on mismatch.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch>;
}

#[derive(Debug, PartialEq, Eq)]
pub struct CasMismatch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    digest: Digest,
    state: BucketState,
    full_at_ns: u64,
}

fn encode(slot: &Slot) -> [u8; SLOT_LEN] {
    let mut out = [0u8; SLOT_LEN];
    out[..16].copy_from_slice(&slot.digest);
    out[16..24].copy_from_slice(&slot.state.level.to_le_bytes());
    out[24..32].copy_from_slice(&slot.state.updated_ns.to_le_bytes());
    out[32..40].copy_from_slice(&slot.full_at_ns.to_le_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<Slot> {
    if bytes.len() != SLOT_LEN {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&bytes[..16]);
    Some(Slot {
        digest,
        state: BucketState { level: u64_at(16), updated_ns: u64_at(24) },
        full_at_ns: u64_at(32),
    })
}

#[derive(Debug, PartialEq, Eq)]
pub enum TakeResult {
    Decided(Outcome),
    /// Every slot of the key's probe window holds another key's non-full bucket.
    TableFull,
    /// The compare-and-swap lost `MAX_CAS_ATTEMPTS` times in a row.
    Contended,
}

/// Whether this worker may create a never-written slot key.
#[derive(Debug, PartialEq, Eq)]
enum Claim {
    Won,
    /// Another worker claimed or created the slot (or the bitmap moved): look again.
    Lost,
}

#[derive(Clone, Debug)]
pub struct SlotTable {
    prefix: String,
    size: u32,
}

/// Decimal digits of `n` into `out` (what `format!` would give, without its machinery:
/// this runs for every probed slot of every request).
fn push_decimal(out: &mut String, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(d as char);
    }
}

impl SlotTable {
    pub fn new(namespace: &str, size: u32) -> Self {
        // The size is part of the prefix: a table of another size never reads these slots.
        SlotTable { prefix: format!("meshgate.rl.{namespace}.{size}."), size: size.max(1) }
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn key(&self, slot: u32) -> String {
        let mut key = String::with_capacity(self.prefix.len() + 10);
        self.key_into(&mut key, slot);
        key
    }

    fn key_into(&self, key: &mut String, slot: u32) {
        key.clear();
        key.push_str(&self.prefix);
        push_decimal(key, slot);
    }

    /// The claim bitmap key of the shard holding `slot` (no slot key has this form:
    /// slot keys end in digits only).
    pub fn claim_key(&self, slot: u32) -> String {
        let mut key = String::with_capacity(self.prefix.len() + 16);
        key.push_str(&self.prefix);
        key.push_str("claims.");
        push_decimal(&mut key, slot / CLAIM_SHARD);
        key
    }

    fn shard_bytes(&self, slot: u32) -> usize {
        let first = slot / CLAIM_SHARD * CLAIM_SHARD;
        ((self.size - first).min(CLAIM_SHARD) as usize).div_ceil(8)
    }

    /// Try to become the one worker that creates the never-written key of `slot`.
    fn claim(&self, store: &dyn SharedStore, slot: u32, slot_key: &str) -> Claim {
        let key = self.claim_key(slot);
        let (bits, cas) = store.get(&key);
        let Some(cas) = cas else {
            // First creation in this shard: the bitmap starts empty. Writing it
            // unconditionally can race only with another worker doing the same, whose
            // claims are then re-checked against the slot itself below.
            let _ = store.set(&key, &vec![0u8; self.shard_bytes(slot)], None);
            return Claim::Lost;
        };
        let mut bits = bits.unwrap_or_default();
        bits.resize(bits.len().max(self.shard_bytes(slot)), 0);
        let (byte, mask) = (((slot % CLAIM_SHARD) / 8) as usize, 1u8 << (slot % 8));
        if bits[byte] & mask != 0 {
            // Created (or being created right now) by another worker.
            return Claim::Lost;
        }
        bits[byte] |= mask;
        if store.set(&key, &bits, Some(cas)).is_err() {
            return Claim::Lost;
        }
        // Belt and braces: the bitmap may have been written unconditionally above by a
        // worker that raced on the shard's first creation; the slot itself tells.
        if store.get(slot_key).1.is_some() {
            return Claim::Lost;
        }
        Claim::Won
    }

    /// Take one token from the bucket `digest` under `limit` at `now_ns`.
    pub fn take(&self, store: &dyn SharedStore, digest: &Digest, limit: &Limit, now_ns: u64) -> TakeResult {
        let base = u64::from_le_bytes(digest[..8].try_into().unwrap()) % self.size as u64;
        let mut key = String::with_capacity(self.prefix.len() + 10);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let mut own: Option<(u32, Option<u32>, Slot)> = None;
            let mut free: Option<(u32, Option<u32>)> = None;
            for i in 0..PROBE.min(self.size) {
                let slot = ((base + i as u64) % self.size as u64) as u32;
                self.key_into(&mut key, slot);
                let (value, cas) = store.get(&key);
                match value.as_deref().and_then(decode) {
                    Some(s) if &s.digest == digest => {
                        own = Some((slot, cas, s));
                        break;
                    }
                    Some(s) if s.full_at_ns > now_ns => {}
                    _ => {
                        free.get_or_insert((slot, cas));
                    }
                }
            }
            let (slot, cas, prev) = match (own, free) {
                (Some((slot, cas, s)), _) => (slot, cas, Some(s.state)),
                (None, Some((slot, cas))) => (slot, cas, None),
                (None, None) => return TakeResult::TableFull,
            };
            self.key_into(&mut key, slot);
            if cas.is_none() && self.claim(store, slot, &key) == Claim::Lost {
                continue;
            }
            let outcome = limit.take(prev, now_ns);
            let new = Slot { digest: *digest, state: outcome.state, full_at_ns: outcome.full_at_ns };
            // With `cas` None the claim above made this worker the key's only creator.
            if store.set(&key, &encode(&new), cas).is_ok() {
                return TakeResult::Decided(outcome);
            }
        }
        TakeResult::Contended
    }

    /// Empty the slots in `start..start+count` whose bucket has refilled to its burst.
    /// Returns (slots evicted, next start).
    pub fn evict_idle(&self, store: &dyn SharedStore, start: u32, count: u32, now_ns: u64) -> (u32, u32) {
        let mut evicted = 0;
        let count = count.min(self.size);
        let mut key = String::with_capacity(self.prefix.len() + 10);
        for i in 0..count {
            let slot = (start.wrapping_add(i)) % self.size;
            self.key_into(&mut key, slot);
            let (value, cas) = store.get(&key);
            if let Some(s) = value.as_deref().and_then(decode) {
                if s.full_at_ns <= now_ns && cas.is_some() && store.set(&key, &[], cas).is_ok() {
                    evicted += 1;
                }
            }
        }
        (evicted, (start.wrapping_add(count)) % self.size)
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Shared data with Envoy's semantics: one CAS counter for the store starting at 1,
    /// CAS 0 (None) writes unconditionally, and a missing key is created by any write.
    #[derive(Default)]
    pub struct MemStore {
        pub map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next_cas: RefCell<u32>,
        /// Writes to fail with a mismatch before succeeding (simulates other workers).
        pub fail_next_sets: RefCell<u32>,
    }

    impl SharedStore for MemStore {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            match self.map.borrow().get(key) {
                Some((v, cas)) => (if v.is_empty() { None } else { Some(v.clone()) }, Some(*cas)),
                None => (None, None),
            }
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
            if *self.fail_next_sets.borrow() > 0 {
                *self.fail_next_sets.borrow_mut() -= 1;
                // Another worker wrote in between: bump the CAS like a real write would.
                if let Some(e) = self.map.borrow_mut().get_mut(key) {
                    *self.next_cas.borrow_mut() += 1;
                    e.1 = *self.next_cas.borrow();
                }
                return Err(CasMismatch);
            }
            let mut map = self.map.borrow_mut();
            // As in Envoy, a missing key is written whatever CAS is given.
            let next = {
                let mut n = self.next_cas.borrow_mut();
                *n += 1;
                *n
            };
            match map.get_mut(key) {
                Some(entry) => {
                    if cas.is_some_and(|c| c != entry.1) {
                        return Err(CasMismatch);
                    }
                    *entry = (value.to_vec(), next);
                }
                None => {
                    map.insert(key.to_string(), (value.to_vec(), next));
                }
            }
            Ok(())
        }
    }

    const S: u64 = 1_000_000_000;
    const L: Limit = Limit { tokens: 1, per_seconds: 60, burst: 2 };

    fn decided(r: TakeResult) -> Outcome {
        match r {
            TakeResult::Decided(o) => o,
            other => panic!("expected a decision, got {other:?}"),
        }
    }

    /// Slot keys in the store (claim bitmaps excluded).
    fn slot_keys(store: &MemStore) -> usize {
        store.map.borrow().keys().filter(|k| !k.contains(".claims.")).count()
    }

    #[test]
    fn nothing_is_written_until_a_bucket_is_used() {
        let store = MemStore::default();
        let t = SlotTable::new("t", 8192);
        assert!(store.map.borrow().is_empty());
        assert!(decided(t.take(&store, &[3u8; 16], &L, 0)).allowed);
        // One slot and the claim bitmap of its shard.
        assert_eq!(slot_keys(&store), 1);
        assert_eq!(store.map.borrow().len(), 2);
        assert_eq!(store.map.borrow()[&t.claim_key(0)].0.len(), 1024);
    }

    #[test]
    fn a_table_written_in_full_by_an_older_plugin_still_works() {
        // Tables of the previous release had every slot pre-written as empty.
        let store = MemStore::default();
        let t = SlotTable::new("t", 16);
        for slot in 0..16 {
            store.set(&t.key(slot), &[], None).unwrap();
        }
        assert_eq!(decided(t.take(&store, &[1u8; 16], &L, 0)).remaining, 1);
        assert_eq!(decided(t.take(&store, &[1u8; 16], &L, 0)).remaining, 0);
        assert_eq!(slot_keys(&store), 16);
    }

    /// What "another worker" does in the middle of this one's request.
    type OtherWorker<'a> = Box<dyn FnOnce(&MemStore) + 'a>;

    /// A store that lets another worker run a whole request in the middle of this one:
    /// after the `nth` read of `key`, before the value is handed back.
    struct Interleaved<'a> {
        inner: &'a MemStore,
        key: String,
        nth: RefCell<u32>,
        other: RefCell<Option<OtherWorker<'a>>>,
    }

    impl SharedStore for Interleaved<'_> {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            let got = self.inner.get(key);
            if key == self.key {
                let mut n = self.nth.borrow_mut();
                *n = n.saturating_sub(1);
                if *n == 0 {
                    if let Some(f) = self.other.borrow_mut().take() {
                        f(self.inner);
                    }
                }
            }
            got
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn two_workers_creating_one_bucket_at_once_spend_two_tokens() {
        let limit = Limit { tokens: 1, per_seconds: 60, burst: 5 };
        let t = SlotTable::new("t", 64);
        let d = [4u8; 16];
        let base = (u64::from_le_bytes(d[..8].try_into().unwrap()) % 64) as u32;
        let store = MemStore::default();
        let other_saw = RefCell::new(None);
        // Worker B's whole request runs right after worker A found the slot unwritten.
        let racing = Interleaved {
            inner: &store,
            key: t.key(base),
            nth: RefCell::new(1),
            other: RefCell::new(Some(Box::new(|s: &MemStore| {
                *other_saw.borrow_mut() = Some(decided(t.take(s, &d, &limit, 0)).remaining);
            }))),
        };
        let a = decided(t.take(&racing, &d, &limit, 0));
        assert_eq!(*other_saw.borrow(), Some(4));
        assert_eq!(a.remaining, 3);
        assert_eq!(decided(t.take(&store, &d, &limit, 0)).remaining, 2);
        assert_eq!(slot_keys(&store), 1);
    }

    #[test]
    fn a_creation_in_progress_elsewhere_is_waited_for_not_duplicated() {
        let limit = Limit { tokens: 1, per_seconds: 60, burst: 5 };
        let t = SlotTable::new("t", 64);
        let d = [5u8; 16];
        let base = (u64::from_le_bytes(d[..8].try_into().unwrap()) % 64) as u32;
        let store = MemStore::default();
        let other = RefCell::new(None);
        // Worker B runs while worker A has claimed the slot but not yet written it (A's
        // re-check read of the slot is its second read): B must not create a second
        // bucket for the key next door; it gives up as contended.
        let racing = Interleaved {
            inner: &store,
            key: t.key(base),
            nth: RefCell::new(2),
            other: RefCell::new(Some(Box::new(|s: &MemStore| {
                *other.borrow_mut() = Some(t.take(s, &d, &limit, 0));
            }))),
        };
        // A's first attempt only creates the shard's bitmap; make it exist beforehand.
        store.set(&t.claim_key(base), &[0u8; 8], None).unwrap();
        assert_eq!(decided(t.take(&racing, &d, &limit, 0)).remaining, 4);
        assert_eq!(*other.borrow(), Some(TakeResult::Contended));
        assert_eq!(decided(t.take(&store, &d, &limit, 0)).remaining, 3);
        assert_eq!(slot_keys(&store), 1);
    }

    #[test]
    fn keys_get_separate_buckets_and_state_persists() {
        let store = MemStore::default();
        let t = SlotTable::new("t", 64);
        let a = [1u8; 16];
        let b = [2u8; 16];
        assert_eq!(decided(t.take(&store, &a, &L, 0)).remaining, 1);
        assert_eq!(decided(t.take(&store, &a, &L, 0)).remaining, 0);
        assert!(!decided(t.take(&store, &a, &L, 0)).allowed);
        assert!(decided(t.take(&store, &b, &L, 0)).allowed);
    }

    #[test]
    fn cas_mismatch_is_retried_and_spends_one_token() {
        let store = MemStore::default();
        let t = SlotTable::new("t", 8);
        let a = [7u8; 16];
        *store.fail_next_sets.borrow_mut() = 3;
        assert_eq!(decided(t.take(&store, &a, &L, 0)).remaining, 1);
        assert_eq!(decided(t.take(&store, &a, &L, 0)).remaining, 0);
    }

    #[test]
    fn endless_contention_gives_up() {
        let store = MemStore::default();
        let t = SlotTable::new("t", 8);
        *store.fail_next_sets.borrow_mut() = MAX_CAS_ATTEMPTS;
        assert_eq!(t.take(&store, &[1u8; 16], &L, 0), TakeResult::Contended);
    }

    #[test]
    fn full_table_reports_full_until_a_bucket_refills() {
        let store = MemStore::default();
        let t = SlotTable::new("t", PROBE);
        for k in 0..PROBE as u8 {
            assert!(decided(t.take(&store, &[k; 16], &L, 0)).allowed);
        }
        assert_eq!(t.take(&store, &[99u8; 16], &L, 0), TakeResult::TableFull);
        // 60 s later every bucket is full again, so its slot is free for another key.
        assert!(decided(t.take(&store, &[99u8; 16], &L, 60 * S)).allowed);
    }

    #[test]
    fn eviction_empties_only_refilled_slots() {
        let store = MemStore::default();
        let t = SlotTable::new("t", 32);
        decided(t.take(&store, &[1u8; 16], &Limit { tokens: 1, per_seconds: 1, burst: 1 }, 0));
        decided(t.take(&store, &[2u8; 16], &Limit { tokens: 1, per_seconds: 100, burst: 1 }, 0));
        let (evicted, next) = t.evict_idle(&store, 0, 32, 5 * S);
        assert_eq!((evicted, next), (1, 0));
        let live = store.map.borrow().iter().filter(|(k, (v, _))| !k.contains(".claims.") && !v.is_empty()).count();
        assert_eq!(live, 1);
    }

    #[test]
    fn slot_encoding_round_trips_and_rejects_garbage() {
        let s = Slot { digest: [9; 16], state: BucketState { level: 5, updated_ns: 6 }, full_at_ns: 7 };
        assert_eq!(decode(&encode(&s)), Some(s));
        assert_eq!(decode(b"short"), None);
    }
}
