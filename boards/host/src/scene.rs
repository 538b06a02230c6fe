//! Scene-sized images read from the top a band of rows at a time: memory holds the rows a tile
//! row needs, not the image. JPEG (libjpeg-turbo, as [`crate::decode_image`]), PNG and TIFF
//! (GeoTIFF included: strips or tiles, 8 or 16 bits, any band count, uncompressed, LZW,
//! Deflate or PackBits).
//!
//! Rows come out as 8-bit samples of the bands chosen ([`ScanOptions`]): 16-bit samples are
//! stretched to 0..255 by a maximum the caller names, since the models here take 8-bit imagery
//! and a sensor's 16-bit range (Sentinel-2's reflectance scaled by 10,000, say) is not theirs.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use kestrel_hal::FrameGeometry;

use crate::ImageError;

/// Which bands of a file make the rows, and how 16-bit samples become 8-bit.
#[derive(Clone, Debug, Default)]
pub struct ScanOptions {
    /// The file's bands to keep, 0-based, in the order wanted (`None`: all, as stored).
    pub bands: Option<Vec<usize>>,
    /// The 16-bit sample value that becomes 255 (linear from 0, larger values clamped).
    /// `None` refuses 16-bit files with a message that names this option.
    pub stretch: Option<u16>,
}

/// The width and height of the image at `path`, from its header (JPEG, PNG or TIFF).
pub fn image_size(path: &Path) -> Result<(u32, u32), ImageError> {
    let any_depth = ScanOptions {
        bands: None,
        stretch: Some(u16::MAX),
    };
    let g = SceneReader::open(path, &any_depth)?.geometry();
    Ok((g.width, g.height))
}

/// An image file read top to bottom, one row at a time, as 8-bit samples.
///
/// ```
/// use kestrel_host::{ScanOptions, SceneReader};
///
/// let scene = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
///     .join("../../sim/sample/nwpu-vhr10/images/017.jpg");
/// let mut reader = SceneReader::open(&scene, &ScanOptions::default())?;
/// let g = reader.geometry();
/// let mut row = vec![0u8; g.width as usize * usize::from(g.bands)];
/// for _ in 0..g.height {
///     reader.read_row(&mut row)?; // one row in memory at a time
/// }
/// assert!(reader.read_row(&mut row).is_err(), "past the last row");
/// # Ok::<(), kestrel_host::ImageError>(())
/// ```
pub struct SceneReader {
    path: PathBuf,
    width: u32,
    height: u32,
    bits: u8,
    file_bands: usize,
    pick: Vec<usize>,
    stretch: Option<u16>,
    next_row: u32,
    /// One row as the file stores it (samples widened to 16 bits).
    file_row: Vec<u16>,
    source: Source,
}

enum Source {
    Jpeg(
        Box<mozjpeg::decompress::DecompressStarted<BufReader<File>>>,
        Vec<u8>,
    ),
    Png(Box<png::Reader<BufReader<File>>>),
    Tiff(Box<TiffRows>),
    /// Uncompressed TIFF strips, read a row at a time from the file at its offset: a strip may
    /// be the whole image (as PIL writes them).
    RawStrips(Box<RawStrips>),
    /// Interlaced PNGs and other layouts that cannot be read by rows: decoded whole (within
    /// the image crate's 512 MB limit).
    Whole(Vec<u8>),
}

struct RawStrips {
    file: File,
    offsets: Vec<u64>,
    rows_per_strip: u32,
    little_endian: bool,
    bytes: Vec<u8>,
}

struct TiffRows {
    decoder: tiff::decoder::Decoder<BufReader<File>>,
    width: u32,
    bands: usize,
    chunk_width: u32,
    chunk_height: u32,
    /// Chunks across the image (1 for strips).
    across: u32,
    /// The rows of the current chunk row, the image's full width, as stored.
    rows: Vec<u16>,
    /// The image row `rows` starts at, and how many it holds.
    first: u32,
    count: u32,
}

