//! Fault injection: what `sim --faults` and the HIL link inject, in a small documented syntax.
//!
//! A spec is a comma-separated list of `name=rate` items (`rate` is a probability per frame),
//! `all` for every fault at its default rate, and parameters as `name=value`:
//!
//! ```text
//! all                      every fault at its default rate
//! corrupt=0.05,nan=0.01    only these two
//! all,backend_hang=0       every fault but hangs
//! all,seed=7,burst_len=32  a different draw, longer bursts
//! device_lost=0.01,lost_ms=2000   a device that takes 2 s to come back
//! ```
//!
//! A TOML file with the same names as flat keys (`corrupt = 0.05`, `all = true`) says the same.
//! Draws come from a seeded generator, so a run with the same spec and input repeats exactly
//! (thread timing aside).

use std::boxed::Box;
use std::string::{String, ToString};
use std::time::Duration;
use std::vec::Vec;

use kestrel_backend::{Backend, BackendError, Landed, Scrub, Upset};

/// One kind of injected fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// Bytes of the frame's file or packet damaged before it is decoded.
    Corrupt,
    /// The frame's file or packet cut short.
    Truncated,
    /// The frame claims a size its samples do not fill.
    WrongSize,
    /// NaN and infinite samples in a float frame.
    NotFinite,
    /// The sensor skips a frame: it is never delivered.
    Dropout,
    /// The capture time repeats or goes back.
    Timestamp,
    /// Frames delivered back to back, faster than inference, overflowing the queue.
    Burst,
    /// The backend fails one inference.
    BackendError,
    /// The backend hangs, then fails (a launch that times out).
    BackendHang,
    /// The device is lost for a while, then comes back.
    DeviceLost,
    /// A bit of the loaded model flips.
    UpsetModel,
    /// A bit of the activations flips between two layers.
    UpsetActivations,
    /// Bits flip on the telemetry link (a probability per byte; HIL only).
    LinkBitErrors,
    /// The telemetry link goes dark for a while: what crosses it is lost (HIL only).
    LinkLoss,
    /// The telemetry link stops moving for a while, then resumes with nothing lost (HIL only).
    LinkStall,
    /// A bit flips in a command on its way up to the board (a probability per command; HIL
    /// only).
    CommandBitErrors,
    /// The board's ingest stage stalls for `stall_ms` before taking a frame, as a sensor driver
    /// stuck in a call would (a probability per frame; the board's faults, HIL only).
    StageStall,
}

impl Fault {
    /// Every fault, in the order of the fault matrix.
    pub const ALL: [Fault; 17] = [
        Self::Corrupt,
        Self::Truncated,
        Self::WrongSize,
        Self::NotFinite,
        Self::Dropout,
        Self::Timestamp,
        Self::Burst,
        Self::BackendError,
        Self::BackendHang,
        Self::DeviceLost,
        Self::UpsetModel,
        Self::UpsetActivations,
        Self::LinkBitErrors,
        Self::LinkLoss,
        Self::LinkStall,
        Self::CommandBitErrors,
        Self::StageStall,
    ];

    /// Its name in specs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Corrupt => "corrupt",
            Self::Truncated => "truncated",
            Self::WrongSize => "wrong_size",
            Self::NotFinite => "nan",
            Self::Dropout => "dropout",
            Self::Timestamp => "timestamp",
            Self::Burst => "burst",
            Self::BackendError => "backend_error",
            Self::BackendHang => "backend_hang",
            Self::DeviceLost => "device_lost",
            Self::UpsetModel => "upset_model",
            Self::UpsetActivations => "upset_activations",
            Self::LinkBitErrors => "link_bit_errors",
            Self::LinkLoss => "link_loss",
            Self::LinkStall => "link_stall",
            Self::CommandBitErrors => "command_bit_errors",
            Self::StageStall => "stage_stall",
        }
    }

    /// Its rate under `all`: a probability per frame (per inference for the backend faults,
    /// per byte for bit errors, per read of the telemetry for link loss and stalls).
    pub fn default_rate(self) -> f64 {
        match self {
            Self::Corrupt | Self::Truncated => 0.01,
            Self::WrongSize | Self::NotFinite | Self::Dropout | Self::Timestamp => 0.005,
            Self::Burst => 0.002,
            Self::BackendError => 0.005,
            Self::BackendHang | Self::DeviceLost => 0.001,
            Self::UpsetModel | Self::UpsetActivations => 0.002,
            Self::LinkBitErrors => 1e-5,
            Self::LinkLoss | Self::LinkStall => 0.002,
            Self::CommandBitErrors => 0.1,
            Self::StageStall => 0.001,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What to inject, and how.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultSpec {
    rates: [f64; Fault::ALL.len()],
    /// Seed of the draws.
    pub seed: u64,
    /// Frames in a burst.
    pub burst_len: u32,
    /// How long a hang lasts before the backend gives up on it.
    pub hang: Duration,
    /// How long a lost device stays lost (until its reset completes).
    pub lost_for: Duration,
    /// How long the telemetry link stays dark on a loss.
    pub outage: Duration,
    /// How long the telemetry link stalls.
    pub stall: Duration,
    /// Bits an activation upset flips in one inference (a particle shower, or a dense test).
    pub upset_bits: u32,
}

impl Default for FaultSpec {
    /// No faults.
    fn default() -> Self {
        Self {
            rates: [0.0; Fault::ALL.len()],
            seed: 1,
            burst_len: 16,
            hang: Duration::from_millis(200),
            lost_for: Duration::from_millis(500),
            outage: Duration::from_millis(200),
            stall: Duration::from_millis(300),
            upset_bits: 1,
        }
    }
}

/// Why a spec is refused: the item and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    /// The item as written.
    pub item: String,
    /// What is wrong with it.
    pub reason: String,
}

impl core::fmt::Display for SpecError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "fault spec item `{}`: {}", self.item, self.reason)
    }
}

