//! COCO-style detection scoring, computed the way pycocotools computes it (bbox, area range
//! "all", 100 detections per image), so Kestrel's mAP numbers mean what published ones mean.
//!
//! Per category and IoU threshold: each image's detections, best score first, are matched
//! greedily to the unmatched ground truth box of highest IoU (at least the threshold); all
//! images' detections are then ranked by score, precision is made monotone, and read at 101
//! recall points. AP averages those points; mAP averages categories that have ground truth,
//! and for `map50_95` the ten IoU thresholds 0.50, 0.55, ..., 0.95 as well.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A ground-truth box.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Truth {
    /// Image id.
    pub image: u64,
    /// Category id.
    pub category: u64,
    /// `[x, y, w, h]` in pixels.
    pub bbox: [f64; 4],
}

/// A detection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored {
    /// Image id.
    pub image: u64,
    /// Category id.
    pub category: u64,
    /// `[x, y, w, h]` in pixels.
    pub bbox: [f64; 4],
    /// Confidence.
    pub score: f64,
}

/// The numbers a detection report carries.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// mAP at IoU 0.5.
    pub map50: f64,
    /// mAP averaged over IoU 0.50:0.05:0.95.
    pub map50_95: f64,
    /// AP at IoU 0.5 per category id; `None` for a category without ground truth.
    pub per_category_ap50: BTreeMap<u64, Option<f64>>,
}

/// Detections kept per image and category, as pycocotools' last `maxDets`.
pub const MAX_DETECTIONS: usize = 100;
const RECALL_POINTS: usize = 101;

fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let x1 = a[0].max(b[0]);
    let y1 = a[1].max(b[1]);
    let x2 = (a[0] + a[2]).min(b[0] + b[2]);
    let y2 = (a[1] + a[3]).min(b[1] + b[3]);
    let inter = (x2 - x1).max(0.0) * (y2 - y1).max(0.0);
    let union = a[2] * a[3] + b[2] * b[3] - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// One image and category: its ranked detections' scores and, per IoU threshold, whether
/// each matched a ground truth box.
struct ImageResult {
    scores: Vec<f64>,
    matched: Vec<Vec<bool>>,
}

fn match_image(
    truths: &[&Truth],
    detections: &mut Vec<&Scored>,
    thresholds: &[f64],
) -> ImageResult {
    // Stable sort: ties keep their input order, as numpy's mergesort does.
    detections.sort_by(|a, b| b.score.total_cmp(&a.score));
    detections.truncate(MAX_DETECTIONS);
    let matched = thresholds
        .iter()
        .map(|&t| {
            let mut taken = vec![false; truths.len()];
            detections
                .iter()
                .map(|d| {
                    let mut best = t.min(1.0 - 1e-10);
                    let mut found = None;
                    for (g, truth) in truths.iter().enumerate() {
                        if taken[g] {
                            continue;
                        }
                        let overlap = iou(&d.bbox, &truth.bbox);
                        // `>=`: pycocotools skips only when strictly below, so the last of
                        // equally good boxes wins.
                        if overlap >= best {
                            best = overlap;
                            found = Some(g);
                        }
                    }
                    if let Some(g) = found {
                        taken[g] = true;
                    }
                    found.is_some()
                })
                .collect()
        })
        .collect();
    ImageResult {
        scores: detections.iter().map(|d| d.score).collect(),
        matched,
    }
}

