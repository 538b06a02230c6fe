//! The downlink queue: items waiting for the link, sent best value per byte first, within a
//! byte budget per window (a ground-station pass, or a radio's share per second).
//!
//! An item is one or more encoded messages that go together (a frame's detections, or all the
//! parts of a product), written with an [`ItemWriter`]. Items are framed when they are sent,
//! so sequence counts on the link have no holes for items that never left. An item's value
//! comes from its class's configured priority and its score ([`value`]). When the queue is
//! full, the least valuable item per byte goes, whether it is the newcomer or one already
//! queued, and every item lost is counted by its reason. Fixed capacity, no heap.

use heapless::Vec;

use crate::{Framing, Telemetry, WireError};

/// An item's value: its class's priority (1.0 for a class with none configured) times its
/// score.
pub fn value(priorities: &[f32], class: u16, score: f32) -> f32 {
    priorities.get(usize::from(class)).copied().unwrap_or(1.0) * score
}

/// Bytes before each message in an item: its length, big-endian.
const LENGTH_PREFIX: usize = 2;

/// Builds an item in a caller's buffer: encoded messages, each after its length.
#[derive(Debug)]
pub struct ItemWriter<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl<'b> ItemWriter<'b> {
    /// An empty item in `buf`.
    pub fn new(buf: &'b mut [u8]) -> Self {
        Self { buf, len: 0 }
    }

    /// Add `message`.
    pub fn push(&mut self, message: &Telemetry) -> Result<(), WireError> {
        let rest = self
            .buf
            .get_mut(self.len..)
            .ok_or(WireError::BufferTooSmall)?;
        let (prefix, body) = rest
            .split_at_mut_checked(LENGTH_PREFIX)
            .ok_or(WireError::BufferTooSmall)?;
        let written = message.encode(body)?.len();
        let length = u16::try_from(written).map_err(|_| WireError::BufferTooSmall)?;
        prefix.copy_from_slice(&length.to_be_bytes());
        self.len += LENGTH_PREFIX + written;
        Ok(())
    }

    /// The item so far.
    pub fn bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

/// The encoded messages of an item.
pub fn messages(item: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = item;
    core::iter::from_fn(move || {
        let (&[high, low], body) = rest.split_first_chunk::<LENGTH_PREFIX>()?;
        let (message, after) =
            body.split_at_checked(usize::from(u16::from_be_bytes([high, low])))?;
        rest = after;
        Some(message)
    })
}

/// One queued item.
#[derive(Clone, Debug, PartialEq)]
struct Queued<const MAX: usize> {
    bytes: Vec<u8, MAX>,
    value: f32,
    /// Whether it carries a frame's result (the frame ledger follows these).
    result: bool,
}

impl<const MAX: usize> Queued<MAX> {
    fn value_per_byte(&self) -> f32 {
        self.value / self.bytes.len().max(1) as f32
    }
}

/// What the queue did with the items it was given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DownlinkStats {
    /// Items offered.
    pub offered: u64,
    /// Bytes of the messages offered (encoded, before framing).
    pub offered_bytes: u64,
    /// Items sent.
    pub sent: u64,
    /// Bytes sent on the link (framed).
    pub sent_bytes: u64,
    /// Items refused on arrival: the queue was full of more valuable ones.
    pub refused_low_value: u64,
    /// Items evicted from the queue for a more valuable newcomer.
    pub evicted_low_value: u64,
    /// Items larger than a queue slot or the whole window budget: they could never be sent.
    pub refused_too_large: u64,
    /// Items that failed to frame (a message the framing cannot carry); dropped.
    pub framing_errors: u64,
}

/// What became of the items that carry a frame's result ([`DownlinkQueue::offer_result`]): the
/// downlink's part of the frame ledger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ResultFates {
    /// Sent.
    pub sent: u64,
    /// Refused on arrival for more valuable items.
    pub refused_low_value: u64,
    /// Evicted for a more valuable newcomer.
    pub evicted_low_value: u64,
    /// Too large to ever send, or not framable.
    pub too_large: u64,
}

