//! Reproducible pseudo-random draws.

/// xorshift64: reproducible pseudo-random draws without a dependency.
pub struct Rng(pub u64);

impl Rng {
    /// The next draw.
    pub fn draw(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform-ish in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.draw() % n as u64) as usize
    }

    /// Any int8 code.
    pub fn code(&mut self) -> i8 {
        self.draw() as i8
    }
}
