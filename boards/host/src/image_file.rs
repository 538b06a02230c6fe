//! Decoding image files into frames.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageDecoder, ImageReader};
use kestrel_hal::{Frame, FrameGeometry, FrameMeta, FrameSource};

/// Why an image file could not become a frame: `"<path>: <reason>"`.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct ImageError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong, on one line.
    pub reason: String,
}

impl ImageError {
    /// `path` could not be used because of `reason`.
    pub fn new(path: &Path, reason: impl Into<String>) -> Self {
        // A decoder's message may end in a line break or span several lines:
        // its lines joined, so that the reason stays on one line in logs and reason files.
        let reason: String = reason.into();
        let lines: Vec<&str> = reason
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        Self {
            path: path.to_path_buf(),
            reason: lines.join("; "),
        }
    }
}

/// A decoded 8-bit image, samples band-interleaved by pixel.
#[derive(Clone, Debug)]
pub struct DecodedImage {
    /// Size and band count (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).
    pub geometry: FrameGeometry,
    /// `width * height * bands` samples.
    pub samples: Vec<u8>,
}

/// Decode a JPEG or PNG file (JPEG exactly as libjpeg-turbo decodes it). 16-bit and float images are rejected: this board delivers 8-bit
/// camera frames.
///
/// ```
/// let chip = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
///     .join("../../sim/sample/eurosat-rgb/River/River_105.jpg");
/// let image = kestrel_host::decode_image(&chip)?;
/// let g = image.geometry;
/// assert_eq!((g.width, g.height, g.bands), (64, 64, 3));
/// assert_eq!(image.samples.len(), 64 * 64 * 3);
///
/// let missing = kestrel_host::decode_image(std::path::Path::new("no/such.jpg")).unwrap_err();
/// assert!(missing.to_string().starts_with("no/such.jpg: cannot open"));
/// # Ok::<(), kestrel_host::ImageError>(())
/// ```
pub fn decode_image(path: &Path) -> Result<DecodedImage, ImageError> {
    decode_image_within(path, usize::MAX)
}

/// [`decode_image`], refusing an image of more than `max_samples` samples from its header,
/// before anything is allocated for it: a damaged or hostile header that claims a huge image
/// costs nothing (the image crate alone would allocate up to 512 MB first).
pub fn decode_image_within(path: &Path, max_samples: usize) -> Result<DecodedImage, ImageError> {
    let bytes =
        std::fs::read(path).map_err(|e| ImageError::new(path, format!("cannot open: {e}")))?;
    decode_image_bytes_within(path, &bytes, max_samples)
}

/// [`decode_image`] of a file's bytes already read (`path` names it in errors).
pub fn decode_image_bytes(path: &Path, bytes: &[u8]) -> Result<DecodedImage, ImageError> {
    decode_image_bytes_within(path, bytes, usize::MAX)
}

/// [`decode_image_within`] of a file's bytes already read.
pub fn decode_image_bytes_within(
    path: &Path,
    bytes: &[u8],
    max_samples: usize,
) -> Result<DecodedImage, ImageError> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        return decode_jpeg(path, bytes, max_samples);
    }
    let decoder = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::new(path, format!("cannot read: {e}")))?
        .into_decoder()
        .map_err(|e| ImageError::new(path, format!("cannot decode image: {e}")))?;
    let (width, height) = decoder.dimensions();
    let bands = decoder.color_type().channel_count();
    check_claimed_size(path, (width, height, bands), max_samples)?;
    image::Limits::default()
        .reserve(decoder.total_bytes())
        .map_err(|e| ImageError::new(path, format!("cannot decode image: {e}")))?;
    let image = DynamicImage::from_decoder(decoder)
        .map_err(|e| ImageError::new(path, format!("cannot decode image: {e}")))?;
    let (width, height) = (image.width(), image.height());
    let (bands, samples) = match image {
        DynamicImage::ImageLuma8(i) => (1, i.into_raw()),
        DynamicImage::ImageLumaA8(i) => (2, i.into_raw()),
        DynamicImage::ImageRgb8(i) => (3, i.into_raw()),
        DynamicImage::ImageRgba8(i) => (4, i.into_raw()),
        other => {
            return Err(ImageError::new(
                path,
                format!(
                    "{:?} samples are not supported, only 8-bit images",
                    other.color()
                ),
            ))
        }
    };
    Ok(DecodedImage {
        geometry: FrameGeometry {
            width,
            height,
            bands,
        },
        samples,
    })
}

