//! Labelled chip folders: one sub-folder per class, named exactly as the model's label.

use std::path::{Path, PathBuf};

/// Which part of a dataset to use. The split is a pure function of the file name (FNV-1a 64-bit
/// hash, divisible by 5 means validation), the same rule the training scripts use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Every image.
    All,
    /// About 80%: the images training may see.
    Train,
    /// About 20%: the held-out validation images.
    Validation,
}

impl Split {
    /// Whether the file called `file_name` (no directories) belongs to this split.
    pub fn contains(self, file_name: &str) -> bool {
        let validation = fnv1a64(file_name.as_bytes()).is_multiple_of(5);
        match self {
            Self::All => true,
            Self::Train => !validation,
            Self::Validation => validation,
        }
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One image and the index of its class in the model's labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelledImage {
    /// The file.
    pub path: PathBuf,
    /// Index into the label list.
    pub label: usize,
}

/// Why a dataset folder cannot be used at all.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The path, or a class folder in it, cannot be read.
    #[error("{}: cannot read: {reason}", path.display())]
    Unreadable {
        /// The folder.
        path: PathBuf,
        /// The I/O error (in the message, not the error's source: printed once).
        reason: std::io::Error,
    },
    /// A class folder whose name is not one of the model's labels.
    #[error("{}: class folder '{name}' is not a label of this model (labels: {labels})", path.display())]
    UnknownClass {
        /// The folder.
        path: PathBuf,
        /// Its name.
        name: String,
        /// The model's labels, comma-separated.
        labels: String,
    },
    /// No images were found (in this split).
    #[error("{}: no images found{detail}", path.display())]
    Empty {
        /// The dataset folder.
        path: PathBuf,
        /// Which split was asked for, if not all.
        detail: String,
    },
}

const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "tif", "tiff"];

fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        IMAGE_EXTENSIONS
            .iter()
            .any(|known| e.eq_ignore_ascii_case(known))
    })
}

fn list(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let unreadable = |source| DatasetError::Unreadable {
        path: dir.to_path_buf(),
        reason: source,
    };
    let mut entries = std::fs::read_dir(dir)
        .map_err(unreadable)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(unreadable)?;
    entries.sort();
    Ok(entries)
}

/// List the images of `dir/<label>/*` in `split`, sorted by class folder then file name.
/// Files directly in `dir` (a README, say) and files in class folders without an image
/// extension are ignored; undecodable images are listed and fail later, one by one.
pub fn scan_labelled(
    dir: &Path,
    labels: &[String],
    split: Split,
) -> Result<Vec<LabelledImage>, DatasetError> {
    let mut images = Vec::new();
    for class_dir in list(dir)?.into_iter().filter(|p| p.is_dir()) {
        let name = class_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let label =
            labels
                .iter()
                .position(|l| *l == name)
                .ok_or_else(|| DatasetError::UnknownClass {
                    path: class_dir.clone(),
                    name,
                    labels: labels.join(", "),
                })?;
        for path in list(&class_dir)? {
            let in_split = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| split.contains(n));
            if path.is_file() && is_image(&path) && in_split {
                images.push(LabelledImage { path, label });
            }
        }
    }
    if images.is_empty() {
        let detail = match split {
            Split::All => String::new(),
            other => format!(" in the {other:?} split"),
        };
        return Err(DatasetError::Empty {
            path: dir.to_path_buf(),
            detail,
        });
    }
    Ok(images)
}

/// The image files named by `path`: the file itself, or the images in a folder (not recursive).
pub fn list_images(path: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let images: Vec<PathBuf> = list(path)?
        .into_iter()
        .filter(|p| p.is_file() && is_image(p))
        .collect();
    if images.is_empty() {
        return Err(DatasetError::Empty {
            path: path.to_path_buf(),
            detail: String::new(),
        });
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_matches_the_training_script() {
        // Expected values printed by models/train/eurosat_train.py's fnv1a64 and is_validation.
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert!(Split::Validation.contains("AnnualCrop_1.jpg"));
        assert!(!Split::Train.contains("AnnualCrop_1.jpg"));
        for train in ["Forest_12.jpg", "River_7.jpg", "SeaLake_100.jpg"] {
            assert!(
                Split::Train.contains(train) && !Split::Validation.contains(train),
                "{train}"
            );
        }
        assert!(Split::All.contains("anything.png"));
    }
}
