//! Buckets in proxy-wasm shared data: a fixed-size table of slots updated with
//! compare-and-swap, so every worker of one proxy shares the buckets, no token is spent
//! twice, and memory is bounded by the table size (see docs/decisions/0101).
//!
//! Slot `i` lives under the key `<prefix><i>`; its value is 40 bytes:
//! `digest[16] | level u64 LE | updated_ns u64 LE | full_at_ns u64 LE`, or empty when
//! free. A bucket that has refilled to its burst is the same as no bucket, so a slot
//! whose `full_at_ns` has passed is free for any key: eviction loses nothing.

use crate::bucket::{BucketState, Limit, Outcome};

/// Distinct keys that may share one probe window before the table counts as full.
pub const PROBE: u32 = 8;
/// Attempts at a compare-and-swap before giving up on one request.
pub const MAX_CAS_ATTEMPTS: u32 = 32;
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

#[derive(Clone, Debug)]
pub struct SlotTable {
    prefix: String,
    size: u32,
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
        format!("{}{}", self.prefix, slot)
    }

    /// Write an empty value into every slot that was never written, so that every later
    /// write can be a compare-and-swap (proxy-wasm treats CAS 0 as "unconditional").
    /// Returns the number of slots initialised; 0 when the table already exists.
    pub fn initialise(&self, store: &dyn SharedStore) -> u32 {
        // Slots are initialised in order, so the last one existing means all do.
        if store.get(&self.key(self.size - 1)).1.is_some() {
            return 0;
        }
        let mut written = 0;
        for slot in 0..self.size {
            let key = self.key(slot);
            if store.get(&key).1.is_none() && store.set(&key, &[], None).is_ok() {
                written += 1;
            }
        }
        written
    }

    /// Take one token from the bucket `digest` under `limit` at `now_ns`.
    pub fn take(&self, store: &dyn SharedStore, digest: &Digest, limit: &Limit, now_ns: u64) -> TakeResult {
        let base = u64::from_le_bytes(digest[..8].try_into().unwrap()) % self.size as u64;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let mut own: Option<(u32, Option<u32>, Slot)> = None;
            let mut free: Option<(u32, Option<u32>)> = None;
            for i in 0..PROBE.min(self.size) {
                let slot = ((base + i as u64) % self.size as u64) as u32;
                let (value, cas) = store.get(&self.key(slot));
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
            let outcome = limit.take(prev, now_ns);
            let new = Slot { digest: *digest, state: outcome.state, full_at_ns: outcome.full_at_ns };
            if store.set(&self.key(slot), &encode(&new), cas).is_ok() {
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
        for i in 0..count {
            let slot = (start.wrapping_add(i)) % self.size;
            let key = self.key(slot);
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

    /// Shared data with Envoy's semantics: CAS starts at 1, increments on every write,
    /// CAS 0 (None) writes unconditionally.
    #[derive(Default)]
    pub struct MemStore {
        pub map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
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
                    e.1 += 1;
                }
                return Err(CasMismatch);
            }
            let mut map = self.map.borrow_mut();
            let entry = map.entry(key.to_string()).or_insert((Vec::new(), 0));
            if let Some(c) = cas {
                if c != entry.1 {
                    return Err(CasMismatch);
                }
            }
            entry.0 = value.to_vec();
            entry.1 += 1;
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

    #[test]
    fn initialise_once_then_every_write_is_a_cas() {
        let store = MemStore::default();
        let t = SlotTable::new("t", 16);
        assert_eq!(t.initialise(&store), 16);
        assert_eq!(t.initialise(&store), 0);
        assert!(store.map.borrow().values().all(|(v, cas)| v.is_empty() && *cas == 1));
    }

    #[test]
    fn keys_get_separate_buckets_and_state_persists() {
        let store = MemStore::default();
        let t = SlotTable::new("t", 64);
        t.initialise(&store);
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
        t.initialise(&store);
        let a = [7u8; 16];
        *store.fail_next_sets.borrow_mut() = 3;
        assert_eq!(decided(t.take(&store, &a, &L, 0)).remaining, 1);
        assert_eq!(decided(t.take(&store, &a, &L, 0)).remaining, 0);
    }

    #[test]
    fn endless_contention_gives_up() {
        let store = MemStore::default();
        let t = SlotTable::new("t", 8);
        t.initialise(&store);
        *store.fail_next_sets.borrow_mut() = MAX_CAS_ATTEMPTS;
        assert_eq!(t.take(&store, &[1u8; 16], &L, 0), TakeResult::Contended);
    }

    #[test]
    fn full_table_reports_full_until_a_bucket_refills() {
        let store = MemStore::default();
        let t = SlotTable::new("t", PROBE);
        t.initialise(&store);
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
        t.initialise(&store);
        decided(t.take(&store, &[1u8; 16], &Limit { tokens: 1, per_seconds: 1, burst: 1 }, 0));
        decided(t.take(&store, &[2u8; 16], &Limit { tokens: 1, per_seconds: 100, burst: 1 }, 0));
        let (evicted, next) = t.evict_idle(&store, 0, 32, 5 * S);
        assert_eq!((evicted, next), (1, 0));
        let live = store.map.borrow().values().filter(|(v, _)| !v.is_empty()).count();
        assert_eq!(live, 1);
    }

    #[test]
    fn slot_encoding_round_trips_and_rejects_garbage() {
        let s = Slot { digest: [9; 16], state: BucketState { level: 5, updated_ns: 6 }, full_at_ns: 7 };
        assert_eq!(decode(&encode(&s)), Some(s));
        assert_eq!(decode(b"short"), None);
    }
}
