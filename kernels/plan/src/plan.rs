//! The plan container: a versioned file of CRC-protected sections, parsed without copying.
//!
//! Layout (integers little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `KSTRLPLN` |
//! | 8..10 | format version |
//! | 10..12 | section count `n` |
//! | 12..16 | CRC32 of bytes 0..12 followed by the section table |
//! | 16..16+16n | section table: `kind: u16`, `reserved: u16` (zero), `offset: u32`, `len: u32`, `crc32: u32` |
//! | ... | section payloads, each starting on a 16-byte boundary |
//!
//! The [`SectionKind::Header`] section is a postcard-encoded [`PlanHeader`] (model name, input
//! and output specs, preprocessing, labels, and for a detector how its head is read and its tiles
//! merged): everything a board needs to run the model from the plan alone. The op list, weights and arena layout are described
//! in [`crate::program`]; this module only guarantees that what it hands out is intact.

use serde::{Deserialize, Serialize};

use kestrel_backend::spec::{PreprocessSpec, ResizeRule, SpecError, MAX_BANDS};

/// First bytes of every plan.
pub const MAGIC: [u8; 8] = *b"KSTRLPLN";
/// The format version this build writes. 2: the header carries the detector's
/// postprocessing ([`DetectorHeader`]); 3: which kind of head ([`HeadHeader`]); 4: the output
/// tensor may hold 16-bit codes (the width its writing step writes), which a version-3 reader
/// would read as int8. Versions from [`OLDEST_FORMAT_VERSION`] are read; older are refused.
pub const FORMAT_VERSION: u16 = 4;
/// The oldest format version this build reads: a version-3 plan is a version-4 one whose
/// output is int8.
pub const OLDEST_FORMAT_VERSION: u16 = 3;
/// Payloads start on this boundary so weights can be read as aligned words.
pub const SECTION_ALIGN: usize = 16;

const PREAMBLE: usize = 16;
const TABLE_ENTRY: usize = 16;

/// What a section holds. The numbers are part of the format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u16)]
pub enum SectionKind {
    /// postcard-encoded [`PlanHeader`]; required.
    Header = 1,
    /// The op list with integer-only parameters.
    Ops = 2,
    /// Quantised weights and biases.
    Weights = 3,
    /// Tensor placement in the arena.
    Arena = 4,
}

impl SectionKind {
    const ALL: [SectionKind; 4] = [Self::Header, Self::Ops, Self::Weights, Self::Arena];

    fn from_u16(value: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u16 == value)
    }

    fn index(self) -> usize {
        self as usize - 1
    }
}

/// Why bytes are not a usable plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PlanError {
    /// Shorter than its own preamble or section table.
    Truncated,
    /// Not a Kestrel plan.
    BadMagic,
    /// Written by another format version.
    UnsupportedVersion {
        /// Version in the file.
        found: u16,
        /// Version this build reads.
        supported: u16,
    },
    /// The preamble or section table fails its CRC.
    TableCorrupt,
    /// A section kind this version does not know, or a non-zero reserved field.
    UnknownSection(u16),
    /// The same section appears twice.
    DuplicateSection(SectionKind),
    /// A section is misaligned or reaches past the end of the file.
    SectionBounds(SectionKind),
    /// A section's payload fails its CRC.
    SectionCorrupt(SectionKind),
    /// A required section is absent.
    MissingSection(SectionKind),
    /// The header section does not decode.
    Header,
    /// The header describes an unusable input.
    Spec(SpecError),
    /// A detector stride in the header is 0 or does not divide the input's height and width
    /// (or a YOLO head has none, or a distribution of no bins).
    DetectorStride(u16),
}

