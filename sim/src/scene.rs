//! What replay needs to take scene-sized images a band of rows at a time: the downscaled picture
//! its class maps and overlays are drawn on, built as rows go by, and progress on long images.

use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};
use kestrel_hal::FrameGeometry;

/// The whole factor an image is shrunk by so that its longer side fits `max_side` pixels
/// (`0`: full resolution).
pub fn shrink_factor(width: u32, height: u32, max_side: u32) -> u32 {
    if max_side == 0 {
        return 1;
    }
    width.max(height).div_ceil(max_side).max(1)
}

/// An image shrunk by a whole factor, each pixel the mean of its block of source pixels, made
/// from the source's rows in order (the first three bands as RGB; one band as grey).
pub struct Shrunk {
    factor: u32,
    bands: usize,
    width: u32,
    height: u32,
    /// Per output pixel of the current output row: sums of R, G, B and a count.
    sums: Vec<[u32; 4]>,
    image: RgbImage,
}

impl Shrunk {
    /// An empty picture of a `geometry` image, shrunk by `factor`.
    pub fn new(geometry: FrameGeometry, factor: u32) -> Self {
        let factor = factor.max(1);
        let (width, height) = (
            geometry.width.div_ceil(factor),
            geometry.height.div_ceil(factor),
        );
        Self {
            factor,
            bands: usize::from(geometry.bands.max(1)),
            width: geometry.width,
            height: geometry.height,
            sums: vec![[0; 4]; width as usize],
            image: RgbImage::new(width, height),
        }
    }

    /// The factor.
    pub fn factor(&self) -> u32 {
        self.factor
    }

    /// Add source row `y` (rows must come in order, each once).
    pub fn push_row(&mut self, y: u32, samples: &[u8]) {
        let (factor, bands) = (self.factor as usize, self.bands);
        for (x, pixel) in samples
            .chunks_exact(bands)
            .take(self.width as usize)
            .enumerate()
        {
            let band = |b: usize| u32::from(pixel[b.min(bands - 1)]);
            if let Some(sum) = self.sums.get_mut(x / factor) {
                sum[0] += band(0);
                sum[1] += band(1);
                sum[2] += band(2);
                sum[3] += 1;
            }
        }
        let last_of_block = (y + 1).is_multiple_of(self.factor) || y + 1 == self.height;
        if last_of_block {
            let out_y = y / self.factor;
            for (x, sum) in self.sums.iter_mut().enumerate() {
                let n = sum[3].max(1);
                let mean = |c: usize| ((sum[c] + n / 2) / n) as u8;
                if out_y < self.image.height() {
                    self.image
                        .put_pixel(x as u32, out_y, Rgb([mean(0), mean(1), mean(2)]));
                }
                *sum = [0; 4];
            }
        }
    }

    /// The picture.
    pub fn into_image(self) -> RgbImage {
        self.image
    }
}

/// Progress on one long image, printed to stderr at most every few seconds: tiles done, the
/// rate, and the time left at that rate.
pub struct Progress {
    name: String,
    total: usize,
    started: Instant,
    last: Instant,
}

impl Progress {
    /// Progress over `total` tiles of the image `name`.
    pub fn new(name: String, total: usize) -> Self {
        let now = Instant::now();
        Self {
            name,
            total,
            started: now,
            last: now,
        }
    }

    /// `done` tiles are done.
    pub fn update(&mut self, done: usize) {
        const EVERY: Duration = Duration::from_secs(5);
        if self.last.elapsed() < EVERY || done >= self.total {
            return;
        }
        self.last = Instant::now();
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = done as f64 / elapsed.max(1e-9);
        let left = (self.total - done) as f64 / rate.max(1e-9);
        eprintln!(
            "{}: {done} of {} tiles ({:.0}%), {rate:.0} tiles/s, about {} left",
            self.name,
            self.total,
            100.0 * done as f64 / self.total as f64,
            duration(left)
        );
    }
}

fn duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    if s >= 60 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrinking_averages_blocks_and_keeps_partial_edges() {
        // 5x3 RGB, factor 2: a 3x2 picture; the right column and bottom row are partial blocks.
        let g = FrameGeometry {
            width: 5,
            height: 3,
            bands: 3,
        };
        let mut shrunk = Shrunk::new(g, 2);
        for y in 0..3u32 {
            let row: Vec<u8> = (0..5u32)
                .flat_map(|x| [(10 * x + y) as u8, 100, 200])
                .collect();
            shrunk.push_row(y, &row);
        }
        let image = shrunk.into_image();
        assert_eq!(image.dimensions(), (3, 2));
        // Block (0,0): x 0..2, y 0..2: red 0, 10, 1, 11 -> mean 5.5 -> 6 (rounded half up).
        assert_eq!(image.get_pixel(0, 0).0, [6, 100, 200]);
        // Block (2,0): x 4, y 0..2: 40, 41 -> 40.5 -> 41.
        assert_eq!(image.get_pixel(2, 0).0, [41, 100, 200]);
        // Block (2,1): x 4, y 2: 42.
        assert_eq!(image.get_pixel(2, 1).0, [42, 100, 200]);
        assert_eq!(shrink_factor(10980, 10980, 2048), 6);
        assert_eq!(shrink_factor(64, 64, 2048), 1);
        assert_eq!(shrink_factor(10980, 10980, 0), 1);
    }
}
