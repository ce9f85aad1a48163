//! Token-bucket arithmetic, free of any host call so it can be unit-tested.
//!
//! Levels are kept in milli-tokens (integer), so a bucket survives a round trip through
//! shared data bit for bit and two workers compute the same refill from the same state.

/// Milli-tokens per token.
pub const SCALE: u64 = 1000;
const NANOS_PER_SEC: u64 = 1_000_000_000;

/// A rule's limit: `tokens` every `per_seconds`, holding at most `burst` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub tokens: u64,
    pub per_seconds: u64,
    pub burst: u64,
}

/// The stored state of one bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketState {
    /// Milli-tokens available at `updated_ns`.
    pub level: u64,
    /// Time (ns since the epoch) up to which refill has been credited.
    pub updated_ns: u64,
}

/// What one request did to a bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// Whole tokens left after this request.
    pub remaining: u64,
    /// Seconds until the bucket is full again (0 when full).
    pub reset_seconds: u64,
    /// Seconds until one token is available (0 when allowed).
    pub retry_after_seconds: u64,
    /// The state to store back.
    pub state: BucketState,
    /// When (ns since the epoch) the stored state will have refilled to `burst`.
    pub full_at_ns: u64,
}

impl Limit {
    pub fn capacity(&self) -> u64 {
        self.burst.saturating_mul(SCALE)
    }

    /// Milli-tokens credited for `elapsed_ns` (rounded down).
    fn refill(&self, elapsed_ns: u64) -> u64 {
        scaled([elapsed_ns, self.tokens, SCALE], [self.per_seconds, NANOS_PER_SEC], false)
    }

    /// Nanoseconds needed to credit `milli` milli-tokens (rounded up).
    pub fn nanos_for(&self, milli: u64) -> u64 {
        scaled([milli, self.per_seconds, NANOS_PER_SEC], [self.tokens, SCALE], true)
    }

    /// The state `prev` refilled up to `now_ns` (a missing bucket is a full one).
    pub fn refilled(&self, prev: Option<BucketState>, now_ns: u64) -> BucketState {
        let cap = self.capacity();
        let Some(prev) = prev else {
            return BucketState { level: cap, updated_ns: now_ns };
        };
        // Clocks of different workers may disagree by a little: never refill backwards.
        let elapsed = now_ns.saturating_sub(prev.updated_ns);
        let added = self.refill(elapsed);
        let level = prev.level.saturating_add(added);
        if level >= cap {
            BucketState { level: cap, updated_ns: now_ns.max(prev.updated_ns) }
        } else {
            // Advance only by the time actually turned into milli-tokens, so frequent
            // callers do not lose the fractional remainder.
            BucketState { level, updated_ns: prev.updated_ns + self.nanos_for(added).min(elapsed) }
        }
    }

    /// Take one token from the bucket at `now_ns`.
    pub fn take(&self, prev: Option<BucketState>, now_ns: u64) -> Outcome {
        let mut state = self.refilled(prev, now_ns);
        let allowed = state.level >= SCALE;
        if allowed {
            state.level -= SCALE;
        }
        let cap = self.capacity();
        // Time from now until the bucket is full / has one token.
        let since_update = now_ns.saturating_sub(state.updated_ns);
        let to_full = self.nanos_for(cap - state.level).saturating_sub(since_update);
        let to_one = if state.level >= SCALE {
            0
        } else {
            self.nanos_for(SCALE - state.level).saturating_sub(since_update)
        };
        Outcome {
            allowed,
            remaining: state.level / SCALE,
            reset_seconds: ceil_seconds(to_full),
            retry_after_seconds: if allowed { 0 } else { ceil_seconds(to_one).max(1) },
            state,
            full_at_ns: now_ns.saturating_add(to_full),
        }
    }
}

fn ceil_seconds(ns: u64) -> u64 {
    ns.div_ceil(NANOS_PER_SEC)
}

/// The product of `num` over the product of `den`, rounded down (or up), saturating at
/// `u64::MAX`. In 64 bits whenever both products fit, as they do for any limit and
/// elapsed time a request sees; else in 128 bits, exactly. wasm has no 128-bit multiply
/// or divide: each is a library call, and the divides alone ran about 300 instructions
/// a request (decision 3000).
fn scaled(num: [u64; 3], den: [u64; 2], round_up: bool) -> u64 {
    let narrow = num[0].checked_mul(num[1]).and_then(|n| n.checked_mul(num[2]));
    if let (Some(n), Some(d)) = (narrow, den[0].checked_mul(den[1])) {
        return if round_up { n.div_ceil(d) } else { n / d };
    }
    scaled_wide(num, den, round_up)
}

