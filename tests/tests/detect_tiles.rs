//! Tiled detection over whole frames: frames of 4000 x 4000, sizes that the tile does not
//! divide, and frames smaller than one tile; objects on tile seams reported once, in frame
//! coordinates.
//!
//! The backend is a stand-in detector that finds bright squares in the tile it is given and
//! writes a CenterNet head for them (the part of a square it can see, as a real detector sees
//! a cut-off object). So the test exercises the real preprocessing, tiling, decoding,
//! suppression, seam merging and clipping on pixels, without a trained model.

use kestrel_backend::{Backend, BackendError, PreprocessSpec, ResizeRule};
use kestrel_runtime::detect::{Detection, Detections, Head, HeadLayout};
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::step::{DetectorConfig, DetectorStep};
use kestrel_runtime::FrameGeometry;

const TILE: usize = 128;
const STRIDE: usize = 4;
const CELLS: usize = TILE / STRIDE;
const WH_SCALE: f32 = 32.0;

/// Finds axis-aligned bright squares (normalised value > 0.5) in a one-band tile.
struct SquareFinder;

impl Backend for SquareFinder {
    fn name(&self) -> &'static str {
        "square-finder"
    }
    fn input_len(&self) -> usize {
        TILE * TILE
    }
    fn output_len(&self) -> usize {
        5 * CELLS * CELLS
    }
    fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError> {
        self.check_lengths(input, output)?;
        output.fill(0.0);
        let bright = |x: usize, y: usize| input[y * TILE + x] > 0.5;
        let plane = CELLS * CELLS;
        for y in 0..TILE {
            for x in 0..TILE {
                // The top-left corner of a visible square.
                if !bright(x, y) || (x > 0 && bright(x - 1, y)) || (y > 0 && bright(x, y - 1)) {
                    continue;
                }
                let w = (x..TILE).take_while(|&i| bright(i, y)).count();
                let h = (y..TILE).take_while(|&j| bright(x, j)).count();
                let (cx, cy) = (
                    (x as f32 + w as f32 / 2.0) / STRIDE as f32,
                    (y as f32 + h as f32 / 2.0) / STRIDE as f32,
                );
                let (col, row) = (cx as usize, cy as usize);
                let cell = row.min(CELLS - 1) * CELLS + col.min(CELLS - 1);
                // Squares seen whole score higher than pieces cut by the tile edge.
                let whole = x > 0 && y > 0 && x + w < TILE && y + h < TILE;
                output[cell] = if whole { 0.9 } else { 0.6 };
                output[plane + cell] = w as f32 / STRIDE as f32 / WH_SCALE;
                output[2 * plane + cell] = h as f32 / STRIDE as f32 / WH_SCALE;
                output[3 * plane + cell] = cx - col as f32;
                output[4 * plane + cell] = cy - row as f32;
            }
        }
        Ok(())
    }
}

fn config() -> DetectorConfig {
    DetectorConfig {
        head: Head::CenterNet(HeadLayout {
            classes: 1,
            height: CELLS,
            width: CELLS,
            stride: STRIDE as f32,
            wh_scale: WH_SCALE,
        }),
        score_threshold: 0.3,
        nms_iou: 0.5,
        tile_overlap: 32,
        seam_containment: 0.8,
        // Thousands of squares of the one class: no cap.
        max_per_class: usize::MAX,
    }
}

/// A dark `width` x `height` frame with 255 in each square `(x, y, size)`.
fn frame(width: u32, height: u32, squares: &[(u32, u32, u32)]) -> Vec<u8> {
    let mut pixels = vec![0u8; width as usize * height as usize];
    for &(x, y, size) in squares {
        for row in y..(y + size).min(height) {
            let start = row as usize * width as usize;
            pixels[start + x as usize..start + (x + size).min(width) as usize].fill(255);
        }
    }
    pixels
}

/// Run the tiled detector over the frame and check each square is found once, where it is.
fn detect_squares(width: u32, height: u32, squares: &[(u32, u32, u32)]) -> usize {
    let spec = PreprocessSpec::new(TILE, TILE, &[0.0], &[255.0], ResizeRule::Bilinear).unwrap();
    let (mut input, mut output) = (vec![0.0; TILE * TILE], vec![0.0; 5 * CELLS * CELLS]);
    let mut step =
        DetectorStep::<_, 64>::new(SquareFinder, spec, config(), &mut input, &mut output).unwrap();
    let pixels = frame(width, height, squares);
    let geometry = FrameGeometry {
        width,
        height,
        bands: 1,
    };
    let view = FrameView::new(geometry, &pixels).unwrap();
    let mut found = Detections::<8192>::new();
    step.detect(view, &mut found).unwrap();
    let tiles = step.tiles(width, height).unwrap().len();
    let found = found.as_slice();
    assert_eq!(
        found.len(),
        squares.len(),
        "{width}x{height} in {tiles} tiles: one detection per square, found {found:?}"
    );
    for &(x, y, size) in squares {
        let truth = Detection {
            x: x as f32,
            y: y as f32,
            w: size.min(width - x) as f32,
            h: size.min(height - y) as f32,
            score: 1.0,
            class: 0,
        };
        let best = found.iter().map(|d| d.iou(&truth)).fold(0.0, f32::max);
        assert!(
            best > 0.95,
            "{width}x{height}: square at ({x}, {y}) size {size}: best IoU {best}, found {found:?}"
        );
    }
    for d in found {
        assert!(d.x >= 0.0 && d.y >= 0.0, "{d:?} inside the frame");
        assert!(
            d.x + d.w <= width as f32 && d.y + d.h <= height as f32,
            "{d:?}"
        );
    }
    tiles
}

/// Squares on a grid, one every `spacing` pixels, so some land on every kind of seam.
fn scattered(width: u32, height: u32, spacing: u32, size: u32) -> Vec<(u32, u32, u32)> {
    let mut squares = Vec::new();
    let mut y = 5;
    while y + size < height {
        let mut x = 7 + (y / spacing % 3) * 11;
        while x + size < width {
            squares.push((x, y, size));
            x += spacing;
        }
        y += spacing + 3;
    }
    squares
}

#[test]
fn a_4000_by_4000_frame_is_tiled_and_every_object_found_once() {
    // 96 px tile stride: 41 x 41 tiles. Squares every 61 px land on seams and in overlaps.
    let squares = scattered(4000, 4000, 61, 20);
    assert!(squares.len() > 4000);
    let tiles = detect_squares(4000, 4000, &squares);
    assert_eq!(tiles, 42 * 42);
}

#[test]
fn sizes_the_tile_does_not_divide() {
    for (width, height) in [(1000, 777), (129, 300), (250, 129), (777, 131)] {
        let squares = scattered(width, height, 37, 13);
        assert!(!squares.is_empty());
        detect_squares(width, height, &squares);
    }
}

#[test]
fn objects_on_seams_are_reported_once() {
    // Tiles at x = 0, 96, 192 (128 wide): the seams' overlaps are 96..128 and 192..224.
    // Each square here straddles a tile edge, so one tile sees a piece and another the whole.
    let squares = [(110, 40, 24), (120, 150, 20), (200, 100, 30), (60, 118, 20)];
    detect_squares(320, 256, &squares);
}

#[test]
fn frames_smaller_than_a_tile_are_padded_not_rejected() {
    assert_eq!(detect_squares(100, 60, &[(10, 10, 20), (70, 30, 25)]), 1);
    assert_eq!(detect_squares(1, 1, &[]), 1);
    // A square touching the frame edge is clipped to the frame.
    assert_eq!(detect_squares(50, 50, &[(40, 40, 20)]), 1);
}