impl std::error::Error for SpecError {}

impl FaultSpec {
    /// Parse a spec such as `all,backend_hang=0,seed=3` (see the module's documentation).
    pub fn parse(spec: &str) -> Result<Self, SpecError> {
        let items = spec
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| match item.split_once('=') {
                Some((key, value)) => (key.trim().to_string(), value.trim().to_string()),
                None => (item.to_string(), String::new()),
            });
        Self::from_items(items)
    }

    /// From `(name, value)` pairs, as a TOML table's keys and values (`all` takes `true`, or
    /// an empty value).
    pub fn from_items(
        items: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SpecError> {
        let mut spec = Self::default();
        for (key, value) in items {
            let error = |reason: &str| SpecError {
                item: if value.is_empty() {
                    key.clone()
                } else {
                    std::format!("{key}={value}")
                },
                reason: reason.to_string(),
            };
            let number = || {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
            };
            match key.as_str() {
                "all" => match value.as_str() {
                    "" | "true" => {
                        for fault in Fault::ALL {
                            spec.set_rate(fault, fault.default_rate());
                        }
                    }
                    "false" => {}
                    _ => return Err(error("`all` takes no value, or true")),
                },
                "seed" => {
                    spec.seed = value
                        .parse()
                        .map_err(|_| error("a seed is a whole number"))?
                }
                "upset_bits" => {
                    spec.upset_bits = value
                        .parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| error("1 bit or more"))?
                }
                "burst_len" => {
                    spec.burst_len = value
                        .parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| error("a burst is 1 frame or more"))?
                }
                "hang_ms" => {
                    let ms = number().ok_or_else(|| error("milliseconds, 0 or more"))?;
                    spec.hang = Duration::from_secs_f64(ms / 1e3);
                }
                "lost_ms" | "outage_ms" | "stall_ms" => {
                    let ms = number().ok_or_else(|| error("milliseconds, 0 or more"))?;
                    let duration = Duration::from_secs_f64(ms / 1e3);
                    match key.as_str() {
                        "lost_ms" => spec.lost_for = duration,
                        "outage_ms" => spec.outage = duration,
                        _ => spec.stall = duration,
                    }
                }
                name => {
                    let Some(fault) = Fault::ALL.into_iter().find(|f| f.name() == name) else {
                        let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                        return Err(error(&std::format!(
                            "unknown; faults are {}, and the parameters seed, burst_len, hang_ms, lost_ms, outage_ms, stall_ms and upset_bits",
                            names.join(", ")
                        )));
                    };
                    let rate = if value.is_empty() {
                        fault.default_rate()
                    } else {
                        number()
                            .filter(|r| *r <= 1.0)
                            .ok_or_else(|| error("a rate is a probability from 0 to 1"))?
                    };
                    spec.set_rate(fault, rate);
                }
            }
        }
        Ok(spec)
    }

    fn set_rate(&mut self, fault: Fault, rate: f64) {
        if let Some(r) = self.rates.get_mut(fault.index()) {
            *r = rate;
        }
    }

    /// The rate of `fault` (0: off).
    pub fn rate(&self, fault: Fault) -> f64 {
        self.rates.get(fault.index()).copied().unwrap_or(0.0)
    }

    /// Whether any fault is on.
    pub fn any(&self) -> bool {
        self.rates.iter().any(|&r| r > 0.0)
    }

    /// Whether any fault of the frames a sensor delivers (damage, size, NaN, dropouts, time,
    /// bursts) is on.
    pub fn any_frame(&self) -> bool {
        [
            Fault::Corrupt,
            Fault::Truncated,
            Fault::WrongSize,
            Fault::NotFinite,
            Fault::Dropout,
            Fault::Timestamp,
            Fault::Burst,
        ]
        .iter()
        .any(|&f| self.rate(f) > 0.0)
    }

    /// Whether any fault of the backend (errors, hangs, loss, upsets) is on.
    pub fn any_backend(&self) -> bool {
        [
            Fault::BackendError,
            Fault::BackendHang,
            Fault::DeviceLost,
            Fault::UpsetModel,
            Fault::UpsetActivations,
        ]
        .iter()
        .any(|&f| self.rate(f) > 0.0)
    }

    /// The spec written back in full, as it parses: `corrupt=0.01,...,seed=1,burst_len=16,...`.
    pub fn describe(&self) -> String {
        let mut items: Vec<String> = Fault::ALL
            .iter()
            .filter(|&&f| self.rate(f) > 0.0)
            .map(|f| std::format!("{}={}", f.name(), self.rate(*f)))
            .collect();
        items.push(std::format!("seed={}", self.seed));
        items.push(std::format!("burst_len={}", self.burst_len));
        items.push(std::format!("hang_ms={}", self.hang.as_millis()));
        items.push(std::format!("lost_ms={}", self.lost_for.as_millis()));
        items.push(std::format!("outage_ms={}", self.outage.as_millis()));
        items.push(std::format!("stall_ms={}", self.stall.as_millis()));
        items.push(std::format!("upset_bits={}", self.upset_bits));
        items.join(",")
    }
}

