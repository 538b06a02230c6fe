//! Frames from a V4L2 camera (`/dev/video*`, through the `v4l` crate), converted to RGB: YUYV
//! (BT.601, limited range, as UVC cameras send it), RGB3, GREY and MJPG.
//!
//! The device part is the `v4l2` cargo feature, because the `v4l` crate generates its kernel
//! bindings with bindgen, which needs libclang where it builds (`apt-get install libclang-dev`).
//! Without the feature, opening a camera says so; the pixel conversions are always built, and
//! tested here on frames whose colours the standard fixes.

use std::path::{Path, PathBuf};

use kestrel_hal::FrameGeometry;

/// The pixel formats taken, by their V4L2 four-character codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelFormat {
    /// `YUYV`: 4:2:2, two pixels in four bytes (Y0 U Y1 V).
    Yuyv,
    /// `RGB3`: 8-bit R, G, B.
    Rgb3,
    /// `GREY`: 8-bit luma.
    Grey,
    /// `MJPG`: each frame a JPEG.
    Mjpg,
}

impl PixelFormat {
    /// Every format, in the order the configuration lists them.
    pub const ALL: [Self; 4] = [Self::Yuyv, Self::Rgb3, Self::Grey, Self::Mjpg];

    /// Its four-character code.
    pub fn fourcc(self) -> [u8; 4] {
        match self {
            Self::Yuyv => *b"YUYV",
            Self::Rgb3 => *b"RGB3",
            Self::Grey => *b"GREY",
            Self::Mjpg => *b"MJPG",
        }
    }

    /// The format with four-character code `code`, if it is taken.
    pub fn from_fourcc(code: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.fourcc() == code)
    }

    /// Bands of the frames it becomes: 1 for GREY, else 3 (RGB).
    pub fn bands(self) -> u16 {
        if self == Self::Grey {
            1
        } else {
            3
        }
    }
}

/// Why a frame could not be captured or converted.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// This build has no V4L2 support.
    #[error("this kestrel-flight was built without V4L2 capture: rebuild it with `--features v4l2` (which needs libclang where it builds)")]
    NotBuilt,
    /// The device cannot be opened or set up.
    #[error("{device}: {reason}")]
    Device {
        /// The device, e.g. `/dev/video0`.
        device: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The camera gave no frame within the timeout.
    #[error("{0}: no frame within the timeout")]
    Silent(PathBuf),
    /// A capture call failed.
    #[error("{device}: capture failed: {reason}")]
    Capture {
        /// The device.
        device: PathBuf,
        /// What the driver said.
        reason: String,
    },
    /// A frame's bytes do not fit its format and size; the frame is skipped.
    #[error("a {format:?} frame of {width}x{height} needs {needed} bytes, the camera gave {got}")]
    Short {
        /// Its format.
        format: PixelFormat,
        /// Its width.
        width: u32,
        /// Its height.
        height: u32,
        /// Bytes it needs.
        needed: usize,
        /// Bytes given.
        got: usize,
    },
    /// A JPEG frame did not decode, or is not the size set.
    #[error("an MJPG frame is not a {width}x{height} JPEG: {reason}")]
    Jpeg {
        /// The width set.
        width: u32,
        /// The height set.
        height: u32,
        /// Why.
        reason: String,
    },
    /// The frame is larger than the frame buffer.
    #[error("a {width}x{height}x{bands} frame exceeds the frame buffer ({capacity} samples)")]
    TooLarge {
        /// Width.
        width: u32,
        /// Height.
        height: u32,
        /// Bands.
        bands: u16,
        /// The buffer's samples.
        capacity: usize,
    },
}

/// BT.601 limited-range YCbCr to 8-bit RGB, in integers scaled by 256 (ITU-R BT.601's
/// coefficients: 1.164, 1.596, 0.391, 0.813, 2.018).
fn ycbcr_to_rgb(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    let c = 298 * (i32::from(y) - 16);
    let (d, e) = (i32::from(cb) - 128, i32::from(cr) - 128);
    let clip = |v: i32| ((v + 128) >> 8).clamp(0, 255) as u8;
    [
        clip(c + 409 * e),
        clip(c - 100 * d - 208 * e),
        clip(c + 516 * d),
    ]
}

