//! CCSDS Space Packets (CCSDS 133.0-B-2) for telemetry, through the `spacepackets` crate: one
//! message per unsegmented TM packet, no secondary header, the APID of the message's class
//! ([`crate::message::MESSAGES`]), a 14-bit sequence count per APID, and the ECSS packet error
//! control in the last two bytes: CRC-16/CCITT-FALSE over the whole packet
//! (ECSS-E-ST-70-41C 7.4.3.2).
//!
//! [`Decoder`] reads a byte stream as it crosses a link: it skips noise between packets, drops
//! packets whose CRC fails, notes sequence gaps per APID, and counts each of these.

use arbitrary_int::{u11, u14};
use spacepackets::{
    CcsdsPacket, CcsdsPacketCreatorWithReservedData, CcsdsPacketReader, PacketType, SequenceFlags,
    SpHeader,
};

use crate::command::{Command, COMMAND_HEADER, MAX_COMMAND};
use crate::message::{MessageId, MESSAGES, MESSAGE_HEADER};
use crate::{Telemetry, WireError};

/// Bytes of the primary header.
pub const HEADER_LEN: usize = 6;
/// Bytes of the packet error control.
pub const CRC_LEN: usize = 2;
/// Sequence counts wrap at 2^14.
const SEQ_MODULO: u16 = 1 << 14;
/// APID of the TC packets that carry commands to the payload.
pub const COMMAND_APID: u16 = 0x080;

/// Frames messages into packets, counting per APID.
#[derive(Clone, Debug, Default)]
pub struct Framer {
    counts: [u16; MESSAGES.len()],
    command_count: u16,
}

/// The row of [`MESSAGES`] whose APID is `apid`.
fn slot_of_apid(apid: u16) -> Option<usize> {
    MESSAGES.iter().position(|m| m.apid == apid)
}

impl Framer {
    /// Sequence counts from 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The sequence count of `apid`.
    fn count_of(&mut self, apid: u16) -> Result<&mut u16, WireError> {
        let slot = slot_of_apid(apid).ok_or(WireError::NotTelemetry)?;
        self.counts.get_mut(slot).ok_or(WireError::NotTelemetry)
    }

    /// `message` as one packet at the front of `buf`; the packet's bytes. No allocation.
    pub fn frame<'b>(
        &mut self,
        message: &Telemetry,
        buf: &'b mut [u8],
    ) -> Result<&'b [u8], WireError> {
        let apid = message.id().info().apid;
        let count = self.count_of(apid)?;
        write_packet(buf, PacketType::Tm, apid, count, |data| {
            Ok(message.encode(data)?.len())
        })
    }

    /// An encoded message (`[id][version][postcard]`, from [`Telemetry::encode`]) as one
    /// packet on its APID at the front of `buf`; the packet's bytes.
    pub fn frame_encoded<'b>(
        &mut self,
        message: &[u8],
        buf: &'b mut [u8],
    ) -> Result<&'b [u8], WireError> {
        let (&[high, low], _) = message
            .split_first_chunk::<2>()
            .ok_or(WireError::Truncated)?;
        let raw = u16::from_be_bytes([high, low]);
        let id = MessageId::from_u16(raw).ok_or(WireError::UnknownId(raw))?;
        let apid = id.info().apid;
        let count = self.count_of(apid)?;
        write_packet(buf, PacketType::Tm, apid, count, |data| {
            data.get_mut(..message.len())
                .ok_or(WireError::BufferTooSmall)?
                .copy_from_slice(message);
            Ok(message.len())
        })
    }

    /// `command` with its command `sequence` as one TC packet at the front of `buf` (the
    /// ground side); the packet's bytes.
    pub fn frame_command<'b>(
        &mut self,
        command: &Command,
        sequence: u16,
        buf: &'b mut [u8],
    ) -> Result<&'b [u8], WireError> {
        let count = &mut self.command_count;
        write_packet(buf, PacketType::Tc, COMMAND_APID, count, |data| {
            Ok(command.encode(sequence, data)?.len())
        })
    }
}

