//! `sim`: replay real imagery through Kestrel on a desktop and score it.
//!
//! With no arguments it classifies the committed EuroSAT sample with the built-in model and
//! prints a summary. `sim eval` scores a labelled dataset and writes a JSON report; `sim replay`
//! runs a user's own images, tiling large ones, and writes per-tile class maps. `sim decode`
//! reads telemetry on the ground; `sim hil` drives a board running `kestrel-flight`.

mod decode;
mod detect;
mod draw;
mod eval;
mod faults;
mod hil;
mod replay;
mod scene;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use kestrel_backend::{Backend, BackendError};
use kestrel_cuda::{CudaBackend, CudaError, CudaOptions};
use kestrel_eval::Split;
use kestrel_payload::command::Slots;
use kestrel_payload::downlink::{slot_pairs, DownlinkArgs};
use kestrel_runtime::supervise::Factory;
use kestrel_runtime::switch::{SwitchHandle, SwitchableBackend};
use kestrel_runtime::threaded::DropPolicy;
use models::ZooModel;

#[derive(Parser)]
#[command(
    version,
    about = "Kestrel simulator: replay real imagery through the onboard runtime and score it",
    long_about = "Kestrel simulator: replay real imagery through the onboard runtime and score it.\n\n\
        With no subcommand it runs `sim run`: the committed EuroSAT sample (300 held-out chips) \
        through the host board, the threaded runtime and the best available backend, with the \
        built-in eurosat-rgb model, and prints top-1, latency, throughput, drops and errors. \
        Then a detection pass: the committed NWPU VHR-10 sample scenes through the built-in \
        nwpu-vhr10 detector, tiled, scored against their boxes (mAP) with latency per frame."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Replay a labelled chip folder through the threaded pipeline and print a summary
    /// (the default: the committed sample).
    Run(RunArgs),
    /// Score a model and write a JSON report: a classifier on a labelled folder (one
    /// sub-folder per class), a detector on a COCO folder (images/ and annotations_coco.json).
    Eval(EvalArgs),
    /// Run a model on your own images. A classifier tiles images larger than its input and
    /// writes a per-tile class map PNG; a detector writes the image with its boxes drawn.
    Replay(ReplayArgs),
    /// Decode telemetry on the ground: a capture file or a TCP sender, as JSON lines of every
    /// message and product, with sequence gaps, CRC failures, truncated packets and unknown ids
    /// counted at the end.
    Decode(decode::DecodeArgs),
    /// Hardware in the loop: stream a dataset's frames to a board running kestrel-flight
    /// (`--board tcp://HOST:PORT`, or `--spawn` one here) over the frame link, decode its
    /// telemetry, score the results as `eval` does, compare each with the same model run
    /// in-process, and report link statistics (sent, received, lost, late, round trip).
    Hil(hil::HilArgs),
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// A built-in model: eurosat-rgb (land-cover classifier, 64x64 chips) or nwpu-vhr10
    /// (object detector, tiled scenes); or a model folder, its model.onnx or its manifest.json
    /// (a manifest is needed beside the ONNX: see models/zoo/eurosat-rgb/manifest.json).
    #[arg(long, default_value = models::DEFAULT_MODEL)]
    model: String,
    /// Backend: `auto` runs the model's int8 plan when it has one, tract otherwise.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Make a --backend that cannot run here (cuda without a usable GPU) an error, rather than a
    /// warning and int8-cpu: for runs that must measure the backend they name.
    #[arg(long)]
    require_backend: bool,
}

impl ModelArgs {
    /// `model` on the backend `backend`, falling back where it cannot run.
    fn new(model: String, backend: BackendChoice) -> Self {
        Self {
            model,
            backend,
            require_backend: false,
        }
    }
}