/// A small seeded generator (SplitMix64): the draws of an injection, repeatable from its seed.
#[derive(Clone, Debug)]
pub struct Draws(u64);

impl Draws {
    /// Draws from `seed`, separated by `stream` so two injectors with one seed differ.
    pub fn new(seed: u64, stream: u64) -> Self {
        Self(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.next_u64() >> 11) as f64) < p * (1u64 << 53) as f64
    }

    /// Damage 8 bytes of `bytes` past the first `skip`, as a bad sector or a garbled packet
    /// leaves them (each byte changed, never left as it was).
    pub fn damage(&mut self, bytes: &mut [u8], skip: usize) {
        let len = bytes.len() as u64;
        let skip = (skip as u64).min(len);
        for _ in 0..8 {
            let at = (skip + self.below(len - skip)) as usize;
            if let Some(b) = bytes.get_mut(at) {
                *b ^= (self.next_u64() as u8) | 1;
            }
        }
    }

    /// A bad capture time after `last_us`: the same again, or one before it.
    pub fn stale_time(&mut self, last_us: u64) -> u64 {
        let back = self.below(2) * self.below(last_us);
        last_us - back
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// What a [`FaultyBackend`] injected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendFaults {
    /// Inferences failed with an error.
    pub errors: u64,
    /// Inferences hung, then failed.
    pub hangs: u64,
    /// Times the device was lost.
    pub losses: u64,
    /// Inferences refused while it was lost (each a failover, or a failed retry).
    pub lost_inferences: u64,
    /// Bits flipped in the loaded model where a scrub checks.
    pub model_upsets_checked: u64,
    /// Bits flipped in the loaded model's padding, which nothing reads or checks.
    pub model_upsets_unchecked: u64,
    /// Checked flips a scrub has found (a restore followed): the detection rate's numerator.
    pub model_upsets_found: u64,
    /// Bits flipped in the activations.
    pub activation_upsets: u64,
}

/// A backend with faults injected: failed and hung inferences, a lost device, upsets in its
/// model and activations. It goes first in a failover chain, as the device that fails.
pub struct FaultyBackend {
    inner: Box<dyn Backend + Send>,
    spec: FaultSpec,
    /// The draws and the lost device's state, shared with [`FaultyBackend::sibling`]s, so that
    /// a backend restarted after a hang goes on with the same sequence of faults.
    state: std::sync::Arc<std::sync::Mutex<FaultState>>,
    /// Checked flips since the last restore.
    unfound: u64,
    /// What it injected.
    pub injected: std::sync::Arc<std::sync::Mutex<BackendFaults>>,
}

struct FaultState {
    draws: Draws,
    lost_until: Option<std::time::Instant>,
}

/// What one inference meets, drawn before it runs.
enum Drawn {
    Lost,
    Hang,
    Error,
    Runs,
}

impl FaultyBackend {
    /// `inner`, with the backend faults of `spec` injected.
    pub fn new(inner: Box<dyn Backend + Send>, spec: &FaultSpec) -> Self {
        Self {
            inner,
            spec: spec.clone(),
            state: std::sync::Arc::new(std::sync::Mutex::new(FaultState {
                draws: Draws::new(spec.seed, 2),
                lost_until: None,
            })),
            unfound: 0,
            injected: std::sync::Arc::default(),
        }
    }