/// One unsegmented packet of `kind` on `apid` at the front of `buf`: `write` fills its data
/// field in place and says how many bytes it wrote, then the header and the CRC are added and
/// `count`, the APID's sequence count, moves on.
fn write_packet<'b>(
    buf: &'b mut [u8],
    kind: PacketType,
    apid: u16,
    count: &mut u16,
    write: impl FnOnce(&mut [u8]) -> Result<usize, WireError>,
) -> Result<&'b [u8], WireError> {
    let room = buf.len().saturating_sub(HEADER_LEN + CRC_LEN);
    let data = buf
        .get_mut(HEADER_LEN..HEADER_LEN + room)
        .ok_or(WireError::BufferTooSmall)?;
    let len = write(data)?;
    let apid = u11::try_new(apid).map_err(|_| WireError::NotTelemetry)?;
    let seq = u14::try_new(*count).map_err(|_| WireError::NotTelemetry)?;
    // The creator sets the packet type.
    let header = SpHeader::new_for_unseg_tm(apid, seq, 0);
    let packet = CcsdsPacketCreatorWithReservedData::new_with_checksum(header, kind, len, buf)
        .map_err(|_| WireError::BufferTooSmall)?;
    let total = packet.finish();
    *count = (*count + 1) % SEQ_MODULO;
    buf.get(..total).ok_or(WireError::BufferTooSmall)
}

/// What a decoder has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamStats {
    /// Packets with a good CRC.
    pub packets: u64,
    /// Those whose message decoded.
    pub messages: u64,
    /// Packet headers whose CRC failed (the packet is dropped, the stream resynchronised).
    pub crc_failures: u64,
    /// Bytes skipped while looking for a packet: noise, or the rest of a corrupt packet.
    pub skipped_bytes: u64,
    /// Packets missing by the per-APID sequence counts.
    pub sequence_gaps: u64,
    /// Packets whose sequence count is behind the last one seen on their APID (or sender): a
    /// duplicate, or one that arrived late. Not counted as gaps.
    pub out_of_order: u64,
    /// Good packets holding an unknown message id or version.
    pub unknown_ids: u64,
    /// Good packets whose message does not decode.
    pub malformed: u64,
    /// A packet cut off by the end of the stream.
    pub truncated: u64,
}

/// One good packet.
#[derive(Clone, Debug, PartialEq)]
pub struct Packet {
    /// Its APID.
    pub apid: u16,
    /// Its sequence count.
    pub sequence: u16,
    /// Its message, or why it did not decode.
    pub message: Result<Telemetry, WireError>,
}

/// Reads packets from a byte stream.
#[derive(Clone, Debug, Default)]
pub struct Decoder {
    last: [Option<u16>; MESSAGES.len()],
    /// What it has seen so far.
    pub stats: StreamStats,
}

/// A header that could start a Kestrel packet of `kind`: version 0, no secondary header,
/// unsegmented, a known APID, and room for at least a message or command header and the CRC
/// (and, for a command, no more than the longest command).
fn plausible(header: &SpHeader, kind: PacketType) -> bool {
    let apid = header.apid().value();
    let (known, least, most) = match kind {
        PacketType::Tm => (slot_of_apid(apid).is_some(), MESSAGE_HEADER, usize::MAX),
        PacketType::Tc => (apid == COMMAND_APID, COMMAND_HEADER, MAX_COMMAND),
    };
    let len = header.packet_len();
    header.ccsds_version().value() == 0
        && header.packet_type() == kind
        && !header.sec_header_flag()
        && header.sequence_flags() == SequenceFlags::Unsegmented
        && known
        && len >= HEADER_LEN + least + CRC_LEN
        && len <= HEADER_LEN.saturating_add(most).saturating_add(CRC_LEN)
}

impl Decoder {
    /// A decoder that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next good packet at the front of `stream`, and the bytes it and any noise before it
    /// took; `None` when `stream` holds no whole packet yet (keep the bytes, add more, call
    /// again; or call [`Decoder::finish`] at the end of the stream).
    pub fn next(&mut self, stream: &[u8]) -> Option<(Packet, usize)> {
        let (header, data, used) = self.scan(stream, PacketType::Tm)?;
        Some((self.accept(&header, data), used))
    }