/// Which backend a run asked for and, where it runs another, why: in every report.
#[derive(Clone, Debug, serde::Serialize)]
struct BackendUse {
    /// `--backend` as given.
    backend_requested: String,
    /// Why the backend running is not the one asked for (null when it is).
    backend_fallback: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendChoice {
    /// The best backend available for this model.
    Auto,
    /// Kestrel's int8 executor on the CPU (needs the model's compiled plan).
    Int8Cpu,
    /// tract, float32 on the CPU.
    Tract,
    /// Kestrel's int8 plan on an NVIDIA GPU (a build with `--features cuda-13000` or
    /// `cuda-12060`); without a usable GPU it says why and runs int8-cpu.
    Cuda,
}

#[derive(clap::Args, Clone)]
struct PipelineArgs {
    /// Frames that may wait for inference before the drop policy applies.
    #[arg(long, default_value_t = 4)]
    queue_depth: usize,
    /// What to do with a frame when the queue is full.
    #[arg(long, value_enum, default_value_t = DropArg::Block)]
    drop_policy: DropArg,
    /// Deliver frames at this rate, like a camera (frames per second); 0 = as fast as they decode.
    #[arg(long, default_value_t = 0.0)]
    frame_rate: f64,
    /// Inject faults: `all` (every fault at its default rate), a spec such as
    /// `corrupt=0.05,backend_error=0.01,seed=3`, or a TOML file of the same keys. Faults:
    /// corrupt, truncated, wrong_size, nan, dropout, timestamp, burst, backend_error,
    /// backend_hang, device_lost, upset_model, upset_activations (and link_bit_errors,
    /// link_loss, link_stall, command_bit_errors and stage_stall, which only `sim hil`
    /// injects); parameters: seed, burst_len, hang_ms, lost_ms, outage_ms, stall_ms,
    /// upset_bits. RELIABILITY.md lists each with its response.
    #[arg(long, value_name = "SPEC|FILE")]
    faults: Option<String>,
    /// Scrub the loaded model's memory against its CRCs every this many frames (0: never); a
    /// corrupt model is restored from its golden copy and the frames since the last clean
    /// scrub run again.
    #[arg(long, default_value_t = 32)]
    scrub_every: u32,
    /// Triple-modular redundancy: run the model three times per frame and vote on each
    /// output value, so that an upset in one run is outvoted (three times the inference).
    #[arg(long)]
    tmr: bool,
    /// With --tmr: vote only frames whose first run makes a high-priority product, a top class
    /// among these (comma-separated labels); the others run once.
    #[arg(
        long,
        value_delimiter = ',',
        requires = "tmr",
        value_name = "CLASS,..."
    )]
    tmr_classes: Vec<String>,
    /// With --faults or --tmr, the preferred backend runs on a supervised worker: an inference
    /// it does not answer within this many milliseconds is a hang, the frame runs on the
    /// fallback, and the backend is restarted on a new worker.
    #[arg(long, default_value_t = faults::DEADLINE.as_millis() as u64)]
    deadline_ms: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum DropArg {
    /// Wait for room (offline replay: nothing is dropped).
    Block,
    /// Drop the incoming frame.
    DropNewest,
    /// Drop the oldest queued frame (freshest data wins).
    DropOldest,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Labelled chip folder, one sub-folder per class [default: the committed sample].
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Which part of the dataset to replay.
    #[arg(long, value_enum, default_value_t = SplitArg::All)]
    split: SplitArg,
    #[command(flatten)]
    pipeline: PipelineArgs,
    #[command(flatten)]
    downlink: DownlinkArgs,
}

#[derive(clap::Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// What to score; it must be the model's task [default: the model's task].
    #[arg(long, value_enum)]
    task: Option<TaskArg>,
    /// classify: one sub-folder of images per class, named as the model's labels.
    /// detect: a COCO folder, `images/` and `annotations_coco.json`.
    #[arg(long)]
    dataset: PathBuf,
    /// detect: lowest score kept. mAP needs the whole ranking, so this is lower than the
    /// model's reporting threshold.
    #[arg(long, default_value_t = 0.05)]
    score_threshold: f32,
    /// Which part to score: `val` is the held-out split the training script never saw.
    #[arg(long, value_enum, default_value_t = SplitArg::All)]
    split: SplitArg,
    /// Write the JSON report here.
    #[arg(long)]
    report: PathBuf,
    #[command(flatten)]
    pipeline: PipelineArgs,
    #[command(flatten)]
    downlink: DownlinkArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TaskArg {
    /// Top-1 and per-class recall over class folders.
    Classify,
    /// COCO mAP over tiled frames.
    Detect,
}

#[derive(Clone, Copy, ValueEnum)]
enum SplitArg {
    /// Every image.
    All,
    /// The training split (about 80%).
    Train,
    /// The validation split (about 20%, file-name hash divisible by 5).
    Val,
}

