//! The telemetry messages, each with a stable id and version ([`MESSAGES`] is the table), and
//! their encoding: `[id: u16 big-endian][version: u8][postcard body]`, into a caller's buffer.

use heapless::Vec;
use serde::{Deserialize, Serialize};

use crate::WireError;

/// Classes kept in a classification's ranking.
pub const TOP_K: usize = 5;
/// Boxes one detections message carries; a frame with more sends the best and counts the rest.
pub const MAX_BOXES: usize = 64;
/// Arguments of an event.
pub const EVENT_ARGS: usize = 3;
/// Error kinds counted in a health snapshot (the runtime's `ErrorKind`s, in their order).
pub const ERROR_KINDS: usize = 6;
/// Bytes of a product one [`ProductPart`] carries at most; larger products are split.
pub const PART_BYTES: usize = 1024;

/// What a message is, by its stable id. The numbers are part of the wire format: never reuse or
/// renumber one; add a new id (or version) instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum MessageId {
    /// [`Classification`].
    Classification = 0x0101,
    /// [`Detections`].
    Detections = 0x0102,
    /// [`Health`].
    Health = 0x0201,
    /// [`Event`].
    Event = 0x0301,
    /// [`CommandAck`].
    CommandAck = 0x0401,
    /// [`ProductPart`].
    ProductPart = 0x0501,
}

/// One row of the message table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageInfo {
    /// The stable id.
    pub id: MessageId,
    /// Name in the docs and the ground decoder's output.
    pub name: &'static str,
    /// Version of its body.
    pub version: u8,
    /// CCSDS APID its packets carry.
    pub apid: u16,
    /// What it means.
    pub meaning: &'static str,
}

/// Every message, as the docs' table lists it (a test checks the README against this).
pub const MESSAGES: [MessageInfo; 6] = [
    MessageInfo {
        id: MessageId::Classification,
        name: "classification",
        version: 1,
        apid: 0x010,
        meaning: "one frame or tile classified: sequence, capture time, class, score, top-5",
    },
    MessageInfo {
        id: MessageId::Detections,
        name: "detections",
        version: 1,
        apid: 0x011,
        meaning: "a frame's detections: boxes in frame pixels, class, score; boxes left out",
    },
    MessageInfo {
        id: MessageId::Health,
        name: "health",
        version: 2,
        apid: 0x020,
        meaning: "counters by kind, queue depths, drops by reason, latency p50/p99, temperature and power if known",
    },
    MessageInfo {
        id: MessageId::Event,
        name: "event",
        version: 1,
        apid: 0x030,
        meaning: "something happened: event id, severity, three integer arguments",
    },
    MessageInfo {
        id: MessageId::CommandAck,
        name: "command_ack",
        version: 1,
        apid: 0x040,
        meaning: "a command accepted or rejected, with a reason code",
    },
    MessageInfo {
        id: MessageId::ProductPart,
        name: "product_part",
        version: 1,
        apid: 0x050,
        meaning: "part of a PNG product (detection crop, thumbnail, class map) for a frame",
    },
];

impl MessageId {
    /// The id for `raw`, if it is one.
    pub fn from_u16(raw: u16) -> Option<Self> {
        MESSAGES.iter().map(|m| m.id).find(|id| *id as u16 == raw)
    }

    /// This message's row of [`MESSAGES`].
    pub fn info(self) -> MessageInfo {
        // Every id has a row (a test checks it); the first row is never reached otherwise.
        MESSAGES
            .iter()
            .copied()
            .find(|m| m.id == self)
            .unwrap_or(MESSAGES[0])
    }
}

/// A class and its score.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ranked {
    /// Class index in the model's labels.
    pub class: u16,
    /// Its score (a probability for softmax models).
    pub score: f32,
}

/// One frame or tile classified.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    /// The frame's sequence number at its source.
    pub frame: u32,
    /// Capture time, microseconds on the board's monotonic clock.
    pub capture_us: u64,
    /// The tile within the frame (0 for a whole frame).
    pub tile: u16,
    /// The best class.
    pub class: u16,
    /// Its score.
    pub score: f32,
    /// The best classes, best first.
    pub top: Vec<Ranked, TOP_K>,
}