/// Up to `SLOTS` items of up to `MAX` bytes each, sent within `budget` bytes per window.
#[derive(Clone, Debug)]
pub struct DownlinkQueue<const SLOTS: usize, const MAX: usize> {
    queue: Vec<Queued<MAX>, SLOTS>,
    budget: u32,
    window_us: u64,
    window_start_us: u64,
    sent_in_window: u32,
    /// What happened so far.
    pub stats: DownlinkStats,
    /// What happened to the items carrying results.
    pub results: ResultFates,
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
            results: ResultFates::default(),
        }
    }

    /// A new budget, from the next window on (the `set_downlink_budget` command).
    pub fn set_budget(&mut self, budget: u32, window_us: u64) {
        self.budget = budget;
        self.window_us = window_us.max(1);
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Bytes of the messages waiting.
    pub fn queued_bytes(&self) -> usize {
        self.queue.iter().map(|q| q.bytes.len()).sum()
    }

    /// Queue `item` (from an [`ItemWriter`]) with its `value`. When the queue is full, the
    /// item with the least value per byte (this one or a queued one) is dropped and counted.
    pub fn offer(&mut self, item: &[u8], value: f32) {
        self.offer_tagged(item, value, false);
    }

    /// [`DownlinkQueue::offer`] for an item carrying a frame's result, whose fate is counted
    /// in [`DownlinkQueue::results`].
    pub fn offer_result(&mut self, item: &[u8], value: f32) {
        self.offer_tagged(item, value, true);
    }

    /// Result items waiting.
    pub fn results_queued(&self) -> usize {
        self.queue.iter().filter(|q| q.result).count()
    }

    fn offer_tagged(&mut self, item: &[u8], value: f32, result: bool) {
        self.stats.offered += 1;
        self.stats.offered_bytes += messages(item).map(|m| m.len() as u64).sum::<u64>();
        let fits = Vec::from_slice(item)
            .ok()
            .filter(|_| item.len() as u64 <= u64::from(self.budget));
        let Some(bytes) = fits else {
            self.stats.refused_too_large += 1;
            self.results.too_large += u64::from(result);
            return;
        };
        // A NaN value is worth nothing rather than poisoning the order.
        let value = if value.is_nan() { 0.0 } else { value };
        let newcomer = Queued {
            bytes,
            value,
            result,
        };
        if let Err(newcomer) = self.queue.push(newcomer) {
            let worst = self
                .queue
                .iter()
                .enumerate()
                .min_by(|(_, a), (_, b)| a.value_per_byte().total_cmp(&b.value_per_byte()));
            match worst {
                Some((i, worst)) if worst.value_per_byte() < newcomer.value_per_byte() => {
                    self.results.evicted_low_value += u64::from(worst.result);
                    // The newcomer joins at the back: the queue stays in arrival order.
                    self.queue.remove(i);
                    let _ = self.queue.push(newcomer);
                    self.stats.evicted_low_value += 1;
                }
                _ => {
                    self.stats.refused_low_value += 1;
                    self.results.refused_low_value += u64::from(newcomer.result);
                }
            }
        }
    }

    /// Frame the most valuable item per byte into `out` with `framing`, if the budget of the
    /// window holding `now_us` still allows it; the bytes written. `None` when nothing waits
    /// or the next item must wait for the next window.
    pub fn send(
        &mut self,
        now_us: u64,
        framing: &mut (impl Framing + ?Sized),
        out: &mut [u8],
    ) -> Option<usize> {
        if now_us.saturating_sub(self.window_start_us) >= self.window_us {
            self.window_start_us = now_us - now_us % self.window_us;
            self.sent_in_window = 0;
        }
        // The best value per byte; among equals the oldest (`max_by` keeps the last maximum,
        // so the queue is scanned newest first): acknowledgements go down in the order their
        // commands came up.
        let (best, item) = self
            .queue
            .iter()
            .enumerate()
            .rev()
            .max_by(|(_, a), (_, b)| a.value_per_byte().total_cmp(&b.value_per_byte()))?;
        let most: usize = messages(&item.bytes)
            .map(|m| framing.framed_len(m.len()))
            .sum();
        let room = self.budget.saturating_sub(self.sent_in_window);
        if most as u64 > u64::from(room) || most > out.len() {
            return None;
        }
        // `remove`, not `swap_remove`: the queue stays in arrival order for the tie above.
        let item = self.queue.remove(best);
        let mut written = 0;
        for message in messages(&item.bytes) {
            let framed = out
                .get_mut(written..)
                .ok_or(WireError::BufferTooSmall)
                .and_then(|rest| framing.frame_encoded(message, rest));
            match framed {
                Ok(len) => written += len,
                Err(_) => {
                    self.stats.framing_errors += 1;
                    self.results.too_large += u64::from(item.result);
                    return Some(0);
                }
            }
        }
        self.sent_in_window = self.sent_in_window.saturating_add(written as u32);
        self.results.sent += u64::from(item.result);
        self.stats.sent += 1;
        self.stats.sent_bytes += written as u64;
        Some(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ccsds::{Decoder, Framer};
    use crate::message::{ProductKind, ProductPart};

    /// An item of one product part: `data` bytes, numbered `tag`.
    fn item(tag: u32, data: usize) -> std::vec::Vec<u8> {
        let mut buf = [0u8; 2048];
        let mut writer = ItemWriter::new(&mut buf);
        writer
            .push(&Telemetry::ProductPart(ProductPart {
                product: tag,
                frame: 0,
                kind: ProductKind::Thumbnail,
                class: 0,
                part: 0,
                parts: 1,
                data: (0..data).map(|i| i as u8).collect(),
            }))
            .unwrap();
        writer.bytes().to_vec()
    }

    /// The product numbers in a stream of packets.
    fn tags(stream: &[u8]) -> std::vec::Vec<u32> {
        let (mut decoder, mut at, mut tags) = (Decoder::new(), 0, vec![]);
        while let Some((packet, used)) = decoder.next(&stream[at..]) {
            at += used;
            if let Ok(Telemetry::ProductPart(p)) = packet.message {
                tags.push(p.product);
            }
        }
        tags
    }

    #[test]
    fn best_value_per_byte_goes_first_and_the_least_is_dropped_when_full() {
        let mut queue = DownlinkQueue::<3, 128>::new(1_000, 1_000_000);
        queue.offer(&item(1, 10), 1.0);
        queue.offer(&item(2, 10), 5.0);
        queue.offer(&item(3, 40), 8.0);
        queue.offer(&item(4, 10), 0.5); // the least per byte: refused on arrival
        assert_eq!(queue.stats.refused_low_value, 1);
        queue.offer(&item(5, 20), 6.0); // evicts item 1
        assert_eq!(queue.stats.evicted_low_value, 1);
        let (mut framer, mut out, mut stream) = (Framer::new(), [0u8; 256], vec![]);
        while let Some(len) = queue.send(0, &mut framer, &mut out) {
            stream.extend_from_slice(&out[..len]);
        }
        assert_eq!(tags(&stream), [2, 5, 3]);
        assert_eq!(queue.stats.sent, 3);
        assert_eq!(queue.stats.sent_bytes, stream.len() as u64);
        assert_eq!(queue.stats.offered, 5);
        // No holes in the sequence counts for the items that never left.
        let mut decoder = Decoder::new();
        let mut at = 0;
        while let Some((_, used)) = decoder.next(&stream[at..]) {
            at += used;
        }
        assert_eq!(decoder.stats.sequence_gaps, 0);
    }

    /// Items of equal value per byte (a run of command acknowledgements) go down in the order
    /// they came, evictions or not.
    #[test]
    fn equal_values_go_first_in_first_out() {
        let mut queue = DownlinkQueue::<4, 128>::new(10_000, 1_000_000);
        let (mut framer, mut out, mut stream) = (Framer::new(), [0u8; 256], vec![]);
        queue.offer(&item(1, 10), 0.1);
        // 5 evicts 1, the least valuable; 6 finds the queue full of equals and is refused.
        for tag in 2..=6 {
            queue.offer(&item(tag, 10), 1.0);
        }
        if let Some(len) = queue.send(0, &mut framer, &mut out) {
            stream.extend_from_slice(&out[..len]);
        }
        // 7 takes the room 2 left; 8 is refused.
        for tag in 7..=8 {
            queue.offer(&item(tag, 10), 1.0);
        }
        while let Some(len) = queue.send(0, &mut framer, &mut out) {
            stream.extend_from_slice(&out[..len]);
        }
        assert_eq!(tags(&stream), [2, 3, 4, 5, 7]);
        assert_eq!(queue.stats.evicted_low_value, 1);
        assert_eq!(queue.stats.refused_low_value, 2);
    }

    #[test]
    fn the_budget_holds_per_window() {
        // Each item frames to 8 + 2 + 3 + 8 + 40 = 61 bytes or fewer.
        let mut queue = DownlinkQueue::<8, 128>::new(130, 1_000);
        for i in 0..5 {
            queue.offer(&item(i, 40), 1.0);
        }
        let (mut framer, mut out) = (Framer::new(), [0u8; 256]);
        let first = queue.send(0, &mut framer, &mut out).unwrap();
        assert!(first > 40 && first <= 65, "{first}");
        assert!(queue.send(10, &mut framer, &mut out).is_some());
        assert_eq!(
            queue.send(20, &mut framer, &mut out),
            None,
            "two items used the window: a third would not fit"
        );
        assert!(
            queue.send(1_000, &mut framer, &mut out).is_some(),
            "a new window"
        );
        queue.set_budget(first as u32, 1_000);
        assert!(queue.send(2_500, &mut framer, &mut out).is_some());
        assert_eq!(queue.send(2_600, &mut framer, &mut out), None);
        assert_eq!(queue.len(), 1);
        queue.offer(&item(9, 100), 100.0);
        assert_eq!(
            queue.stats.refused_too_large, 1,
            "larger than the whole budget"
        );
        queue.set_budget(10_000, 1_000);
        queue.offer(&item(9, 200), 100.0);
        assert_eq!(queue.stats.refused_too_large, 2, "larger than a slot");
    }

    #[test]
    fn values_come_from_class_priorities_and_scores() {
        let priorities = [0.5, 4.0];
        assert_eq!(value(&priorities, 1, 0.5), 2.0);
        assert_eq!(value(&priorities, 0, 0.5), 0.25);
        assert_eq!(value(&priorities, 9, 0.5), 0.5, "no priority configured: 1");
        let mut queue = DownlinkQueue::<1, 64>::new(100, 1);
        queue.offer(&item(1, 4), f32::NAN);
        queue.offer(&item(2, 4), 0.1);
        assert_eq!(
            queue.stats.evicted_low_value, 1,
            "a NaN value is worth nothing"
        );
    }

    #[test]
    fn an_item_holds_its_messages_in_order_and_a_full_buffer_is_an_error() {
        let (a, b) = (item(1, 5), item(2, 7));
        let joined = [a.clone(), b.clone()].concat();
        let inside: std::vec::Vec<&[u8]> = messages(&joined).collect();
        assert_eq!(inside, [&a[2..], &b[2..]]);
        let mut small = [0u8; 8];
        let mut writer = ItemWriter::new(&mut small);
        let part = Telemetry::decode(&a[2..]).unwrap();
        assert_eq!(writer.push(&part), Err(WireError::BufferTooSmall));
        assert!(writer.bytes().is_empty());
    }
}
