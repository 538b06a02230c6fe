//! MAVLink 2 framing (the `mavlink` crate, common dialect) for a UAV companion computer beside a
//! PX4 or ArduPilot autopilot. MAVLink's own header, sequence number and CRC (with the message's
//! CRC_EXTRA) protect every frame.
//!
//! - The board is an onboard computer: component [`COMPONENT_ID`] (MAV_COMP_ID_ONBOARD_COMPUTER),
//!   and its [`MavlinkFramer::heartbeat`] says MAV_TYPE_ONBOARD_CONTROLLER with
//!   MAV_AUTOPILOT_INVALID, as MAVLink asks of components that are not autopilots.
//! - Events go out as STATUSTEXT, which every ground station shows: the severity maps to
//!   MAV_SEVERITY, and the text is `kestrel IIII: A B C` (the event id in hex, then its
//!   arguments; at most 49 characters), which [`MavlinkDecoder`] reads back.
//! - Everything else travels in TUNNEL messages (payload type 0, MAV_TUNNEL_PAYLOAD_TYPE_UNKNOWN:
//!   the crate's enum cannot carry the private range 32768 and up). The tunnel payload is a
//!   3-byte segment header, `[kind][message number][index | 0x80 on the last]`, then up to
//!   [`SEGMENT_BYTES`] of the Kestrel message (`[id][version][postcard]`, as in CCSDS). `kind` is
//!   `T` for telemetry, `C` for a command. A message longer than one segment is split; the
//!   receiver joins segments with the same message number in index order, and a missing
//!   segment loses that message only, counted.

use ::mavlink::dialects::common::{
    MavAutopilot, MavMessage, MavModeFlag, MavSeverity, MavState, MavTunnelPayloadType, MavType,
    HEARTBEAT_DATA, STATUSTEXT_DATA, TUNNEL_DATA,
};
use ::mavlink::{MAVLinkV2MessageRaw, MavHeader, MavlinkVersion, Message, MessageData};
use heapless::Vec;

use crate::ccsds::StreamStats;
use crate::command::Command;
use crate::message::{Event, MessageId, Severity, EVENT_ARGS};
use crate::{Telemetry, WireError};

/// MAV_COMP_ID_ONBOARD_COMPUTER.
pub const COMPONENT_ID: u8 = 191;
/// Tunnel payload bytes MAVLink's TUNNEL message holds.
const TUNNEL_BYTES: usize = 128;
/// Segment header bytes at the front of each tunnel payload.
const SEGMENT_HEADER: usize = 3;
/// Message bytes one TUNNEL carries.
pub const SEGMENT_BYTES: usize = TUNNEL_BYTES - SEGMENT_HEADER;
/// Segments one message may have (the index is 7 bits).
pub const MAX_SEGMENTS: usize = 128;
/// The last segment of a message has this bit set in its index byte.
const LAST: u8 = 0x80;
/// Segment kind: a telemetry message.
pub const KIND_TELEMETRY: u8 = b'T';
/// Segment kind: a command.
pub const KIND_COMMAND: u8 = b'C';
/// MAVLink 2 frame bytes around a payload: start byte, 9 header bytes, 2 CRC bytes.
const FRAME_OVERHEAD: usize = 12;
/// TUNNEL's fixed fields before its payload: payload type, target system and component,
/// payload length.
const TUNNEL_FIELDS: usize = 5;

/// Frames Kestrel messages as MAVLink 2 from one system and component.
#[derive(Clone, Debug)]
pub struct MavlinkFramer {
    system_id: u8,
    component_id: u8,
    sequence: u8,
    message_number: u8,
}

impl MavlinkFramer {
    /// A framer sending as `system_id` (the vehicle's, usually 1) and `component_id`
    /// ([`COMPONENT_ID`] on the board; a ground station's own id when it sends commands).
    pub fn new(system_id: u8, component_id: u8) -> Self {
        Self {
            system_id,
            component_id,
            sequence: 0,
            message_number: 0,
        }
    }

    /// One MAVLink 2 frame of `message` at the front of `out`; its length.
    fn write(&mut self, message: &MavMessage, out: &mut [u8]) -> Result<usize, WireError> {
        let header = MavHeader {
            system_id: u32::from(self.system_id),
            component_id: self.component_id,
            sequence: self.sequence,
        };
        let mut raw = MAVLinkV2MessageRaw::new();
        raw.serialize_message(header, message);
        let bytes = raw.raw_bytes();
        out.get_mut(..bytes.len())
            .ok_or(WireError::BufferTooSmall)?
            .copy_from_slice(bytes);
        self.sequence = self.sequence.wrapping_add(1);
        Ok(bytes.len())
    }