/// A box in frame pixels.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireBox {
    /// Left edge.
    pub x: f32,
    /// Top edge.
    pub y: f32,
    /// Width.
    pub w: f32,
    /// Height.
    pub h: f32,
    /// Class index.
    pub class: u16,
    /// Score.
    pub score: f32,
}

/// A frame's detections, best first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Detections {
    /// The frame's sequence number at its source.
    pub frame: u32,
    /// Capture time, microseconds on the board's monotonic clock.
    pub capture_us: u64,
    /// The boxes sent.
    pub boxes: Vec<WireBox, MAX_BOXES>,
    /// Boxes found but not sent (beyond [`MAX_BOXES`] or the detector's lists).
    pub left_out: u32,
}

/// A health snapshot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Microseconds since start.
    pub uptime_us: u64,
    /// Frames accepted.
    pub frames_in: u64,
    /// Frames with a result.
    pub frames_done: u64,
    /// Frames dropped by the queue policy.
    pub frames_dropped: u64,
    /// Frames failed, by error kind (source, frame, backend, output, pool, timestamp).
    pub errors: [u64; ERROR_KINDS],
    /// Frames waiting for inference.
    pub queue_depth: u16,
    /// Items waiting in the downlink queue.
    pub downlink_queue: u16,
    /// Downlink items dropped, by reason: refused for lower value, evicted for lower value,
    /// too large to ever send.
    pub downlink_dropped: [u32; 3],
    /// Latency median, microseconds.
    pub latency_p50_us: u32,
    /// Latency 99th percentile, microseconds.
    pub latency_p99_us: u32,
    /// Board temperature, millidegrees Celsius, when the board has a sensor.
    pub temperature_mc: Option<i32>,
    /// Board power, milliwatts, when the board has a monitor.
    pub power_mw: Option<u32>,
    /// The frame ledger: how every accepted frame ended.
    pub ledger: LedgerCounts,
}

/// Drop reasons in a [`LedgerCounts`] (the runtime's `ledger::DropReason`s, in their order).
pub const DROP_REASONS: usize = 7;
/// Reject reasons in a [`LedgerCounts`] (the runtime's `ledger::RejectReason`s, in their order).
pub const REJECT_REASONS: usize = 5;

/// The frame ledger's counts: `accepted == sent + queued + dropped + rejected` once drained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerCounts {
    /// Frames accepted.
    pub accepted: u64,
    /// Frames whose product was sent.
    pub sent: u64,
    /// Frames whose product waits in the downlink queue.
    pub queued: u64,
    /// Dropped by policy: queue full, backend, below threshold, downlink refused, downlink
    /// evicted, downlink too large, link down.
    pub dropped: [u64; DROP_REASONS],
    /// Rejected as invalid: source, frame, not finite, timestamp, output.
    pub rejected: [u64; REJECT_REASONS],
}

/// How bad an event is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// For the record.
    Info,
    /// Handled, worth a look.
    Warning,
    /// A failure the payload contained.
    Error,
    /// The payload cannot do its job.
    Fatal,
}

/// What an event is, by its stable id (part of the wire format: never reuse or renumber).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum EventId {
    /// A command was refused: args are the command id, its sequence number and the
    /// [`RejectReason`] code.
    CommandRejected = 0x0001,
    /// The active model changed: args are the old slot and the new one.
    ModelSwitched = 0x0002,
    /// Frames are no longer taken (the `pause` command).
    Paused = 0x0003,
    /// Frames are taken again (the `resume` command).
    Resumed = 0x0004,
    /// A backend failed on a frame with a device fault and the frame ran on the next one in
    /// the failover chain: args are the chain index that failed, the one that took over, and
    /// the fault code.
    BackendFailover = 0x0005,
    /// The preferred backend ran a frame again and is back in use: args are the chain index
    /// that was in use until then.
    BackendRestored = 0x0006,
    /// A scrub found the loaded model corrupt (a bit flipped in memory): args are the chain
    /// index, 1 if it was restored from its golden copy (the frames since the last clean scrub
    /// then run again) or 0 if the restore failed.
    ModelCorrupt = 0x0007,
    /// A backend did not answer within its deadline and was restarted in-process on a new
    /// worker: args are the chain index, restarts so far, and 1 if the new worker loaded the
    /// model or 0 if it could not be started.
    BackendRestarted = 0x0008,
}

