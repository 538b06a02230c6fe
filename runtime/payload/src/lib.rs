//! Kestrel's payload services on std boards (the flight binary on a Jetson, and `sim` on a
//! desktop share them): results become telemetry messages and PNG products, queued by value
//! per byte under a downlink budget and written to a link in CCSDS or MAVLink 2 framing
//! ([`downlink`]); commands from the ground arrive on the same link and are carried out
//! ([`command`]).

pub mod command;
pub mod downlink;

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[u64], percent: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((percent / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted.get(rank.min(sorted.len()) - 1).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