    /// A HEARTBEAT: an active onboard controller, no autopilot. Send one a second.
    pub fn heartbeat(&mut self, out: &mut [u8]) -> Result<usize, WireError> {
        let heartbeat = MavMessage::HEARTBEAT(HEARTBEAT_DATA {
            custom_mode: 0,
            mavtype: MavType::MAV_TYPE_ONBOARD_CONTROLLER,
            autopilot: MavAutopilot::MAV_AUTOPILOT_INVALID,
            base_mode: MavModeFlag::empty(),
            system_status: MavState::MAV_STATE_ACTIVE,
            mavlink_version: 3,
        });
        self.write(&heartbeat, out)
    }

    /// `message` as MAVLink frames at the front of `out`, encoding it in `scratch` first; the
    /// bytes written.
    pub fn frame(
        &mut self,
        message: &Telemetry,
        scratch: &mut [u8],
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        let encoded = message.encode(scratch)?;
        self.frame_encoded(encoded, out)
    }

    /// An encoded message (`[id][version][postcard]`) as MAVLink frames: an event as a
    /// STATUSTEXT, anything else as TUNNEL segments. The bytes written.
    pub fn frame_encoded(&mut self, message: &[u8], out: &mut [u8]) -> Result<usize, WireError> {
        if let Some(event) = as_event(message) {
            let text = event_text(&event);
            let statustext = MavMessage::STATUSTEXT(STATUSTEXT_DATA {
                severity: mav_severity(event.severity),
                text: text.as_str().into(),
            });
            return self.write(&statustext, out);
        }
        self.tunnel(KIND_TELEMETRY, 0, 0, message, out)
    }

    /// `command` with its command `sequence` as a TUNNEL to `target` (system, component): the
    /// ground side. The bytes written.
    pub fn frame_command(
        &mut self,
        command: &Command,
        sequence: u16,
        target: (u8, u8),
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        let mut buf = [0u8; SEGMENT_BYTES];
        let encoded = command.encode(sequence, &mut buf)?;
        self.tunnel(KIND_COMMAND, target.0, target.1, encoded, out)
    }

    /// `bytes` split into TUNNEL segments of `kind`.
    fn tunnel(
        &mut self,
        kind: u8,
        target_system: u8,
        target_component: u8,
        bytes: &[u8],
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        let segments = bytes.len().div_ceil(SEGMENT_BYTES).max(1);
        if segments > MAX_SEGMENTS {
            return Err(WireError::BufferTooSmall);
        }
        let number = self.message_number;
        self.message_number = number.wrapping_add(1);
        let mut written = 0;
        for index in 0..segments {
            let start = index * SEGMENT_BYTES;
            let chunk = bytes
                .get(start..bytes.len().min(start + SEGMENT_BYTES))
                .ok_or(WireError::BufferTooSmall)?;
            let mut payload = [0u8; TUNNEL_BYTES];
            let last = if index + 1 == segments { LAST } else { 0 };
            payload[..SEGMENT_HEADER].copy_from_slice(&[kind, number, index as u8 | last]);
            payload
                .get_mut(SEGMENT_HEADER..SEGMENT_HEADER + chunk.len())
                .ok_or(WireError::BufferTooSmall)?
                .copy_from_slice(chunk);
            let tunnel = MavMessage::TUNNEL(TUNNEL_DATA {
                payload_type: MavTunnelPayloadType::MAV_TUNNEL_PAYLOAD_TYPE_UNKNOWN,
                target_system,
                target_component,
                payload_length: (SEGMENT_HEADER + chunk.len()) as u8,
                payload,
            });
            let rest = out.get_mut(written..).ok_or(WireError::BufferTooSmall)?;
            written += self.write(&tunnel, rest)?;
        }
        Ok(written)
    }
}

/// Most bytes a message of `len` encoded bytes takes as MAVLink frames (MAVLink 2 drops a
/// payload's trailing zeros, so the frames may be shorter).
pub fn framed_len(len: usize) -> usize {
    len.div_ceil(SEGMENT_BYTES).max(1) * (FRAME_OVERHEAD + TUNNEL_FIELDS + TUNNEL_BYTES)
}

