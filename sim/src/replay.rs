//! `sim replay`: a user's own images; large ones tiled, with a per-tile class map PNG.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use image::{GrayImage, Rgb, RgbImage};
use kestrel_eval::dataset::list_images;
use kestrel_host::{decode_image, DecodedImage};
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::step::ClassifierStep;
use kestrel_runtime::tile::TileGrid;
use serde::Serialize;

use crate::draw::{colour, legend};
use crate::{load_model, ReplayArgs};
use kestrel_payload::downlink::Downlink;
use kestrel_wire::message::ProductKind;
use models::ZooModel;

/// One classified tile, as written to `<image>.tiles.json`.
#[derive(Serialize)]
struct TileResult {
    #[serde(flatten)]
    region: RegionJson,
    class: u16,
    label: String,
    confidence: f32,
}

#[derive(Serialize)]
struct RegionJson {
    x: u32,
    y: u32,
    width: u32,
    height: u32,
}

#[derive(Serialize)]
struct TilesReport<'a> {
    image: String,
    width: u32,
    height: u32,
    tile: u32,
    overlap: u32,
    tiles: &'a [TileResult],
}

pub fn run(args: &ReplayArgs) -> anyhow::Result<()> {
    let files = list_images(&args.images)?;
    let model = ZooModel::load(&args.model.model)?;
    check_tiling(args, &model)?;
    // A folder this run makes is removed again if the run fails before writing to it.
    let created = !args.out.exists();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create folder", args.out.display()))?;
    let replayed = replay_files(args, &files, &model);
    if replayed.is_err() && created {
        // `remove_dir` removes only an empty folder: nothing the run wrote is lost.
        let _ = std::fs::remove_dir(&args.out);
    }
    replayed
}

/// Refuse tiling options that cannot apply: `--tile`/`--overlap` on a detector (which tiles as
/// its manifest says), an overlap not smaller than the tile.
fn check_tiling(args: &ReplayArgs, model: &ZooModel) -> anyhow::Result<()> {
    if model.manifest.task == "detect" {
        if args.tile.is_some() || args.overlap.is_some() {
            bail!(
                "--tile and --overlap are for classifiers: the detector {} tiles as its manifest says",
                model.manifest.name
            );
        }
        return Ok(());
    }
    let tile = match args.tile {
        Some(tile) => tile,
        None => model.preprocess_spec()?.width() as u32,
    };
    let overlap = args.overlap.unwrap_or(0);
    if overlap >= tile {
        bail!("--overlap {overlap} must be less than the tile ({tile} px)");
    }
    Ok(())
}

/// Replay `files` through `model` into the output folder, and print the summary.
fn replay_files(args: &ReplayArgs, files: &[PathBuf], model: &ZooModel) -> anyhow::Result<()> {
    let mut downlink = Downlink::new(&args.downlink, &model.manifest.labels)?;
    let started = Instant::now();
    let failed = if model.manifest.task == "detect" {
        crate::detect::replay(&args.model, files, &args.out, &mut downlink)?
    } else {
        classify_images(args, files, &mut downlink)?
    };
    println!(
        "{} image(s) replayed, {failed} failed",
        files.len() - failed
    );
    let health = kestrel_wire::message::Health {
        uptime_us: started.elapsed().as_micros() as u64,
        frames_in: files.len() as u64,
        frames_done: (files.len() - failed) as u64,
        errors: [0, failed as u64, 0, 0, 0, 0],
        ..Default::default()
    };
    kestrel_payload::downlink::print_summary(&downlink.finish(health));
    if failed == files.len() {
        bail!("{}: no image could be replayed", args.images.display());
    }
    Ok(())
}