impl core::fmt::Display for PlanError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Truncated => f.write_str("plan is truncated"),
            Self::BadMagic => f.write_str("not a Kestrel plan (bad magic)"),
            Self::UnsupportedVersion { found, supported } => {
                write!(
                    f,
                    "plan format version {found}, this build reads versions {OLDEST_FORMAT_VERSION} to {supported}"
                )
            }
            Self::TableCorrupt => f.write_str("plan section table is corrupt (CRC mismatch)"),
            Self::UnknownSection(kind) => write!(f, "unknown plan section kind {kind}"),
            Self::DuplicateSection(kind) => write!(f, "plan section {kind:?} appears twice"),
            Self::SectionBounds(kind) => write!(f, "plan section {kind:?} is out of bounds"),
            Self::SectionCorrupt(kind) => {
                write!(f, "plan section {kind:?} is corrupt (CRC mismatch)")
            }
            Self::MissingSection(kind) => write!(f, "plan has no {kind:?} section"),
            Self::Header => f.write_str("plan header does not decode"),
            Self::DetectorStride(stride) => {
                write!(
                    f,
                    "plan header: detector stride {stride} does not divide the input"
                )
            }
            Self::Spec(e) => write!(f, "plan header: {e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for PlanError {}

/// What a plan says about itself: borrowed from the plan bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanHeader<'a> {
    /// Zoo name of the model.
    pub name: &'a str,
    /// sha256 (hex) of the ONNX model the plan was compiled from, so a stale plan is caught.
    pub onnx_sha256: &'a str,
    /// Input shape, NCHW.
    pub input_shape: [u32; 4],
    /// Values in the output tensor.
    pub output_len: u32,
    /// Bands used in `mean` and `std`.
    pub bands: u8,
    /// Per-band mean in raw sample units.
    pub mean: [f32; MAX_BANDS],
    /// Per-band standard deviation in raw sample units.
    pub std: [f32; MAX_BANDS],
    /// 0 = nearest, 1 = bilinear.
    pub resize: u8,
    /// Class labels, one per line.
    pub labels: &'a str,
    /// Bytes of arena the executor needs.
    pub arena_size: u32,
    /// Tensor id of the program's output (the input is tensor 0).
    pub output_tensor: u16,
    /// Scale of the int8 input: `real = scale * (code - zero_point)`.
    pub input_scale: f32,
    /// Zero point of the int8 input.
    pub input_zero_point: i32,
    /// Scale of the output codes (int8, or 16-bit where the step writing the output is a
    /// 16-bit one: [`crate::program::Program::output_width`]).
    pub output_scale: f32,
    /// Zero point of the output codes.
    pub output_zero_point: i32,
    /// The model ends in a Softmax, applied to the dequantised output.
    pub output_softmax: bool,
    /// For a detector: how its head is read and its tiles merged. `None` for a classifier.
    pub detector: Option<DetectorHeader>,
}

/// A detector's postprocessing, in the plan so that a board needs nothing else. Tiles are the
/// model's input size.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DetectorHeader {
    /// How the head is read.
    pub head: HeadHeader,
    /// Lowest class score reported.
    pub score_threshold: f32,
    /// Same-class boxes overlapping a better one by more than this IoU are suppressed.
    pub nms_iou: f32,
    /// Pixels shared by neighbouring tiles.
    pub tile_overlap: u32,
    /// A same-class box this much inside a better one (intersection over its own area) is a
    /// piece cut off by a tile edge, and is dropped.
    pub seam_containment: f32,
    /// Most detections of one class a frame reports (the best ones); the rest are counted.
    pub max_per_class: u16,
}

/// The kind of detector head and its geometry.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum HeadHeader {
    /// `[labels, height / stride, width / stride]` heatmaps followed by box size and centre
    /// offset planes.
    CenterNet {
        /// Input pixels per head cell.
        stride: u16,
        /// Head cells that a box size of 1.0 stands for.
        wh_scale: f32,
    },
    /// ultralytics' raw YOLO head: per scale, `4 * reg_max` box-distribution planes then one
    /// class-logit plane per label.
    Yolo {
        /// Bins of each box side's distribution.
        reg_max: u16,
        /// Input pixels per cell of each scale, in the head's order; 0 after the last.
        strides: [u16; 4],
    },
}

