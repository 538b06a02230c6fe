//! The frame link: how a test bench (or a camera head) sends frames to a board, for hardware
//! in the loop. Each frame is a fixed 72-byte header and then its samples (u8, band-interleaved
//! by pixel, as `FrameSource` delivers them):
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | `KFRM` |
//! | 4 | version (1) |
//! | 5 | flags: bit 0 position present, bit 1 attitude present |
//! | 6..8 | bands (u16) |
//! | 8..16 | sequence (u64) |
//! | 16..24 | capture time, µs (u64) |
//! | 24..28, 28..32 | width, height (u32) |
//! | 32..40, 40..48, 48..52 | latitude, longitude (f64, degrees), altitude (f32, m) |
//! | 52..56, 56..60, 60..64 | roll, pitch, yaw (f32, degrees) |
//! | 64..68 | sample count (u32): width x height x bands |
//! | 68..72 | CRC-32 (IEEE) of the samples |
//!
//! All big-endian. A header that does not check out (magic, version, undefined flag bits, a
//! sample count that is not the geometry's) is an error; a receiver resynchronises on the next
//! `KFRM`. The pose fields of an absent pose are ignored and sent as zeros.

use kestrel_hal::{Attitude, Frame, FrameGeometry, FrameMeta, Position};

/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 72;
/// The header's first bytes.
pub const FRAME_MAGIC: [u8; 4] = *b"KFRM";
/// The header's version.
pub const FRAME_VERSION: u8 = 1;
const HAS_POSITION: u8 = 1;
const HAS_ATTITUDE: u8 = 2;

/// Why a frame header does not check out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameLinkError {
    /// It does not start with `KFRM`.
    NoMagic,
    /// A version this build does not read.
    Version(u8),
    /// Flag bits this version does not define.
    Flags(u8),
    /// Width x height x bands is not the sample count, or does not fit.
    Size,
    /// The samples' CRC does not match.
    Crc,
}

impl core::fmt::Display for FrameLinkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoMagic => f.write_str("not a frame header"),
            Self::Version(v) => write!(f, "frame header version {v} is not 1"),
            Self::Flags(flags) => write!(f, "frame header flags {flags:#04x} are not defined"),
            Self::Size => f.write_str("the frame's size does not match its sample count"),
            Self::Crc => f.write_str("the frame's samples fail their CRC"),
        }
    }
}

/// A decoded header: the frame, its sample count and the samples' CRC.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FrameHeader {
    /// Geometry and metadata.
    pub frame: Frame,
    /// Samples that follow.
    pub samples: u32,
    /// Their CRC-32.
    pub crc: u32,
}

/// The CRC-32 a header carries for `samples`.
pub fn samples_crc(samples: &[u8]) -> u32 {
    crc32fast::hash(samples)
}

/// Reads a header's fields in order.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    /// The next `N` bytes (zeros past the end, which a 72-byte header never reaches).
    fn next<const N: usize>(&mut self) -> [u8; N] {
        match self.0.split_first_chunk::<N>() {
            Some((field, rest)) => {
                self.0 = rest;
                *field
            }
            None => [0; N],
        }
    }
}

/// The header for `frame` with `samples` (which it describes).
pub fn encode_header(
    frame: &Frame,
    samples: &[u8],
) -> Result<[u8; FRAME_HEADER_LEN], FrameLinkError> {
    let g = frame.geometry;
    let count = g
        .sample_count()
        .filter(|&n| n == samples.len())
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(FrameLinkError::Size)?;
    let meta = frame.meta;
    let flags = if meta.position.is_some() {
        HAS_POSITION
    } else {
        0
    } | if meta.attitude.is_some() {
        HAS_ATTITUDE
    } else {
        0
    };
    let p = meta.position.unwrap_or(Position {
        latitude_deg: 0.0,
        longitude_deg: 0.0,
        altitude_m: 0.0,
    });
    let a = meta.attitude.unwrap_or(Attitude {
        roll_deg: 0.0,
        pitch_deg: 0.0,
        yaw_deg: 0.0,
    });
    let fields: [&[u8]; 15] = [
        &FRAME_MAGIC,
        &[FRAME_VERSION, flags],
        &g.bands.to_be_bytes(),
        &meta.sequence.to_be_bytes(),
        &meta.capture_us.to_be_bytes(),
        &g.width.to_be_bytes(),
        &g.height.to_be_bytes(),
        &p.latitude_deg.to_be_bytes(),
        &p.longitude_deg.to_be_bytes(),
        &p.altitude_m.to_be_bytes(),
        &a.roll_deg.to_be_bytes(),
        &a.pitch_deg.to_be_bytes(),
        &a.yaw_deg.to_be_bytes(),
        &count.to_be_bytes(),
        &samples_crc(samples).to_be_bytes(),
    ];
    let mut out = [0u8; FRAME_HEADER_LEN];
    let mut rest = out.as_mut_slice();
    for field in fields {
        let (slot, after) = rest.split_at_mut(field.len().min(rest.len()));
        slot.copy_from_slice(field.get(..slot.len()).unwrap_or_default());
        rest = after;
    }
    Ok(out)
}