impl SceneReader {
    /// Open `path` and read its header: nothing of the image is decoded yet.
    pub fn open(path: &Path, options: &ScanOptions) -> Result<Self, ImageError> {
        let fail = |reason: String| ImageError::new(path, reason);
        let mut magic = [0u8; 4];
        {
            use std::io::Read;
            let mut file = File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
            file.read_exact(&mut magic)
                .map_err(|e| fail(format!("cannot read: {e}")))?;
        }
        let reader = || -> Result<BufReader<File>, ImageError> {
            let file = File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
            Ok(BufReader::with_capacity(1 << 16, file))
        };
        let (width, height, bits, file_bands, source) = match magic {
            [0xFF, 0xD8, ..] => open_jpeg(path, reader()?)?,
            [0x89, b'P', b'N', b'G'] => open_png(path, reader()?)?,
            [b'I', b'I', 42, 0]
            | [b'M', b'M', 0, 42]
            | [b'I', b'I', 43, 0]
            | [b'M', b'M', 0, 43] => open_tiff(path, reader()?)?,
            _ => return Err(fail("not a JPEG, PNG or TIFF file".into())),
        };
        if bits == 16 && options.stretch.is_none() {
            return Err(fail(
                "16-bit samples: say which value becomes 255 (--stretch, e.g. 2750 for \
                 Sentinel-2 reflectance), since the models take 8-bit imagery"
                    .into(),
            ));
        }
        let pick = match &options.bands {
            None => (0..file_bands).collect(),
            Some(bands) => {
                if let Some(&bad) = bands.iter().find(|&&b| b >= file_bands) {
                    return Err(fail(format!(
                        "band {} asked for, but the image has {file_bands}",
                        bad + 1
                    )));
                }
                bands.clone()
            }
        };
        if pick.is_empty() || pick.len() > usize::from(u16::MAX) {
            return Err(fail("no bands to read".into()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            width,
            height,
            bits,
            file_bands,
            pick,
            stretch: options.stretch,
            next_row: 0,
            file_row: vec![0; width as usize * file_bands],
            source,
        })
    }

    /// The rows' geometry: the image's size, and the bands chosen.
    pub fn geometry(&self) -> FrameGeometry {
        FrameGeometry {
            width: self.width,
            height: self.height,
            bands: self.pick.len() as u16,
        }
    }

    /// Bands in the file, and bits per sample.
    pub fn file_format(&self) -> (usize, u8) {
        (self.file_bands, self.bits)
    }

    /// The next row into `out` (`width * bands` samples); an error past the last row.
    pub fn read_row(&mut self, out: &mut [u8]) -> Result<(), ImageError> {
        let y = self.next_row;
        if y >= self.height {
            return Err(ImageError::new(&self.path, "read past the last row"));
        }
        let width = self.width as usize;
        if out.len() != width * self.pick.len() {
            return Err(ImageError::new(&self.path, "row buffer of the wrong size"));
        }
        self.fill_file_row(y)?;
        self.next_row += 1;
        let (bands, pick) = (self.file_bands, &self.pick);
        let scale = match (self.bits, self.stretch) {
            (16, Some(max)) => 255.0 / f32::from(max.max(1)),
            _ => 1.0,
        };
        for (pixel, samples) in out
            .chunks_exact_mut(pick.len())
            .zip(self.file_row.chunks_exact(bands))
        {
            for (o, &band) in pixel.iter_mut().zip(pick) {
                let v = samples.get(band).copied().unwrap_or(0);
                *o = if self.bits == 16 {
                    (f32::from(v) * scale).round().min(255.0) as u8
                } else {
                    v as u8
                };
            }
        }
        Ok(())
    }

    /// Row `y` (the next one) into `file_row`, as stored.
    fn fill_file_row(&mut self, y: u32) -> Result<(), ImageError> {
        let path = &self.path;
        let fail = |reason: String| ImageError::new(path, format!("cannot decode image: {reason}"));
        let row = &mut self.file_row;
        let width = self.width as usize;
        match &mut self.source {
            Source::Jpeg(jpeg, bytes) => {
                crate::image_file::catching_libjpeg(path, || {
                    jpeg.read_scanlines_into(bytes.as_mut_slice())
                        .map(|_| ())
                        .map_err(|e| fail(e.to_string()))
                })?;
                for (o, &b) in row.iter_mut().zip(bytes.iter()) {
                    *o = u16::from(b);
                }
            }
            Source::Png(png) => {
                let data = png
                    .next_row()
                    .map_err(|e| fail(e.to_string()))?
                    .ok_or_else(|| fail("the image data ended early".into()))?
                    .data();
                widen(data, self.bits, row, false);
            }
            Source::Tiff(tiff) => {
                if y >= tiff.first + tiff.count {
                    // The tiff crate asserts on some damaged headers: one more undecodable file.
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        tiff.read_chunk_row(y)
                    }))
                    .unwrap_or_else(|_| Err("the TIFF decoder failed".into()))
                    .map_err(fail)?;
                }
                let start = (y - tiff.first) as usize * row.len();
                let stored = tiff
                    .rows
                    .get(start..start + row.len())
                    .ok_or_else(|| fail("a chunk smaller than its header says".into()))?;
                row.copy_from_slice(stored);
            }
            Source::RawStrips(raw) => {
                use std::io::{Read, Seek, SeekFrom};
                let strip = (y / raw.rows_per_strip) as usize;
                let within = u64::from(y % raw.rows_per_strip) * raw.bytes.len() as u64;
                let offset = raw
                    .offsets
                    .get(strip)
                    .ok_or_else(|| fail("fewer strips than the image's rows need".into()))?;
                raw.file
                    .seek(SeekFrom::Start(offset.saturating_add(within)))
                    .and_then(|_| raw.file.read_exact(&mut raw.bytes))
                    .map_err(|e| fail(format!("row {y}: {e}")))?;
                widen(&raw.bytes, self.bits, row, raw.little_endian);
            }
            Source::Whole(samples) => {
                let start = y as usize * width * self.file_bands;
                let stored = samples
                    .get(start..start + row.len())
                    .ok_or_else(|| fail("fewer samples than the header says".into()))?;
                for (o, &b) in row.iter_mut().zip(stored) {
                    *o = u16::from(b);
                }
            }
        }
        Ok(())
    }
}

