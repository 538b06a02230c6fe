//! Tiling a large frame into model-sized tiles with overlap.
//!
//! Tiles step by `tile - overlap`; the last tile in each row and column is shifted back to end
//! exactly on the frame edge, so every pixel is covered and no tile needs padding unless the
//! frame is smaller than one tile (then a single tile at the origin covers it, padded).

use crate::preprocess::Region;

/// Why a tile grid could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TileError {
    /// A frame or tile dimension is zero.
    Empty,
    /// The overlap is not smaller than the tile in some dimension.
    Overlap {
        /// The requested overlap.
        overlap: u32,
        /// The smaller tile dimension.
        tile: u32,
    },
}

impl core::fmt::Display for TileError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Empty => f.write_str("frame and tile sizes must be non-zero"),
            Self::Overlap { overlap, tile } => {
                write!(
                    f,
                    "tile overlap {overlap} must be smaller than the tile ({tile})"
                )
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for TileError {}

/// The tiles covering one frame, in row-major order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileGrid {
    columns: Axis,
    rows: Axis,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Axis {
    frame: u32,
    tile: u32,
    stride: u32,
    count: u32,
}

impl Axis {
    fn new(frame: u32, tile: u32, overlap: u32) -> Self {
        let stride = tile - overlap;
        let count = if frame <= tile {
            1
        } else {
            1 + (frame - tile).div_ceil(stride)
        };
        Self {
            frame,
            tile,
            stride,
            count,
        }
    }

    fn start(&self, index: u32) -> u32 {
        if self.frame <= self.tile {
            0
        } else {
            (index * self.stride).min(self.frame - self.tile)
        }
    }
}

impl TileGrid {
    /// Tiles of `tile_width` x `tile_height` over a `frame_width` x `frame_height` frame,
    /// neighbours sharing `overlap` pixels.
    pub fn new(
        frame_width: u32,
        frame_height: u32,
        tile_width: u32,
        tile_height: u32,
        overlap: u32,
    ) -> Result<Self, TileError> {
        if frame_width == 0 || frame_height == 0 || tile_width == 0 || tile_height == 0 {
            return Err(TileError::Empty);
        }
        let smaller = tile_width.min(tile_height);
        if overlap >= smaller {
            return Err(TileError::Overlap {
                overlap,
                tile: smaller,
            });
        }
        Ok(Self {
            columns: Axis::new(frame_width, tile_width, overlap),
            rows: Axis::new(frame_height, tile_height, overlap),
        })
    }

    /// Tiles per row.
    pub fn columns(&self) -> u32 {
        self.columns.count
    }

    /// Tile rows.
    pub fn rows(&self) -> u32 {
        self.rows.count
    }

    /// Number of tiles (saturating where `usize` is 32 bits and the frame absurdly large).
    pub fn len(&self) -> usize {
        (self.columns.count as usize).saturating_mul(self.rows.count as usize)
    }

    /// Always false: a grid has at least one tile.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Tile `index` in row-major order, or `None` past the end.
    pub fn tile(&self, index: usize) -> Option<Region> {
        if index >= self.len() {
            return None;
        }
        let columns = self.columns.count as usize;
        let (column, row) = ((index % columns) as u32, (index / columns) as u32);
        Some(Region {
            x: self.columns.start(column),
            y: self.rows.start(row),
            width: self.columns.tile,
            height: self.rows.tile,
        })
    }

    /// All tiles in row-major order.
    pub fn iter(&self) -> impl Iterator<Item = Region> + '_ {
        (0..self.len()).filter_map(|i| self.tile(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_and_overlap_as_large_as_the_tile() {
        assert_eq!(TileGrid::new(0, 10, 4, 4, 0), Err(TileError::Empty));
        assert_eq!(TileGrid::new(10, 10, 4, 0, 0), Err(TileError::Empty));
        assert_eq!(
            TileGrid::new(10, 10, 4, 8, 4),
            Err(TileError::Overlap {
                overlap: 4,
                tile: 4
            })
        );
    }

    #[test]
    fn exact_division_without_overlap() {
        let grid = TileGrid::new(128, 64, 64, 64, 0).unwrap();
        let tiles: heapless::Vec<Region, 4> = grid.iter().collect();
        assert_eq!(
            tiles.as_slice(),
            &[
                Region {
                    x: 0,
                    y: 0,
                    width: 64,
                    height: 64
                },
                Region {
                    x: 64,
                    y: 0,
                    width: 64,
                    height: 64
                }
            ]
        );
    }
}