/// One row of the event table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventInfo {
    /// The stable id.
    pub id: EventId,
    /// Name in the docs and the ground decoder's output.
    pub name: &'static str,
    /// How bad it is.
    pub severity: Severity,
    /// What it means, and its arguments.
    pub meaning: &'static str,
}

/// Every event, as the docs' table lists it (a test checks the README against this).
pub const EVENTS: [EventInfo; 8] = [
    EventInfo {
        id: EventId::CommandRejected,
        name: "command_rejected",
        severity: Severity::Warning,
        meaning: "a command was refused: command id, sequence number, reason code",
    },
    EventInfo {
        id: EventId::ModelSwitched,
        name: "model_switched",
        severity: Severity::Info,
        meaning: "the active model changed: old slot, new slot",
    },
    EventInfo {
        id: EventId::Paused,
        name: "paused",
        severity: Severity::Info,
        meaning: "frames are no longer taken",
    },
    EventInfo {
        id: EventId::Resumed,
        name: "resumed",
        severity: Severity::Info,
        meaning: "frames are taken again",
    },
    EventInfo {
        id: EventId::BackendFailover,
        name: "backend_failover",
        severity: Severity::Error,
        meaning: "a backend failed on a frame, which ran on the next: failed index, new index, fault code (1 execution, 2 not available, 3 out of memory, 4 launch failed, 5 device lost, 6 hung)",
    },
    EventInfo {
        id: EventId::BackendRestored,
        name: "backend_restored",
        severity: Severity::Info,
        meaning: "the preferred backend runs frames again: the index in use until now",
    },
    EventInfo {
        id: EventId::ModelCorrupt,
        name: "model_corrupt",
        severity: Severity::Warning,
        meaning: "a scrub found the loaded model corrupt: the chain index, 1 if restored from its golden copy (recent frames run again) or 0 if not",
    },
    EventInfo {
        id: EventId::BackendRestarted,
        name: "backend_restarted",
        severity: Severity::Error,
        meaning: "a backend hung past its deadline and was restarted on a new worker: the chain index, restarts so far, 1 if the model loaded or 0 if not",
    },
];

impl EventId {
    /// This event's row of [`EVENTS`].
    pub fn info(self) -> EventInfo {
        EVENTS
            .iter()
            .copied()
            .find(|e| e.id == self)
            .unwrap_or(EVENTS[0])
    }

    /// The event with its table severity and `args`.
    pub fn with(self, args: [i32; EVENT_ARGS]) -> Event {
        Event {
            id: self as u16,
            severity: self.info().severity,
            args,
        }
    }
}

impl RejectReason {
    /// Its code in a `command_rejected` event: 1 malformed, 2 unknown command, 3 out of range,
    /// 4 stale sequence, 5 failed.
    pub fn code(self) -> i32 {
        match self {
            Self::Malformed => 1,
            Self::UnknownCommand => 2,
            Self::OutOfRange => 3,
            Self::StaleSequence => 4,
            Self::Failed => 5,
        }
    }
}

/// Something that happened on board.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Which event ([`EVENTS`]).
    pub id: u16,
    /// How bad.
    pub severity: Severity,
    /// Its arguments; their meaning is the event's.
    pub args: [i32; EVENT_ARGS],
}

/// Why a command was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The command did not decode.
    Malformed,
    /// No such command.
    UnknownCommand,
    /// An argument is out of its range.
    OutOfRange,
    /// Its sequence number is not newer than the last accepted: a replay.
    StaleSequence,
    /// It cannot be done now (for example a model that fails its checks).
    Failed,
}

/// The answer to a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandAck {
    /// The command's id.
    pub command: u16,
    /// The command's sequence number.
    pub sequence: u16,
    /// `None`: accepted and done.
    pub rejected: Option<RejectReason>,
}