/// Samples of `bits` bits (8, or 16 big- or little-endian) into `out`.
fn widen(data: &[u8], bits: u8, out: &mut [u16], little_endian: bool) {
    if bits == 16 {
        for (o, pair) in out.iter_mut().zip(data.chunks_exact(2)) {
            let bytes = [pair[0], pair[1]];
            *o = if little_endian {
                u16::from_le_bytes(bytes)
            } else {
                u16::from_be_bytes(bytes)
            };
        }
    } else {
        for (o, &b) in out.iter_mut().zip(data) {
            *o = u16::from(b);
        }
    }
}

type Opened = (u32, u32, u8, usize, Source);

fn open_jpeg(path: &Path, reader: BufReader<File>) -> Result<Opened, ImageError> {
    use crate::image_file::{catching_libjpeg, start_jpeg};
    catching_libjpeg(path, || {
        let header = mozjpeg::Decompress::new_reader(reader)
            .map_err(|e| ImageError::new(path, format!("cannot decode image: {e}")))?;
        // Read by rows: no whole-image bound.
        let (g, started) = start_jpeg(path, header, None)?;
        let bands = usize::from(g.bands);
        let row = vec![0u8; g.width as usize * bands];
        let source = Source::Jpeg(Box::new(started), row);
        Ok((g.width, g.height, 8, bands, source))
    })
}