/// `scaled` in 128 bits: exact for any inputs.
fn scaled_wide(num: [u64; 3], den: [u64; 2], round_up: bool) -> u64 {
    let n = num[0] as u128 * num[1] as u128 * num[2] as u128;
    let d = den[0] as u128 * den[1] as u128;
    u64::try_from(if round_up { n.div_ceil(d) } else { n / d }).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn limit(tokens: u64, per_seconds: u64, burst: u64) -> Limit {
        Limit { tokens, per_seconds, burst }
    }

    #[test]
    fn new_bucket_starts_full_and_counts_down() {
        let l = limit(1, 60, 3);
        let o1 = l.take(None, 100 * S);
        assert!(o1.allowed);
        assert_eq!(o1.remaining, 2);
        let o2 = l.take(Some(o1.state), 100 * S);
        let o3 = l.take(Some(o2.state), 100 * S);
        assert_eq!((o2.remaining, o3.remaining), (1, 0));
        let o4 = l.take(Some(o3.state), 100 * S);
        assert!(!o4.allowed);
        assert_eq!(o4.remaining, 0);
        assert_eq!(o4.retry_after_seconds, 60);
        assert_eq!(o4.reset_seconds, 180);
    }

    #[test]
    fn refill_is_time_based_and_capped_at_burst() {
        let l = limit(10, 1, 5);
        let mut st = None;
        for _ in 0..5 {
            st = Some(l.take(st, 0).state);
        }
        assert!(!l.take(st, 0).allowed);
        // 100 ms at 10/s gives exactly one token.
        let o = l.take(st, S / 10);
        assert!(o.allowed);
        assert_eq!(o.remaining, 0);
        // An hour later the bucket is full, not overfull.
        let o = l.take(Some(o.state), 3600 * S);
        assert_eq!(o.remaining, 4);
        assert_eq!(o.state.level, 4 * SCALE);
    }

    #[test]
    fn frequent_small_refills_lose_no_fraction() {
        // 1 token per 3 s: a refill every 7 ms must still add up to 1 token after 3 s.
        let l = limit(1, 3, 1);
        let mut st = l.take(None, 0).state;
        assert_eq!(st.level, 0);
        let mut t = 0;
        while t < 3 * S {
            t += 7_000_000;
            st = l.refilled(Some(st), t);
        }
        assert_eq!(st.level, SCALE);
    }

    #[test]
    fn clock_going_backwards_does_not_refill() {
        let l = limit(1, 1, 1);
        let st = l.take(None, 10 * S).state;
        let o = l.take(Some(st), 9 * S);
        assert!(!o.allowed);
        assert_eq!(o.state.level, 0);
    }

    #[test]
    fn retry_after_and_reset_follow_partial_refill() {
        let l = limit(1, 10, 2);
        let a = l.take(None, 0);
        let b = l.take(Some(a.state), 0);
        // 4 s later: 0.4 token; one more needs 6 s, full needs 16 s.
        let c = l.take(Some(b.state), 4 * S);
        assert!(!c.allowed);
        assert_eq!(c.retry_after_seconds, 6);
        assert_eq!(c.reset_seconds, 16);
        assert_eq!(c.full_at_ns, 20 * S);
    }

    #[test]
    fn sixty_four_bit_path_agrees_with_exact_arithmetic() {
        // Products just under, at and over u64::MAX, and denominators either side of it.
        let edge = u64::MAX / 1000;
        let cases = [
            ([7, 3, 1000], [2, S]),
            ([edge, 1, 1000], [3, S]),
            ([edge + 1, 1, 1000], [3, S]),
            ([u64::MAX, 1, 1], [1, 7]),
            ([u64::MAX, 2, 1000], [u64::MAX, 2]),
            ([123_456_789, 1_000_000_000, 1000], [u64::MAX / 2, 3]),
        ];
        for (num, den) in cases {
            for up in [false, true] {
                assert_eq!(scaled(num, den, up), scaled_wide(num, den, up), "{num:?}/{den:?} up={up}");
            }
        }
    }

    #[test]
    fn huge_values_saturate_instead_of_overflowing() {
        let l = limit(u32::MAX as u64, 1, u32::MAX as u64);
        let o = l.take(None, u64::MAX - 1);
        assert!(o.allowed);
        let o2 = l.take(Some(o.state), u64::MAX);
        assert!(o2.allowed);
    }
}