/// Classify each image's tiles; returns how many images failed.
fn classify_images(
    args: &ReplayArgs,
    files: &[PathBuf],
    downlink: &mut Downlink,
) -> anyhow::Result<usize> {
    let crate::LoadedModel {
        model,
        backend,
        switch,
        ..
    } = load_model(&args.model)?;
    let slots = crate::model_slots(&args.model, &args.downlink.slots, &model)?;
    downlink.listen_for_commands(slots, switch, &[ProductKind::Thumbnail])?;
    let controls = downlink.controls();
    let labels = &model.manifest.labels;
    let spec = model.preprocess_spec()?;
    let tile = args.tile.unwrap_or(spec.width() as u32);
    let model_side = spec.width().max(spec.height()) as u32;
    let mut input = vec![0.0; spec.input_len()];
    let mut output = vec![0.0; backend.output_len()];
    let mut step = ClassifierStep::new(backend, spec, &mut input, &mut output)?;
    println!("legend: {}", legend(labels));

    let mut failed = 0;
    for (frame, path) in files.iter().enumerate() {
        controls.wait_while_paused();
        let frame = frame as u64;
        let want = downlink.wants(frame, ProductKind::Thumbnail);
        let overlap = args.overlap.unwrap_or(0);
        if let Some(warning) = scale_warning(path, tile, model_side) {
            eprintln!("warning: {warning}");
        }
        let replayed = replay_image(path, &mut step, tile, overlap, labels, &args.out, want);
        match replayed {
            Ok((raw_bytes, map, worth, thumbnail)) => {
                downlink.frame_in(raw_bytes);
                downlink.class_map(frame, &map, worth);
                if let Some(thumbnail) = thumbnail {
                    downlink.thumbnail(frame, &thumbnail);
                }
            }
            Err(e) => {
                eprintln!("warning: {e:#}");
                failed += 1;
            }
        }
    }
    Ok(failed)
}

/// Why the model's answers on `path` deserve little trust, where its tiles (`tile` px, or the
/// whole image where that is smaller) are resized to the model's input (`model_side` px) by
/// more than 1.5x up or 2x down: it was not trained at that scale (a 1x1 image would otherwise
/// get as confident an answer as any chip). `None` where the image cannot be read (its own
/// error follows) or is close to the model's scale.
fn scale_warning(path: &Path, tile: u32, model_side: u32) -> Option<String> {
    let (width, height) = image::image_dimensions(path).ok()?;
    let side = tile.min(width).min(height).max(1);
    let (up, down) = (
        f64::from(model_side) / f64::from(side),
        f64::from(side) / f64::from(model_side),
    );
    let change = if up > 1.5 {
        format!("upscaled {up:.1}x")
    } else if down > 2.0 {
        format!("shrunk {down:.1}x")
    } else {
        return None;
    };
    Some(format!(
        "{}: {width}x{height}, tiles of {side} px {change} to the model's {model_side} px input: \
         it was not trained at that scale; treat its answers as unreliable",
        path.display()
    ))
}

