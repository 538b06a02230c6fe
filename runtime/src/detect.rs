//! Detector postprocessing, `no_std` with fixed capacity: decode a head into boxes, keep those
//! above a score threshold, suppress overlaps class by class, and cap the list at its capacity
//! while counting what did not fit. Two kinds of head ([`Head`]):
//!
//! - CenterNet-style ([`HeadLayout`]): one tensor `[classes + 4, H, W]` of values in `0..1`
//!   (the model ends in a sigmoid): class heatmaps, then box width and height as a fraction of
//!   `wh_scale` cells, then the centre's offset inside its cell. A cell reports a box when its
//!   class score is a local maximum of its 3x3 neighbourhood.
//! - ultralytics YOLO (v8, 11; [`YoloLayout`]): the raw head before ultralytics' own decoding,
//!   scale by scale: box side distributions (distribution focal loss) and class logits for
//!   every cell. A cell reports a box when its best class scores above the threshold, as
//!   ultralytics' `non_max_suppression` takes one class per anchor.

use heapless::Vec;
use kestrel_plan::plan::HeadHeader;

/// One detected object, in the pixel coordinates of the image the caller maps it to.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Detection {
    /// Left edge.
    pub x: f32,
    /// Top edge.
    pub y: f32,
    /// Width.
    pub w: f32,
    /// Height.
    pub h: f32,
    /// Confidence, 0..1.
    pub score: f32,
    /// Index into the model's labels.
    pub class: u16,
}

impl Detection {
    fn intersection(&self, other: &Detection) -> f32 {
        let x1 = self.x.max(other.x);
        let y1 = self.y.max(other.y);
        let x2 = (self.x + self.w).min(other.x + other.w);
        let y2 = (self.y + self.h).min(other.y + other.h);
        (x2 - x1).max(0.0) * (y2 - y1).max(0.0)
    }

    /// Intersection over union with `other` (0 when either is empty).
    pub fn iou(&self, other: &Detection) -> f32 {
        let inter = self.intersection(other);
        let union = self.w * self.h + other.w * other.h - inter;
        if union > 0.0 {
            inter / union
        } else {
            0.0
        }
    }

    /// Intersection over the smaller box's area: near 1 when one box lies inside the other,
    /// as the part of an object a tile cut off lies inside the whole seen by its neighbour.
    pub fn overlap_of_smaller(&self, other: &Detection) -> f32 {
        let smaller = (self.w * self.h).min(other.w * other.h);
        if smaller > 0.0 {
            self.intersection(other) / smaller
        } else {
            0.0
        }
    }
}

/// The shape and meaning of a detector head.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct HeadLayout {
    /// Class heatmaps at the start of the tensor.
    pub classes: usize,
    /// Rows of the head.
    pub height: usize,
    /// Columns of the head.
    pub width: usize,
    /// Input pixels per head cell.
    pub stride: f32,
    /// Cells that a box size of 1.0 stands for.
    pub wh_scale: f32,
}

impl HeadLayout {
    /// Values in the head tensor.
    pub fn len(&self) -> usize {
        (self.classes + 4) * self.height * self.width
    }

    /// Whether the head has no cells.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Most scales a YOLO head has: ultralytics' P3-P5 heads have three, its P2 and P6 variants four.
pub const MAX_YOLO_SCALES: usize = 4;

/// An ultralytics YOLO head (YOLOv8, YOLO11) as a Kestrel plan or the float backend leaves it:
/// for each scale in `strides` order, `4 * reg_max` box-distribution planes (left, top, right,
/// bottom, `reg_max` bins each) then `classes` class-logit planes, each plane
/// `height / stride` x `width / stride` cells, row-major.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct YoloLayout {
    /// Class-logit planes per scale.
    pub classes: usize,
    /// Bins of each box side's distribution (16 in ultralytics' models).
    pub reg_max: usize,
    /// Input height, pixels.
    pub height: usize,
    /// Input width, pixels.
    pub width: usize,
    /// Input pixels per cell of each scale; unused entries are 0, after the used ones.
    pub strides: [u16; MAX_YOLO_SCALES],
}

