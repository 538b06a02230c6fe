//! The `sim` binary end to end, on the committed sample and on broken inputs: each bad input
//! gets a one-line error naming the file and the reason, and either stops the job (non-zero
//! exit) or is counted while the run goes on.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sample/eurosat-rgb")
}

fn zoo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/zoo/eurosat-rgb")
}

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sim"))
        .args(args)
        .output()
        .expect("sim runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A dataset with `per_class` real sample chips of Forest and SeaLake.
fn small_dataset(per_class: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for class in ["Forest", "SeaLake"] {
        std::fs::create_dir(dir.path().join(class)).unwrap();
        let mut chips: Vec<_> = std::fs::read_dir(sample().join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        chips.sort();
        for chip in chips.iter().take(per_class) {
            std::fs::copy(chip, dir.path().join(class).join(chip.file_name().unwrap())).unwrap();
        }
    }
    dir
}

fn eval(dataset: &Path, model: &str, report_path: &Path) -> Output {
    let dataset = dataset.to_str().unwrap();
    sim(&[
        "eval",
        "--model",
        model,
        "--dataset",
        dataset,
        "--report",
        report_path.to_str().unwrap(),
    ])
}

#[test]
fn default_run_replays_the_sample_accurately() {
    let out = sim(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("top-1"))
        .expect("summary has a top-1 line");
    let top1: f64 = line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches('%')
        .parse()
        .unwrap();
    assert!(
        top1 >= 93.0,
        "top-1 on the 300 held-out sample chips fell to {top1}%"
    );
    assert!(
        stdout.contains("frames      300 (300 classified, 0 dropped, 0 errors)"),
        "{stdout}"
    );
    assert!(stdout.contains("latency     p50"), "{stdout}");
    // Then the detection pass over the committed scenes.
    assert!(
        stdout.contains("frames      7 (38 tiles of 512x512, 0 failed), 61 objects"),
        "{stdout}"
    );
    let map = stdout
        .lines()
        .find(|l| l.starts_with("mAP"))
        .expect("detection summary has an mAP line");
    let map50: f64 = map.split_whitespace().nth(1).unwrap().parse().unwrap();
    // Measured 0.78 with the committed detector.
    assert!(map50 >= 0.6, "{map}");
}

#[test]
fn eval_report_has_the_promised_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.json");
    let out = eval(&sample(), "eurosat-rgb", &path);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = report(&path);
    assert_eq!(r["images"], 300);
    assert_eq!(r["backend"], "int8-cpu", "the built-in model has a plan");
    let load_ms = r["plan_load_ms"].as_f64().unwrap();
    assert!(load_ms > 0.0, "plan_load_ms {load_ms}");
    assert_eq!(r["model"], "eurosat-rgb");
    let top1 = r["top1"].as_f64().unwrap();
    assert!(top1 >= 0.93, "top-1 {top1}");
    let confusion = r["confusion"].as_array().unwrap();
    assert_eq!(confusion.len(), 10);
    let total: u64 = confusion
        .iter()
        .flat_map(|row| row.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 300);
    let diagonal: u64 = (0..10).map(|i| confusion[i][i].as_u64().unwrap()).sum();
    assert!(
        (diagonal as f64 / 300.0 - top1).abs() < 1e-9,
        "top-1 agrees with the confusion matrix"
    );
    for (class, recall) in r["per_class"].as_object().unwrap() {
        assert!(recall.as_f64().unwrap() >= 0.7, "{class} recall {recall}");
    }
    let (p50, p99) = (
        r["latency_us"]["p50"].as_u64().unwrap(),
        r["latency_us"]["p99"].as_u64().unwrap(),
    );
    assert!(p50 > 0 && p99 >= p50, "{p50} {p99}");
}

#[test]
fn missing_model_stops_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let out = eval(
        &sample(),
        "/nonexistent/model.onnx",
        &dir.path().join("r.json"),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/model.onnx: no such model"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn corrupt_model_file_stops_the_job() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        zoo().join("manifest.json"),
        dir.path().join("manifest.json"),
    )
    .unwrap();
    let mut onnx = std::fs::read(zoo().join("model.onnx")).unwrap();
    onnx.truncate(onnx.len() / 2);
    std::fs::write(dir.path().join("model.onnx"), &onnx).unwrap();
    let model = dir.path().to_str().unwrap().to_string();
    let out = eval(&sample(), &model, &dir.path().join("r.json"));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("model.onnx: sha256") && err.contains("corrupt or replaced"),
        "{err}"
    );

    // Same truncated bytes with a manifest that vouches for them: tract must refuse them cleanly.
    let manifest = std::fs::read_to_string(dir.path().join("manifest.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let old = v["onnx_sha256"].as_str().unwrap();
    let new: String = Sha256::digest(&onnx)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(
        dir.path().join("manifest.json"),
        manifest.replace(old, &new),
    )
    .unwrap();
    let out = eval(&sample(), &model, &dir.path().join("r.json"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("model.onnx: not a usable ONNX model"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        stderr(&out).trim().lines().count(),
        1,
        "one line: {}",
        stderr(&out)
    );
}

/// A model whose output does not fit its manifest (ten outputs, five labels) is refused at load
/// with one error naming the mismatch, not run frame by frame into errors.
#[test]
fn a_model_that_does_not_fit_its_manifest_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(zoo().join("model.onnx"), dir.path().join("model.onnx")).unwrap();
    let manifest = std::fs::read_to_string(zoo().join("manifest.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    v["labels"].as_array_mut().unwrap().truncate(5);
    std::fs::write(dir.path().join("manifest.json"), v.to_string()).unwrap();
    let report = dir.path().join("r.json");
    let out = sim(&[
        "eval",
        "--dataset",
        sample().to_str().unwrap(),
        "--model",
        dir.path().to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("the model gives 10 output values, but its manifest lists 5 classes"),
        "{err}"
    );
    assert!(!report.exists(), "nothing was run");
}

#[test]
fn corrupt_images_and_wrong_band_counts_are_counted_and_the_run_goes_on() {
    let data = small_dataset(3);
    let forest = data.path().join("Forest");
    let jpeg = std::fs::read(forest.read_dir().unwrap().next().unwrap().unwrap().path()).unwrap();
    // Cut inside the headers: decoders fill a truncated scan with grey, but not missing tables.
    std::fs::write(forest.join("truncated.jpg"), &jpeg[..100]).unwrap();
    std::fs::write(
        data.path().join("SeaLake/garbage.png"),
        b"\x89PNG\r\n\x1a\nnot really a png",
    )
    .unwrap();
    image::GrayImage::from_pixel(64, 64, image::Luma([90]))
        .save(data.path().join("SeaLake/grey.png"))
        .unwrap();
    image::RgbaImage::from_pixel(64, 64, image::Rgba([9, 9, 9, 255]))
        .save(forest.join("rgba.png"))
        .unwrap();

    let path = data.path().join("report.json");
    let out = eval(data.path(), "eurosat-rgb", &path);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = report(&path);
    assert_eq!(r["images"], 10);
    assert_eq!(r["classified"], 6);
    assert_eq!(r["errors"]["source"], 2);
    assert_eq!(r["errors"]["frame"], 2);
    let err = stderr(&out);
    for expected in [
        "truncated.jpg: cannot decode image",
        "garbage.png: cannot decode image",
        "grey.png: image has 1 band(s), the model takes 3",
        "rgba.png: image has 4 band(s), the model takes 3",
    ] {
        assert!(err.contains(expected), "missing '{expected}' in:\n{err}");
    }
    let failures = r["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 4);
}

#[test]
fn unusable_datasets_stop_the_job_with_a_reason() {
    let empty = tempfile::tempdir().unwrap();
    let r = empty.path().join("r.json");
    let out = eval(empty.path(), "eurosat-rgb", &r);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(": no images found"),
        "{}",
        stderr(&out)
    );

    let unknown = small_dataset(1);
    std::fs::create_dir(unknown.path().join("Desert")).unwrap();
    let out = eval(unknown.path(), "eurosat-rgb", &r);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("class folder 'Desert' is not a label of this model"),
        "{}",
        stderr(&out)
    );

    let out = eval(Path::new("/nonexistent/dataset"), "eurosat-rgb", &r);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/dataset: cannot read"),
        "{}",
        stderr(&out)
    );
    assert!(
        !r.exists(),
        "no report is written for a job that could not run"
    );
}

#[test]
fn replay_tiles_a_large_scene_into_a_class_map() {
    // A 2000 x 2000 scene: real Forest chips on the left, SeaLake chips on the right.
    let chips = |class: &str| -> Vec<image::RgbImage> {
        let mut paths: Vec<_> = std::fs::read_dir(sample().join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|p| {
                let chip = kestrel_host::decode_image(p).unwrap();
                image::RgbImage::from_raw(64, 64, chip.samples).unwrap()
            })
            .collect()
    };
    let (forest, sea) = (chips("Forest"), chips("SeaLake"));
    let mut scene = image::RgbImage::new(2000, 2000);
    for (i, (cx, cy)) in (0..32u32)
        .flat_map(|y| (0..32u32).map(move |x| (x, y)))
        .enumerate()
    {
        let chip = if cx < 16 {
            &forest[i % forest.len()]
        } else {
            &sea[i % sea.len()]
        };
        image::imageops::replace(&mut scene, chip, i64::from(cx * 64), i64::from(cy * 64));
    }
    let dir = tempfile::tempdir().unwrap();
    let scene_path = dir.path().join("scene.png");
    scene.save(&scene_path).unwrap();
    let out_dir = dir.path().join("out");
    let out = sim(&[
        "replay",
        "--images",
        scene_path.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("scene.png: 2000x2000, 1024 tile(s) (32x32, 64 px, overlap 0)"),
        "{stdout}"
    );
    // The map is the scene's size, with the legend as a panel below it: two classes, two lines.
    let map = image::open(out_dir.join("scene.classmap.png")).unwrap();
    assert_eq!(map.width(), 2000);
    assert!(map.height() > 2000, "no legend panel: {}", map.height());
    let mix = stdout.split("share of tiles ").nth(1).unwrap_or_default();
    assert!(
        mix.contains("Forest") && mix.contains("SeaLake"),
        "{stdout}"
    );

    let tiles: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("scene.tiles.json")).unwrap())
            .unwrap();
    let tiles = tiles["tiles"].as_array().unwrap();
    assert_eq!(tiles.len(), 1024);
    // Tiles that sit exactly on one chip (all but the last, shifted column and row).
    let (mut right, mut total) = (0, 0);
    for t in tiles {
        let (x, y) = (t["x"].as_u64().unwrap(), t["y"].as_u64().unwrap());
        if x + 64 > 1984 || y + 64 > 1984 {
            continue;
        }
        let expected = if x < 1024 { "Forest" } else { "SeaLake" };
        total += 1;
        right += usize::from(t["label"] == expected);
    }
    assert_eq!(total, 31 * 31);
    assert!(
        right as f64 / total as f64 >= 0.9,
        "{right}/{total} tiles right"
    );

    // Drawn shrunk to fit 500 pixels (1:4), read a band of rows at a time either way: the same
    // tiles, the same answers; progress on stderr is for long images only.
    let shrunk_dir = dir.path().join("shrunk");
    let out = sim(&[
        "replay",
        "--images",
        scene_path.to_str().unwrap(),
        "--out",
        shrunk_dir.to_str().unwrap(),
        "--map-side",
        "500",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("drawn 1:4"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let map = image::open(shrunk_dir.join("scene.classmap.png")).unwrap();
    assert_eq!(map.width(), 500);
    let read = |dir: &Path| std::fs::read_to_string(dir.join("scene.tiles.json")).unwrap();
    assert_eq!(read(&out_dir), read(&shrunk_dir));
}

/// A 13-band, 16-bit Sentinel-2 GeoTIFF through the RGB model: bands picked and stretched to
/// 8 bits as EuroSAT's RGB chips were made; refused, with the reason, without a stretch or with
/// a band it does not have.
#[test]
fn replay_takes_a_multispectral_geotiff_by_band() {
    let dir = tempfile::tempdir().unwrap();
    let tif = sample().join("../eurosat-ms/AnnualCrop_1.tif");
    let replay = |extra: &[&str]| {
        let mut args = vec!["replay", "--images", tif.to_str().unwrap()];
        args.extend(["--out", dir.path().to_str().unwrap()]);
        args.extend(extra);
        sim(&args)
    };
    let out = replay(&["--bands", "4,3,2", "--stretch", "2750"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tiles: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("AnnualCrop_1.tiles.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tiles["tiles"][0]["label"], "AnnualCrop", "{tiles}");

    let out = replay(&["--bands", "4,3,2"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("16-bit samples"), "{}", stderr(&out));
    let out = replay(&["--bands", "4,3,14", "--stretch", "2750"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("band 14 asked for, but the image has 13"),
        "{}",
        stderr(&out)
    );
    // All 13 bands into a 3-band model: the frame does not fit, said as such.
    let out = replay(&["--stretch", "2750"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("image has 13 band(s), the model takes 3"),
        "{}",
        stderr(&out)
    );
}

/// Arguments that cannot work are refused before any work, each with its reason: a tile of 0,
/// an overlap as large as the tile, tiling options for a detector, a report where no file can
/// be written. A run that fails at the model leaves no empty output folder behind.
#[test]
fn bad_arguments_are_refused_up_front_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let images = sample().join("Forest");
    let replay = |extra: &[&str]| {
        let mut args = vec!["replay", "--images", images.to_str().unwrap()];
        args.extend(["--out", out_dir.to_str().unwrap()]);
        args.extend(extra);
        sim(&args)
    };
    for (extra, reason) in [
        (
            &["--tile", "0"][..],
            "invalid value '0' for '--tile <TILE>'",
        ),
        (
            &["--overlap", "64"][..],
            "--overlap 64 must be less than the tile (64 px)",
        ),
        (
            &["--model", "nwpu-vhr10", "--tile", "512"][..],
            "--tile and --overlap are for classifiers",
        ),
    ] {
        let out = replay(extra);
        assert!(!out.status.success(), "{extra:?}");
        assert!(stderr(&out).contains(reason), "{extra:?}: {}", stderr(&out));
        assert!(!out_dir.exists(), "{extra:?} left {}", out_dir.display());
    }

    // A model folder whose plan is broken: refused once, with no folder left behind.
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for file in ["manifest.json", "model.onnx"] {
        std::fs::copy(zoo().join(file), model.join(file)).unwrap();
    }
    std::fs::write(model.join("model.plan"), [7u8; 4096]).unwrap();
    let out = replay(&["--model", model.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.matches("bad magic").count(), 1, "{err}");
    assert!(
        !out_dir.exists(),
        "a failed load left {}",
        out_dir.display()
    );

    // `run` replays a classifier over labelled chips, and says so when given a detector.
    let out = sim(&["run", "--model", "nwpu-vhr10"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nwpu-vhr10 is a detector") && stderr(&out).contains("sim eval"),
        "{}",
        stderr(&out)
    );

    // A report nobody can write is found before the evaluation, not after it.
    let unwritable = dir.path().join("missing/folder/report.json");
    let out = eval(&sample(), "eurosat-rgb", &unwritable);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("report.json: cannot write there"),
        "{}",
        stderr(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("top-1"),
        "the evaluation ran first: {stdout}"
    );
}

/// An image smaller than the model's input, or tiles far from its size, are run but warned
/// about: the answers would otherwise look as confident as any other. A chip at the model's
/// own size is not.
#[test]
fn replay_warns_when_tiles_are_far_from_the_models_scale() {
    let dir = tempfile::tempdir().unwrap();
    let chip = kestrel_host::decode_image(&sample().join("Forest/Forest_10.jpg")).unwrap();
    let chip = image::RgbImage::from_raw(64, 64, chip.samples).unwrap();
    let tiny = dir.path().join("tiny.png");
    image::imageops::crop_imm(&chip, 0, 0, 8, 8)
        .to_image()
        .save(&tiny)
        .unwrap();
    let out_dir = dir.path().join("out");
    let replay = |images: &Path, extra: &[&str]| {
        let mut args = vec!["replay", "--images", images.to_str().unwrap()];
        args.extend(["--out", out_dir.to_str().unwrap()]);
        args.extend(extra);
        sim(&args)
    };
    let out = replay(&tiny, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("tiny.png: 8x8, tiles of 8 px upscaled 8.0x"),
        "{}",
        stderr(&out)
    );
    let scene = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample/nwpu-vhr10/images/017.jpg");
    for (tile, change) in [("256", "shrunk 4.0x"), ("16", "upscaled 4.0x")] {
        let out = replay(&scene, &["--tile", tile]);
        assert!(out.status.success(), "{}", stderr(&out));
        let expected = format!("017.jpg: 1020x630, tiles of {tile} px {change}");
        assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
    }
    // A chip at the model's size, even with a larger --tile (it is one tile of itself).
    for extra in [&[][..], &["--tile", "256"][..]] {
        let out = replay(&sample().join("Forest/Forest_10.jpg"), extra);
        assert!(
            !stderr(&out).contains("warning"),
            "{extra:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn replay_of_an_unreadable_or_grey_image_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = sim(&["replay", "--images", "/nonexistent/scene.png"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/scene.png: cannot read"),
        "{}",
        stderr(&out)
    );
    let grey = dir.path().join("grey.png");
    image::GrayImage::new(300, 200).save(&grey).unwrap();
    let out = sim(&[
        "replay",
        "--images",
        grey.to_str().unwrap(),
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("grey.png: tile at (0, 0): image has 1 band(s), the model takes 3"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn tract_is_chosen_on_request_and_a_missing_plan_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.json");
    let dataset = sample();
    let out = sim(&[
        "eval",
        "--backend",
        "tract",
        "--dataset",
        dataset.to_str().unwrap(),
        "--report",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = report(&path);
    assert_eq!(r["backend"], "tract");
    assert!(r["plan_load_ms"].is_null());

    let no_plan = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/ops");
    let out = sim(&[
        "run",
        "--model",
        no_plan.to_str().unwrap(),
        "--backend",
        "int8-cpu",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("has no compiled plan"),
        "{}",
        stderr(&out)
    );
}

/// `--backend cuda` where there is no usable GPU (CI, this test): a warning naming the reason,
/// then the same evaluation on the CPU executor, reported as such.
#[test]
fn cuda_backend_without_a_gpu_falls_back_to_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.json");
    let out = sim(&[
        "eval",
        "--model",
        "eurosat-rgb",
        "--backend",
        "cuda",
        "--dataset",
        sample().to_str().unwrap(),
        "--report",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    let r = report(&path);
    assert_eq!(r["backend_requested"], "cuda");
    if err.contains("CUDA is not available") {
        assert!(err.contains("running int8-cpu instead"), "{err}");
        assert_eq!(r["backend"], "int8-cpu");
        // The report keeps what was asked for and why it did not run.
        let why = r["backend_fallback"].as_str().unwrap_or_default();
        assert!(why.starts_with("cuda not available: "), "{r}");
        // --require-backend makes the same run an error before any image.
        let out = sim(&[
            "eval",
            "--model",
            "eurosat-rgb",
            "--backend",
            "cuda",
            "--require-backend",
            "--dataset",
            sample().to_str().unwrap(),
            "--report",
            dir.path().join("required.json").to_str().unwrap(),
        ]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("--backend cuda cannot run here")
                && stderr(&out).contains("--require-backend"),
            "{}",
            stderr(&out)
        );
    } else {
        // A machine with a GPU and a CUDA build.
        assert_eq!(r["backend"], "cuda");
        assert!(r["backend_fallback"].is_null(), "{r}");
    }
    assert_eq!(r["images"], 300);
}
