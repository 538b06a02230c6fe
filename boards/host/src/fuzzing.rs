//! The frame decoders' fuzz harness, shared by the `cargo fuzz` target `image_decode` (`fuzz/`
//! at the repository root) and the bounded runs in `tests/tests/fuzz_corpus.rs`, so both check
//! the same things. It takes arbitrary bytes and panics only if an invariant breaks: a file's
//! bytes, whatever they are, become a frame or an [`ImageError`], never a panic.

use std::path::Path;

use crate::image_file::{decode_image_bytes_within, ImageError};

/// Samples a decoded image may have: a board's frame buffer (64 M samples here). Larger claims
/// are refused from the header, so a mutated header costs no allocation.
pub const MAX_SAMPLES: usize = 1 << 26;

/// `bytes` as an image file read from disk (JPEG or PNG; the host board reads no other format):
/// a decoded image has 1 to 4 bands and exactly its geometry's samples; a refused one is an
/// error naming the file, with its reason on one line.
pub fn image_decode(bytes: &[u8]) {
    let path = Path::new("fuzz/input.img");
    match decode_image_bytes_within(path, bytes, MAX_SAMPLES) {
        Ok(image) => {
            let g = image.geometry;
            assert!(image.samples.len() <= MAX_SAMPLES, "within the bound");
            assert!((1..=4).contains(&g.bands), "{} bands", g.bands);
            assert!(
                g.sample_count() == Some(image.samples.len()),
                "{}x{}x{} image with {} samples",
                g.width,
                g.height,
                g.bands,
                image.samples.len()
            );
        }
        Err(ImageError {
            path: named,
            reason,
        }) => {
            assert!(named == path, "the error names the file");
            assert!(!reason.contains('\n'), "a reason on one line: {reason:?}");
        }
    }
}