impl YoloLayout {
    /// Each scale's stride and its first value's index in the head, and its rows and columns.
    fn scales(&self) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        let channels = 4 * self.reg_max + self.classes;
        let mut start = 0;
        self.strides
            .iter()
            .map(|&s| usize::from(s))
            .take_while(|&s| s > 0)
            .map(move |stride| {
                let (rows, cols) = (self.height / stride, self.width / stride);
                let first = start;
                start += channels * rows * cols;
                (stride, first, rows, cols)
            })
    }

    /// Values in the head.
    pub fn len(&self) -> usize {
        let channels = 4 * self.reg_max + self.classes;
        self.scales()
            .map(|(_, _, rows, cols)| channels * rows * cols)
            .sum()
    }

    /// Whether the head has no cells.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a detector's head is read.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Head {
    /// Heatmaps, box sizes and offsets, all after a sigmoid.
    CenterNet(HeadLayout),
    /// ultralytics' raw YOLO head.
    Yolo(YoloLayout),
}

impl Head {
    /// The head a plan header describes, for a `height` x `width` input and `classes` labels.
    /// A parsed plan's strides divide its input; a header made by hand with stride 0 gets an
    /// empty head, which `DetectorStep::new` refuses.
    pub fn from_header(header: &HeadHeader, height: u32, width: u32, classes: usize) -> Self {
        let (height, width) = (height as usize, width as usize);
        match *header {
            HeadHeader::CenterNet { stride, wh_scale } => {
                let cells = |side: usize| side.checked_div(usize::from(stride)).unwrap_or(0);
                Self::CenterNet(HeadLayout {
                    classes,
                    height: cells(height),
                    width: cells(width),
                    stride: f32::from(stride),
                    wh_scale,
                })
            }
            HeadHeader::Yolo { reg_max, strides } => Self::Yolo(YoloLayout {
                classes,
                reg_max: usize::from(reg_max),
                height,
                width,
                strides,
            }),
        }
    }

    /// Values in the head tensor.
    pub fn len(&self) -> usize {
        match self {
            Self::CenterNet(layout) => layout.len(),
            Self::Yolo(layout) => layout.len(),
        }
    }

    /// Whether the head has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Classes the head scores.
    pub fn classes(&self) -> usize {
        match self {
            Self::CenterNet(layout) => layout.classes,
            Self::Yolo(layout) => layout.classes,
        }
    }

    /// Decode `head` into `out` (cleared first): boxes in input pixels scoring at least
    /// `threshold` (above it, for YOLO, as ultralytics compares). Call
    /// [`Detections::suppress`] afterwards.
    pub fn decode<const N: usize>(
        &self,
        head: &[f32],
        threshold: f32,
        out: &mut Detections<N>,
    ) -> Result<(), DetectError> {
        match self {
            Self::CenterNet(layout) => decode(head, layout, threshold, out),
            Self::Yolo(layout) => decode_yolo(head, layout, threshold, out),
        }
    }

    /// Whether `class` scores at least `threshold` anywhere in `head`.
    pub fn class_scores(&self, head: &[f32], class: usize, threshold: f32) -> bool {
        match self {
            Self::CenterNet(layout) => {
                let plane = layout.height * layout.width;
                head.get(class * plane..(class + 1) * plane)
                    .is_some_and(|scores| scores.iter().any(|&s| s >= threshold))
            }
            Self::Yolo(layout) => {
                let box_planes = 4 * layout.reg_max;
                layout.scales().any(|(_, first, rows, cols)| {
                    let plane = rows * cols;
                    let at = first + (box_planes + class) * plane;
                    head.get(at..at + plane)
                        .is_some_and(|logits| logits.iter().any(|&l| sigmoid(l) >= threshold))
                })
            }
        }
    }
}

/// Why a head could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DetectError {
    /// The tensor does not hold `expected` values.
    HeadLength {
        /// Values the layout needs.
        expected: usize,
        /// Values supplied.
        got: usize,
    },
    /// A value is not finite: the model produced garbage for this frame.
    NonFinite,
    /// A peak found elsewhere names a cell past the class heatmaps' `cells`.
    PeakIndex {
        /// The peak's index.
        index: usize,
        /// Cells in the class heatmaps.
        cells: usize,
    },
}

