//! The frame ledger: every frame the pipeline accepted ends as exactly one of product sent,
//! product queued, dropped by policy (with the reason) or rejected as invalid (with the
//! reason). `accepted == sent + queued + dropped + rejected` once a run has drained; health
//! telemetry carries the counts, and tests check the balance after every fault scenario.

/// Why an accepted frame's product was not sent, by the payload's own policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum DropReason {
    /// The inference queue was full (a burst).
    QueueFull = 0,
    /// Every backend of the failover chain failed on it.
    Backend = 1,
    /// Its best score was below the reporting threshold.
    BelowThreshold = 2,
    /// The downlink queue was full of more valuable items.
    DownlinkRefused = 3,
    /// Evicted from the downlink queue by a more valuable item.
    DownlinkEvicted = 4,
    /// Larger than the downlink can ever carry, or the framing could not carry it.
    DownlinkTooLarge = 5,
    /// Written after the telemetry link failed.
    LinkDown = 6,
}

/// Why an accepted frame was refused as invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum RejectReason {
    /// The source could not read or decode it (a corrupt or truncated file or packet).
    Source = 0,
    /// Its size or bands do not fit its samples or the model (a wrong-size frame).
    Frame = 1,
    /// NaN or infinite samples.
    NotFinite = 2,
    /// Its capture time repeats or precedes the previous frame's.
    Timestamp = 3,
    /// The model's output was unusable (empty, not finite).
    Output = 4,
}

impl DropReason {
    /// Every reason, in id order.
    pub const ALL: [Self; 7] = [
        Self::QueueFull,
        Self::Backend,
        Self::BelowThreshold,
        Self::DownlinkRefused,
        Self::DownlinkEvicted,
        Self::DownlinkTooLarge,
        Self::LinkDown,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::Backend => "backend",
            Self::BelowThreshold => "below_threshold",
            Self::DownlinkRefused => "downlink_refused",
            Self::DownlinkEvicted => "downlink_evicted",
            Self::DownlinkTooLarge => "downlink_too_large",
            Self::LinkDown => "link_down",
        }
    }
}

impl RejectReason {
    /// Every reason, in id order.
    pub const ALL: [Self; 5] = [
        Self::Source,
        Self::Frame,
        Self::NotFinite,
        Self::Timestamp,
        Self::Output,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Frame => "frame",
            Self::NotFinite => "not_finite",
            Self::Timestamp => "timestamp",
            Self::Output => "output",
        }
    }
}

/// The counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Ledger {
    /// Frames the pipeline took in.
    pub accepted: u64,
    /// Frames whose product left on the link.
    pub sent: u64,
    /// Frames whose product still waits in the downlink queue.
    pub queued: u64,
    /// Frames dropped by policy, by [`DropReason`].
    pub dropped: [u64; DropReason::ALL.len()],
    /// Frames rejected as invalid, by [`RejectReason`].
    pub rejected: [u64; RejectReason::ALL.len()],
}

impl Ledger {
    /// Count a frame dropped for `reason`.
    pub fn drop(&mut self, reason: DropReason) {
        self.drop_many(reason, 1);
    }

    /// Count `frames` dropped for `reason`.
    pub fn drop_many(&mut self, reason: DropReason, frames: u64) {
        if let Some(n) = self.dropped.get_mut(reason as usize) {
            *n += frames;
        }
    }

    /// Count a frame rejected for `reason`.
    pub fn reject(&mut self, reason: RejectReason) {
        if let Some(n) = self.rejected.get_mut(reason as usize) {
            *n += 1;
        }
    }

    /// Frames dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped.get(reason as usize).copied().unwrap_or(0)
    }

    /// Frames rejected for `reason`.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected.get(reason as usize).copied().unwrap_or(0)
    }

    /// Accepted frames with no end yet (in flight), or, if negative, ends counted twice:
    /// zero once a run has drained.
    pub fn unaccounted(&self) -> i128 {
        let ended = self.sent
            + self.queued
            + self.dropped.iter().sum::<u64>()
            + self.rejected.iter().sum::<u64>();
        i128::from(self.accepted) - i128::from(ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_balances_only_when_every_frame_has_one_end() {
        let mut ledger = Ledger {
            accepted: 5,
            sent: 1,
            queued: 1,
            ..Ledger::default()
        };
        ledger.drop(DropReason::QueueFull);
        ledger.reject(RejectReason::Timestamp);
        assert_eq!(ledger.unaccounted(), 1, "one frame still in flight");
        ledger.reject(RejectReason::NotFinite);
        assert_eq!(ledger.unaccounted(), 0);
        ledger.drop(DropReason::LinkDown);
        assert_eq!(ledger.unaccounted(), -1, "an end counted twice shows too");
        assert_eq!(
            (
                ledger.dropped(DropReason::QueueFull),
                ledger.rejected(RejectReason::NotFinite)
            ),
            (1, 1)
        );
    }
}