/// `width x height x bands` from a header, refused when over `max_samples` or over the image
/// crate's allocation limit (512 MB), which every decoder here keeps to.
fn check_claimed_size(
    path: &Path,
    (width, height, bands): (u32, u32, u8),
    max_samples: usize,
) -> Result<(), ImageError> {
    let claimed = u64::from(width) * u64::from(height) * u64::from(bands);
    if claimed > max_samples as u64 {
        return Err(ImageError::new(
            path,
            format!(
                "{width}x{height}x{bands} image exceeds the frame buffer ({max_samples} samples)"
            ),
        ));
    }
    image::Limits::default()
        .reserve(claimed)
        .map_err(|e| ImageError::new(path, format!("cannot decode image: {e}")))
}

/// JPEG through libjpeg-turbo's decoder (as mozjpeg builds it, without SIMD): its integer IDCT
/// and "fancy" chroma upsampling are what PIL and torchvision decode with, so frames carry the
/// pixels the models were trained on, byte for byte (the image crate's decoder differs in up to
/// a fifth of the samples). Grey JPEGs stay one band; CMYK ones are refused.
fn decode_jpeg(path: &Path, bytes: &[u8], max_samples: usize) -> Result<DecodedImage, ImageError> {
    catching_libjpeg(path, || {
        let header = mozjpeg::Decompress::new_mem(bytes).map_err(|e| jpeg_error(path, e))?;
        let (geometry, mut started) = start_jpeg(path, header, Some(max_samples))?;
        let samples: Vec<u8> = started.read_scanlines().map_err(|e| jpeg_error(path, e))?;
        started.finish().map_err(|e| jpeg_error(path, e))?;
        Ok(DecodedImage { geometry, samples })
    })
}

/// Start decompressing a JPEG whose header `header` has read: grey as one band, colour as RGB.
/// An image to be held whole (`max_samples` given) is refused when over it or the 512 MB limit.
pub(crate) fn start_jpeg<R>(
    path: &Path,
    header: mozjpeg::Decompress<R>,
    max_samples: Option<usize>,
) -> Result<(FrameGeometry, mozjpeg::decompress::DecompressStarted<R>), ImageError> {
    use mozjpeg::ColorSpace;
    let bands = match header.color_space() {
        ColorSpace::JCS_GRAYSCALE => 1,
        ColorSpace::JCS_YCbCr | ColorSpace::JCS_RGB => 3,
        other => {
            return Err(jpeg_error(
                path,
                format!("{other:?} JPEGs are not supported"),
            ))
        }
    };
    let (width, height) = (header.width() as u32, header.height() as u32);
    if let Some(max_samples) = max_samples {
        check_claimed_size(path, (width, height, bands), max_samples)?;
    }
    let started = if bands == 1 {
        header.grayscale()
    } else {
        header.rgb()
    }
    .map_err(|e| jpeg_error(path, e))?;
    let geometry = FrameGeometry {
        width,
        height,
        bands: bands.into(),
    };
    Ok((geometry, started))
}

/// `f`, which calls into libjpeg: libjpeg reports a fatal error by unwinding out of the call
/// (without the panic hook); caught here, it is one more undecodable file.
pub(crate) fn catching_libjpeg<T>(
    path: &Path,
    f: impl FnOnce() -> Result<T, ImageError>,
) -> Result<T, ImageError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|unwound| {
        let reason = unwound
            .downcast_ref::<String>()
            .map_or("libjpeg failed", String::as_str)
            .trim_start_matches("libjpeg fatal error: ")
            .to_string();
        Err(jpeg_error(path, reason))
    })
}