impl core::fmt::Display for DetectError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::HeadLength { expected, got } => {
                write!(
                    f,
                    "detector head has {got} values, its layout needs {expected}"
                )
            }
            Self::NonFinite => f.write_str("detector head holds a non-finite value"),
            Self::PeakIndex { index, cells } => {
                write!(f, "peak at cell {index}, the heatmaps have {cells}")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for DetectError {}

/// At most `N` detections, best first after [`Detections::suppress`], and how many were
/// dropped because the list was full.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Detections<const N: usize> {
    items: Vec<Detection, N>,
    overflow: u32,
}

impl<const N: usize> Detections<N> {
    /// An empty list.
    pub fn new() -> Self {
        Self {
            items: Vec::new(),
            overflow: 0,
        }
    }

    /// Forget every detection and the overflow count (no allocation: the storage is inline).
    pub fn clear(&mut self) {
        self.items.clear();
        self.overflow = 0;
    }

    /// The detections held.
    pub fn as_slice(&self) -> &[Detection] {
        &self.items
    }

    /// Detections that did not fit (the lowest scores are the ones dropped).
    pub fn overflow(&self) -> u32 {
        self.overflow
    }

    /// Add `d`; when full, it replaces the lowest-scoring detection if it scores higher, and
    /// either way one detection is counted as overflow.
    pub fn push(&mut self, d: Detection) {
        if let Err(d) = self.items.push(d) {
            self.overflow = self.overflow.saturating_add(1);
            let lowest = self
                .items
                .iter_mut()
                .min_by(|a, b| a.score.total_cmp(&b.score));
            if let Some(lowest) = lowest {
                if d.score > lowest.score {
                    *lowest = d;
                }
            }
        }
    }

    /// Class-wise greedy non-maximum suppression: highest score first, drop any box of the
    /// same class overlapping a kept one by more than `iou`. Leaves the list best first.
    pub fn suppress(&mut self, iou: f32) {
        self.suppress_where(|kept, candidate| kept.iou(candidate) > iou);
    }

    /// Merge detections gathered from overlapping tiles ([`Detections::add_from_tile`]): as
    /// [`Detections::suppress`], and also drop a box of the same class mostly inside a
    /// better one (`overlap_of_smaller` above `contained`), the piece of an object that
    /// a tile edge cut off.
    pub fn merge_tiles(&mut self, iou: f32, contained: f32) {
        self.suppress_where(|kept, candidate| {
            kept.iou(candidate) > iou || kept.overlap_of_smaller(candidate) > contained
        });
    }

    /// Add the detections of a tile whose top-left corner is at `(x, y)` in the frame and
    /// whose pixels are `scale` frame pixels each.
    pub fn add_from_tile<const M: usize>(
        &mut self,
        tile: &Detections<M>,
        x: f32,
        y: f32,
        scale: f32,
    ) {
        for d in tile.as_slice() {
            self.push(Detection {
                x: x + d.x * scale,
                y: y + d.y * scale,
                w: d.w * scale,
                h: d.h * scale,
                ..*d
            });
        }
        self.overflow = self.overflow.saturating_add(tile.overflow);
    }

    /// Keep at most `max` detections of each class, the best ones (the list is best first after
    /// [`Detections::suppress`] or [`Detections::merge_tiles`]); the rest count as overflow.
    pub fn keep_per_class(&mut self, max: usize) {
        // The usual case on every frame: no class can be over the cap, so nothing to count.
        if self.items.len() <= max {
            return;
        }
        let dropped = self.retain_given_kept(|kept, candidate| {
            kept.iter().filter(|k| k.class == candidate.class).count() < max
        });
        self.overflow = self.overflow.saturating_add(dropped);
    }

    /// Clip every box to a `width` x `height` frame (padding beyond the frame edge holds
    /// nothing), dropping any left with no area.
    pub fn clip_to(&mut self, width: f32, height: f32) {
        self.items.retain_mut(|d| {
            let (x2, y2) = ((d.x + d.w).min(width), (d.y + d.h).min(height));
            d.x = d.x.max(0.0);
            d.y = d.y.max(0.0);
            d.w = x2 - d.x;
            d.h = y2 - d.y;
            d.w > 0.0 && d.h > 0.0
        });
    }