    /// `inner` with the same faults, going on with this one's draws and counts: the backend a
    /// restart builds after this one hung.
    pub fn sibling(&self, inner: Box<dyn Backend + Send>) -> Self {
        Self {
            inner,
            spec: self.spec.clone(),
            state: std::sync::Arc::clone(&self.state),
            unfound: 0,
            injected: std::sync::Arc::clone(&self.injected),
        }
    }

    fn count(&self, what: impl FnOnce(&mut BackendFaults)) {
        what(&mut self.injected.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Draw what the next inference meets and flip its upsets (the lock is not held while it
    /// runs or hangs).
    fn draw(&mut self) -> Drawn {
        let state = std::sync::Arc::clone(&self.state);
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(until) = state.lost_until {
            if std::time::Instant::now() < until {
                return Drawn::Lost;
            }
            state.lost_until = None;
        }
        let spec = &self.spec;
        let draws = &mut state.draws;
        if draws.chance(spec.rate(Fault::UpsetModel)) {
            let bit = draws.next_u64();
            match self.inner.upset(Upset::Model { bit }) {
                Landed::Checked => {
                    self.unfound += 1;
                    self.count(|c| c.model_upsets_checked += 1);
                }
                Landed::Unchecked => self.count(|c| c.model_upsets_unchecked += 1),
                Landed::Missed => {}
            }
        }
        if draws.chance(spec.rate(Fault::UpsetActivations)) {
            for _ in 0..spec.upset_bits {
                let bit = draws.next_u64();
                if self.inner.upset(Upset::Activations { bit }) != Landed::Missed {
                    self.count(|c| c.activation_upsets += 1);
                }
            }
        }
        if draws.chance(spec.rate(Fault::DeviceLost)) {
            state.lost_until = Some(std::time::Instant::now() + spec.lost_for);
            self.count(|c| c.losses += 1);
            Drawn::Lost
        } else if draws.chance(spec.rate(Fault::BackendHang)) {
            Drawn::Hang
        } else if draws.chance(spec.rate(Fault::BackendError)) {
            Drawn::Error
        } else {
            Drawn::Runs
        }
    }
}

impl Backend for FaultyBackend {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn input_len(&self) -> usize {
        self.inner.input_len()
    }

    fn output_len(&self) -> usize {
        self.inner.output_len()
    }

    fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError> {
        match self.draw() {
            Drawn::Lost => {
                self.count(|c| c.lost_inferences += 1);
                Err(BackendError::DeviceLost)
            }
            Drawn::Hang => {
                self.count(|c| c.hangs += 1);
                std::thread::sleep(self.spec.hang);
                Err(BackendError::LaunchFailed)
            }
            Drawn::Error => {
                self.count(|c| c.errors += 1);
                Err(BackendError::Execution)
            }
            Drawn::Runs => self.inner.run(input, output),
        }
    }

    fn scrub(&mut self) -> Scrub {
        self.inner.scrub()
    }

    fn restore(&mut self) -> Result<(), BackendError> {
        self.inner.restore()?;
        let found = std::mem::take(&mut self.unfound);
        self.count(|c| c.model_upsets_found += found);
        Ok(())
    }

    fn upset(&mut self, upset: Upset) -> Landed {
        self.inner.upset(upset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_items_name_themselves() {
        let all = FaultSpec::parse("all").unwrap();
        assert!(Fault::ALL.iter().all(|&f| all.rate(f) == f.default_rate()));
        let some = FaultSpec::parse("all, backend_hang=0, seed=7, burst_len=4, nan=0.5").unwrap();
        assert_eq!(some.rate(Fault::BackendHang), 0.0);
        assert_eq!(some.rate(Fault::NotFinite), 0.5);
        assert_eq!((some.seed, some.burst_len), (7, 4));
        assert_eq!(
            FaultSpec::parse(&some.describe()).unwrap().describe(),
            some.describe()
        );
        assert!(!FaultSpec::parse("").unwrap().any());
        for bad in [
            "corupt=0.1",
            "nan=2",
            "nan=x",
            "seed=-1",
            "burst_len=0",
            "all=3",
        ] {
            let e = FaultSpec::parse(bad).unwrap_err();
            assert_eq!(e.item, bad, "{e}");
        }
    }

    #[test]
    fn draws_repeat_from_their_seed_and_hit_their_rate() {
        let mut a = Draws::new(3, 1);
        let mut b = Draws::new(3, 1);
        let hits = (0..100_000).filter(|_| a.chance(0.1)).count();
        assert!((9_000..11_000).contains(&hits), "{hits}");
        let mut a = Draws::new(3, 1);
        assert!((0..100).all(|_| a.next_u64() == b.next_u64()));
        assert!(!Draws::new(3, 1).chance(0.0));
    }
}