#[derive(clap::Args)]
struct ReplayArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An image file (JPEG, PNG, or TIFF/GeoTIFF of 8 or 16 bits) or a folder of them. Images
    /// of any size are read a band of rows at a time: memory holds the rows one tile row
    /// needs, not the image.
    #[arg(long)]
    images: PathBuf,
    /// Classifiers: tile size in pixels [default: the model's input size]; tiles are resized to
    /// the input. A detector tiles as its manifest says.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    tile: Option<u32>,
    /// Classifiers: pixels shared by neighbouring tiles, less than the tile [default: 0].
    #[arg(long)]
    overlap: Option<u32>,
    /// Folder for the results, created if missing: a classifier's class maps
    /// (`<image>.classmap.png`) and per-tile results (`<image>.tiles.json`, written as tiles
    /// are classified), a detector's images with their boxes drawn (`<image>.boxes.png`) and
    /// detections (`<image>.detections.json`).
    #[arg(long, default_value = "sim-replay")]
    out: PathBuf,
    /// Longest side, in pixels, of the class maps and box pictures written: a larger image is
    /// drawn shrunk by a whole factor (each pixel the mean of its block). 0 draws at the
    /// image's full resolution, which holds a picture of the whole image in memory.
    #[arg(long, default_value_t = 2048)]
    map_side: u32,
    /// The image's bands to use, 1-based, in the model's band order: e.g. `4,3,2` for red,
    /// green and blue of a 13-band Sentinel-2 GeoTIFF [default: all, as stored].
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..))]
    bands: Option<Vec<u16>>,
    /// 16-bit images: the sample value that becomes 255 (linear from 0, larger values
    /// clamped), e.g. 2750 for Sentinel-2 L1C reflectance as EuroSAT scaled it; the models take
    /// 8-bit imagery.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    stretch: Option<u16>,
    #[command(flatten)]
    downlink: DownlinkArgs,
}

impl From<SplitArg> for Split {
    fn from(s: SplitArg) -> Self {
        match s {
            SplitArg::All => Split::All,
            SplitArg::Train => Split::Train,
            SplitArg::Val => Split::Validation,
        }
    }
}

impl From<DropArg> for DropPolicy {
    fn from(d: DropArg) -> Self {
        match d {
            DropArg::Block => DropPolicy::Block,
            DropArg::DropNewest => DropPolicy::DropNewest,
            DropArg::DropOldest => DropPolicy::DropOldest,
        }
    }
}

/// A committed sample (`eurosat-rgb`, `nwpu-vhr10`), found beside this crate's sources.
fn sample_dataset(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("sample")
        .join(name)
}

/// The default run: the classification sample, then the detection sample scenes.
fn default_run() -> anyhow::Result<()> {
    eval::run(eval::Options::sample(sample_dataset("eurosat-rgb")))?;
    println!();
    println!("detection pass: committed NWPU VHR-10 sample scenes, built-in nwpu-vhr10 detector");
    let model = ModelArgs::new(models::DEFAULT_DETECTOR.to_string(), BackendChoice::Auto);
    detect::evaluate(&detect::EvalOptions {
        model,
        dataset: sample_dataset("nwpu-vhr10"),
        split: Split::All,
        report: None,
        score_threshold: 0.05,
        downlink: DownlinkArgs::default(),
        faults: None,
        scrub_every: 32,
    })?;
    Ok(())
}

/// `sim eval`: the task named, or the model's own.
fn eval_command(a: EvalArgs) -> anyhow::Result<()> {
    let model_task = ZooModel::load(&a.model.model)?.manifest.task;
    let task = match (a.task, model_task.as_str()) {
        (None | Some(TaskArg::Detect), "detect") => TaskArg::Detect,
        (None | Some(TaskArg::Classify), "classify") => TaskArg::Classify,
        (Some(_), other) => anyhow::bail!(
            "model {} is a {other} model; --task must match it",
            a.model.model
        ),
        (None, other) => anyhow::bail!("model {}: unknown task {other}", a.model.model),
    };
    match task {
        TaskArg::Detect => detect::evaluate(&detect::EvalOptions {
            model: a.model,
            dataset: a.dataset,
            split: a.split.into(),
            report: Some(a.report),
            score_threshold: a.score_threshold,
            downlink: a.downlink,
            faults: a
                .pipeline
                .faults
                .as_deref()
                .map(faults::load_spec)
                .transpose()?,
            scrub_every: a.pipeline.scrub_every,
        }),
        TaskArg::Classify => eval::run(eval::Options {
            model: a.model,
            dataset: a.dataset,
            split: a.split.into(),
            pipeline: a.pipeline,
            report: Some(a.report),
            downlink: a.downlink,
        }),
    }
}

/// A model on its backend, which the `switch_model` command can replace through `switch`.
struct LoadedModel {
    model: ZooModel,
    backend: Box<dyn Backend + Send>,
    /// Time to parse, check and prepare the int8 plan; `None` on tract.
    plan_load_ms: Option<f64>,
    switch: SwitchHandle,
    /// The backend asked for, and why another runs if one does.
    backend_use: BackendUse,
}

/// Load a model and put it on the chosen backend, switchable.
fn load_model(args: &ModelArgs) -> anyhow::Result<LoadedModel> {
    let mut fallback = None;
    let (model, backend, plan_load_ms) = load_backend_noting(args, &mut fallback)?;
    let (switchable, switch) = SwitchableBackend::new(backend);
    let backend_requested = args
        .backend
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_string());
    Ok(LoadedModel {
        model,
        backend: Box::new(switchable),
        plan_load_ms,
        switch,
        backend_use: BackendUse {
            backend_requested,
            backend_fallback: fallback,
        },
    })
}