    fn suppress_where(&mut self, overlapping: impl Fn(&Detection, &Detection) -> bool) {
        self.items
            .sort_unstable_by(|a, b| b.score.total_cmp(&a.score));
        self.retain_given_kept(|kept, candidate| {
            !kept
                .iter()
                .any(|k| k.class == candidate.class && overlapping(k, candidate))
        });
    }

    /// Keep, in order, each detection that `keep` accepts given the ones kept before it; the
    /// number dropped. No allocation: survivors move to the front.
    fn retain_given_kept(&mut self, keep: impl Fn(&[Detection], &Detection) -> bool) -> u32 {
        // `kept <= i < len` throughout, so every `get` hits.
        let (mut kept, mut dropped) = (0, 0u32);
        for i in 0..self.items.len() {
            let Some(&candidate) = self.items.get(i) else {
                break;
            };
            if keep(self.items.get(..kept).unwrap_or_default(), &candidate) {
                if let Some(slot) = self.items.get_mut(kept) {
                    *slot = candidate;
                }
                kept += 1;
            } else {
                dropped = dropped.saturating_add(1);
            }
        }
        self.items.truncate(kept);
        dropped
    }
}

/// That `head` holds `expected` values, every one finite.
fn check_head(head: &[f32], expected: usize) -> Result<(), DetectError> {
    if head.len() != expected {
        return Err(DetectError::HeadLength {
            expected,
            got: head.len(),
        });
    }
    if head.iter().any(|v| !v.is_finite()) {
        return Err(DetectError::NonFinite);
    }
    Ok(())
}

/// Decode `head` into `out` (cleared first): every local maximum of a class heatmap scoring at
/// least `threshold`, as a box in input pixels. Call [`Detections::suppress`] afterwards.
pub fn decode<const N: usize>(
    head: &[f32],
    layout: &HeadLayout,
    threshold: f32,
    out: &mut Detections<N>,
) -> Result<(), DetectError> {
    out.clear();
    check_head(head, layout.len())?;
    let (h, w) = (layout.height, layout.width);
    let plane = h * w;
    // The length was checked above, so every cell is there; a missing one would read as no score.
    let at = |channel: usize, y: usize, x: usize| {
        head.get(channel * plane + y * w + x)
            .copied()
            .unwrap_or(f32::NEG_INFINITY)
    };
    for class in 0..layout.classes {
        for y in 0..h {
            for x in 0..w {
                let score = at(class, y, x);
                if score < threshold {
                    continue;
                }
                // A peak: nothing in the 3x3 neighbourhood scores higher, and on a plateau of
                // equal scores (common in int8 heads) only its first cell in raster order.
                let peak = (y.saturating_sub(1)..(y + 2).min(h)).all(|ny| {
                    (x.saturating_sub(1)..(x + 2).min(w)).all(|nx| {
                        let other = at(class, ny, nx);
                        other < score || (other == score && (ny, nx) >= (y, x))
                    })
                });
                if peak {
                    let c = layout.classes;
                    let size = [at(c, y, x), at(c + 1, y, x)];
                    let offset = [at(c + 2, y, x), at(c + 3, y, x)];
                    out.push(peak_box(layout, class, y, x, score, size, offset));
                }
            }
        }
    }
    Ok(())
}

/// The logistic function, as ultralytics applies it to class logits.
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + libm::expf(-x))
}

