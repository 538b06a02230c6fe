//! The downlink queue: framed packets waiting for the link, sent best value per byte first,
//! within a byte budget per window (a ground-station pass, or a radio's share per second).
//!
//! A packet's value comes from its class's configured priority and its score ([`value`]). When
//! the queue is full, the least valuable packet per byte goes, whether it is the newcomer or one
//! already queued, and every packet lost is counted by its reason. Fixed capacity, no heap.

use heapless::Vec;

/// A packet's value: its class's priority (1.0 for a class with none configured) times its
/// score.
pub fn value(priorities: &[f32], class: u16, score: f32) -> f32 {
    priorities.get(usize::from(class)).copied().unwrap_or(1.0) * score
}

/// One queued packet.
#[derive(Clone, Debug, PartialEq)]
struct Queued<const MAX: usize> {
    bytes: Vec<u8, MAX>,
    value: f32,
}

impl<const MAX: usize> Queued<MAX> {
    fn value_per_byte(&self) -> f32 {
        self.value / self.bytes.len().max(1) as f32
    }
}

/// What the queue did with the packets it was given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DownlinkStats {
    /// Packets offered.
    pub offered: u64,
    /// Bytes offered.
    pub offered_bytes: u64,
    /// Packets sent.
    pub sent: u64,
    /// Bytes sent.
    pub sent_bytes: u64,
    /// Packets refused on arrival: the queue was full of more valuable ones.
    pub refused_low_value: u64,
    /// Packets evicted from the queue for a more valuable newcomer.
    pub evicted_low_value: u64,
    /// Packets larger than a queue slot or the whole window budget: they could never be sent.
    pub refused_too_large: u64,
}

/// Up to `SLOTS` packets of up to `MAX` bytes each, sent within `budget` bytes per window.
#[derive(Clone, Debug)]
pub struct DownlinkQueue<const SLOTS: usize, const MAX: usize> {
    queue: Vec<Queued<MAX>, SLOTS>,
    budget: u32,
    window_us: u64,
    window_start_us: u64,
    sent_in_window: u32,
    /// What happened so far.
    pub stats: DownlinkStats,
}

impl<const SLOTS: usize, const MAX: usize> DownlinkQueue<SLOTS, MAX> {
    /// An empty queue sending at most `budget` bytes every `window_us` microseconds.
    pub fn new(budget: u32, window_us: u64) -> Self {
        Self {
            queue: Vec::new(),
            budget,
            window_us: window_us.max(1),
            window_start_us: 0,
            sent_in_window: 0,
            stats: DownlinkStats::default(),
        }
    }

    /// A new budget, from the next window on (the `set_downlink_budget` command).
    pub fn set_budget(&mut self, budget: u32, window_us: u64) {
        self.budget = budget;
        self.window_us = window_us.max(1);
    }

    /// Packets waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Queue `packet` with its `value`. When the queue is full, the packet with the least
    /// value per byte (this one or a queued one) is dropped and counted.
    pub fn offer(&mut self, packet: &[u8], value: f32) {
        self.stats.offered += 1;
        self.stats.offered_bytes += packet.len() as u64;
        let Ok(bytes) = Vec::from_slice(packet) else {
            self.stats.refused_too_large += 1;
            return;
        };
        if packet.len() as u64 > u64::from(self.budget) {
            self.stats.refused_too_large += 1;
            return;
        }
        // A NaN value is worth nothing rather than poisoning the order.
        let value = if value.is_nan() { 0.0 } else { value };
        let newcomer = Queued { bytes, value };
        if let Err(newcomer) = self.queue.push(newcomer) {
            let worst = self
                .queue
                .iter_mut()
                .min_by(|a, b| a.value_per_byte().total_cmp(&b.value_per_byte()));
            match worst {
                Some(worst) if worst.value_per_byte() < newcomer.value_per_byte() => {
                    *worst = newcomer;
                    self.stats.evicted_low_value += 1;
                }
                _ => self.stats.refused_low_value += 1,
            }
        }
    }