/// Precision at the 101 recall points for one threshold, from detections ranked by score.
fn precision_points(matched: &[bool], truths: usize) -> [f64; RECALL_POINTS] {
    let mut recall = Vec::with_capacity(matched.len());
    let mut precision = Vec::with_capacity(matched.len());
    let (mut tp, mut fp) = (0.0f64, 0.0f64);
    for &m in matched {
        if m {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        recall.push(tp / truths as f64);
        precision.push(tp / (tp + fp + f64::EPSILON));
    }
    for i in (1..precision.len()).rev() {
        if precision[i] > precision[i - 1] {
            precision[i - 1] = precision[i];
        }
    }
    let mut points = [0.0; RECALL_POINTS];
    for (r, point) in points.iter_mut().enumerate() {
        let target = r as f64 / (RECALL_POINTS - 1) as f64;
        // numpy searchsorted(side="left"): the first recall at or above the target.
        let at = recall.partition_point(|&v| v < target);
        if let Some(&p) = precision.get(at) {
            *point = p;
        }
    }
    points
}

/// Score `detections` against `truths` for every category id in `categories`.
pub fn evaluate(truths: &[Truth], detections: &[Scored], categories: &[u64]) -> Summary {
    let thresholds: Vec<f64> = (0..10).map(|i| 0.5 + 0.05 * i as f64).collect();
    let mut images: Vec<u64> = truths.iter().map(|t| t.image).collect();
    images.extend(detections.iter().map(|d| d.image));
    images.sort_unstable();
    images.dedup();

    let mut per_category = BTreeMap::new();
    let mut all_points: Vec<f64> = Vec::new();
    let mut ap50s = Vec::new();
    for &category in categories {
        let mut results = Vec::new();
        let mut truth_count = 0;
        for &image in &images {
            let image_truths: Vec<&Truth> = truths
                .iter()
                .filter(|t| t.image == image && t.category == category)
                .collect();
            let mut image_detections: Vec<&Scored> = detections
                .iter()
                .filter(|d| d.image == image && d.category == category)
                .collect();
            truth_count += image_truths.len();
            if !image_truths.is_empty() || !image_detections.is_empty() {
                results.push(match_image(
                    &image_truths,
                    &mut image_detections,
                    &thresholds,
                ));
            }
        }
        if truth_count == 0 {
            per_category.insert(category, None);
            continue;
        }
        // All images' detections ranked by score, ties in image order (a stable sort).
        let mut ranked: Vec<(f64, usize, usize)> = results
            .iter()
            .enumerate()
            .flat_map(|(i, r)| r.scores.iter().enumerate().map(move |(d, &s)| (s, i, d)))
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (t, _) in thresholds.iter().enumerate() {
            let matched: Vec<bool> = ranked
                .iter()
                .map(|&(_, i, d)| results[i].matched[t][d])
                .collect();
            let points = precision_points(&matched, truth_count);
            if t == 0 {
                let ap = points.iter().sum::<f64>() / RECALL_POINTS as f64;
                per_category.insert(category, Some(ap));
                ap50s.extend(points);
            }
            all_points.extend(points);
        }
    }
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    Summary {
        map50: mean(&ap50s),
        map50_95: mean(&all_points),
        per_category_ap50: per_category,
    }
}

/// An image of a COCO dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    /// Image id.
    pub id: u64,
    /// The file.
    pub path: PathBuf,
    /// Width in pixels, from the annotations.
    pub width: u32,
    /// Height in pixels, from the annotations.
    pub height: u32,
}

/// A COCO detection dataset: `images/` and `annotations_coco.json` in one folder.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Images whose file exists, by id.
    pub images: Vec<Image>,
    /// Category ids and names, by id.
    pub categories: Vec<(u64, String)>,
    /// Usable ground truth, clipped to its image.
    pub truths: Vec<Truth>,
    /// What was left out or changed, one line each, naming the image and the reason.
    pub skipped: Vec<String>,
}

/// Why a COCO dataset cannot be used at all.
#[derive(Debug, thiserror::Error)]
pub enum CocoError {
    /// The annotation file cannot be read.
    #[error("{}: cannot read: {reason}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The I/O error (in the message, not the error's source: printed once).
        reason: std::io::Error,
    },
    /// The annotation file is not COCO instances JSON.
    #[error("{}: not COCO instances JSON: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No image of the annotations exists on disk.
    #[error("{}: none of the {listed} annotated images exist under images/", path.display())]
    NoImages {
        /// The dataset folder.
        path: PathBuf,
        /// Images the annotations list.
        listed: usize,
    },
}