fn jpeg_error(path: &Path, reason: impl std::fmt::Display) -> ImageError {
    ImageError::new(path, format!("cannot decode image: {reason}"))
}

/// Delivers a list of image files as frames, in order, optionally paced like a sensor.
///
/// A file that cannot be decoded, or is larger than the caller's buffer, is reported as an
/// [`ImageError`] and skipped; the next call moves on to the next file.
#[derive(Debug)]
pub struct FolderSource {
    files: Vec<PathBuf>,
    next: usize,
    interval: Option<Duration>,
    last_frame: Option<Instant>,
    started: Instant,
}

impl FolderSource {
    /// Frames from `files`, as fast as they decode.
    pub fn new(files: Vec<PathBuf>) -> Self {
        Self {
            files,
            next: 0,
            interval: None,
            last_frame: None,
            started: Instant::now(),
        }
    }

    /// Deliver at most one frame per `interval`, like a camera at `1 / interval` frames per second.
    pub fn paced(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    fn wait_for_next_slot(&mut self) {
        if let (Some(interval), Some(last)) = (self.interval, self.last_frame) {
            if let Some(remaining) = interval.checked_sub(last.elapsed()) {
                std::thread::sleep(remaining);
            }
        }
        self.last_frame = Some(Instant::now());
    }
}

impl FrameSource<u8> for FolderSource {
    type Error = ImageError;

    /// The frame's sequence is its file's position in the list, its capture time when it was
    /// read (microseconds since the source was made); files carry no pose.
    fn next_frame(&mut self, buffer: &mut [u8]) -> Result<Option<Frame>, ImageError> {
        let Some(path) = self.files.get(self.next).cloned() else {
            return Ok(None);
        };
        let sequence = self.next as u64;
        self.next += 1;
        self.wait_for_next_slot();
        let capture_us = self.started.elapsed().as_micros() as u64;
        let image = decode_image_within(&path, buffer.len())?;
        let target = buffer
            .get_mut(..image.samples.len())
            .ok_or_else(|| ImageError::new(&path, "the decoder gave more samples than it said"))?;
        target.copy_from_slice(&image.samples);
        Ok(Some(Frame {
            geometry: image.geometry,
            meta: FrameMeta {
                sequence,
                capture_us,
                ..FrameMeta::default()
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chip() -> (PathBuf, Vec<u8>) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../sim/sample/eurosat-rgb/River/River_105.jpg");
        let bytes = std::fs::read(&path).unwrap();
        (path, bytes)
    }

    #[test]
    fn an_image_larger_than_the_bound_is_refused_from_its_header() {
        let (path, bytes) = chip();
        let image = decode_image_bytes_within(&path, &bytes, 64 * 64 * 3).unwrap();
        assert_eq!(image.samples.len(), 64 * 64 * 3);
        let e = decode_image_bytes_within(&path, &bytes, 64 * 64 * 3 - 1).unwrap_err();
        assert!(
            e.reason.contains("64x64x3 image exceeds the frame buffer"),
            "{e}"
        );

        // A damaged header claiming 60000x60000 pixels: refused before anything is decoded.
        let mut claims_huge = bytes.clone();
        let sof = claims_huge
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("a baseline JPEG");
        // Marker, length (2), precision (1), then height and width, big-endian.
        claims_huge[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
        let started = Instant::now();
        let e = decode_image_bytes_within(&path, &claims_huge, 1 << 24).unwrap_err();
        assert!(e.reason.contains("60000x60000x3 image exceeds"), "{e}");
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "refused from the header"
        );
        // Unbounded, the image crate's 512 MB limit still holds (not an allocation failure).
        let e = decode_image_bytes(&path, &claims_huge).unwrap_err();
        assert!(e.reason.contains("cannot decode image"), "{e}");
    }
}