/// Read a header (its samples are checked with [`check_samples`] once they arrive).
pub fn decode_header(bytes: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, FrameLinkError> {
    let mut f = Fields(bytes);
    if f.next::<4>() != FRAME_MAGIC {
        return Err(FrameLinkError::NoMagic);
    }
    let [version, flags] = f.next();
    if version != FRAME_VERSION {
        return Err(FrameLinkError::Version(version));
    }
    if flags & !(HAS_POSITION | HAS_ATTITUDE) != 0 {
        return Err(FrameLinkError::Flags(flags));
    }
    let bands = u16::from_be_bytes(f.next());
    let sequence = u64::from_be_bytes(f.next());
    let capture_us = u64::from_be_bytes(f.next());
    let geometry = FrameGeometry {
        width: u32::from_be_bytes(f.next()),
        height: u32::from_be_bytes(f.next()),
        bands,
    };
    let position = Position {
        latitude_deg: f64::from_be_bytes(f.next()),
        longitude_deg: f64::from_be_bytes(f.next()),
        altitude_m: f32::from_be_bytes(f.next()),
    };
    let attitude = Attitude {
        roll_deg: f32::from_be_bytes(f.next()),
        pitch_deg: f32::from_be_bytes(f.next()),
        yaw_deg: f32::from_be_bytes(f.next()),
    };
    let samples = u32::from_be_bytes(f.next());
    let crc = u32::from_be_bytes(f.next());
    if geometry.sample_count() != Some(samples as usize) {
        return Err(FrameLinkError::Size);
    }
    let meta = FrameMeta {
        sequence,
        capture_us,
        position: (flags & HAS_POSITION != 0).then_some(position),
        attitude: (flags & HAS_ATTITUDE != 0).then_some(attitude),
    };
    Ok(FrameHeader {
        frame: Frame { geometry, meta },
        samples,
        crc,
    })
}

/// Check the samples that followed `header`.
pub fn check_samples(header: &FrameHeader, samples: &[u8]) -> Result<(), FrameLinkError> {
    if samples.len() != header.samples as usize {
        return Err(FrameLinkError::Size);
    }
    if samples_crc(samples) != header.crc {
        return Err(FrameLinkError::Crc);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(position: bool) -> Frame {
        Frame {
            geometry: FrameGeometry {
                width: 3,
                height: 2,
                bands: 2,
            },
            meta: FrameMeta {
                sequence: u64::MAX - 1,
                capture_us: 123_456_789,
                position: position.then_some(Position {
                    latitude_deg: 52.52,
                    longitude_deg: -13.4,
                    altitude_m: 512.5,
                }),
                attitude: Some(Attitude {
                    roll_deg: -1.5,
                    pitch_deg: 2.0,
                    yaw_deg: 359.0,
                }),
            },
        }
    }

    #[test]
    fn headers_round_trip_with_and_without_a_pose() {
        let samples: std::vec::Vec<u8> = (0..12).collect();
        for position in [true, false] {
            let f = frame(position);
            let header = encode_header(&f, &samples).unwrap();
            assert_eq!(&header[..4], b"KFRM");
            let back = decode_header(&header).unwrap();
            assert_eq!(back.frame, f);
            assert_eq!(back.samples, 12);
            check_samples(&back, &samples).unwrap();
        }
    }

    #[test]
    fn bad_headers_and_samples_are_refused() {
        let samples = [7u8; 12];
        assert_eq!(
            encode_header(&frame(true), &samples[..11]),
            Err(FrameLinkError::Size)
        );
        let header = encode_header(&frame(true), &samples).unwrap();
        let mut bad = header;
        bad[0] = b'X';
        assert_eq!(decode_header(&bad), Err(FrameLinkError::NoMagic));
        let mut bad = header;
        bad[4] = 2;
        assert_eq!(decode_header(&bad), Err(FrameLinkError::Version(2)));
        let mut bad = header;
        bad[5] |= 0x80;
        assert_eq!(decode_header(&bad), Err(FrameLinkError::Flags(0x83)));
        let mut bad = header;
        bad[67] ^= 1; // the sample count
        assert_eq!(decode_header(&bad), Err(FrameLinkError::Size));
        let decoded = decode_header(&header).unwrap();
        let mut flipped = samples;
        flipped[5] ^= 0x10;
        assert_eq!(check_samples(&decoded, &flipped), Err(FrameLinkError::Crc));
    }
}