/// A model on the chosen backend, and its plan's load time.
fn load_backend(
    args: &ModelArgs,
) -> anyhow::Result<(ZooModel, Box<dyn Backend + Send>, Option<f64>)> {
    load_backend_noting(args, &mut None)
}

/// [`load_backend`], with why the backend asked for does not run (if so) in `fallback`.
fn load_backend_noting(
    args: &ModelArgs,
    fallback: &mut Option<String>,
) -> anyhow::Result<(ZooModel, Box<dyn Backend + Send>, Option<f64>)> {
    let model = ZooModel::load(&args.model)?;
    let use_plan = match args.backend {
        BackendChoice::Auto => model.has_plan(),
        BackendChoice::Int8Cpu | BackendChoice::Cuda => true,
        BackendChoice::Tract => false,
    };
    if !use_plan {
        let backend = Box::new(model.tract_backend()?);
        return Ok((model, backend, None));
    }
    let started = std::time::Instant::now();
    if matches!(args.backend, BackendChoice::Cuda) {
        match cuda_backend(&model)? {
            Ok(cuda) => {
                let ms = started.elapsed().as_secs_f64() * 1e3;
                return Ok((model, Box::new(cuda), Some(ms)));
            }
            Err(why) if args.require_backend => {
                anyhow::bail!(
                    "--backend cuda cannot run here ({why}), and --require-backend was given"
                )
            }
            Err(why) => {
                eprintln!("warning: CUDA is not available ({why}); running int8-cpu instead");
                *fallback = Some(format!("cuda not available: {why}"));
            }
        }
    }
    let int8 = model.int8_backend()?.ok_or_else(|| {
        anyhow::anyhow!(
            "model {} has no compiled plan (model.plan); compile one with `cargo run -p models -- compile`, or use --backend tract",
            model.origin
        )
    })?;
    let plan_load_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok((model, Box::new(int8), Some(plan_load_ms)))
}

/// Builds the backend `args` names again, for a supervised worker's restart after a hang.
fn rebuild_backend(args: &ModelArgs) -> Factory {
    let args = args.clone();
    Arc::new(move || {
        load_backend(&args)
            .map(|(_, backend, _)| backend)
            .map_err(|e| {
                eprintln!("error: the restarted backend cannot load its model: {e:#}");
                BackendError::NotAvailable
            })
    })
}

/// The models `switch_model` may load: `model` in slot 0, then each `--slot N=MODEL`; each is
/// checked against `running` (the same task, classes and input) when it is loaded.
fn model_slots(model: &ModelArgs, pairs: &[String], running: &ZooModel) -> anyhow::Result<Slots> {
    let mut by_slot: Vec<Option<ModelArgs>> = vec![None; 16];
    by_slot[0] = Some(model.clone());
    for (slot, name) in slot_pairs(pairs)? {
        by_slot[usize::from(slot)] = Some(ModelArgs {
            model: name,
            ..model.clone()
        });
    }
    let filled = std::array::from_fn(|i| by_slot[i].is_some());
    let shape = running.shape();
    let load = move |slot: u8| -> Result<Box<dyn Backend + Send>, String> {
        let Some(Some(args)) = by_slot.get(usize::from(slot)) else {
            return Err(format!("slot {slot} is empty"));
        };
        let (model, backend, _) = load_backend(args).map_err(|e| format!("{e:#}"))?;
        shape
            .admits(&model)
            .map_err(|why| format!("slot {slot}: {why}"))?;
        Ok(backend)
    };
    Ok(Slots {
        filled,
        load: Box::new(load),
    })
}

/// The model's plan on the GPU, or why it cannot run there (this build or machine has no usable
/// CUDA, or the model no plan), for the caller to run the CPU instead or refuse.
fn cuda_backend(model: &ZooModel) -> anyhow::Result<Result<CudaBackend, String>> {
    let Some(plan) = model.plan_bytes()? else {
        return Ok(Err("the model has no compiled plan".to_string()));
    };
    match CudaBackend::new(plan, &CudaOptions::default()) {
        Ok(cuda) => Ok(Ok(cuda)),
        Err(CudaError::NotAvailable(why)) => Ok(Err(why.to_string())),
        Err(e) => Err(e.into()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => default_run(),
        Some(Command::Run(a)) => eval::run(eval::Options {
            model: a.model,
            dataset: a.dataset.unwrap_or_else(|| sample_dataset("eurosat-rgb")),
            split: a.split.into(),
            pipeline: a.pipeline,
            report: None,
            downlink: a.downlink,
        }),
        Some(Command::Eval(a)) => eval_command(a),
        Some(Command::Replay(a)) => replay::run(&a),
        Some(Command::Decode(a)) => decode::run(&a),
        Some(Command::Hil(a)) => hil::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