/// Decode a raw YOLO head into `out` (cleared first), as ultralytics' `Detect` head and
/// `non_max_suppression` do: each cell's best class scores `sigmoid(logit)`; a cell scoring
/// above `threshold` reports a box whose sides lie at the expected values of their softmaxed
/// distributions, in cells, from the cell's centre. Call [`Detections::suppress`] afterwards.
pub fn decode_yolo<const N: usize>(
    head: &[f32],
    layout: &YoloLayout,
    threshold: f32,
    out: &mut Detections<N>,
) -> Result<(), DetectError> {
    out.clear();
    check_head(head, layout.len())?;
    let bins = layout.reg_max;
    for (stride, first, rows, cols) in layout.scales() {
        let plane = rows * cols;
        // The length was checked above, so every value is there.
        let at = |channel: usize, cell: usize| {
            head.get(first + channel * plane + cell)
                .copied()
                .unwrap_or(f32::NEG_INFINITY)
        };
        for cell in 0..plane {
            let (mut class, mut best) = (0, f32::NEG_INFINITY);
            for c in 0..layout.classes {
                let logit = at(4 * bins + c, cell);
                if logit > best {
                    (class, best) = (c, logit);
                }
            }
            let score = sigmoid(best);
            if score <= threshold {
                continue;
            }
            // Left, top, right, bottom: the expectation of each side's distribution.
            let side = |k: usize| {
                let logits = (0..bins).map(|j| at(k * bins + j, cell));
                let max = logits.clone().fold(f32::NEG_INFINITY, f32::max);
                let (mut sum, mut weighted) = (0.0, 0.0);
                for (j, logit) in logits.enumerate() {
                    let e = libm::expf(logit - max);
                    sum += e;
                    weighted += e * j as f32;
                }
                // sum >= 1: the maximum contributes exp(0).
                weighted / sum
            };
            let (left, top, right, bottom) = (side(0), side(1), side(2), side(3));
            let s = stride as f32;
            let (ax, ay) = ((cell % cols) as f32 + 0.5, (cell / cols) as f32 + 0.5);
            let (w, h) = ((left + right) * s, (top + bottom) * s);
            // ultralytics' centre-and-size form, then its corners.
            let (cx, cy) = (
                (ax + (right - left) / 2.0) * s,
                (ay + (bottom - top) / 2.0) * s,
            );
            out.push(Detection {
                x: cx - w / 2.0,
                y: cy - h / 2.0,
                w,
                h,
                score,
                class: class as u16,
            });
        }
    }
    Ok(())
}

/// Finish decoding peaks found elsewhere (a GPU's decoding kernel) into `out` (cleared first).
/// Each peak is `(index, score, [width, height, dx, dy])`: its index into the class heatmaps
/// (`class * height * width + y * width + x`), in increasing order as [`decode`] scans, and
/// the head's values at that cell. The boxes are those [`decode`] makes of the same head.
pub fn decode_peaks<const N: usize>(
    peaks: impl IntoIterator<Item = (usize, f32, [f32; 4])>,
    layout: &HeadLayout,
    out: &mut Detections<N>,
) -> Result<(), DetectError> {
    out.clear();
    let plane = layout.height * layout.width;
    for (index, score, [bw, bh, dx, dy]) in peaks {
        let cells = layout.classes * plane;
        if index >= cells {
            return Err(DetectError::PeakIndex { index, cells });
        }
        if ![score, bw, bh, dx, dy].iter().all(|v| v.is_finite()) {
            return Err(DetectError::NonFinite);
        }
        let (class, cell) = (index / plane, index % plane);
        let (y, x) = (cell / layout.width, cell % layout.width);
        out.push(peak_box(layout, class, y, x, score, [bw, bh], [dx, dy]));
    }
    Ok(())
}