/// Convert one captured frame of `format`, `width` x `height` with `stride` bytes per line
/// (0: packed), from `raw` into `out` as RGB (GREY stays one band); the frame's geometry.
pub fn convert(
    format: PixelFormat,
    width: u32,
    height: u32,
    stride: u32,
    raw: &[u8],
    out: &mut [u8],
) -> Result<FrameGeometry, CaptureError> {
    let geometry = FrameGeometry {
        width,
        height,
        bands: format.bands(),
    };
    let (w, h) = (width as usize, height as usize);
    let samples = w * h * usize::from(format.bands());
    let Some(out) = out.get_mut(..samples) else {
        return Err(CaptureError::TooLarge {
            width,
            height,
            bands: format.bands(),
            capacity: out.len(),
        });
    };
    if format == PixelFormat::Mjpg {
        let jpeg_error = |reason: String| CaptureError::Jpeg {
            width,
            height,
            reason,
        };
        // The host's decoder, libjpeg-turbo's arithmetic (the training pipeline's). It checks
        // the size from the header, before a damaged one that claims a huge image is
        // allocated for.
        let image =
            kestrel_host::decode_image_bytes_within(Path::new("MJPEG frame"), raw, out.len())
                .map_err(|e| jpeg_error(e.reason))?;
        let got = image.geometry;
        if (got.width, got.height, got.bands) != (width, height, 3) {
            return Err(jpeg_error(format!(
                "it is {}x{} with {} band(s)",
                got.width, got.height, got.bands
            )));
        }
        out.copy_from_slice(&image.samples);
        return Ok(geometry);
    }
    let line = match format {
        PixelFormat::Yuyv => 2 * w,
        PixelFormat::Rgb3 => 3 * w,
        _ => w,
    };
    let stride = if stride == 0 { line } else { stride as usize };
    let needed = stride * h.saturating_sub(1) + line;
    if stride < line || raw.len() < needed || (format == PixelFormat::Yuyv && w % 2 == 1) {
        return Err(CaptureError::Short {
            format,
            width,
            height,
            needed,
            got: raw.len(),
        });
    }
    let out_line = w * usize::from(format.bands());
    for (row, target) in out.chunks_exact_mut(out_line).enumerate() {
        let source = raw
            .get(row * stride..row * stride + line)
            .unwrap_or_default();
        match format {
            PixelFormat::Yuyv => {
                for (pair, rgb) in source.chunks_exact(4).zip(target.chunks_exact_mut(6)) {
                    let &[y0, u, y1, v] = pair else { continue };
                    rgb[..3].copy_from_slice(&ycbcr_to_rgb(y0, u, v));
                    rgb[3..].copy_from_slice(&ycbcr_to_rgb(y1, u, v));
                }
            }
            _ => target.copy_from_slice(source),
        }
    }
    Ok(geometry)
}

#[cfg(feature = "v4l2")]
mod device {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use kestrel_hal::{Frame, FrameMeta, FrameSource};
    use v4l::buffer::Type;
    use v4l::io::mmap::Stream;
    use v4l::io::traits::CaptureStream;
    use v4l::video::Capture;
    use v4l::{Device, Format, FourCC};

    use super::{convert, CaptureError, PixelFormat};

    /// A V4L2 capture device streaming through memory-mapped buffers.
    pub struct V4l2Source {
        path: PathBuf,
        format: PixelFormat,
        set: Format,
        stream: Stream<'static>,
        _device: Device,
    }