    /// The most valuable packet per byte that the budget of the window holding `now_us` still
    /// allows, copied into `out`; its length. `None` when nothing waits or the next packet
    /// must wait for the next window.
    pub fn send(&mut self, now_us: u64, out: &mut [u8]) -> Option<usize> {
        if now_us.saturating_sub(self.window_start_us) >= self.window_us {
            self.window_start_us = now_us - now_us % self.window_us;
            self.sent_in_window = 0;
        }
        let (best, _) = self
            .queue
            .iter()
            .enumerate()
            .max_by(|(_, a), (_, b)| a.value_per_byte().total_cmp(&b.value_per_byte()))?;
        let len = self.queue.get(best)?.bytes.len();
        let room = self.budget.saturating_sub(self.sent_in_window);
        if len as u64 > u64::from(room) || len > out.len() {
            return None;
        }
        let packet = self.queue.swap_remove(best);
        out.get_mut(..len)?.copy_from_slice(&packet.bytes);
        self.sent_in_window = self.sent_in_window.saturating_add(len as u32);
        self.stats.sent += 1;
        self.stats.sent_bytes += len as u64;
        Some(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_value_per_byte_goes_first_and_the_least_is_dropped_when_full() {
        let mut queue = DownlinkQueue::<3, 64>::new(1_000, 1_000_000);
        queue.offer(&[1; 10], 1.0); // 0.1 per byte
        queue.offer(&[2; 10], 5.0); // 0.5
        queue.offer(&[3; 40], 8.0); // 0.2
        queue.offer(&[4; 10], 0.5); // 0.05: the least, refused on arrival
        assert_eq!(queue.stats.refused_low_value, 1);
        queue.offer(&[5; 20], 6.0); // 0.3: evicts packet 1 (0.1)
        assert_eq!(queue.stats.evicted_low_value, 1);
        let mut out = [0u8; 64];
        let mut order = std::vec::Vec::new();
        while let Some(len) = queue.send(0, &mut out) {
            order.push((out[0], len));
        }
        assert_eq!(order, [(2, 10), (5, 20), (3, 40)]);
        assert_eq!((queue.stats.sent, queue.stats.sent_bytes), (3, 70));
        assert_eq!(queue.stats.offered, 5);
    }

    #[test]
    fn the_budget_holds_per_window() {
        let mut queue = DownlinkQueue::<8, 64>::new(100, 1_000);
        for i in 0..5u8 {
            queue.offer(&[i; 40], 1.0);
        }
        let mut out = [0u8; 64];
        assert_eq!(queue.send(0, &mut out), Some(40));
        assert_eq!(queue.send(10, &mut out), Some(40));
        assert_eq!(
            queue.send(20, &mut out),
            None,
            "80 of 100 bytes used: 40 more would not fit"
        );
        assert_eq!(queue.send(1_000, &mut out), Some(40), "a new window");
        queue.set_budget(40, 1_000);
        assert_eq!(queue.send(2_500, &mut out), Some(40));
        assert_eq!(queue.send(2_600, &mut out), None);
        assert_eq!(queue.len(), 1);
        queue.offer(&[9; 41], 100.0);
        assert_eq!(
            queue.stats.refused_too_large, 1,
            "larger than the whole budget"
        );
        queue.offer(&[9; 65], 100.0);
        assert_eq!(queue.stats.refused_too_large, 2, "larger than a slot");
    }

    #[test]
    fn values_come_from_class_priorities_and_scores() {
        let priorities = [0.5, 4.0];
        assert_eq!(value(&priorities, 1, 0.5), 2.0);
        assert_eq!(value(&priorities, 0, 0.5), 0.25);
        assert_eq!(value(&priorities, 9, 0.5), 0.5, "no priority configured: 1");
        let mut queue = DownlinkQueue::<1, 8>::new(100, 1);
        queue.offer(&[1; 4], f32::NAN);
        queue.offer(&[2; 4], 0.1);
        assert_eq!(
            queue.stats.evicted_low_value, 1,
            "a NaN value is worth nothing"
        );
    }
}
