//! Harnesses for the parsers that read bytes from the link, shared by the `cargo fuzz` targets
//! (`runtime/wire/fuzz`) and the bounded property runs in the tests, so both check the same
//! things. Each takes arbitrary bytes and panics only if an invariant breaks: the parsers
//! themselves must never panic, and what they accept must be consistent.

use crate::ccsds::{Decoder, HEADER_LEN};
use crate::mavlink::{Incoming, MavlinkDecoder};
use crate::{CommandGate, Telemetry};

/// Read `bytes` as a CCSDS stream: every packet found lies within the bytes, and a message
/// that decodes encodes back to the same bytes' meaning.
pub fn ccsds_stream(bytes: &[u8]) {
    let mut decoder = Decoder::new();
    let mut at = 0;
    while let Some((packet, used)) = decoder.next(bytes.get(at..).unwrap_or_default()) {
        assert!(used >= HEADER_LEN && at + used <= bytes.len());
        at += used;
        if let Ok(message) = packet.message {
            round_trips(&message);
        }
    }
    decoder.finish(bytes.get(at..).unwrap_or_default());
    let stats = decoder.stats;
    assert!(stats.messages + stats.unknown_ids + stats.malformed == stats.packets);
}

/// Read `bytes` as a MAVLink 2 stream: frames lie within the bytes, whole messages re-encode,
/// and commands found go through the gate without a panic.
pub fn mavlink_stream(bytes: &[u8]) {
    let mut decoder = MavlinkDecoder::<4096>::new();
    let mut gate = CommandGate::new();
    let mut at = 0;
    while let Some((frame, used)) = decoder.next(bytes.get(at..).unwrap_or_default()) {
        assert!(used >= 12 && at + used <= bytes.len());
        at += used;
        match frame.incoming {
            Incoming::Telemetry(Ok(message)) => round_trips(&message),
            Incoming::Command { bytes, .. } => {
                let _ = gate.accept(&bytes);
            }
            _ => {}
        }
    }
    decoder.finish(bytes.get(at..).unwrap_or_default());
}

/// `bytes` as one command: accepted or rejected with an acknowledgement, and an accepted one
/// is in range and encodes back to a command a fresh gate accepts as the same.
pub fn command(bytes: &[u8]) {
    match CommandGate::new().accept(bytes) {
        Ok((command, ack)) => {
            assert!(command.in_range() && ack.rejected.is_none());
            let mut buf = [0u8; 64];
            let again = command.encode(ack.sequence, &mut buf);
            let accepted = again.map(|b| CommandGate::new().accept(b).map(|(c, _)| c));
            assert!(matches!(accepted, Ok(Ok(c)) if c == command));
        }
        Err(ack) => assert!(ack.rejected.is_some()),
    }
}

/// `bytes` as one telemetry message: decoded ones round-trip.
pub fn telemetry(bytes: &[u8]) {
    if let Ok(message) = Telemetry::decode(bytes) {
        round_trips(&message);
    }
}

/// `bytes` as a frame link header: a header that decodes describes exactly its sample count,
/// and re-encoding it is stable (the fields a header leaves unused, such as an absent pose, are
/// written as zeros, so the first re-encoding may differ from the input but not the second).
pub fn frame_header(bytes: &[u8]) {
    use crate::framelink::{decode_header, encode_header, FRAME_HEADER_LEN};
    let Some(header) = bytes.first_chunk::<FRAME_HEADER_LEN>() else {
        return;
    };
    let Ok(decoded) = decode_header(header) else {
        return;
    };
    let g = decoded.frame.geometry;
    assert!(g.sample_count() == Some(decoded.samples as usize));
    // Re-encoding needs the samples; small frames only, to keep a run fast.
    if decoded.samples > 4096 {
        return;
    }
    let samples = [0u8; 4096];
    let samples = samples.get(..decoded.samples as usize).unwrap_or_default();
    let once = encode_header(&decoded.frame, samples);
    assert!(once.is_ok(), "a decoded header must encode");
    if let Ok(once) = once {
        let again = decode_header(&once).and_then(|d| encode_header(&d.frame, samples));
        assert!(again == Ok(once), "re-encoding must be stable");
    }
}

/// `message` encodes, and decodes back to itself (NaN scores compared by their bits).
fn round_trips(message: &Telemetry) {
    let mut buf = [0u8; 4096];
    let encoded = message.encode(&mut buf);
    assert!(encoded.is_ok(), "a decoded message must encode");
    if let Ok(encoded) = encoded {
        let again = Telemetry::decode(encoded);
        assert!(again.is_ok(), "an encoded message must decode");
        if let Ok(again) = again {
            // Postcard writes floats bit for bit, so the re-encoding is identical even for NaN.
            let mut second = [0u8; 4096];
            assert!(again.encode(&mut second).ok() == Some(encoded));
        }
    }
}
