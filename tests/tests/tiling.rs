//! Tiling geometry: full coverage, requested overlap, tiles inside the frame, edges handled,
//! for sizes that divide evenly and sizes that do not, up to 4000 x 4000.

use kestrel_runtime::preprocess::Region;
use kestrel_runtime::tile::{TileError, TileGrid};

/// Check one axis of a grid: tiles start at 0, step forward, overlap their neighbour by at
/// least `overlap`, and the last one ends on the frame edge (or covers a small frame from 0).
fn check_axis(starts: &[u32], frame: u32, tile: u32, overlap: u32) {
    assert_eq!(starts[0], 0, "first tile starts at the edge");
    if frame <= tile {
        assert_eq!(
            starts,
            &[0],
            "a frame no larger than a tile takes one (padded) tile"
        );
        return;
    }
    assert_eq!(
        starts[starts.len() - 1] + tile,
        frame,
        "last tile ends on the frame edge"
    );
    for pair in starts.windows(2) {
        assert!(pair[1] > pair[0], "tiles advance: {starts:?}");
        assert!(
            pair[0] + tile >= pair[1] + overlap,
            "neighbours share at least {overlap} px: {pair:?}"
        );
        assert!(
            pair[1] - pair[0] <= tile - overlap,
            "stride never exceeds tile - overlap"
        );
    }
    // Minimal: one tile fewer would not cover the frame at this stride.
    let stride = tile - overlap;
    assert!(
        (starts.len() as u32 - 2) * stride + tile < frame,
        "no redundant tile: {starts:?}"
    );
}

fn starts(grid: &TileGrid) -> (Vec<u32>, Vec<u32>) {
    let tiles: Vec<Region> = grid.iter().collect();
    assert_eq!(tiles.len(), grid.len());
    assert_eq!(grid.len(), (grid.columns() * grid.rows()) as usize);
    let xs = tiles[..grid.columns() as usize]
        .iter()
        .map(|t| t.x)
        .collect();
    let ys = tiles
        .iter()
        .step_by(grid.columns() as usize)
        .map(|t| t.y)
        .collect();
    (xs, ys)
}

#[test]
fn axes_cover_every_size_and_overlap() {
    for (frame_w, frame_h) in [
        (4000, 4000),
        (2000, 2000),
        (2000, 1333),
        (64, 64),
        (65, 127),
        (63, 10),
        (1, 1),
        (1000, 64),
    ] {
        for (tile, overlap) in [(64, 0), (64, 16), (64, 60), (256, 32), (100, 7)] {
            let grid = TileGrid::new(frame_w, frame_h, tile, tile, overlap).unwrap();
            let (xs, ys) = starts(&grid);
            check_axis(&xs, frame_w, tile, overlap);
            check_axis(&ys, frame_h, tile, overlap);
            for t in grid.iter() {
                assert_eq!((t.width, t.height), (tile, tile), "tiles are model-sized");
            }
        }
    }
}

#[test]
fn every_pixel_is_covered_in_2d() {
    // A full per-pixel check on a frame whose sizes divide by neither the tile nor the stride.
    let (w, h) = (203u32, 150u32);
    let grid = TileGrid::new(w, h, 64, 48, 10).unwrap();
    let mut covered = vec![0u8; (w * h) as usize];
    for t in grid.iter() {
        assert!(
            t.x + t.width <= w && t.y + t.height <= h,
            "tile {t:?} stays inside the frame"
        );
        for y in t.y..t.y + t.height {
            for x in t.x..t.x + t.width {
                covered[(y * w + x) as usize] += 1;
            }
        }
    }
    assert!(covered.iter().all(|&c| c > 0), "some pixel is not covered");
    assert_eq!((grid.columns(), grid.rows()), (4, 4));
}

#[test]
fn known_grids() {
    // 2000 px with 64 px tiles, no overlap: 31 full steps, the 32nd shifted back to 1936.
    let grid = TileGrid::new(2000, 2000, 64, 64, 0).unwrap();
    assert_eq!((grid.columns(), grid.rows(), grid.len()), (32, 32, 1024));
    assert_eq!(
        grid.tile(31).unwrap(),
        Region {
            x: 1936,
            y: 0,
            width: 64,
            height: 64
        }
    );
    assert_eq!(
        grid.tile(1023).unwrap(),
        Region {
            x: 1936,
            y: 1936,
            width: 64,
            height: 64
        }
    );
    assert_eq!(grid.tile(1024), None);
    // 4000 px, 256 px tiles, 32 px overlap: stride 224, 1 + ceil(3744 / 224) = 18 per axis.
    let grid = TileGrid::new(4000, 4000, 256, 256, 32).unwrap();
    assert_eq!((grid.columns(), grid.rows()), (18, 18));
    assert_eq!(grid.tile(1).unwrap().x, 224);
    assert_eq!(grid.tile(17).unwrap().x, 4000 - 256);
    // Smaller than one tile: one tile at the origin, extending past the frame (padded).
    let grid = TileGrid::new(40, 30, 64, 64, 8).unwrap();
    assert_eq!(
        grid.iter().collect::<Vec<_>>(),
        vec![Region {
            x: 0,
            y: 0,
            width: 64,
            height: 64
        }]
    );
}

#[test]
fn bad_grids_are_errors() {
    assert_eq!(
        TileGrid::new(100, 100, 64, 64, 64),
        Err(TileError::Overlap {
            overlap: 64,
            tile: 64
        })
    );
    assert_eq!(TileGrid::new(100, 0, 64, 64, 0), Err(TileError::Empty));
}
