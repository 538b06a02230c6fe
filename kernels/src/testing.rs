//! Test support shared by the kernel tests.

/// xorshift64: reproducible pseudo-random draws without a dependency.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform-ish in `0..n`.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Any int8 code.
    pub(crate) fn code(&mut self) -> i8 {
        self.next() as i8
    }
}
