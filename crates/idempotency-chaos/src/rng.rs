//! A small deterministic random number generator (SplitMix64), so that one seed fixes the
//! traffic's shape and which keys the upstream's faults hit.

/// SplitMix64: fast, good enough for choosing traffic, and reproducible from its seed.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator started from `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// A number in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `num / den`.
    pub(crate) fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// The SplitMix64 finaliser: a bijective scramble of 64 bits.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A hash of `text` under `seed` (FNV-1a, then scrambled): the same inputs always give the same
/// value, in every process.
pub(crate) fn hash(seed: u64, text: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix64(h ^ mix64(seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_spread() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let hits = (0..3000)
            .filter(|i| hash(1, &format!("k{i}")).is_multiple_of(3))
            .count();
        assert!((800..1200).contains(&hits), "{hits}");
        assert_eq!(hash(5, "abc"), hash(5, "abc"));
        assert_ne!(hash(5, "abc"), hash(6, "abc"));
    }
}