impl HeadHeader {
    /// That the strides in use each divide a `height` x `width` input; the first that does not
    /// (or 0 when a YOLO head has none, or no bins) is the error.
    pub fn check(&self, height: u32, width: u32) -> Result<(), PlanError> {
        let divides = |s: u16| {
            s != 0 && height.is_multiple_of(u32::from(s)) && width.is_multiple_of(u32::from(s))
        };
        match *self {
            Self::CenterNet { stride, .. } if !divides(stride) => {
                Err(PlanError::DetectorStride(stride))
            }
            Self::Yolo { reg_max, strides } => {
                let used = strides.iter().take_while(|&&s| s != 0).count();
                let bad =
                    strides
                        .iter()
                        .enumerate()
                        .find(|&(i, &s)| if i < used { !divides(s) } else { s != 0 });
                match bad {
                    Some((_, &s)) => Err(PlanError::DetectorStride(s)),
                    None if used == 0 || reg_max == 0 => Err(PlanError::DetectorStride(0)),
                    None => Ok(()),
                }
            }
            Self::CenterNet { .. } => Ok(()),
        }
    }
}

impl PlanHeader<'_> {
    /// The preprocessing contract the plan was compiled for.
    pub fn preprocess_spec(&self) -> Result<PreprocessSpec, SpecError> {
        let bands = usize::from(self.bands);
        let (mean, std) = match (self.mean.get(..bands), self.std.get(..bands)) {
            (Some(mean), Some(std)) => (mean, std),
            _ => return Err(SpecError::TooManyBands(bands)),
        };
        let resize = if self.resize == 0 {
            ResizeRule::Nearest
        } else {
            ResizeRule::Bilinear
        };
        let [_, _, height, width] = self.input_shape;
        PreprocessSpec::new(width as usize, height as usize, mean, std, resize)
    }

    /// The labels, in output order.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.labels.lines()
    }
}

