//! Helpers shared by the integration tests in `tests/`.

use std::path::{Path, PathBuf};

use kestrel_backend::PreprocessSpec;
use kestrel_host::decode_image;
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::preprocess::{prepare_input, Region};

/// The entries of `dir`, sorted by path.
pub fn sorted_files(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
}

/// The image at `path`, whole, as the runtime prepares a model input from it.
pub fn whole_image_input(path: &Path, spec: &PreprocessSpec) -> Vec<f32> {
    let image = decode_image(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let g = image.geometry;
    let view = FrameView::new(g, &image.samples).unwrap();
    let mut input = vec![0.0; spec.input_len()];
    prepare_input(view, Region::whole(g.width, g.height), spec, &mut input).unwrap();
    input
}