/// The event an encoded message holds, if it is one.
fn as_event(message: &[u8]) -> Option<Event> {
    match message.get(..2) {
        Some(&[high, low]) if u16::from_be_bytes([high, low]) == MessageId::Event as u16 => {
            match Telemetry::decode(message) {
                Ok(Telemetry::Event(event)) => Some(event),
                _ => None,
            }
        }
        _ => None,
    }
}

/// STATUSTEXT's text is 50 bytes.
type Text = heapless::String<50>;

/// `kestrel IIII: A B C`: 14 characters and three arguments of at most 11 fit in 50.
fn event_text(event: &Event) -> Text {
    use core::fmt::Write;
    let mut text = Text::new();
    let [a, b, c] = event.args;
    let _ = write!(text, "kestrel {:04x}: {a} {b} {c}", event.id);
    text
}

/// The event a STATUSTEXT carries, if Kestrel wrote it.
fn parse_event_text(text: &str, severity: MavSeverity) -> Option<Event> {
    let rest = text.strip_prefix("kestrel ")?;
    let (id, args) = rest.split_once(": ")?;
    let id = u16::from_str_radix(id, 16).ok()?;
    let mut parsed = [0i32; EVENT_ARGS];
    let mut words = args.split(' ');
    for slot in &mut parsed {
        *slot = words.next()?.parse().ok()?;
    }
    Some(Event {
        id,
        severity: kestrel_severity(severity),
        args: parsed,
    })
}

fn mav_severity(severity: Severity) -> MavSeverity {
    match severity {
        Severity::Info => MavSeverity::MAV_SEVERITY_INFO,
        Severity::Warning => MavSeverity::MAV_SEVERITY_WARNING,
        Severity::Error => MavSeverity::MAV_SEVERITY_ERROR,
        Severity::Fatal => MavSeverity::MAV_SEVERITY_CRITICAL,
    }
}

fn kestrel_severity(severity: MavSeverity) -> Severity {
    match severity {
        MavSeverity::MAV_SEVERITY_INFO
        | MavSeverity::MAV_SEVERITY_DEBUG
        | MavSeverity::MAV_SEVERITY_NOTICE => Severity::Info,
        MavSeverity::MAV_SEVERITY_WARNING => Severity::Warning,
        MavSeverity::MAV_SEVERITY_ERROR => Severity::Error,
        _ => Severity::Fatal,
    }
}

/// What one MAVLink frame (or the last segment of a message) brought.
// No heap: a message arrives in place, as [`Telemetry`] does.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Incoming {
    /// A HEARTBEAT: the sender is alive.
    Heartbeat {
        /// Its MAV_TYPE.
        mavtype: u32,
    },
    /// A whole Kestrel telemetry message (from one or more segments, or an event's
    /// STATUSTEXT), or why it did not decode.
    Telemetry(Result<Telemetry, WireError>),
    /// A STATUSTEXT that is not a Kestrel event.
    Text(heapless::String<50>),
    /// A command's bytes (for [`crate::CommandGate::accept`]), addressed to (system,
    /// component).
    Command {
        /// The command bytes.
        bytes: Vec<u8, SEGMENT_BYTES>,
        /// The target system and component.
        target: (u8, u8),
    },
    /// A segment of a message still incomplete.
    Segment,
    /// A valid frame of another message (by its MAVLink id), not for Kestrel.
    Other(u32),
}

/// One frame read from the stream: its sender, MAVLink sequence number and what it brought.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// Sender's system id.
    pub system_id: u8,
    /// Sender's component id.
    pub component_id: u8,
    /// MAVLink sequence number.
    pub sequence: u8,
    /// What it brought.
    pub incoming: Incoming,
}

/// Senders a decoder tracks sequence numbers for.
const SENDERS: usize = 8;

/// Reads MAVLink 2 frames from a byte stream: skips noise, drops frames whose CRC fails,
/// counts sequence gaps per sender, and joins TUNNEL segments into messages of up to `MAX`
/// bytes.
#[derive(Clone, Debug, Default)]
pub struct MavlinkDecoder<const MAX: usize> {
    senders: Vec<(u8, u8, u8), SENDERS>,
    /// (sender system, component, message number, next index) of the message being joined.
    joining: Option<(u8, u8, u8, u8)>,
    joined: Vec<u8, MAX>,
    /// (sender system, component, message number) of a message lost part-way, whose later
    /// segments are passed over.
    skipping: Option<(u8, u8, u8)>,
    /// What it has seen so far (packets are frames; messages are whole Kestrel messages).
    pub stats: StreamStats,
    /// Messages lost because a segment was missing or they outgrew `MAX`.
    pub lost_messages: u64,
}