fn open_png(path: &Path, reader: BufReader<File>) -> Result<Opened, ImageError> {
    let fail = |reason: String| ImageError::new(path, format!("cannot decode image: {reason}"));
    // Rows only: the decoder's own allocation limit is for whole images.
    let mut decoder = png::Decoder::new_with_limits(reader, png::Limits { bytes: 1 << 30 });
    decoder.set_transformations(png::Transformations::EXPAND);
    let png = decoder.read_info().map_err(|e| fail(e.to_string()))?;
    let info = png.info();
    let (width, height, interlaced) = (info.width, info.height, info.interlaced);
    let (colour, depth) = png.output_color_type();
    let bands = colour.samples();
    let bits = match depth {
        png::BitDepth::Sixteen => 16,
        _ => 8,
    };
    if interlaced {
        drop(png);
        if bits == 16 {
            return Err(fail("interlaced 16-bit PNGs are not supported".into()));
        }
        let image = crate::decode_image(path)?;
        let bands = usize::from(image.geometry.bands);
        return Ok((width, height, 8, bands, Source::Whole(image.samples)));
    }
    Ok((width, height, bits, bands, Source::Png(Box::new(png))))
}

fn open_tiff(path: &Path, reader: BufReader<File>) -> Result<Opened, ImageError> {
    use tiff::decoder::{ChunkType, Decoder};
    use tiff::tags::Tag;
    let fail = |reason: String| ImageError::new(path, format!("cannot decode image: {reason}"));
    let mut decoder = Decoder::new(reader).map_err(|e| fail(e.to_string()))?;
    let (width, height) = decoder.dimensions().map_err(|e| fail(e.to_string()))?;
    let colour = decoder.colortype().map_err(|e| fail(e.to_string()))?;
    let bits = colour.bit_depth();
    let bands = usize::from(colour.num_samples());
    if bits != 8 && bits != 16 {
        return Err(fail(format!(
            "{bits}-bit samples are not supported, only 8 and 16"
        )));
    }
    // One value per band, where a file gives the tag.
    let formats = decoder
        .find_tag_unsigned_vec::<u16>(Tag::SampleFormat)
        .map_err(|e| fail(e.to_string()))?
        .unwrap_or_default();
    if formats.iter().any(|&f| f != 1) {
        return Err(fail("only unsigned integer samples are supported".into()));
    }
    let planar = decoder
        .find_tag_unsigned::<u16>(Tag::PlanarConfiguration)
        .map_err(|e| fail(e.to_string()))?
        .unwrap_or(1);
    if planar != 1 {
        return Err(fail(
            "bands stored as separate planes are not supported, only interleaved".into(),
        ));
    }
    let compression = decoder
        .find_tag_unsigned::<u16>(Tag::Compression)
        .map_err(|e| fail(e.to_string()))?
        .unwrap_or(1);
    if compression == 1 && decoder.get_chunk_type() == ChunkType::Strip {
        let offsets = decoder
            .get_tag_u64_vec(Tag::StripOffsets)
            .map_err(|e| fail(e.to_string()))?;
        let rows_per_strip = decoder
            .find_tag_unsigned::<u32>(Tag::RowsPerStrip)
            .map_err(|e| fail(e.to_string()))?
            .unwrap_or(height)
            .clamp(1, height.max(1));
        let little_endian = decoder.byte_order() == tiff::tags::ByteOrder::LittleEndian;
        let file = File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
        let line = width as usize * bands * usize::from(bits / 8);
        let raw = RawStrips {
            file,
            offsets,
            rows_per_strip,
            little_endian,
            bytes: vec![0; line],
        };
        return Ok((width, height, bits, bands, Source::RawStrips(Box::new(raw))));
    }
    let (chunk_width, chunk_height) = decoder.chunk_dimensions();
    let across = match decoder.get_chunk_type() {
        ChunkType::Strip => 1,
        ChunkType::Tile => width.div_ceil(chunk_width.max(1)),
    };
    if chunk_width == 0 || chunk_height == 0 {
        return Err(fail("chunks of zero size".into()));
    }
    let rows = TiffRows {
        decoder,
        width,
        bands,
        chunk_width,
        chunk_height,
        across,
        rows: Vec::new(),
        first: 0,
        count: 0,
    };
    Ok((width, height, bits, bands, Source::Tiff(Box::new(rows))))
}