    /// As [`Decoder::next`] for the board's side: the data field of the next good command
    /// packet (for [`crate::CommandGate::accept`]), and the bytes taken.
    pub fn next_command<'s>(&mut self, stream: &'s [u8]) -> Option<(&'s [u8], usize)> {
        let (_, data, used) = self.scan(stream, PacketType::Tc)?;
        self.stats.packets += 1;
        Some((data, used))
    }

    /// The next packet of `kind` with a good CRC: its header, its data field without the CRC,
    /// and the bytes taken with the noise before it.
    fn scan<'s>(
        &mut self,
        stream: &'s [u8],
        kind: PacketType,
    ) -> Option<(SpHeader, &'s [u8], usize)> {
        let mut at = 0;
        loop {
            let rest = stream.get(at..)?;
            let (header, _) = rest
                .get(..HEADER_LEN)
                .and_then(|h| SpHeader::from_be_bytes(h).ok())?;
            if !plausible(&header, kind) {
                at += 1;
                self.stats.skipped_bytes += 1;
                continue;
            }
            if header.packet_len() > rest.len() {
                return None;
            }
            let Ok(reader) = CcsdsPacketReader::new_with_checksum(rest) else {
                self.stats.crc_failures += 1;
                at += 1;
                self.stats.skipped_bytes += 1;
                continue;
            };
            return Some((header, reader.user_data(), at + header.packet_len()));
        }
    }

    /// Count a partial packet left at the end of a stream (`rest`: the bytes [`Decoder::next`]
    /// did not take).
    pub fn finish(&mut self, rest: &[u8]) {
        if !rest.is_empty() {
            self.stats.truncated += 1;
        }
    }

    fn accept(&mut self, header: &SpHeader, data: &[u8]) -> Packet {
        let (apid, sequence) = (header.apid().value(), header.seq_count().value());
        self.stats.packets += 1;
        if let Some(last) = slot_of_apid(apid).and_then(|slot| self.last.get_mut(slot)) {
            match *last {
                Some(previous) => {
                    let expected = (previous + 1) % SEQ_MODULO;
                    let ahead = (sequence + SEQ_MODULO - expected) % SEQ_MODULO;
                    // Ahead by less than half the count space: packets were lost. Otherwise
                    // it is behind: a duplicate or a late packet.
                    if ahead < SEQ_MODULO / 2 {
                        self.stats.sequence_gaps += u64::from(ahead);
                        *last = Some(sequence);
                    } else {
                        self.stats.out_of_order += 1;
                    }
                }
                None => *last = Some(sequence),
            }
        }
        let message = Telemetry::decode(data);
        match message {
            Ok(_) => self.stats.messages += 1,
            Err(WireError::UnknownId(_) | WireError::UnknownVersion { .. }) => {
                self.stats.unknown_ids += 1
            }
            Err(_) => self.stats.malformed += 1,
        }
        Packet {
            apid,
            sequence,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::tests::samples;

    fn frame_all(framer: &mut Framer, messages: &[Telemetry]) -> std::vec::Vec<std::vec::Vec<u8>> {
        let mut buf = [0u8; 4096];
        messages
            .iter()
            .map(|m| framer.frame(m, &mut buf).unwrap().to_vec())
            .collect()
    }

    fn decode_all(stream: &[u8]) -> (std::vec::Vec<Packet>, StreamStats) {
        let mut decoder = Decoder::new();
        let (mut packets, mut at) = (std::vec::Vec::new(), 0);
        while let Some((packet, used)) = decoder.next(&stream[at..]) {
            packets.push(packet);
            at += used;
        }
        decoder.finish(&stream[at..]);
        (packets, decoder.stats)
    }

    #[test]
    fn every_message_round_trips_through_packets_with_counts_per_apid() {
        let messages = samples();
        let packets = frame_all(
            &mut Framer::new(),
            &[messages.clone(), messages.clone()].concat(),
        );
        for (packet, message) in packets.iter().zip(messages.iter().chain(&messages)) {
            let apid = message.id().info().apid;
            assert_eq!(u16::from_be_bytes([packet[0], packet[1]]) & 0x7ff, apid);
            assert_eq!(packet[0] >> 5, 0, "version 0");
            assert_eq!(packet[0] & 0x18, 0, "TM, no secondary header");
            assert_eq!(packet[2] >> 6, 0b11, "unsegmented");
            let len = usize::from(u16::from_be_bytes([packet[4], packet[5]])) + 7;
            assert_eq!(len, packet.len());
            // CRC-16/CCITT-FALSE over the whole packet, CRC included, leaves 0.
            assert_eq!(spacepackets::crc::CRC_CCITT_FALSE.checksum(packet), 0);
        }
        let (decoded, stats) = decode_all(&packets.concat());
        let n = messages.len();
        assert_eq!(
            stats,
            StreamStats {
                packets: 2 * n as u64,
                messages: 2 * n as u64,
                ..StreamStats::default()
            }
        );
        for (i, packet) in decoded.iter().enumerate() {
            assert_eq!(packet.message.as_ref().unwrap(), &messages[i % n]);
            assert_eq!(
                packet.sequence,
                (i / n) as u16,
                "each APID counts on its own"
            );
        }
    }

    #[test]
    fn sequence_counts_wrap_at_14_bits() {
        let event = samples().remove(3);
        let mut framer = Framer::new();
        framer.counts[3] = SEQ_MODULO - 1;
        let packets = frame_all(&mut framer, &[event.clone(), event]);
        let (decoded, stats) = decode_all(&packets.concat());
        assert_eq!(
            (decoded[0].sequence, decoded[1].sequence),
            (SEQ_MODULO - 1, 0)
        );
        assert_eq!(stats.sequence_gaps, 0);
    }

    #[test]
    fn noise_corruption_loss_and_truncation_are_counted_and_skipped() {
        // Three rounds of five messages: packets 0-4 have count 0, 5-9 count 1, 10-14 count 2.
        let messages = samples()[..5].to_vec();
        let rounds = [messages.clone(), messages.clone(), messages].concat();
        let packets = frame_all(&mut Framer::new(), &rounds);
        let mut stream = std::vec::Vec::new();
        stream.extend_from_slice(&[0xff, 0x00, 0x13, 0x37, 0x08]); // noise before
        stream.extend_from_slice(&packets[0]);
        let mut corrupt = packets[1].clone();
        corrupt[8] ^= 0x40; // one flipped bit in the body
        stream.extend_from_slice(&corrupt);
        stream.extend_from_slice(&packets[2]);
        stream.extend_from_slice(&[0xaa; 7]); // noise between
        for (i, packet) in packets.iter().enumerate().take(14).skip(3) {
            if i != 8 {
                stream.extend_from_slice(packet); // packet 8 (the event, count 1) is lost
            }
        }
        stream.extend_from_slice(&packets[14][..packets[14].len() - 3]); // cut off
        let (decoded, stats) = decode_all(&stream);
        assert_eq!(decoded.len(), 12, "{stats:?}");
        assert_eq!((stats.packets, stats.messages), (12, 12));
        assert_eq!(stats.crc_failures, 1);
        assert_eq!(stats.truncated, 1);
        // The event's count goes 0, 2: one missing. The corrupt packet was its APID's first,
        // so nothing before it shows a gap.
        assert_eq!(stats.sequence_gaps, 1);
        assert!(
            stats.skipped_bytes >= 5 + 7 + corrupt.len() as u64 - 1,
            "{stats:?}"
        );
        let events: std::vec::Vec<u16> = decoded
            .iter()
            .filter(|p| p.apid == 0x030)
            .map(|p| p.sequence)
            .collect();
        assert_eq!(events, [0, 2]);
    }

    #[test]
    fn duplicated_and_reordered_packets_are_counted_not_taken_for_gaps() {
        let event = samples().remove(3);
        let packets = frame_all(&mut Framer::new(), &vec![event; 4]);
        // Counts 0, 1, 1 again, 3, then 2 late.
        let stream = [
            &packets[0],
            &packets[1],
            &packets[1],
            &packets[3],
            &packets[2],
        ]
        .map(|p| p.as_slice())
        .concat();
        let (decoded, stats) = decode_all(&stream);
        assert_eq!(decoded.len(), 5, "every good packet is delivered");
        assert_eq!(stats.out_of_order, 2, "{stats:?}");
        assert_eq!(stats.sequence_gaps, 1, "2 was missing when 3 came");
    }
}
