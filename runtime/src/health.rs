//! Health counters: every frame that enters is accounted for as done, dropped or failed.

/// What went wrong with a frame. The numeric values are stable telemetry ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum ErrorKind {
    /// The source could not read or decode the frame (corrupt file, sensor fault).
    Source = 1,
    /// The frame does not fit the model (band count, empty, larger than the buffers).
    Frame = 2,
    /// The backend failed to run the model.
    Backend = 3,
    /// The model's output was empty or not finite.
    Output = 4,
    /// No frame buffer was free.
    Pool = 5,
    /// The frame's capture time is not after the previous frame's (a repeated or
    /// out-of-order timestamp: a stuck or glitching sensor clock).
    Timestamp = 6,
}

impl ErrorKind {
    /// Every kind, in id order.
    pub const ALL: [ErrorKind; 6] = [
        Self::Source,
        Self::Frame,
        Self::Backend,
        Self::Output,
        Self::Pool,
        Self::Timestamp,
    ];

    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Frame => "frame",
            Self::Backend => "backend",
            Self::Output => "output",
            Self::Pool => "pool",
            Self::Timestamp => "timestamp",
        }
    }

    fn index(self) -> usize {
        self as usize - 1
    }
}

/// Upper bounds of the latency buckets in microseconds; the last bucket is unbounded.
pub const LATENCY_BOUNDS_US: [u32; 15] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 5_000_000,
];

/// A fixed-bucket latency histogram (no allocation, mergeable, cheap to downlink).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct LatencyHistogram {
    /// Counts per bucket: `counts[i]` holds latencies `<= LATENCY_BOUNDS_US[i]` and above the
    /// previous bound; the last entry holds everything larger.
    pub counts: [u32; LATENCY_BOUNDS_US.len() + 1],
    /// Largest latency recorded.
    pub max_us: u64,
}

impl LatencyHistogram {
    /// Count one latency.
    pub fn record(&mut self, us: u64) {
        let bucket = LATENCY_BOUNDS_US
            .iter()
            .position(|&bound| us <= u64::from(bound))
            .unwrap_or(LATENCY_BOUNDS_US.len());
        // `counts` has one bucket past the last bound, so `bucket` is always one of them.
        if let Some(count) = self.counts.get_mut(bucket) {
            *count = count.saturating_add(1);
        }
        self.max_us = self.max_us.max(us);
    }

    /// Latencies recorded.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|&c| u64::from(c)).sum()
    }

    /// Upper bound of the bucket holding the `percent`th percentile (the maximum for the last
    /// bucket), or `None` when empty.
    pub fn percentile_upper_bound_us(&self, percent: f32) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = libm::ceilf(percent.clamp(0.0, 100.0) / 100.0 * total as f32).max(1.0) as u64;
        let mut seen = 0;
        for (i, &count) in self.counts.iter().enumerate() {
            seen += u64::from(count);
            if seen >= rank {
                return Some(
                    LATENCY_BOUNDS_US
                        .get(i)
                        .map_or(self.max_us, |&b| u64::from(b)),
                );
            }
        }
        Some(self.max_us)
    }

    /// Add another histogram's counts to this one.
    pub fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine = mine.saturating_add(theirs);
        }
        self.max_us = self.max_us.max(other.max_us);
    }
}

/// What scrubbing the loaded model found and did ([`crate::threaded::PipelineConfig::scrub_every`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ScrubStats {
    /// Scrubs run.
    pub scrubs: u64,
    /// Scrubs that found the model corrupt.
    pub corrupt: u64,
    /// Restores from the golden copy that succeeded.
    pub restored: u64,
    /// Restores that failed (the frames since stay suspect).
    pub restore_failures: u64,
    /// Frames run again after a restore.
    pub reruns: u64,
    /// Time spent scrubbing, microseconds, and the longest scrub.
    pub scrub_us: u64,
    /// The longest scrub, microseconds.
    pub max_scrub_us: u64,
}

impl ScrubStats {
    fn merge(&mut self, other: &Self) {
        self.scrubs += other.scrubs;
        self.corrupt += other.corrupt;
        self.restored += other.restored;
        self.restore_failures += other.restore_failures;
        self.reruns += other.reruns;
        self.scrub_us += other.scrub_us;
        self.max_scrub_us = self.max_scrub_us.max(other.max_scrub_us);
    }
}

/// Frame accounting for one pipeline: `frames_in == frames_done + frames_dropped + errors`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Health {
    /// Frames offered to the pipeline.
    pub frames_in: u64,
    /// Frames that produced a result.
    pub frames_done: u64,
    /// Frames discarded by the drop policy because the pipeline was full.
    pub frames_dropped: u64,
    /// Failed frames, indexed by `ErrorKind as usize - 1`.
    errors: [u64; ErrorKind::ALL.len()],
    /// Per-frame processing latency of completed frames.
    pub latency: LatencyHistogram,
    /// Scrubbing of the loaded model.
    pub scrub: ScrubStats,
}

impl Health {
    /// Count a frame that failed with `kind`.
    pub fn record_error(&mut self, kind: ErrorKind) {
        if let Some(count) = self.errors.get_mut(kind.index()) {
            *count += 1;
        }
    }

    /// Count a completed frame and its latency.
    pub fn record_done(&mut self, latency_us: u64) {
        self.frames_done += 1;
        self.latency.record(latency_us);
    }

    /// Failed frames of one kind.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors.get(kind.index()).copied().unwrap_or(0)
    }

    /// Failed frames of every kind.
    pub fn total_errors(&self) -> u64 {
        self.errors.iter().sum()
    }

    /// Frames in flight or lost: zero once a pipeline has drained.
    pub fn unaccounted(&self) -> i128 {
        i128::from(self.frames_in)
            - i128::from(self.frames_done)
            - i128::from(self.frames_dropped)
            - i128::from(self.total_errors())
    }

    /// Add another pipeline's (or thread's) counters to these.
    pub fn merge(&mut self, other: &Self) {
        self.frames_in += other.frames_in;
        self.frames_done += other.frames_done;
        self.frames_dropped += other.frames_dropped;
        for (mine, theirs) in self.errors.iter_mut().zip(other.errors) {
            *mine += theirs;
        }
        self.latency.merge(&other.latency);
        self.scrub.merge(&other.scrub);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_percentiles() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.percentile_upper_bound_us(50.0), None);
        for us in [10, 60, 60, 700, 9_000_000] {
            h.record(us);
        }
        assert_eq!(h.counts[0], 1);
        assert_eq!(h.counts[1], 2);
        assert_eq!(h.counts[4], 1);
        assert_eq!(h.counts[15], 1);
        assert_eq!(h.percentile_upper_bound_us(50.0), Some(100));
        assert_eq!(h.percentile_upper_bound_us(80.0), Some(1_000));
        assert_eq!(h.percentile_upper_bound_us(99.0), Some(9_000_000));
    }

    #[test]
    fn accounting_adds_up() {
        let mut a = Health {
            frames_in: 4,
            ..Health::default()
        };
        a.record_done(120);
        a.record_error(ErrorKind::Source);
        a.record_error(ErrorKind::Output);
        a.frames_dropped += 1;
        assert_eq!(a.unaccounted(), 0);
        let mut b = Health {
            frames_in: 1,
            ..Health::default()
        };
        b.record_error(ErrorKind::Source);
        a.merge(&b);
        assert_eq!(
            (a.frames_in, a.errors(ErrorKind::Source), a.total_errors()),
            (5, 2, 3)
        );
        assert_eq!(a.unaccounted(), 0);
    }
}