    impl V4l2Source {
        /// Open `path` and set it to `width` x `height` in `format`, with `buffers` driver
        /// buffers; a capture waits at most `timeout` for a frame.
        pub fn open(
            path: &Path,
            width: u32,
            height: u32,
            format: PixelFormat,
            buffers: u32,
            timeout: Duration,
        ) -> Result<Self, CaptureError> {
            let error = |reason: String| CaptureError::Device {
                device: path.to_path_buf(),
                reason,
            };
            let device = Device::with_path(path).map_err(|e| error(format!("cannot open: {e}")))?;
            let wanted = Format::new(width, height, FourCC::new(&format.fourcc()));
            let set = device
                .set_format(&wanted)
                .map_err(|e| error(format!("cannot set the format: {e}")))?;
            if (set.width, set.height, set.fourcc.repr) != (width, height, format.fourcc()) {
                return Err(error(format!(
                    "asked for {width}x{height} {}, the driver offers {}x{} {}",
                    String::from_utf8_lossy(&format.fourcc()),
                    set.width,
                    set.height,
                    String::from_utf8_lossy(&set.fourcc.repr)
                )));
            }
            let mut stream = Stream::with_buffers(&device, Type::VideoCapture, buffers.max(1))
                .map_err(|e| error(format!("cannot map {buffers} buffers: {e}")))?;
            stream.set_timeout(timeout);
            Ok(Self {
                path: path.to_path_buf(),
                format,
                set,
                stream,
                _device: device,
            })
        }
    }

    impl FrameSource<u8> for V4l2Source {
        type Error = CaptureError;

        /// The next frame, its sequence the driver's and its capture time the driver's
        /// timestamp in microseconds.
        fn next_frame(&mut self, buffer: &mut [u8]) -> Result<Option<Frame>, CaptureError> {
            let (raw, meta) = self.stream.next().map_err(|e| {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    CaptureError::Silent(self.path.clone())
                } else {
                    CaptureError::Capture {
                        device: self.path.clone(),
                        reason: e.to_string(),
                    }
                }
            })?;
            let used = raw.get(..meta.bytesused as usize).unwrap_or(raw);
            let s = &self.set;
            let geometry = convert(self.format, s.width, s.height, s.stride, used, buffer)?;
            let micros = Duration::from(meta.timestamp).as_micros();
            Ok(Some(Frame {
                geometry,
                meta: FrameMeta {
                    sequence: u64::from(meta.sequence),
                    capture_us: u64::try_from(micros).unwrap_or(u64::MAX),
                    ..FrameMeta::default()
                },
            }))
        }
    }
}

#[cfg(feature = "v4l2")]
pub use device::V4l2Source;

/// Without the `v4l2` feature: a camera cannot be opened, and says why.
#[cfg(not(feature = "v4l2"))]
pub struct V4l2Source(std::convert::Infallible);

#[cfg(not(feature = "v4l2"))]
impl V4l2Source {
    /// Always [`CaptureError::NotBuilt`].
    pub fn open(
        _path: &std::path::Path,
        _width: u32,
        _height: u32,
        _format: PixelFormat,
        _buffers: u32,
        _timeout: std::time::Duration,
    ) -> Result<Self, CaptureError> {
        Err(CaptureError::NotBuilt)
    }
}

#[cfg(not(feature = "v4l2"))]
impl kestrel_hal::FrameSource<u8> for V4l2Source {
    type Error = CaptureError;