fn replay_image<B: kestrel_backend::Backend>(
    path: &Path,
    step: &mut ClassifierStep<'_, B>,
    tile: u32,
    overlap: u32,
    labels: &[String],
    out: &Path,
    thumbnail: bool,
) -> anyhow::Result<(u64, GrayImage, f32, Option<RgbImage>)> {
    let started = Instant::now();
    let image = decode_image(path)?;
    let g = image.geometry;
    let view = FrameView::new(g, &image.samples).with_context(|| path.display().to_string())?;
    let grid = TileGrid::new(g.width, g.height, tile, tile, overlap)
        .with_context(|| path.display().to_string())?;
    let mut tiles = Vec::with_capacity(grid.len());
    for region in grid.iter() {
        let c = step
            .classify(view, region)
            .with_context(|| format!("{}: tile at ({}, {})", path.display(), region.x, region.y))?;
        let label = labels
            .get(usize::from(c.class()))
            .cloned()
            .unwrap_or_default();
        let region = RegionJson {
            x: region.x,
            y: region.y,
            width: region.width,
            height: region.height,
        };
        tiles.push(TileResult {
            region,
            class: c.class(),
            label,
            confidence: c.confidence(),
        });
    }
    let mut counts = vec![0usize; labels.len()];
    for t in &tiles {
        if let Some(n) = counts.get_mut(usize::from(t.class)) {
            *n += 1;
        }
    }
    let mut ranked: Vec<(usize, usize)> = counts
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, n)| *n > 0)
        .collect();
    ranked.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    let mix: Vec<String> = ranked
        .iter()
        .take(4)
        .map(|(class, n)| {
            format!(
                "{} {:.0}%",
                labels[*class],
                100.0 * *n as f64 / tiles.len() as f64
            )
        })
        .collect();
    let shares: Vec<(u16, &str, f64)> = ranked
        .iter()
        .filter_map(|&(class, n)| {
            let label = labels.get(class)?;
            Some((class as u16, label.as_str(), n as f64 / tiles.len() as f64))
        })
        .collect();
    let map_path = output_path(out, path, "classmap.png");
    write_class_map(&image, &tiles, &shares, &map_path)?;
    let json_path = output_path(out, path, "tiles.json");
    let report = TilesReport {
        image: path.display().to_string(),
        width: g.width,
        height: g.height,
        tile,
        overlap,
        tiles: &tiles,
    };
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("{}: cannot write", json_path.display()))?;
    println!(
        "{}: {}x{}, {} tile(s) ({}x{}, {} px, overlap {}): share of tiles {} [{:.0} ms] -> {}",
        path.display(),
        g.width,
        g.height,
        tiles.len(),
        grid.columns(),
        grid.rows(),
        tile,
        overlap,
        mix.join(", "),
        started.elapsed().as_secs_f64() * 1000.0,
        map_path.display()
    );
    // The class map product: one grey pixel per tile; worth the mean confidence.
    let mut map = GrayImage::new(grid.columns() as u32, grid.rows() as u32);
    for (pixel, t) in map.pixels_mut().zip(&tiles) {
        pixel.0 = [t.class.min(255) as u8];
    }
    let worth = tiles.iter().map(|t| t.confidence).sum::<f32>() / tiles.len().max(1) as f32;
    let rgb = thumbnail
        .then(|| kestrel_payload::downlink::rgb_image(&image.samples, g.width, g.height, g.bands));
    Ok((image.samples.len() as u64, map, worth, rgb))
}

/// `<out>/<image stem>.<suffix>`.
pub fn output_path(out: &Path, image: &Path, suffix: &str) -> PathBuf {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    out.join(format!("{stem}.{suffix}"))
}

/// The image blended half and half with the class colour of the tile covering each pixel
/// (where tiles overlap, the later tile in row-major order wins).
fn write_class_map(
    image: &DecodedImage,
    tiles: &[TileResult],
    shares: &[(u16, &str, f64)],
    path: &Path,
) -> anyhow::Result<()> {
    let (samples, g) = (&image.samples, image.geometry);
    let (width, height) = (g.width, g.height);
    let (w, bands) = (width as usize, usize::from(g.bands));
    let mut owner = vec![None; w * height as usize];
    for t in tiles {
        let x_end = (t.region.x + t.region.width).min(width) as usize;
        let y_end = (t.region.y + t.region.height).min(height) as usize;
        for y in t.region.y as usize..y_end {
            owner[y * w + t.region.x as usize..y * w + x_end].fill(Some(t.class));
        }
    }
    let map = RgbImage::from_fn(width, height, |x, y| {
        let i = y as usize * w + x as usize;
        let sample = |b: usize| {
            samples
                .get(i * bands + b.min(bands - 1))
                .copied()
                .unwrap_or(0)
        };
        let pixel = [sample(0), sample(1), sample(2)];
        match owner[i] {
            Some(class) => {
                let tint = colour(class);
                Rgb(core::array::from_fn(|c| {
                    ((u16::from(pixel[c]) + u16::from(tint[c])) / 2) as u8
                }))
            }
            None => Rgb(pixel),
        }
    });
    crate::draw::with_legend(&map, shares)
        .save(path)
        .with_context(|| format!("{}: cannot write class map", path.display()))
}