/// Bytes before a frame's payload: start, length, flags (2), sequence, system, component,
/// message id (3).
const HEADER_LEN: usize = 10;
/// Incompatibility flag of a signed frame (13 more bytes after the CRC).
const SIGNED: u8 = 0x01;
const SIGNATURE_LEN: usize = 13;

impl<const MAX: usize> MavlinkDecoder<MAX> {
    /// A decoder that has seen nothing.
    pub fn new() -> Self {
        Self {
            senders: Vec::new(),
            joining: None,
            joined: Vec::new(),
            skipping: None,
            stats: StreamStats::default(),
            lost_messages: 0,
        }
    }

    /// The next good frame at the front of `stream`, and the bytes it and any noise before it
    /// took; `None` when `stream` holds no whole frame yet (keep the bytes, add more, call
    /// again, or [`MavlinkDecoder::finish`] at the end).
    pub fn next(&mut self, stream: &[u8]) -> Option<(Frame, usize)> {
        let mut at = 0;
        loop {
            let rest = stream.get(at..)?;
            let start = rest.iter().position(|&b| b == ::mavlink::MAV_STX_V2);
            let Some(start) = start else {
                self.stats.skipped_bytes += rest.len() as u64;
                return None;
            };
            at += start;
            self.stats.skipped_bytes += start as u64;
            let rest = stream.get(at..)?;
            let &[_, len, flags, ..] = rest.get(..HEADER_LEN)? else {
                return None;
            };
            if flags & !SIGNED != 0 {
                // Not a frame this decoder reads (or not a frame at all): look further.
                at += 1;
                self.stats.skipped_bytes += 1;
                continue;
            }
            let signature = if flags & SIGNED != 0 {
                SIGNATURE_LEN
            } else {
                0
            };
            let total = HEADER_LEN + usize::from(len) + 2 + signature;
            let bytes = rest.get(..total)?;
            let mut raw = MAVLinkV2MessageRaw::new();
            raw.as_mut_slice().get_mut(..total)?.copy_from_slice(bytes);
            let id = raw.message_id();
            if MavMessage::default_message_from_id(id).is_none() {
                // An id the common dialect lacks: its CRC cannot be checked.
                self.stats.unknown_ids += 1;
                at += 1;
                self.stats.skipped_bytes += 1;
                continue;
            }
            if !raw.has_valid_crc::<MavMessage>() {
                self.stats.crc_failures += 1;
                at += 1;
                self.stats.skipped_bytes += 1;
                continue;
            }
            self.stats.packets += 1;
            let (system_id, component_id, sequence) =
                (raw.system_id() as u8, raw.component_id(), raw.sequence());
            self.note_sequence(system_id, component_id, sequence);
            let incoming = match MavMessage::parse(MavlinkVersion::V2, id, raw.payload()) {
                Ok(message) => self.incoming(system_id, component_id, &message),
                Err(_) => {
                    self.stats.malformed += 1;
                    Incoming::Other(id)
                }
            };
            let frame = Frame {
                system_id,
                component_id,
                sequence,
                incoming,
            };
            return Some((frame, at + total));
        }
    }

    /// Count a partial frame, or a message missing its last segments, at the end of a stream.
    pub fn finish(&mut self, rest: &[u8]) {
        if !rest.is_empty() {
            self.stats.truncated += 1;
        }
        if self.joining.take().is_some() {
            self.lost_messages += 1;
        }
    }

    fn note_sequence(&mut self, system: u8, component: u8, sequence: u8) {
        match self
            .senders
            .iter_mut()
            .find(|(s, c, _)| (*s, *c) == (system, component))
        {
            Some(sender) => {
                let ahead = sequence.wrapping_sub(sender.2.wrapping_add(1));
                // Ahead by less than half the count space: frames were lost. Otherwise it is
                // behind: a duplicate or a late frame.
                if ahead < 128 {
                    self.stats.sequence_gaps += u64::from(ahead);
                    sender.2 = sequence;
                } else {
                    self.stats.out_of_order += 1;
                }
            }
            // Senders beyond the first few are not tracked.
            None => {
                let _ = self.senders.push((system, component, sequence));
            }
        }
    }