/// A parsed, verified plan borrowing its bytes.
#[derive(Clone, Debug)]
pub struct Plan<'a> {
    header: PlanHeader<'a>,
    sections: [Option<&'a [u8]>; SectionKind::ALL.len()],
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

impl<'a> Plan<'a> {
    /// Check magic, version and every CRC, and decode the header. Never panics.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, PlanError> {
        Self::parse_checked(bytes, true)
    }

    /// As [`Plan::parse`], letting CRC mismatches through: the view of a plan whose memory
    /// changed after it was verified (an injected upset), so that it runs as the damaged
    /// memory would. Only fault injection uses it; a scrub's [`Plan::parse`] finds the damage.
    pub fn parse_unchecked_crcs(bytes: &'a [u8]) -> Result<Self, PlanError> {
        Self::parse_checked(bytes, false)
    }

    /// Bytes the CRCs cover: the preamble and section table, and each section's payload. The
    /// rest is alignment padding nothing reads.
    pub fn covered_bytes(
        &self,
        bytes: &[u8],
    ) -> impl Iterator<Item = core::ops::Range<usize>> + '_ {
        let table_end = PREAMBLE + self.sections.iter().flatten().count() * TABLE_ENTRY;
        let base = bytes.as_ptr() as usize;
        let sections = self.sections.iter().flatten().map(move |payload| {
            let start = (payload.as_ptr() as usize).wrapping_sub(base);
            start..start.saturating_add(payload.len())
        });
        core::iter::once(0..table_end).chain(sections)
    }

    fn parse_checked(bytes: &'a [u8], check_crcs: bool) -> Result<Self, PlanError> {
        if bytes.get(..MAGIC.len()) != Some(&MAGIC[..]) {
            return Err(if bytes.len() < MAGIC.len() {
                PlanError::Truncated
            } else {
                PlanError::BadMagic
            });
        }
        let version = u16_at(bytes, 8).ok_or(PlanError::Truncated)?;
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(PlanError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let count = usize::from(u16_at(bytes, 10).ok_or(PlanError::Truncated)?);
        let stored_crc = u32_at(bytes, 12).ok_or(PlanError::Truncated)?;
        let table = bytes
            .get(PREAMBLE..PREAMBLE + count * TABLE_ENTRY)
            .ok_or(PlanError::Truncated)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(bytes.get(..12).ok_or(PlanError::Truncated)?);
        crc.update(table);
        if check_crcs && crc.finalize() != stored_crc {
            return Err(PlanError::TableCorrupt);
        }

        let mut sections = [None; SectionKind::ALL.len()];
        for entry in table.chunks_exact(TABLE_ENTRY) {
            let field = |at| u32_at(entry, at).unwrap_or(u32::MAX) as usize;
            let raw_kind = u16_at(entry, 0).unwrap_or(0);
            let kind =
                SectionKind::from_u16(raw_kind).ok_or(PlanError::UnknownSection(raw_kind))?;
            if u16_at(entry, 2) != Some(0) {
                return Err(PlanError::UnknownSection(raw_kind));
            }
            let (offset, len, crc) = (field(4), field(8), field(12) as u32);
            let payload = offset
                .checked_add(len)
                .filter(|_| offset.is_multiple_of(SECTION_ALIGN))
                .and_then(|end| bytes.get(offset..end))
                .ok_or(PlanError::SectionBounds(kind))?;
            if check_crcs && crc32fast::hash(payload) != crc {
                return Err(PlanError::SectionCorrupt(kind));
            }
            match sections.get_mut(kind.index()) {
                Some(slot @ None) => *slot = Some(payload),
                _ => return Err(PlanError::DuplicateSection(kind)),
            }
        }

        let header_bytes = sections
            .get(SectionKind::Header.index())
            .copied()
            .flatten()
            .ok_or(PlanError::MissingSection(SectionKind::Header))?;
        let header: PlanHeader<'a> =
            postcard::from_bytes(header_bytes).map_err(|_| PlanError::Header)?;
        header.preprocess_spec().map_err(PlanError::Spec)?;
        if let Some(detector) = &header.detector {
            let [_, _, height, width] = header.input_shape;
            detector.head.check(height, width)?;
        }
        Ok(Self { header, sections })
    }

    /// The decoded header.
    pub fn header(&self) -> &PlanHeader<'a> {
        &self.header
    }

    /// A section's verified payload, if the plan has one.
    pub fn section(&self, kind: SectionKind) -> Option<&'a [u8]> {
        self.sections.get(kind.index()).copied().flatten()
    }
}