    fn next_frame(
        &mut self,
        _buffer: &mut [u8],
    ) -> Result<Option<kestrel_hal::Frame>, CaptureError> {
        match self.0 {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// YUYV for two pixels of the same colour.
    fn pair(y: u8, u: u8, v: u8) -> [u8; 4] {
        [y, u, y, v]
    }

    #[test]
    fn yuyv_becomes_the_colours_bt601_fixes() {
        // BT.601 limited range: black is Y 16, white Y 235, both with chroma at 128; 75%
        // colour bars' red is Y 65, Cb 100, Cr 212, which is RGB (191, 0, 0) to within the
        // rounding of 8-bit YCbCr.
        let mut raw = Vec::new();
        for colour in [pair(16, 128, 128), pair(235, 128, 128), pair(65, 100, 212)] {
            raw.extend_from_slice(&colour);
        }
        // Two lines of 6 pixels, each line padded to a 16-byte stride.
        let mut strided = Vec::new();
        for _ in 0..2 {
            strided.extend_from_slice(&raw);
            strided.extend_from_slice(&[0xEE; 4]);
        }
        let mut out = [0u8; 6 * 2 * 3];
        let g = convert(PixelFormat::Yuyv, 6, 2, 16, &strided, &mut out).unwrap();
        assert_eq!((g.width, g.height, g.bands), (6, 2, 3));
        let pixels: Vec<&[u8]> = out.chunks(3).collect();
        for line in pixels.chunks(6) {
            assert_eq!(line[0], [0, 0, 0]);
            assert_eq!(line[1], [0, 0, 0]);
            assert_eq!(line[2], [255, 255, 255]);
            for red in [line[4], line[5]] {
                let off = red.iter().zip([191u8, 0, 0]).map(|(a, b)| a.abs_diff(b));
                assert!(off.max() <= Some(1), "75% red came out {red:?}");
            }
        }
        // Values beyond the nominal range clip instead of wrapping.
        assert_eq!(ycbcr_to_rgb(255, 255, 255), [255, 125, 255]);
        assert_eq!(ycbcr_to_rgb(0, 0, 0), [0, 135, 0]);
    }

    #[test]
    fn packed_and_grey_frames_copy_and_short_ones_are_refused() {
        let raw: Vec<u8> = (0..24).collect();
        let mut out = [0u8; 24];
        let g = convert(PixelFormat::Rgb3, 4, 2, 0, &raw, &mut out).unwrap();
        assert_eq!((g.bands, &out[..]), (3, &raw[..]));
        let g = convert(PixelFormat::Grey, 4, 2, 12, &raw, &mut out).unwrap();
        assert_eq!((g.bands, &out[..8]), (1, &[0, 1, 2, 3, 12, 13, 14, 15][..]));
        let short = convert(PixelFormat::Yuyv, 4, 2, 0, &raw[..15], &mut out).unwrap_err();
        assert!(
            matches!(
                short,
                CaptureError::Short {
                    needed: 16,
                    got: 15,
                    ..
                }
            ),
            "{short}"
        );
        let odd = convert(PixelFormat::Yuyv, 3, 2, 0, &raw, &mut out).unwrap_err();
        assert!(matches!(odd, CaptureError::Short { .. }), "{odd}");
        let large = convert(PixelFormat::Rgb3, 8, 2, 0, &raw, &mut out).unwrap_err();
        assert!(matches!(large, CaptureError::TooLarge { .. }), "{large}");
    }

    #[test]
    fn mjpg_frames_decode_at_the_size_set() {
        // A real 64x64 JPEG chip as the camera's frame: the pixels a file of it decodes to.
        let chip = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../sim/sample/eurosat-rgb/River/River_105.jpg");
        let jpeg = std::fs::read(&chip).unwrap();
        let mut out = vec![0u8; 64 * 64 * 3];
        convert(PixelFormat::Mjpg, 64, 64, 0, &jpeg, &mut out).unwrap();
        assert_eq!(out, kestrel_host::decode_image(&chip).unwrap().samples);
        let wrong = convert(PixelFormat::Mjpg, 32, 64, 0, &jpeg, &mut out).unwrap_err();
        assert!(wrong.to_string().contains("64x64"), "{wrong}");
        let garbage = convert(PixelFormat::Mjpg, 8, 4, 0, b"not a jpeg", &mut out).unwrap_err();
        assert!(matches!(garbage, CaptureError::Jpeg { .. }), "{garbage}");
    }

    #[test]
    fn fourccs_name_their_formats() {
        for f in PixelFormat::ALL {
            assert_eq!(PixelFormat::from_fourcc(&f.fourcc()), Some(f));
        }
        assert_eq!(PixelFormat::from_fourcc(b"NV12"), None);
    }

    #[test]
    fn an_absent_camera_is_a_clear_error() {
        let opened = V4l2Source::open(
            std::path::Path::new("/dev/video-kestrel-absent"),
            640,
            480,
            PixelFormat::Yuyv,
            4,
            std::time::Duration::from_secs(1),
        );
        let e = opened.err().expect("an absent camera is an error");
        let text = e.to_string();
        if cfg!(feature = "v4l2") {
            assert!(
                text.starts_with("/dev/video-kestrel-absent: cannot open"),
                "{text}"
            );
        } else {
            assert!(matches!(e, CaptureError::NotBuilt), "{text}");
        }
    }
}