impl TiffRows {
    /// Decode the chunk row holding image row `y` into `rows`, the image's full width.
    fn read_chunk_row(&mut self, y: u32) -> Result<(), String> {
        use tiff::decoder::DecodingResult;
        let chunk_row = y / self.chunk_height;
        let line = self.width as usize * self.bands;
        let mut count = 0;
        for across in 0..self.across {
            let index = chunk_row * self.across + across;
            let (data_w, data_h) = self.decoder.chunk_data_dimensions(index);
            let samples: Vec<u16> =
                match self.decoder.read_chunk(index).map_err(|e| e.to_string())? {
                    DecodingResult::U8(v) => v.into_iter().map(u16::from).collect(),
                    DecodingResult::U16(v) => v,
                    _ => return Err("unsupported sample type".into()),
                };
            if across == 0 {
                count = data_h;
                self.rows.clear();
                self.rows.resize(line * data_h as usize, 0);
            }
            // A tile may be stored padded to the full tile width.
            let stored_w = samples.len() / (data_h as usize * self.bands).max(1);
            let run = data_w as usize * self.bands;
            let x0 = (across * self.chunk_width) as usize * self.bands;
            for r in 0..data_h.min(count) as usize {
                let from = r * stored_w * self.bands;
                let to = r * line + x0;
                let (Some(src), Some(dst)) = (
                    samples.get(from..from + run),
                    self.rows.get_mut(to..to + run),
                ) else {
                    return Err("a chunk smaller than its header says".into());
                };
                dst.copy_from_slice(src);
            }
        }
        self.first = chunk_row * self.chunk_height;
        self.count = count;
        Ok(())
    }
}

/// A band of an image's rows, moving down it: the rows a tile row needs are resident, the ones
/// above dropped. Each row is read once, in order.
pub struct SceneStrip {
    reader: SceneReader,
    samples: Vec<u8>,
    top: u32,
    rows: u32,
}

impl SceneStrip {
    /// A strip over `reader`'s image, holding nothing yet.
    pub fn new(reader: SceneReader) -> Self {
        Self {
            reader,
            samples: Vec::new(),
            top: 0,
            rows: 0,
        }
    }

    /// The image's geometry (its bands as chosen).
    pub fn geometry(&self) -> FrameGeometry {
        self.reader.geometry()
    }

    /// Make rows `top .. top + count` resident (those inside the image), reading on and handing
    /// each newly read row to `on_row` with its row number. `top` may not move back up.
    pub fn cover(
        &mut self,
        top: u32,
        count: u32,
        mut on_row: impl FnMut(u32, &[u8]),
    ) -> Result<(), ImageError> {
        let g = self.reader.geometry();
        let line = g.width as usize * usize::from(g.bands);
        let top = top.max(self.top);
        let end = top.saturating_add(count).min(g.height);
        // Drop the rows above `top`.
        let drop = (top - self.top).min(self.rows);
        self.samples.drain(..drop as usize * line);
        self.rows -= drop;
        // Rows above `top` that were never resident (past the last tile row) are read only
        // for `on_row`.
        let mut passing = Vec::new();
        while self.reader.next_row < top {
            passing.resize(line, 0);
            self.reader.read_row(&mut passing)?;
            on_row(self.reader.next_row - 1, &passing);
        }
        self.top = top;
        while self.top + self.rows < end {
            let start = self.samples.len();
            self.samples.resize(start + line, 0);
            let row = &mut self.samples[start..];
            self.reader.read_row(row)?;
            on_row(self.top + self.rows, row);
            self.rows += 1;
        }
        Ok(())
    }