/// Assemble a plan file from a header and section payloads (the compiler's side).
#[cfg(feature = "alloc")]
pub fn write_plan(
    header: &PlanHeader<'_>,
    sections: &[(SectionKind, &[u8])],
) -> Result<alloc::vec::Vec<u8>, postcard::Error> {
    let header_bytes = postcard::to_allocvec(header)?;
    let mut payloads = alloc::vec![(SectionKind::Header, header_bytes.as_slice())];
    payloads.extend(sections.iter().copied());

    // The section table first, with each payload's offset after the aligned ones before it.
    let mut table = alloc::vec::Vec::with_capacity(payloads.len() * TABLE_ENTRY);
    let mut offset = PREAMBLE + payloads.len() * TABLE_ENTRY;
    for (kind, payload) in &payloads {
        offset = offset.next_multiple_of(SECTION_ALIGN);
        table.extend_from_slice(&(*kind as u16).to_le_bytes());
        table.extend_from_slice(&0u16.to_le_bytes());
        table.extend_from_slice(&(offset as u32).to_le_bytes());
        table.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        table.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        offset += payload.len();
    }
    let mut out = alloc::vec::Vec::with_capacity(offset);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payloads.len() as u16).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out);
    crc.update(&table);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&table);
    for (_, payload) in &payloads {
        out.resize(out.len().next_multiple_of(SECTION_ALIGN), 0);
        out.extend_from_slice(payload);
    }
    Ok(out)
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    fn header() -> PlanHeader<'static> {
        let mut mean = [0.0; MAX_BANDS];
        let mut std = [1.0; MAX_BANDS];
        mean[..3].copy_from_slice(&[87.4, 96.7, 103.8]);
        std[..3].copy_from_slice(&[51.3, 34.7, 29.3]);
        PlanHeader {
            name: "eurosat-rgb",
            onnx_sha256: "00ff",
            input_shape: [1, 3, 64, 64],
            output_len: 10,
            bands: 3,
            mean,
            std,
            resize: 1,
            labels: "AnnualCrop\nForest\nSeaLake",
            arena_size: 4096,
            output_tensor: 7,
            input_scale: 0.02,
            input_zero_point: -3,
            output_scale: 0.1,
            output_zero_point: 5,
            output_softmax: false,
            detector: None,
        }
    }

    fn sample_plan() -> Vec<u8> {
        let weights: Vec<u8> = (0..=255).collect();
        write_plan(
            &header(),
            &[(SectionKind::Weights, &weights), (SectionKind::Ops, b"ops")],
        )
        .unwrap()
    }

    #[test]
    fn round_trips_header_and_sections() {
        let bytes = sample_plan();
        let plan = Plan::parse(&bytes).unwrap();
        assert_eq!(plan.header(), &header());
        assert_eq!(
            plan.header().labels().collect::<Vec<_>>(),
            ["AnnualCrop", "Forest", "SeaLake"]
        );
        assert_eq!(
            plan.header().preprocess_spec().unwrap().input_len(),
            3 * 64 * 64
        );
        assert_eq!(plan.section(SectionKind::Ops), Some(&b"ops"[..]));
        assert_eq!(plan.section(SectionKind::Weights).unwrap().len(), 256);
        assert_eq!(plan.section(SectionKind::Arena), None);
        let weights = plan.section(SectionKind::Weights).unwrap();
        let offset = weights.as_ptr() as usize - bytes.as_ptr() as usize;
        assert!(
            offset < bytes.len(),
            "zero-copy: the section points into the plan bytes"
        );
        assert!(
            offset.is_multiple_of(SECTION_ALIGN),
            "weights start aligned, at {offset}"
        );
    }

    #[test]
    fn a_detector_header_round_trips_and_its_strides_must_divide_the_input() {
        let detector = DetectorHeader {
            head: HeadHeader::CenterNet {
                stride: 4,
                wh_scale: 16.0,
            },
            score_threshold: 0.3,
            nms_iou: 0.5,
            tile_overlap: 16,
            seam_containment: 0.8,
            max_per_class: 50,
        };
        let plan = |head| {
            let header = PlanHeader {
                detector: Some(DetectorHeader { head, ..detector }),
                ..header()
            };
            write_plan(&header, &[(SectionKind::Ops, b"ops")]).unwrap()
        };
        let centernet = |stride| HeadHeader::CenterNet {
            stride,
            wh_scale: 16.0,
        };
        let yolo = |reg_max, strides| HeadHeader::Yolo { reg_max, strides };
        for head in [
            centernet(4),
            yolo(16, [8, 16, 32, 0]),
            yolo(1, [64, 0, 0, 0]),
        ] {
            assert_eq!(
                Plan::parse(&plan(head)).unwrap().header().detector,
                Some(DetectorHeader { head, ..detector })
            );
        }
        let refused = [
            (centernet(0), 0),
            (centernet(3), 3),
            (centernet(128), 128),
            (yolo(16, [8, 24, 32, 0]), 24),
            (yolo(16, [8, 0, 32, 0]), 32),
            (yolo(16, [0; 4]), 0),
            (yolo(0, [8, 16, 0, 0]), 0),
        ];
        for (head, stride) in refused {
            assert_eq!(
                Plan::parse(&plan(head)).unwrap_err(),
                PlanError::DetectorStride(stride),
                "{head:?} on a 64x64 input"
            );
        }
    }

    #[test]
    fn the_writer_reproduces_a_committed_plan_byte_for_byte() {
        let original = include_bytes!("../../../models/zoo/eurosat-rgb/model.plan");
        let mut aligned = std::vec![0u128; original.len().div_ceil(16)];
        let bytes = &mut bytemuck::cast_slice_mut::<u128, u8>(&mut aligned)[..original.len()];
        bytes.copy_from_slice(original);
        let plan = Plan::parse(bytes).unwrap();
        let sections: std::vec::Vec<_> =
            [SectionKind::Ops, SectionKind::Weights, SectionKind::Arena]
                .into_iter()
                .filter_map(|kind| Some((kind, plan.section(kind)?)))
                .collect();
        assert_eq!(sections.len(), 3);
        assert!(write_plan(plan.header(), &sections).unwrap() == original);
    }

    #[test]
    fn rejects_wrong_magic_version_and_short_input() {
        let mut bytes = sample_plan();
        bytes[0] = b'X';
        assert_eq!(Plan::parse(&bytes).unwrap_err(), PlanError::BadMagic);
        // A version 1 plan (no detector postprocessing in its header) is refused by name.
        let mut bytes = sample_plan();
        bytes[8] = 1;
        let refused = Plan::parse(&bytes).unwrap_err();
        assert_eq!(
            refused,
            PlanError::UnsupportedVersion {
                found: 1,
                supported: FORMAT_VERSION
            }
        );
        assert_eq!(
            refused.to_string(),
            "plan format version 1, this build reads versions 3 to 4"
        );
        // A version-3 plan (its output int8 by construction) is still read, a later one not
        // (the preamble's CRC, which covers the version, left unchecked).
        let mut bytes = sample_plan();
        bytes[8] = 3;
        assert!(Plan::parse_unchecked_crcs(&bytes).is_ok());
        bytes[8] = 5;
        assert!(matches!(
            Plan::parse_unchecked_crcs(&bytes),
            Err(PlanError::UnsupportedVersion { found: 5, .. })
        ));
        assert_eq!(Plan::parse(b"KSTRL").unwrap_err(), PlanError::Truncated);
        assert_eq!(Plan::parse(&[]).unwrap_err(), PlanError::Truncated);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample_plan();
        for len in 0..bytes.len() {
            assert!(
                Plan::parse(&bytes[..len]).is_err(),
                "truncated to {len} bytes parsed"
            );
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = sample_plan();
        // The padding between sections is covered by no CRC and carries no meaning.
        let plan = Plan::parse(&bytes).unwrap();
        let covered = |i: usize| {
            i < PREAMBLE + 3 * TABLE_ENTRY
                || SectionKind::ALL
                    .iter()
                    .filter_map(|k| plan.section(*k))
                    .any(|s| {
                        let start = s.as_ptr() as usize - bytes.as_ptr() as usize;
                        (start..start + s.len()).contains(&i)
                    })
        };
        for i in (0..bytes.len()).filter(|i| covered(*i)) {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[i] ^= 1 << bit;
                assert!(
                    Plan::parse(&flipped).is_err(),
                    "flip of byte {i} bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A property test over pseudo-random inputs (xorshift, fixed seed): raw noise, noise
        // behind a valid preamble, and valid plans with random bytes overwritten.
        let valid = sample_plan();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let len = (next() % 400) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            match round % 3 {
                0 => {}
                1 => {
                    let n = bytes.len().min(16);
                    bytes[..n].copy_from_slice(&valid[..n]);
                }
                _ => {
                    bytes = valid.clone();
                    for _ in 0..1 + next() % 4 {
                        let at = (next() as usize) % bytes.len();
                        bytes[at] = next() as u8;
                    }
                }
            }
            let _ = Plan::parse(&bytes);
        }
    }
}
