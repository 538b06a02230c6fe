//! Kestrel's wire: the telemetry messages every board sends and every ground tool decodes,
//! defined once with stable ids ([`message::MESSAGES`]), encoded with postcard into caller
//! buffers, and framed as CCSDS space packets ([`ccsds`]) with an APID per message class, a
//! 14-bit sequence count per APID and the ECSS packet error control (CRC-16/CCITT-FALSE) in every
//! packet's last two bytes. `no_std`, no heap: the flight side allocates nothing per message.
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
pub mod message;

pub use command::{Command, CommandGate};
pub use message::{MessageId, Telemetry};

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