    /// Read the rows left below the strip, handing each to `on_row`.
    pub fn finish(&mut self, on_row: impl FnMut(u32, &[u8])) -> Result<(), ImageError> {
        let height = self.reader.geometry().height;
        self.cover(height, 0, on_row)
    }

    /// The resident rows: their geometry (the image's width and bands, `rows` high), samples,
    /// and the image row they start at.
    pub fn resident(&self) -> (FrameGeometry, &[u8], u32) {
        let g = self.reader.geometry();
        let geometry = FrameGeometry {
            height: self.rows,
            ..g
        };
        (geometry, &self.samples, self.top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_rows(
        path: &Path,
        options: &ScanOptions,
    ) -> Result<(FrameGeometry, Vec<u8>), ImageError> {
        let mut reader = SceneReader::open(path, options)?;
        let g = reader.geometry();
        let line = g.width as usize * usize::from(g.bands);
        let mut samples = vec![0u8; line * g.height as usize];
        for row in samples.chunks_exact_mut(line) {
            reader.read_row(row)?;
        }
        Ok((g, samples))
    }

    fn sample(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../sim/sample")
            .join(path)
    }

    /// Row by row, a JPEG and a PNG give what decoding them whole gives.
    #[test]
    fn jpeg_and_png_rows_are_the_whole_images_rows() {
        let dir = tempfile::tempdir().unwrap();
        let jpeg = sample("nwpu-vhr10/images/017.jpg");
        let whole = crate::decode_image(&jpeg).unwrap();
        let (g, rows) = all_rows(&jpeg, &ScanOptions::default()).unwrap();
        assert_eq!((g, &rows), (whole.geometry, &whole.samples));

        let png = dir.path().join("017.png");
        image::RgbImage::from_raw(g.width, g.height, whole.samples.clone())
            .unwrap()
            .save(&png)
            .unwrap();
        let (g, rows) = all_rows(&png, &ScanOptions::default()).unwrap();
        assert_eq!((g, &rows), (whole.geometry, &whole.samples));

        // The bands picked, in the order asked.
        let bgr = ScanOptions {
            bands: Some(vec![2, 1, 0]),
            stretch: None,
        };
        let (_, rows) = all_rows(&png, &bgr).unwrap();
        assert_eq!(
            rows[..3],
            [whole.samples[2], whole.samples[1], whole.samples[0]]
        );
        let e = all_rows(
            &png,
            &ScanOptions {
                bands: Some(vec![3]),
                stretch: None,
            },
        )
        .unwrap_err();
        assert!(
            e.reason.contains("band 4 asked for, but the image has 3"),
            "{e}"
        );
    }

    /// TIFF in strips, 8-bit RGB and 16-bit RGBA: rows as stored; 16-bit samples stretched by
    /// the maximum given, and refused without one.
    #[test]
    fn tiff_rows_in_8_and_16_bits() {
        use tiff::encoder::{colortype, TiffEncoder};
        let dir = tempfile::tempdir().unwrap();
        let (width, height) = (37u32, 23u32);
        let rgb: Vec<u8> = (0..width * height * 3)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let path8 = dir.path().join("rgb8.tif");
        TiffEncoder::new(std::fs::File::create(&path8).unwrap())
            .unwrap()
            .write_image::<colortype::RGB8>(width, height, &rgb)
            .unwrap();
        let (g, rows) = all_rows(&path8, &ScanOptions::default()).unwrap();
        assert_eq!((g.width, g.height, g.bands), (width, height, 3));
        assert_eq!(rows, rgb);
        // Compressed strips, decoded a strip at a time.
        let lzw = dir.path().join("rgb8-lzw.tif");
        TiffEncoder::new(std::fs::File::create(&lzw).unwrap())
            .unwrap()
            .with_compression(tiff::encoder::Compression::Lzw)
            .write_image::<colortype::RGB8>(width, height, &rgb)
            .unwrap();
        assert_eq!(all_rows(&lzw, &ScanOptions::default()).unwrap().1, rgb);
        // Tiles (16x16, edge tiles padded, Deflate with a predictor), written by tifffile.
        let tiled = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/tiled.tif");
        let (g, rows) = all_rows(&tiled, &ScanOptions::default()).unwrap();
        assert_eq!((g.width, g.height, g.bands), (width, height, 3));
        assert_eq!(rows, rgb);

        let rgba: Vec<u16> = (0..width * height * 4)
            .map(|i| (i * 131 % 4000) as u16)
            .collect();
        let path16 = dir.path().join("rgba16.tif");
        TiffEncoder::new(std::fs::File::create(&path16).unwrap())
            .unwrap()
            .write_image::<colortype::RGBA16>(width, height, &rgba)
            .unwrap();
        let e = all_rows(&path16, &ScanOptions::default()).unwrap_err();
        assert!(
            e.reason.contains("16-bit samples") && e.reason.contains("--stretch"),
            "{e}"
        );
        let options = ScanOptions {
            bands: Some(vec![3, 0]),
            stretch: Some(2000),
        };
        let deflate = dir.path().join("rgba16-deflate.tif");
        TiffEncoder::new(std::fs::File::create(&deflate).unwrap())
            .unwrap()
            .with_compression(tiff::encoder::Compression::Deflate(Default::default()))
            .write_image::<colortype::RGBA16>(width, height, &rgba)
            .unwrap();
        assert_eq!(
            all_rows(&deflate, &options).unwrap(),
            all_rows(&path16, &options).unwrap()
        );
        let (g, rows) = all_rows(&path16, &options).unwrap();
        assert_eq!(g.bands, 2);
        let expected: Vec<u8> = rgba
            .chunks_exact(4)
            .flat_map(|p| [p[3], p[0]])
            .map(|v| (f32::from(v) * 255.0 / 2000.0).round().min(255.0) as u8)
            .collect();
        assert_eq!(rows, expected);
    }

    /// A strip moving down an image holds only the rows asked for, hands every row over once,
    /// and reads each once.
    #[test]
    fn a_strip_holds_the_rows_asked_for() {
        let jpeg = sample("nwpu-vhr10/images/017.jpg");
        let whole = crate::decode_image(&jpeg).unwrap();
        let g = whole.geometry;
        let line = g.width as usize * 3;
        let mut strip = SceneStrip::new(SceneReader::open(&jpeg, &ScanOptions::default()).unwrap());
        let mut seen = Vec::new();
        for (top, count) in [(0, 64), (48, 64), (200, 64), (g.height - 10, 64)] {
            strip.cover(top, count, |y, _| seen.push(y)).unwrap();
            let (resident, samples, first) = strip.resident();
            assert_eq!(first, top);
            assert_eq!(resident.height, count.min(g.height - top));
            let at = top as usize * line;
            assert_eq!(samples, &whole.samples[at..at + samples.len()]);
        }
        strip.finish(|y, _| seen.push(y)).unwrap();
        assert_eq!(seen, (0..g.height).collect::<Vec<_>>());
    }

    #[test]
    fn what_is_not_an_image_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, b"hello").unwrap();
        let e = SceneReader::open(&path, &ScanOptions::default())
            .err()
            .unwrap();
        assert!(e.reason.contains("not a JPEG, PNG or TIFF"), "{e}");
        let truncated = dir.path().join("cut.tif");
        std::fs::write(&truncated, b"II*\0\x08\0\0\0\x01\0").unwrap();
        assert!(SceneReader::open(&truncated, &ScanOptions::default()).is_err());
    }
}
