//! `sim replay`: a user's own images; large ones tiled, with a per-tile class map PNG.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use image::{GrayImage, Rgb, RgbImage};
use kestrel_eval::dataset::list_images;
use kestrel_hal::FrameGeometry;
use kestrel_host::{ScanOptions, SceneReader, SceneStrip};
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::preprocess::Region;
use kestrel_runtime::step::ClassifierStep;
use kestrel_runtime::tile::TileGrid;
use serde::Serialize;

use crate::draw::{colour, legend};
use crate::scene::{shrink_factor, Progress, Shrunk};
use crate::{load_model, ReplayArgs};
use kestrel_payload::downlink::Downlink;
use kestrel_wire::message::ProductKind;
use models::ZooModel;

/// One classified tile, as written to `<image>.tiles.json`.
#[derive(Serialize)]
struct TileResult<'a> {
    #[serde(flatten)]
    region: RegionJson,
    class: u16,
    label: &'a str,
    confidence: f32,
}

#[derive(Serialize)]
struct RegionJson {
    x: u32,
    y: u32,
    width: u32,
    height: u32,
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
        crate::detect::replay(args, files, &mut downlink)?
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
        let tiling = (tile, args.overlap.unwrap_or(0), model_side);
        let replayed = replay_image(path, &mut step, tiling, labels, args, want);
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
/// get as confident an answer as any chip). `None` where the image is close to the model's
/// scale.
fn scale_warning(
    path: &Path,
    (width, height): (u32, u32),
    tile: u32,
    model_side: u32,
) -> Option<String> {
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
    tiling: (u32, u32, u32),
    labels: &[String],
    args: &ReplayArgs,
    thumbnail: bool,
) -> anyhow::Result<(u64, GrayImage, f32, Option<RgbImage>)> {
    let (tile, overlap, model_side) = tiling;
    let started = Instant::now();
    let reader = SceneReader::open(path, &scan_options(args))?;
    let g = reader.geometry();
    if let Some(warning) = scale_warning(path, (g.width, g.height), tile, model_side) {
        eprintln!("warning: {warning}");
    }
    let grid = TileGrid::new(g.width, g.height, tile, tile, overlap)
        .with_context(|| path.display().to_string())?;
    let mut picture = Shrunk::new(g, shrink_factor(g.width, g.height, args.map_side));
    let mut strip = SceneStrip::new(reader);
    let json_path = output_path(&args.out, path, "tiles.json");
    let mut json = TilesJson::create(&json_path, path, g, tile, overlap)?;
    let mut tiles = Vec::with_capacity(grid.len());
    let mut progress = Progress::new(path.display().to_string(), grid.len());
    let columns = grid.columns() as usize;
    for row in 0..grid.rows() as usize {
        let Some(first) = grid.tile(row * columns) else {
            break;
        };
        strip.cover(first.y, first.height, |y, samples| {
            picture.push_row(y, samples)
        })?;
        let (resident, samples, top) = strip.resident();
        let view = FrameView::new(resident, samples).with_context(|| path.display().to_string())?;
        for region in (0..columns).filter_map(|column| grid.tile(row * columns + column)) {
            let local = Region {
                y: region.y - top,
                ..region
            };
            let c = step.classify(view, local).with_context(|| {
                format!("{}: tile at ({}, {})", path.display(), region.x, region.y)
            })?;
            let label = labels
                .get(usize::from(c.class()))
                .map_or("", String::as_str);
            let result = TileResult {
                region: RegionJson {
                    x: region.x,
                    y: region.y,
                    width: region.width,
                    height: region.height,
                },
                class: c.class(),
                label,
                confidence: c.confidence(),
            };
            json.tile(&result)?;
            tiles.push((region, c.class(), c.confidence()));
        }
        progress.update(tiles.len());
    }
    strip.finish(|y, samples| picture.push_row(y, samples))?;
    json.finish()?;

    let mut counts = vec![0usize; labels.len()];
    for &(_, class, _) in &tiles {
        if let Some(n) = counts.get_mut(usize::from(class)) {
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
    let factor = picture.factor();
    let picture = picture.into_image();
    let map_path = output_path(&args.out, path, "classmap.png");
    write_class_map(&picture, factor, &tiles, &shares, &map_path)?;
    let shrunk = if factor > 1 {
        format!(", drawn 1:{factor}")
    } else {
        String::new()
    };
    println!(
        "{}: {}x{}, {} tile(s) ({}x{}, {} px, overlap {}): share of tiles {} [{:.0} ms] -> {}{shrunk}",
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
    let mut map = GrayImage::new(grid.columns(), grid.rows());
    for (pixel, (_, class, _)) in map.pixels_mut().zip(&tiles) {
        pixel.0 = [(*class).min(255) as u8];
    }
    let worth = tiles.iter().map(|t| t.2).sum::<f32>() / tiles.len().max(1) as f32;
    let raw_bytes = u64::from(g.width) * u64::from(g.height) * u64::from(g.bands);
    Ok((raw_bytes, map, worth, thumbnail.then_some(picture)))
}

/// How replay reads image files: the bands and 16-bit stretch asked for.
pub fn scan_options(args: &ReplayArgs) -> ScanOptions {
    ScanOptions {
        bands: args
            .bands
            .as_ref()
            .map(|bands| bands.iter().map(|&b| usize::from(b) - 1).collect()),
        stretch: args.stretch,
    }
}

/// `<image>.tiles.json`, written as tiles are classified: nothing is lost to a failure late in
/// a long image, and memory does not grow with the results.
struct TilesJson {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    tiles: usize,
}

impl TilesJson {
    fn create(
        path: &Path,
        image: &Path,
        g: FrameGeometry,
        tile: u32,
        overlap: u32,
    ) -> anyhow::Result<Self> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        let mut json = Self {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(file),
            tiles: 0,
        };
        let image = serde_json::to_string(&image.display().to_string())?;
        json.write(&format!(
            "{{\n  \"image\": {image},\n  \"width\": {},\n  \"height\": {},\n  \"tile\": {tile},\n  \"overlap\": {overlap},\n  \"tiles\": [",
            g.width, g.height
        ))?;
        Ok(json)
    }

    fn tile(&mut self, tile: &TileResult) -> anyhow::Result<()> {
        let separator = if self.tiles == 0 { "" } else { "," };
        self.tiles += 1;
        let tile = serde_json::to_string(tile)?;
        self.write(&format!("{separator}\n    {tile}"))
    }

    fn finish(mut self) -> anyhow::Result<()> {
        self.write("\n  ]\n}\n")?;
        std::io::Write::flush(&mut self.file)
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }

    fn write(&mut self, text: &str) -> anyhow::Result<()> {
        std::io::Write::write_all(&mut self.file, text.as_bytes())
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

/// `<out>/<image stem>.<suffix>`.
pub fn output_path(out: &Path, image: &Path, suffix: &str) -> PathBuf {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    out.join(format!("{stem}.{suffix}"))
}

/// The picture (the image shrunk by `factor`) blended half and half with the class colour of
/// the tile covering each pixel (where tiles overlap, the later tile in row-major order wins).
fn write_class_map(
    picture: &RgbImage,
    factor: u32,
    tiles: &[(Region, u16, f32)],
    shares: &[(u16, &str, f64)],
    path: &Path,
) -> anyhow::Result<()> {
    let (width, height) = picture.dimensions();
    let w = width as usize;
    let mut owner = vec![None; w * height as usize];
    for &(region, class, _) in tiles {
        let x_end = (region.x + region.width).div_ceil(factor).min(width) as usize;
        let y_end = (region.y + region.height).div_ceil(factor).min(height) as usize;
        let x_start = (region.x / factor) as usize;
        for y in (region.y / factor) as usize..y_end {
            if let Some(cells) = owner.get_mut(y * w + x_start..y * w + x_end) {
                cells.fill(Some(class));
            }
        }
    }
    let map = RgbImage::from_fn(width, height, |x, y| {
        let pixel = picture.get_pixel(x, y).0;
        match owner[y as usize * w + x as usize] {
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