/// What a product shows. Every product is a PNG image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProductKind {
    /// A crop around one detection.
    DetectionCrop,
    /// A downscaled thumbnail of the frame.
    Thumbnail,
    /// The frame's class map: one 8-bit grey pixel per tile, its value the tile's class.
    ClassMap,
}

/// One part of a product. A product larger than [`PART_BYTES`] travels as several parts, sent
/// one after another; the ground joins them by `product` and `part` ([`crate::product`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProductPart {
    /// The product's number on this board, counting up.
    pub product: u32,
    /// The frame it comes from.
    pub frame: u32,
    /// What it shows.
    pub kind: ProductKind,
    /// For a detection crop, the detection's class; otherwise 0.
    pub class: u16,
    /// This part's index, from 0.
    pub part: u16,
    /// How many parts the product has.
    pub parts: u16,
    /// This part's bytes of the PNG.
    pub data: Vec<u8, PART_BYTES>,
}

/// Any telemetry message.
// No heap on the flight side: a message is built in place, so the detections' boxes are inline.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Telemetry {
    /// See [`Classification`].
    Classification(Classification),
    /// See [`Detections`].
    Detections(Detections),
    /// See [`Health`].
    Health(Health),
    /// See [`Event`].
    Event(Event),
    /// See [`CommandAck`].
    CommandAck(CommandAck),
    /// See [`ProductPart`].
    ProductPart(ProductPart),
}

/// Bytes before the body: id and version.
pub const MESSAGE_HEADER: usize = 3;

impl Telemetry {
    /// Its id.
    pub fn id(&self) -> MessageId {
        match self {
            Self::Classification(_) => MessageId::Classification,
            Self::Detections(_) => MessageId::Detections,
            Self::Health(_) => MessageId::Health,
            Self::Event(_) => MessageId::Event,
            Self::CommandAck(_) => MessageId::CommandAck,
            Self::ProductPart(_) => MessageId::ProductPart,
        }
    }

    /// Encode into the front of `buf`; the bytes written. No allocation.
    pub fn encode<'b>(&self, buf: &'b mut [u8]) -> Result<&'b [u8], WireError> {
        let info = self.id().info();
        let (head, body) = buf
            .split_at_mut_checked(MESSAGE_HEADER)
            .ok_or(WireError::BufferTooSmall)?;
        head.copy_from_slice(&[(info.id as u16 >> 8) as u8, info.id as u8, info.version]);
        let written = match self {
            Self::Classification(m) => postcard::to_slice(m, body),
            Self::Detections(m) => postcard::to_slice(m, body),
            Self::Health(m) => postcard::to_slice(m, body),
            Self::Event(m) => postcard::to_slice(m, body),
            Self::CommandAck(m) => postcard::to_slice(m, body),
            Self::ProductPart(m) => postcard::to_slice(m, body),
        }
        .map_err(|_| WireError::BufferTooSmall)?
        .len();
        buf.get(..MESSAGE_HEADER + written)
            .ok_or(WireError::BufferTooSmall)
    }

    /// Decode one message that fills `bytes` exactly.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let (&[high, low, version], body) = bytes
            .split_first_chunk::<MESSAGE_HEADER>()
            .ok_or(WireError::Truncated)?;
        let raw = u16::from_be_bytes([high, low]);
        let id = MessageId::from_u16(raw).ok_or(WireError::UnknownId(raw))?;
        if version != id.info().version {
            return Err(WireError::UnknownVersion { id: raw, version });
        }
        Ok(match id {
            MessageId::Classification => Self::Classification(body_of(body)?),
            MessageId::Detections => Self::Detections(body_of(body)?),
            MessageId::Health => Self::Health(body_of(body)?),
            MessageId::Event => Self::Event(body_of(body)?),
            MessageId::CommandAck => Self::CommandAck(body_of(body)?),
            MessageId::ProductPart => Self::ProductPart(body_of(body)?),
        })
    }
}