/// The box of a peak of `class` at cell (y, x): `size` in units of `wh_scale` cells, the
/// centre `offset` inside the cell, both as the head holds them.
fn peak_box(
    layout: &HeadLayout,
    class: usize,
    y: usize,
    x: usize,
    score: f32,
    size: [f32; 2],
    offset: [f32; 2],
) -> Detection {
    let bw = size[0] * layout.wh_scale * layout.stride;
    let bh = size[1] * layout.wh_scale * layout.stride;
    let cx = (x as f32 + offset[0]) * layout.stride;
    let cy = (y as f32 + offset[1]) * layout.stride;
    Detection {
        x: cx - bw / 2.0,
        y: cy - bh / 2.0,
        w: bw,
        h: bh,
        score,
        class: class as u16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUT: HeadLayout = HeadLayout {
        classes: 2,
        height: 8,
        width: 8,
        stride: 4.0,
        wh_scale: 8.0,
    };

    /// A head with one object: class `class` peaking at cell (y, x), size (w, h) in cells.
    fn head_with(objects: &[(usize, usize, usize, f32, f32, f32)]) -> [f32; 6 * 64] {
        let mut head = [0.0f32; 6 * 64];
        for &(class, y, x, score, w, h) in objects {
            head[class * 64 + y * 8 + x] = score;
            // A weaker neighbour that must not become a second detection.
            if x + 1 < 8 {
                head[class * 64 + y * 8 + x + 1] = score * 0.5;
            }
            head[2 * 64 + y * 8 + x] = w / 8.0;
            head[3 * 64 + y * 8 + x] = h / 8.0;
            head[4 * 64 + y * 8 + x] = 0.5;
            head[5 * 64 + y * 8 + x] = 0.25;
        }
        head
    }

    fn box_at(x: f32, y: f32, w: f32, h: f32, score: f32, class: u16) -> Detection {
        Detection {
            x,
            y,
            w,
            h,
            score,
            class,
        }
    }

    #[test]
    fn decodes_peaks_into_pixel_boxes() {
        let head = head_with(&[(1, 2, 3, 0.9, 4.0, 2.0)]);
        let mut found = Detections::<8>::new();
        decode(&head, &LAYOUT, 0.3, &mut found).unwrap();
        assert_eq!(found.as_slice().len(), 1, "{found:?}");
        let d = found.as_slice()[0];
        // Centre (3.5, 2.25) cells = (14, 9) px; size 16 x 8 px.
        assert_eq!((d.x, d.y, d.w, d.h, d.class), (6.0, 5.0, 16.0, 8.0, 1));
        assert_eq!(d.score, 0.9);
        decode(&head, &LAYOUT, 0.95, &mut found).unwrap();
        assert!(found.as_slice().is_empty(), "below the threshold");
    }

    #[test]
    fn a_plateau_of_equal_scores_is_one_peak() {
        let mut head = head_with(&[(0, 4, 4, 0.7, 2.0, 2.0)]);
        // Three more cells around (4, 4) with exactly its score, as int8 rounding leaves them.
        for (y, x) in [(4, 5), (5, 4), (5, 5)] {
            head[y * 8 + x] = 0.7;
        }
        let mut found = Detections::<8>::new();
        decode(&head, &LAYOUT, 0.3, &mut found).unwrap();
        assert_eq!(found.as_slice().len(), 1, "{found:?}");
        assert_eq!(
            (found.as_slice()[0].x, found.as_slice()[0].y),
            (14.0, 13.0),
            "the first cell"
        );
    }

    #[test]
    fn the_per_class_cap_keeps_the_best_of_each_class_and_counts_the_rest() {
        let mut found = Detections::<8>::new();
        for (i, (score, class)) in [(0.9, 0), (0.8, 1), (0.7, 0), (0.6, 0), (0.5, 1), (0.4, 2)]
            .into_iter()
            .enumerate()
        {
            found.push(box_at(i as f32 * 20.0, 0.0, 10.0, 10.0, score, class));
        }
        found.keep_per_class(6);
        assert_eq!(
            (found.as_slice().len(), found.overflow()),
            (6, 0),
            "a cap above the count"
        );
        found.keep_per_class(2);
        let kept: Vec<(f32, u16), 8> = found
            .as_slice()
            .iter()
            .map(|d| (d.score, d.class))
            .collect();
        assert_eq!(
            &kept[..],
            [(0.9, 0), (0.8, 1), (0.7, 0), (0.5, 1), (0.4, 2)]
        );
        assert_eq!(found.overflow(), 1, "the third box of class 0");
        found.keep_per_class(0);
        assert_eq!((found.as_slice().len(), found.overflow()), (0, 6));
    }

    #[test]
    fn suppression_is_per_class_and_best_first() {
        let mut list = Detections::<8>::new();
        list.push(box_at(0.0, 0.0, 10.0, 10.0, 0.6, 0));
        list.push(box_at(1.0, 1.0, 10.0, 10.0, 0.9, 0));
        list.push(box_at(1.0, 1.0, 10.0, 10.0, 0.8, 1));
        list.push(box_at(50.0, 50.0, 10.0, 10.0, 0.7, 0));
        list.suppress(0.5);
        let scores: std::vec::Vec<f32> = list.as_slice().iter().map(|d| d.score).collect();
        assert_eq!(
            scores,
            [0.9, 0.8, 0.7],
            "the 0.6 box overlaps the 0.9 one of its class"
        );
    }

    #[test]
    fn a_full_list_keeps_the_best_and_counts_the_rest() {
        let mut list = Detections::<2>::new();
        for (i, score) in [0.5, 0.2, 0.9, 0.1].into_iter().enumerate() {
            list.push(box_at(i as f32 * 100.0, 0.0, 5.0, 5.0, score, 0));
        }
        let mut scores: std::vec::Vec<f32> = list.as_slice().iter().map(|d| d.score).collect();
        scores.sort_by(f32::total_cmp);
        assert_eq!(scores, [0.5, 0.9]);
        assert_eq!(list.overflow(), 2);
        list.clear();
        assert_eq!((list.as_slice().len(), list.overflow()), (0, 0));
    }

    /// An object on the seam between two overlapping tiles: the left tile sees it cut by its
    /// edge, the right one whole. After merging, the frame reports it once, where it is.
    #[test]
    fn an_object_on_a_seam_is_reported_once() {
        use crate::tile::TileGrid;
        // Two 32-pixel tiles over a 48-pixel-wide frame, overlapping by 16.
        let grid = TileGrid::new(48, 32, 32, 32, 16).unwrap();
        assert_eq!(grid.len(), 2);
        // The object spans frame x 20..44. The left tile (0..32) sees 20..32; the right tile
        // (16..48) sees all of it at tile x 4..28.
        let mut left = Detections::<4>::new();
        left.push(box_at(20.0, 8.0, 12.0, 10.0, 0.6, 1));
        let mut right = Detections::<4>::new();
        right.push(box_at(4.0, 8.0, 24.0, 10.0, 0.9, 1));
        let mut frame = Detections::<8>::new();
        for (tile, found) in grid.iter().zip([&left, &right]) {
            frame.add_from_tile(found, tile.x as f32, tile.y as f32, 1.0);
        }
        // IoU of the cut piece and the whole is 0.5: plain NMS at 0.5 keeps both.
        let mut plain = frame.clone();
        plain.suppress(0.5);
        assert_eq!(plain.as_slice().len(), 2);
        frame.merge_tiles(0.5, 0.8);
        assert_eq!(frame.as_slice(), &[box_at(20.0, 8.0, 24.0, 10.0, 0.9, 1)]);
    }

    #[test]
    fn bad_heads_are_typed_errors() {
        let mut found = Detections::<4>::new();
        assert_eq!(
            decode(&[0.0; 10], &LAYOUT, 0.3, &mut found),
            Err(DetectError::HeadLength {
                expected: 384,
                got: 10
            })
        );
        let mut head = head_with(&[]);
        head[17] = f32::NAN;
        assert_eq!(
            decode(&head, &LAYOUT, 0.3, &mut found),
            Err(DetectError::NonFinite)
        );
        // Peaks found elsewhere: one past the heatmaps, one not finite.
        assert_eq!(
            decode_peaks([(128, 0.5, [0.1; 4])], &LAYOUT, &mut found),
            Err(DetectError::PeakIndex {
                index: 128,
                cells: 128
            })
        );
        assert_eq!(
            decode_peaks(
                [(3, 0.5, [0.1, f32::INFINITY, 0.0, 0.0])],
                &LAYOUT,
                &mut found
            ),
            Err(DetectError::NonFinite)
        );
    }

    #[test]
    fn peaks_found_elsewhere_make_the_boxes_decode_makes() {
        let head = head_with(&[(1, 2, 3, 0.9, 4.0, 2.0), (0, 6, 1, 0.6, 2.0, 6.0)]);
        let mut want = Detections::<8>::new();
        decode(&head, &LAYOUT, 0.3, &mut want).unwrap();
        let at = |c: usize, y: usize, x: usize| head[c * 64 + y * 8 + x];
        let peak = |class: usize, y: usize, x: usize| {
            let boxes = [2, 3, 4, 5].map(|c| at(c, y, x));
            (class * 64 + y * 8 + x, at(class, y, x), boxes)
        };
        let mut got = Detections::<8>::new();
        decode_peaks([peak(0, 6, 1), peak(1, 2, 3)], &LAYOUT, &mut got).unwrap();
        assert_eq!(got, want);
        assert_eq!(got.as_slice().len(), 2);
    }

    /// Two scales of a 16x8 input (strides 4 and 8: 4x2 and 2x1 cells), 2 classes, 4 bins.
    const YOLO: YoloLayout = YoloLayout {
        classes: 2,
        reg_max: 4,
        height: 8,
        width: 16,
        strides: [4, 8, 0, 0],
    };

    /// A YOLO head scoring nothing (logit -20 everywhere), every side's distribution peaked
    /// (logit 30) on bin 1.
    fn yolo_head() -> std::vec::Vec<f32> {
        let mut head = std::vec::Vec::new();
        for cells in [8, 2] {
            for channel in 0..18 {
                let value = match channel {
                    16.. => -20.0,
                    c if c % 4 == 1 => 30.0,
                    _ => 0.0,
                };
                head.extend(core::iter::repeat_n(value, cells));
            }
        }
        head
    }

    #[test]
    fn a_yolo_cell_above_the_threshold_reports_its_best_class_and_expected_sides() {
        let mut head = yolo_head();
        assert_eq!((YOLO.len(), head.len()), (180, 180));
        // Scale 0, cell (row 1, column 2): class 1 at logit 2 (0.88), class 0 at 1.
        let cell = 4 + 2;
        head[17 * 8 + cell] = 2.0;
        head[16 * 8 + cell] = 1.0;
        // Its right side spread evenly over bins 2 and 3: expectation 2.5 cells.
        head[(2 * 4) * 8 + cell] = -30.0;
        head[(2 * 4 + 1) * 8 + cell] = -30.0;
        head[(2 * 4 + 2) * 8 + cell] = 5.0;
        head[(2 * 4 + 3) * 8 + cell] = 5.0;
        // Scale 1, its second cell: class 0 at logit 0 (0.5), not above 0.5.
        head[8 * 18 + 16 * 2 + 1] = 0.0;
        let mut found = Detections::<4>::new();
        Head::Yolo(YOLO).decode(&head, 0.5, &mut found).unwrap();
        assert_eq!(found.as_slice().len(), 1, "{found:?}");
        let d = found.as_slice()[0];
        // Centre of the cell (2.5, 1.5) cells; left 1, top 1, right 2.5, bottom 1 (almost:
        // the other bins hold e^-30 of the mass), times the stride 4.
        let close = |a: f32, b: f32| (a - b).abs() < 1e-4;
        assert!(close(d.x, 6.0) && close(d.y, 2.0), "{d:?}");
        assert!(close(d.w, 14.0) && close(d.h, 8.0), "{d:?}");
        assert_eq!(d.class, 1);
        assert!(close(d.score, 1.0 / (1.0 + libm::expf(-2.0))));
        // At 0.49 the scale-1 cell reports too, 16 px wide from its centre (12, 4).
        Head::Yolo(YOLO).decode(&head, 0.49, &mut found).unwrap();
        assert_eq!(found.as_slice().len(), 2);
        let d = found.as_slice()[1];
        assert!(close(d.x, 4.0) && close(d.w, 16.0) && d.class == 0, "{d:?}");
        // Which classes score: the guard of triple-modular redundancy asks.
        assert!(Head::Yolo(YOLO).class_scores(&head, 1, 0.8));
        assert!(!Head::Yolo(YOLO).class_scores(&head, 1, 0.9));
    }

    #[test]
    fn bad_yolo_heads_are_typed_errors() {
        let mut found = Detections::<4>::new();
        let yolo = Head::Yolo(YOLO);
        assert_eq!(
            yolo.decode(&[0.0; 179], 0.3, &mut found),
            Err(DetectError::HeadLength {
                expected: 180,
                got: 179
            })
        );
        let mut head = yolo_head();
        head[3] = f32::NAN;
        assert_eq!(
            yolo.decode(&head, 0.3, &mut found),
            Err(DetectError::NonFinite)
        );
    }

    #[test]
    fn iou_of_disjoint_nested_and_empty_boxes() {
        let a = box_at(0.0, 0.0, 10.0, 10.0, 1.0, 0);
        assert_eq!(a.iou(&box_at(20.0, 0.0, 10.0, 10.0, 1.0, 0)), 0.0);
        assert_eq!(a.iou(&a), 1.0);
        assert_eq!(a.iou(&box_at(0.0, 0.0, 5.0, 10.0, 1.0, 0)), 0.5);
        assert_eq!(
            box_at(0.0, 0.0, 0.0, 0.0, 1.0, 0).iou(&box_at(0.0, 0.0, 0.0, 0.0, 1.0, 0)),
            0.0
        );
    }
}
