//! Kestrel's wire: the telemetry messages every board sends and every ground tool decodes,
//! defined once with stable ids ([`message::MESSAGES`]), encoded with postcard into caller
//! buffers, and framed either as CCSDS space packets ([`ccsds`]) with an APID per message class,
//! a 14-bit sequence count per APID and the ECSS packet error control (CRC-16/CCITT-FALSE) in
//! every packet's last two bytes, or as MAVLink 2 ([`mavlink`]). Products larger than a packet
//! travel in parts ([`product`]); the [`downlink`] queue sends the most valuable first within a
//! byte budget. `no_std`, no heap: the flight side allocates nothing per message.
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![deny(missing_docs)]
#![forbid(unsafe_code)]
// Flight code returns typed errors; it never panics on any input (tests may).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod ccsds;
pub mod command;
pub mod downlink;
pub mod framelink;
pub mod fuzzing;
pub mod mavlink;
pub mod message;
pub mod product;

pub use command::{Command, CommandGate, Commandable};
pub use message::{MessageId, Telemetry};

/// A framing: how encoded messages (`[id][version][postcard]`) cross the link.
pub trait Framing {
    /// The most bytes a message of `len` encoded bytes takes on the link.
    fn framed_len(&self, len: usize) -> usize;
    /// Frame one encoded message at the front of `out`; the bytes written.
    fn frame_encoded(&mut self, message: &[u8], out: &mut [u8]) -> Result<usize, WireError>;
}

impl Framing for ccsds::Framer {
    fn framed_len(&self, len: usize) -> usize {
        len + ccsds::HEADER_LEN + ccsds::CRC_LEN
    }

    fn frame_encoded(&mut self, message: &[u8], out: &mut [u8]) -> Result<usize, WireError> {
        Ok(ccsds::Framer::frame_encoded(self, message, out)?.len())
    }
}

impl Framing for mavlink::MavlinkFramer {
    fn framed_len(&self, len: usize) -> usize {
        mavlink::framed_len(len)
    }

    fn frame_encoded(&mut self, message: &[u8], out: &mut [u8]) -> Result<usize, WireError> {
        mavlink::MavlinkFramer::frame_encoded(self, message, out)
    }
}

/// Why a message could not be encoded, framed or decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The caller's buffer cannot hold it.
    BufferTooSmall,
    /// The bytes end before the message does.
    Truncated,
    /// No message has this id.
    UnknownId(u16),
    /// The message has a version this build does not read.
    UnknownVersion {
        /// The message id.
        id: u16,
        /// Its version.
        version: u8,
    },
    /// The body does not decode.
    Malformed,
    /// Bytes follow the body inside its packet.
    TrailingBytes,
    /// The packet's CRC does not match its bytes.
    Crc,
    /// The packet is not a Kestrel telemetry packet (version, type or APID).
    NotTelemetry,
}

impl core::fmt::Display for WireError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BufferTooSmall => f.write_str("the buffer is too small for the message"),
            Self::Truncated => f.write_str("the bytes end inside a message"),
            Self::UnknownId(id) => write!(f, "unknown message id {id:#06x}"),
            Self::UnknownVersion { id, version } => {
                write!(f, "message {id:#06x} has unknown version {version}")
            }
            Self::Malformed => f.write_str("the message body does not decode"),
            Self::TrailingBytes => f.write_str("bytes follow the message body"),
            Self::Crc => f.write_str("packet CRC mismatch"),
            Self::NotTelemetry => f.write_str("not a Kestrel telemetry packet"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for WireError {}
