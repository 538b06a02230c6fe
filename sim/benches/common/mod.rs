//! Inputs shared by the benchmarks: real frames from the committed samples.

use std::path::Path;

use kestrel_backend::PreprocessSpec;
use kestrel_host::{decode_image, DecodedImage};
use kestrel_runtime::step::DetectorConfig;
use kestrel_runtime::tile::TileGrid;
use kestrel_runtime::FrameGeometry;

/// Side of the benchmark frame.
pub const SIZE: usize = 1024;

/// The benchmark frame: `SIZE` x `SIZE`, RGB.
pub const GEOMETRY: FrameGeometry = FrameGeometry {
    width: SIZE as u32,
    height: SIZE as u32,
    bands: 3,
};

/// The tiles `DetectorStep` cuts the benchmark frame into, for a detector of `spec` and
/// `config`.
pub fn frame_tiles(spec: &PreprocessSpec, config: &DetectorConfig) -> TileGrid {
    TileGrid::new(
        GEOMETRY.width,
        GEOMETRY.height,
        spec.width() as u32,
        spec.height() as u32,
        config.tile_overlap,
    )
    .expect("grid")
}

/// A 1024 x 1024 RGB frame (HWC): a mosaic of two committed NWPU VHR-10 sample scenes (`017.jpg`
/// above, `201.jpg` below), cropped.
pub fn mosaic() -> Vec<u8> {
    let scenes = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample/nwpu-vhr10/images");
    let top = decode_image(&scenes.join("017.jpg")).expect("sample scene");
    let bottom = decode_image(&scenes.join("201.jpg")).expect("sample scene");
    let mut frame = vec![0u8; SIZE * SIZE * 3];
    let mut y = 0;
    for scene in [&top, &bottom] {
        let DecodedImage { geometry, samples } = scene;
        let (w, h) = (geometry.width as usize, geometry.height as usize);
        for row in 0..h.min(SIZE - y) {
            let n = w.min(SIZE) * 3;
            frame[(y + row) * SIZE * 3..][..n].copy_from_slice(&samples[row * w * 3..][..n]);
        }
        y += h.min(SIZE - y);
    }
    frame
}