/// The postcard value that fills `bytes` exactly (messages and commands alike).
pub(crate) fn body_of<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, WireError> {
    match postcard::take_from_bytes(bytes) {
        Ok((value, [])) => Ok(value),
        Ok(_) => Err(WireError::TrailingBytes),
        Err(_) => Err(WireError::Malformed),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One of every message, with values at their edges.
    pub(crate) fn samples() -> std::vec::Vec<Telemetry> {
        let ranked = |class, score| Ranked { class, score };
        vec![
            Telemetry::Classification(Classification {
                frame: u32::MAX,
                capture_us: 1_234_567_890_123,
                tile: 7,
                class: 8,
                score: 0.97,
                top: Vec::from_slice(&[ranked(8, 0.97), ranked(2, 0.02), ranked(0, 0.01)]).unwrap(),
            }),
            Telemetry::Detections(Detections {
                frame: 42,
                capture_us: 0,
                boxes: (0..MAX_BOXES)
                    .map(|i| WireBox {
                        x: i as f32 * 10.5,
                        y: 3.25,
                        w: 20.0,
                        h: 8.0,
                        class: (i % 10) as u16,
                        score: 1.0 - i as f32 / 100.0,
                    })
                    .collect(),
                left_out: 3,
            }),
            Telemetry::Health(Health {
                uptime_us: u64::MAX,
                frames_in: 300,
                frames_done: 298,
                frames_dropped: 1,
                errors: [0, 1, 0, 0, 0, 0],
                queue_depth: 4,
                downlink_queue: 17,
                downlink_dropped: [1, 0, u32::MAX],
                latency_p50_us: 3_250,
                latency_p99_us: 4_140,
                temperature_mc: Some(-40_000),
                power_mw: None,
                ledger: LedgerCounts {
                    accepted: 300,
                    sent: 290,
                    queued: 2,
                    dropped: [1, 0, 3, 0, 0, 0, 0],
                    rejected: [1, 0, 1, 2, 0],
                },
            }),
            Telemetry::Event(Event {
                id: 0x0101,
                severity: Severity::Warning,
                args: [i32::MIN, 0, i32::MAX],
            }),
            Telemetry::CommandAck(CommandAck {
                command: 0x8002,
                sequence: 17,
                rejected: Some(RejectReason::StaleSequence),
            }),
            Telemetry::ProductPart(ProductPart {
                product: 3,
                frame: 9,
                kind: ProductKind::DetectionCrop,
                class: 4,
                part: 1,
                parts: 2,
                data: (0..PART_BYTES).map(|i| i as u8).collect(),
            }),
        ]
    }

    #[test]
    fn the_table_has_one_row_per_id_with_unique_ids_and_apids() {
        for (i, row) in MESSAGES.iter().enumerate() {
            assert_eq!(row.id.info(), *row);
            assert_eq!(MessageId::from_u16(row.id as u16), Some(row.id));
            assert!(
                row.apid < 0x7ff,
                "APID {:#x} is 11 bits, not the idle APID",
                row.apid
            );
            for other in &MESSAGES[i + 1..] {
                assert_ne!(row.id, other.id);
                assert_ne!(row.apid, other.apid);
                assert_ne!(row.name, other.name);
            }
        }
        let samples = samples();
        assert_eq!(samples.len(), MESSAGES.len(), "a sample of every message");
    }

    #[test]
    fn every_message_round_trips_and_short_buffers_are_errors() {
        for message in samples() {
            let mut buf = [0u8; 4096];
            let bytes = message.encode(&mut buf).unwrap().to_vec();
            assert_eq!(Telemetry::decode(&bytes).unwrap(), message);
            assert_eq!(
                u16::from_be_bytes([bytes[0], bytes[1]]),
                message.id() as u16
            );
            let mut short = vec![0u8; bytes.len() - 1];
            assert_eq!(message.encode(&mut short), Err(WireError::BufferTooSmall));
            for cut in 0..bytes.len() {
                assert!(Telemetry::decode(&bytes[..cut]).is_err(), "cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(Telemetry::decode(&longer), Err(WireError::TrailingBytes));
        }
        assert_eq!(
            Telemetry::decode(&[0x7f, 0x7f, 1]),
            Err(WireError::UnknownId(0x7f7f))
        );
        assert_eq!(
            Telemetry::decode(&[0x03, 0x01, 9]),
            Err(WireError::UnknownVersion {
                id: 0x0301,
                version: 9
            })
        );
    }
}