#[derive(serde::Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnnotation>,
    categories: Vec<CocoCategory>,
}

#[derive(serde::Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
    width: u32,
    height: u32,
}

#[derive(serde::Deserialize)]
struct CocoAnnotation {
    image_id: u64,
    category_id: u64,
    bbox: [f64; 4],
}

#[derive(serde::Deserialize)]
struct CocoCategory {
    id: u64,
    name: String,
}

/// Read `dir/annotations_coco.json` and check it against `dir/images/`. Annotations for
/// missing images or unknown categories, boxes with no area and boxes wholly outside their
/// image are skipped; boxes crossing the image edge are clipped. Each is named in `skipped`.
pub fn load(dir: &Path) -> Result<Dataset, CocoError> {
    let path = dir.join("annotations_coco.json");
    let text = std::fs::read_to_string(&path).map_err(|source| CocoError::Unreadable {
        path: path.clone(),
        reason: source,
    })?;
    let file: CocoFile = serde_json::from_str(&text).map_err(|e| CocoError::Malformed {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let mut skipped = Vec::new();
    let mut images = Vec::new();
    for image in &file.images {
        let image_path = dir.join("images").join(&image.file_name);
        if image_path.is_file() {
            images.push(Image {
                id: image.id,
                path: image_path,
                width: image.width,
                height: image.height,
            });
        } else {
            skipped.push(format!("{}: image file missing", image_path.display()));
        }
    }
    if images.is_empty() {
        return Err(CocoError::NoImages {
            path: dir.to_path_buf(),
            listed: file.images.len(),
        });
    }
    images.sort_by_key(|i| i.id);
    let categories: Vec<(u64, String)> = file
        .categories
        .iter()
        .map(|c| (c.id, c.name.clone()))
        .collect();
    let mut truths = Vec::new();
    for (n, a) in file.annotations.iter().enumerate() {
        let what = |reason: &str| format!("annotation {n} (image {}): {reason}", a.image_id);
        let Some(image) = images.iter().find(|i| i.id == a.image_id) else {
            skipped.push(what("its image is missing"));
            continue;
        };
        if !categories.iter().any(|(id, _)| *id == a.category_id) {
            skipped.push(what(&format!("unknown category {}", a.category_id)));
            continue;
        }
        let [x, y, w, h] = a.bbox;
        let (x1, y1) = (x.max(0.0), y.max(0.0));
        let (x2, y2) = (
            (x + w).min(f64::from(image.width)),
            (y + h).min(f64::from(image.height)),
        );
        if !(w > 0.0 && h > 0.0) {
            skipped.push(what("box has no area"));
            continue;
        }
        if x2 <= x1 || y2 <= y1 {
            skipped.push(what("box lies outside its image"));
            continue;
        }
        if (x1, y1, x2, y2) != (x, y, x + w, y + h) {
            skipped.push(what("box crosses the image edge: clipped"));
        }
        truths.push(Truth {
            image: a.image_id,
            category: a.category_id,
            bbox: [x1, y1, x2 - x1, y2 - y1],
        });
    }
    Ok(Dataset {
        images,
        categories,
        truths,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kestrel's numbers against pycocotools' on a fixture with misses, duplicates, wrong
    /// classes, false alarms, tied scores and a category without ground truth
    /// (`tests/data/coco/make_fixture.py` wrote the files and pycocotools' results).
    #[test]
    fn matches_pycocotools_on_the_fixture() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/coco");
        let read = |name: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
        };
        let bbox = |v: &serde_json::Value| -> [f64; 4] {
            core::array::from_fn(|i| v["bbox"][i].as_f64().unwrap())
        };
        let ground_truth = read("ground_truth.json");
        let truths: Vec<Truth> = ground_truth["annotations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| Truth {
                image: a["image_id"].as_u64().unwrap(),
                category: a["category_id"].as_u64().unwrap(),
                bbox: bbox(a),
            })
            .collect();
        let detections: Vec<Scored> = read("detections.json")
            .as_array()
            .unwrap()
            .iter()
            .map(|d| Scored {
                image: d["image_id"].as_u64().unwrap(),
                category: d["category_id"].as_u64().unwrap(),
                bbox: bbox(d),
                score: d["score"].as_f64().unwrap(),
            })
            .collect();
        let categories: Vec<u64> = ground_truth["categories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_u64().unwrap())
            .collect();
        let expected = read("expected.json");
        let summary = evaluate(&truths, &detections, &categories);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(
            close(summary.map50, expected["map50"].as_f64().unwrap()),
            "{summary:?}"
        );
        assert!(
            close(summary.map50_95, expected["map50_95"].as_f64().unwrap()),
            "{summary:?}"
        );
        for (category, ap) in &summary.per_category_ap50 {
            let want = expected["per_category_ap50"][category.to_string()]
                .as_f64()
                .unwrap();
            match ap {
                Some(ap) => assert!(close(*ap, want), "category {category}: {ap} vs {want}"),
                None => assert_eq!(want, -1.0, "category {category} has no ground truth"),
            }
        }
    }

    #[test]
    fn the_loader_names_every_bad_annotation() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("images")).unwrap();
        std::fs::write(dir.path().join("images/a.jpg"), b"not decoded here").unwrap();
        let annotations = r#"{
            "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 50},
                       {"id": 2, "file_name": "gone.jpg", "width": 100, "height": 50}],
            "categories": [{"id": 1, "name": "ship"}],
            "annotations": [
                {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
                {"image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20]},
                {"image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 20]},
                {"image_id": 1, "category_id": 1, "bbox": [200, 10, 20, 20]},
                {"image_id": 1, "category_id": 1, "bbox": [90, 40, 20, 20]},
                {"image_id": 2, "category_id": 1, "bbox": [10, 10, 20, 20]}
            ]}"#;
        std::fs::write(dir.path().join("annotations_coco.json"), annotations).unwrap();
        let data = load(dir.path()).unwrap();
        assert_eq!(data.images.len(), 1);
        assert_eq!(data.truths.len(), 2);
        assert_eq!(
            data.truths[1].bbox,
            [90.0, 40.0, 10.0, 10.0],
            "clipped to the image"
        );
        let reasons = data.skipped.join("\n");
        for expected in [
            "gone.jpg: image file missing",
            "unknown category 7",
            "box has no area",
            "box lies outside its image",
            "box crosses the image edge: clipped",
            "annotation 5 (image 2): its image is missing",
        ] {
            assert!(reasons.contains(expected), "{expected} not in:\n{reasons}");
        }

        std::fs::write(dir.path().join("annotations_coco.json"), "{").unwrap();
        assert!(matches!(load(dir.path()), Err(CocoError::Malformed { .. })));
        assert!(matches!(
            load(&dir.path().join("nowhere")),
            Err(CocoError::Unreadable { .. })
        ));
    }

    #[test]
    fn perfect_and_empty_detections() {
        let truth = Truth {
            image: 1,
            category: 1,
            bbox: [10.0, 10.0, 20.0, 20.0],
        };
        let exact = Scored {
            image: 1,
            category: 1,
            bbox: truth.bbox,
            score: 0.9,
        };
        let summary = evaluate(&[truth], &[exact], &[1]);
        // pycocotools adds machine epsilon to the precision's denominator, so not quite 1.
        assert!(1.0 - summary.map50 < 1e-12 && 1.0 - summary.map50_95 < 1e-12);
        let summary = evaluate(&[truth], &[], &[1]);
        assert_eq!((summary.map50, summary.map50_95), (0.0, 0.0));
    }
}