    fn incoming(&mut self, system: u8, component: u8, message: &MavMessage) -> Incoming {
        match message {
            MavMessage::HEARTBEAT(h) => Incoming::Heartbeat {
                mavtype: h.mavtype as u32,
            },
            MavMessage::STATUSTEXT(s) => {
                let text = s.text.to_str().unwrap_or("");
                match parse_event_text(text, s.severity) {
                    Some(event) => {
                        self.stats.messages += 1;
                        Incoming::Telemetry(Ok(Telemetry::Event(event)))
                    }
                    None => Incoming::Text(heapless::String::try_from(text).unwrap_or_default()),
                }
            }
            MavMessage::TUNNEL(t) => self.segment(system, component, t),
            other => Incoming::Other(other.message_id()),
        }
    }

    fn segment(&mut self, system: u8, component: u8, tunnel: &TUNNEL_DATA) -> Incoming {
        let len = usize::from(tunnel.payload_length).min(TUNNEL_BYTES);
        let Some((&[kind, number, index], data)) = tunnel
            .payload
            .get(..len)
            .and_then(|p| p.split_first_chunk::<SEGMENT_HEADER>())
        else {
            self.stats.malformed += 1;
            return Incoming::Other(TUNNEL_DATA::ID);
        };
        let (position, last) = (index & !LAST, index & LAST != 0);
        if kind == KIND_COMMAND {
            return match (position, last, Vec::from_slice(data)) {
                (0, true, Ok(bytes)) => Incoming::Command {
                    bytes,
                    target: (tunnel.target_system, tunnel.target_component),
                },
                _ => {
                    self.stats.malformed += 1;
                    Incoming::Segment
                }
            };
        }
        if kind != KIND_TELEMETRY {
            self.stats.unknown_ids += 1;
            return Incoming::Other(TUNNEL_DATA::ID);
        }
        let key = (system, component, number);
        if self.skipping == Some(key) {
            return Incoming::Segment; // the rest of a message already counted lost
        }
        if self.joining != Some((system, component, number, position)) {
            if let Some((s, c, n, _)) = self.joining.take() {
                self.lost_messages += 1; // the message being joined lost a segment
                if (s, c, n) == key {
                    self.skipping = Some(key);
                    return Incoming::Segment;
                }
            }
            self.joined.clear();
            if position != 0 {
                self.lost_messages += 1; // this message lost its first segments
                self.skipping = Some(key);
                return Incoming::Segment;
            }
            self.skipping = None;
        }
        if self.joined.extend_from_slice(data).is_err() {
            self.joining = None;
            self.skipping = Some(key);
            self.lost_messages += 1;
            return Incoming::Segment;
        }
        if !last {
            self.joining = Some((system, component, number, position + 1));
            return Incoming::Segment;
        }
        self.joining = None;
        let message = Telemetry::decode(&self.joined);
        match message {
            Ok(_) => self.stats.messages += 1,
            Err(WireError::UnknownId(_) | WireError::UnknownVersion { .. }) => {
                self.stats.unknown_ids += 1
            }
            Err(_) => self.stats.malformed += 1,
        }
        Incoming::Telemetry(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::tests::samples;

    fn decode_all(stream: &[u8]) -> (std::vec::Vec<Frame>, MavlinkDecoder<4096>) {
        let mut decoder = MavlinkDecoder::<4096>::new();
        let (mut frames, mut at) = (std::vec::Vec::new(), 0);
        while let Some((frame, used)) = decoder.next(&stream[at..]) {
            frames.push(frame);
            at += used;
        }
        decoder.finish(&stream[at..]);
        (frames, decoder)
    }

    fn telemetry(frames: &[Frame]) -> std::vec::Vec<Telemetry> {
        frames
            .iter()
            .filter_map(|f| match &f.incoming {
                Incoming::Telemetry(Ok(t)) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    fn stream_of(messages: &[Telemetry]) -> std::vec::Vec<u8> {
        let mut framer = MavlinkFramer::new(1, COMPONENT_ID);
        let (mut scratch, mut out) = ([0u8; 4096], [0u8; 8192]);
        let mut stream = std::vec::Vec::new();
        let len = framer.heartbeat(&mut out).unwrap();
        stream.extend_from_slice(&out[..len]);
        for m in messages {
            let len = framer.frame(m, &mut scratch, &mut out).unwrap();
            let mut encoded = [0u8; 4096];
            let encoded_len = m.encode(&mut encoded).unwrap().len();
            assert!(len <= framed_len(encoded_len));
            stream.extend_from_slice(&out[..len]);
        }
        stream
    }

    #[test]
    fn every_message_round_trips_with_events_as_statustext() {
        let messages = samples();
        let stream = stream_of(&messages);
        let (frames, decoder) = decode_all(&stream);
        assert_eq!(telemetry(&frames), messages);
        assert_eq!(
            frames[0].incoming,
            Incoming::Heartbeat {
                mavtype: MavType::MAV_TYPE_ONBOARD_CONTROLLER as u32
            }
        );
        assert!(frames
            .iter()
            .all(|f| (f.system_id, f.component_id) == (1, COMPONENT_ID)));
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(usize::from(f.sequence), i, "one sequence per frame");
        }
        let stats = decoder.stats;
        assert_eq!((stats.crc_failures, stats.sequence_gaps), (0, 0));
        assert_eq!(stats.messages as usize, messages.len());
        assert_eq!(decoder.lost_messages, 0);
        // The 64-box detections list needs several tunnel segments.
        assert!(frames.len() > messages.len() + 10, "{}", frames.len());
    }

    #[test]
    fn a_lost_segment_loses_its_message_only_and_noise_is_skipped() {
        let messages = samples();
        let stream = stream_of(&messages);
        let (frames, _) = decode_all(&stream);
        // Frame boundaries, to cut one segment of the detections (message 1) out.
        let mut bounds = vec![0];
        let mut decoder = MavlinkDecoder::<4096>::new();
        let mut at = 0;
        while let Some((_, used)) = decoder.next(&stream[at..]) {
            at += used;
            bounds.push(at);
        }
        assert_eq!(bounds.len(), frames.len() + 1);
        let victim = 4; // heartbeat, classification, then detections segments from frame 2
        let mut damaged = vec![0x42, 0xfd, 0x07]; // noise with a false start byte
        damaged.extend_from_slice(&stream[..bounds[victim]]);
        damaged.extend_from_slice(&stream[bounds[victim + 1]..]);
        let mut corrupt = damaged.clone();
        let (got, decoder) = decode_all(&damaged);
        let expected: std::vec::Vec<Telemetry> = messages
            .iter()
            .filter(|m| !matches!(m, Telemetry::Detections(_)))
            .cloned()
            .collect();
        assert_eq!(telemetry(&got), expected);
        assert_eq!(decoder.lost_messages, 1);
        assert_eq!(decoder.stats.sequence_gaps, 1);
        assert!(decoder.stats.skipped_bytes >= 3);
        // A flipped bit fails that frame's CRC.
        let last = corrupt.len() - 5;
        corrupt[last] ^= 0x10;
        let (_, decoder) = decode_all(&corrupt);
        assert_eq!(decoder.stats.crc_failures, 1);
        assert_eq!(decoder.stats.truncated, 1, "the rest of the corrupt frame");
    }

    #[test]
    fn duplicated_and_reordered_frames_are_counted_not_taken_for_gaps() {
        let mut framer = MavlinkFramer::new(1, COMPONENT_ID);
        let mut out = [0u8; 64];
        let beats: std::vec::Vec<std::vec::Vec<u8>> = (0..4)
            .map(|_| {
                let len = framer.heartbeat(&mut out).unwrap();
                out[..len].to_vec()
            })
            .collect();
        let stream = [&beats[0], &beats[1], &beats[1], &beats[3], &beats[2]]
            .map(|b| b.as_slice())
            .concat();
        let (frames, decoder) = decode_all(&stream);
        assert_eq!(frames.len(), 5);
        assert_eq!(decoder.stats.out_of_order, 2);
        assert_eq!(decoder.stats.sequence_gaps, 1);
    }

    #[test]
    fn commands_cross_as_tunnels_to_the_board() {
        let mut ground = MavlinkFramer::new(255, 190);
        let mut out = [0u8; 300];
        let len = ground
            .frame_command(&Command::Pause, 9, (1, COMPONENT_ID), &mut out)
            .unwrap();
        let (frames, _) = decode_all(&out[..len]);
        let Incoming::Command { bytes, target } = &frames[0].incoming else {
            panic!("{:?}", frames[0]);
        };
        assert_eq!(*target, (1, COMPONENT_ID));
        let (command, ack) = crate::CommandGate::new().accept(bytes).unwrap();
        assert_eq!((command, ack.sequence), (Command::Pause, 9));
    }

    #[test]
    fn event_text_round_trips_at_its_extremes() {
        for args in [[0, 0, 0], [i32::MIN, -1, i32::MAX], [-99_999, 12, 7]] {
            let event = Event {
                id: 0xffff,
                severity: Severity::Error,
                args,
            };
            let text = event_text(&event);
            assert_eq!(
                parse_event_text(&text, mav_severity(event.severity)),
                Some(event)
            );
        }
    }
}
