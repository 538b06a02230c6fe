//! `sim hil`: hardware in the loop. `sim` plays the test bench: it streams a dataset's frames
//! to a board running `kestrel-flight` over the frame link, reads the board's telemetry with the
//! ground decoder, scores what comes back as `sim eval` does, and checks every result against
//! the same model run here in-process on the same backend.
//!
//! The board's flight configuration is the one file both sides read: its `[source]` is a
//! `frame-link` (where the bench connects), its `[downlink] link` is `tcp://HOST:PORT` (where
//! the bench listens for telemetry), and its `[model]` is what the bench runs in-process.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ValueEnum;
use kestrel_eval::coco::{self, Scored};
use kestrel_eval::dataset::{scan_labelled, LabelledImage};
use kestrel_eval::Split;
use kestrel_hal::{Frame, FrameMeta};
use kestrel_host::frame_link::send_frame;
use kestrel_host::{decode_image, FolderSource, HostClock};
use kestrel_jetson::config::{FlightConfig, SourceConfig};
use kestrel_payload::downlink::{classification_message, detections_message, LedgerReport};
use kestrel_runtime::faults::{Draws, Fault, FaultSpec};
use kestrel_runtime::step::{ClassifierStep, DetectorStep};
use kestrel_runtime::threaded::{run_pipeline, DropPolicy, PipelineConfig};
use kestrel_wire::command::Command as WireCommand;
use kestrel_wire::framelink::encode_header;
use kestrel_wire::message::{Classification, CommandAck, Detections, Health, EVENTS};
use kestrel_wire::Telemetry;
use models::ZooModel;
use serde::Serialize;

use crate::decode::{describe, CommandFramer, Ground, GroundStats};
use crate::detect::{self, CocoScores, FrameDetections, TILE_CAP};
use crate::eval::{ClassScores, Confusion, Failure, Latency, Progress};
use crate::{BackendChoice, ModelArgs, SplitArg};

#[derive(clap::Args)]
pub struct HilArgs {
    /// The board's flight configuration (see boards/jetson/flight-*.toml). Its `[source]` must
    /// be a frame-link and its `[downlink]` link tcp://HOST:PORT; the bench runs its `[model]`
    /// in-process to check the board's results.
    #[arg(long)]
    config: PathBuf,
    /// A board already running kestrel-flight with that configuration: its frame link,
    /// tcp://HOST:PORT. Start `sim hil` first: the board connects its telemetry at start.
    #[arg(
        long,
        value_name = "tcp://HOST:PORT",
        required_unless_present = "spawn"
    )]
    board: Option<String>,
    /// Start the board here instead: the kestrel-flight binary, after any program that runs
    /// it, split at spaces (`--spawn "qemu-aarch64-static -L /usr/aarch64-linux-gnu PATH"`
    /// for an aarch64 build). `--config FILE` is added to its arguments; it is stopped at
    /// the end if it has not stopped by itself.
    #[arg(long, value_name = "COMMAND", conflicts_with = "board")]
    spawn: Option<String>,
    /// Listen here for the board's telemetry [default: the configuration's `[downlink]` link].
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// classify: one sub-folder of images per class; detect: a COCO folder [default: the
    /// committed sample for the model's task].
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Which part of the dataset to stream.
    #[arg(long, value_enum, default_value_t = SplitArg::All)]
    split: SplitArg,
    /// Stream at most this many frames.
    #[arg(long)]
    limit: Option<usize>,
    /// Frames per second sent to the board; 0 = as fast as the link takes them.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// A result arriving later than this after its frame was sent is counted as late.
    #[arg(long, default_value_t = 1000)]
    deadline_ms: u64,
    /// Seconds to wait for the board to connect, to take a frame, or to send anything after
    /// the last frame, before it is reported silent.
    #[arg(long, default_value_t = 30.0)]
    timeout_s: f64,
    /// Skip the in-process run that each of the board's results is compared with.
    #[arg(long)]
    no_compare: bool,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write every telemetry message received as a JSON line here (as `sim decode` does).
    #[arg(long)]
    telemetry_log: Option<PathBuf>,
    /// Inject faults, as `sim eval --faults` takes them (`all`, a spec, or a TOML file). The
    /// bench damages frames on the frame link (corrupt, truncated, wrong_size, timestamp,
    /// dropout, burst) and the telemetry on its way in (link_bit_errors, link_loss,
    /// link_stall, until the last frame is sent), and sends a report_health command up every
    /// 20 frames, some with a bit flipped (command_bit_errors); a board started with --spawn
    /// gets the backend faults, upsets and stage stalls in its configuration. A faulted run is
    /// scored against the truth (top1_clean over the frames no fault touched), not compared
    /// frame by frame, and fails if the board executed a damaged command.
    #[arg(long, value_name = "SPEC|FILE")]
    faults: Option<String>,
    /// Stream a classifier's dataset this many times over (a soak: 34 times the 300-chip
    /// sample is 10,200 frames); a spawned board's memory (RSS) is sampled as it runs.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
}

/// A frame's result as the telemetry carries it, with the board's capture time zeroed so that
/// a board's and an in-process run's compare equal.
#[derive(Clone, Debug, PartialEq)]
enum Answer {
    Class(Classification),
    Boxes(Box<Detections>),
}

impl Answer {
    fn of(message: &Telemetry) -> Option<(u32, Self)> {
        match message {
            Telemetry::Classification(c) if c.tile == 0 => Some((
                c.frame,
                Self::Class(Classification {
                    capture_us: 0,
                    ..c.clone()
                }),
            )),
            Telemetry::Detections(d) => Some((
                d.frame,
                Self::Boxes(Box::new(Detections {
                    capture_us: 0,
                    ..d.clone()
                })),
            )),
            _ => None,
        }
    }
}

/// The frames streamed, and the truth they are scored against.
enum Truth {
    Labels(Vec<LabelledImage>),
    Boxes {
        dataset: coco::Dataset,
        /// Indices into `dataset.images` of the frames, in order.
        images: Vec<usize>,
        category_of: Vec<Option<u64>>,
    },
}

impl Truth {
    fn load(
        model: &ZooModel,
        folder: &Path,
        split: SplitArg,
        limit: Option<usize>,
        repeat: usize,
    ) -> anyhow::Result<Self> {
        let limit = limit.unwrap_or(usize::MAX);
        let labels = &model.manifest.labels;
        if model.manifest.task == "detect" {
            if repeat > 1 {
                bail!("--repeat is for classifiers: a detector's mAP would count each image's boxes again");
            }
            let dataset = coco::load(folder)?;
            let chosen = detect::split_images(&dataset, folder, split.into())?;
            let images: Vec<usize> = dataset
                .images
                .iter()
                .enumerate()
                .filter(|(_, image)| chosen.iter().any(|c| c.id == image.id))
                .map(|(i, _)| i)
                .take(limit)
                .collect();
            let category_of = detect::categories_of(&dataset, folder, labels)?;
            return Ok(Self::Boxes {
                dataset,
                images,
                category_of,
            });
        }
        let mut images = scan_labelled(folder, labels, split.into())?;
        images.truncate(limit);
        let once = images.len();
        Ok(Self::Labels(
            images
                .into_iter()
                .cycle()
                .take(once * repeat.max(1))
                .collect(),
        ))
    }

    fn files(&self) -> Vec<PathBuf> {
        match self {
            Self::Labels(images) => images.iter().map(|i| i.path.clone()).collect(),
            Self::Boxes {
                dataset, images, ..
            } => images
                .iter()
                .filter_map(|&i| dataset.images.get(i))
                .map(|i| i.path.clone())
                .collect(),
        }
    }

    /// Score the board's answers, by frame.
    fn score(&self, answers: &[Option<Received>], labels: &[String]) -> Scores {
        match self {
            Self::Labels(images) => {
                let mut confusion = Confusion::new(labels.len());
                for (image, received) in images.iter().zip(answers) {
                    if let Some(Answer::Class(c)) = received.as_ref().map(|r| &r.answer) {
                        confusion.record(image.label, c.class);
                    }
                }
                Scores::Classify(confusion.scores(images, labels))
            }
            Self::Boxes {
                dataset,
                images,
                category_of,
            } => {
                let mut scored = Vec::new();
                for (&index, received) in images.iter().zip(answers) {
                    let (Some(image), Some(Answer::Boxes(d))) = (
                        dataset.images.get(index),
                        received.as_ref().map(|r| &r.answer),
                    ) else {
                        continue;
                    };
                    for b in &d.boxes {
                        if let Some(Some(category)) = category_of.get(usize::from(b.class)) {
                            scored.push(Scored {
                                image: image.id,
                                category: *category,
                                bbox: [b.x, b.y, b.w, b.h].map(f64::from),
                                score: f64::from(b.score),
                            });
                        }
                    }
                }
                let chosen: Vec<&coco::Image> = images
                    .iter()
                    .filter_map(|&i| dataset.images.get(i))
                    .collect();
                Scores::Detect(detect::coco_scores(dataset, &chosen, &scored))
            }
        }
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum Scores {
    Classify(ClassScores),
    Detect(CocoScores),
}

/// A result from the board and when it arrived.
struct Received {
    answer: Answer,
    at: Instant,
}

/// What crossed the link, and how long results took.
#[derive(Serialize)]
struct LinkStats {
    /// Frames offered to the link (the dataset's, up to --limit).
    frames: usize,
    /// Frames the board took whole.
    frames_sent: usize,
    /// Results that came back for frames sent.
    results_received: usize,
    /// Frames sent that got no result.
    lost: usize,
    /// Results that came back later than the deadline.
    late: usize,
    deadline_ms: u64,
    /// Second results for a frame, and results for frames never sent.
    duplicates: usize,
    unexpected: usize,
    /// From a frame's first byte sent to its result decoded on the ground, microseconds.
    rtt_us: Latency,
    /// What the ground decoder counted on the telemetry stream.
    telemetry: GroundStats,
    /// The board's last health snapshot.
    board_health: Option<Health>,
    /// How the link ended when it did not end cleanly (the board disconnected or fell silent).
    ended: Option<String>,
    /// A spawned board's exit status.
    board_exit: Option<String>,
}

/// The same frames through the same model in-process, and how they compare.
#[derive(Serialize)]
struct Comparison {
    backend: String,
    /// Frames with a result from both.
    compared: usize,
    /// Of those, frames whose results differ in any field.
    mismatches: usize,
    /// The first few that differ, each as both results.
    differing: Vec<String>,
    /// Per frame in-process: preprocessing, model, postprocessing.
    latency_us: Latency,
    throughput_fps: f64,
    elapsed_s: f64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    model_origin: String,
    /// The backend the configuration asks for.
    backend: String,
    /// Where the board was: its frame link, or the command that started it.
    board: String,
    dataset: String,
    split: String,
    labels: Vec<String>,
    /// Frames streamed.
    images: usize,
    #[serde(flatten)]
    scores: Scores,
    /// Round trip per frame: the link, the board's queue and inference, and the telemetry.
    latency_us: Latency,
    /// Results received per second, from the first frame sent to the last result back.
    throughput_fps: f64,
    elapsed_s: f64,
    /// Images the bench could not read (they were not sent).
    failures: Vec<Failure>,
    link: LinkStats,
    in_process: Option<Comparison>,
    /// How every frame the board accepted ended, from its last health telemetry.
    ledger: Option<LedgerReport>,
    /// Correct / classified over the frames no fault touched (classifiers).
    top1_clean: Option<f64>,
    /// What was injected (null without --faults).
    faults: Option<HilFaults>,
    /// A spawned board's resident memory, sampled while frames stream.
    board_rss_kb: Option<Rss>,
    /// Events the board sent, by name (failovers, corrupt models, rejected commands).
    board_events: BTreeMap<String, u64>,
}

/// What `sim hil --faults` injected.
#[derive(Serialize)]
struct HilFaults {
    spec: String,
    injected: BTreeMap<&'static str, u64>,
    /// Frames damaged on purpose (and the frame after each truncated one, which the board
    /// loses finding the next header).
    damaged_frames: usize,
    /// The command link: commands sent up, damaged, and how the board answered.
    commands: Option<CommandsReport>,
}

/// Resident memory samples of the board, kB.
#[derive(Serialize)]
struct Rss {
    samples: usize,
    /// After the first tenth of the frames (warm: buffers and queues full).
    warm: u64,
    max: u64,
    last: u64,
    /// last - warm.
    growth: i64,
    /// Every sample: (frames sent by then, kB).
    series: Vec<(usize, u64)>,
}

/// Seconds between samples of a spawned board's memory.
const RSS_EVERY: Duration = Duration::from_millis(500);

/// The samples taken while `frames` streamed, as a report.
fn rss_kb_report(samples: &[(usize, u64)], frames: usize) -> Option<Rss> {
    let warm = samples
        .iter()
        .find(|(frame, _)| *frame >= frames / 10)
        .or(samples.first())?
        .1;
    let last = samples.last()?.1;
    Some(Rss {
        samples: samples.len(),
        warm,
        max: samples.iter().map(|s| s.1).max().unwrap_or(0),
        last,
        growth: last as i64 - warm as i64,
        series: samples.to_vec(),
    })
}

/// A copy of the board's configuration with `spec`'s faults and the capture-time check on.
fn faulted_config(path: &Path, spec: &FaultSpec) -> anyhow::Result<tempfile::NamedTempFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not TOML", path.display()))?;
    table.insert("faults".into(), toml::Value::String(spec.describe()));
    let pipeline = table
        .entry("pipeline")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(pipeline) = pipeline {
        pipeline.insert("monotonic_capture".into(), toml::Value::Boolean(true));
    }
    let mut file = tempfile::Builder::new()
        .prefix("kestrel-hil-faults-")
        .suffix(".toml")
        .tempfile()?;
    file.write_all(toml::to_string(&table)?.as_bytes())?;
    Ok(file)
}

/// The frame link's faults, as the bench sends each frame.
struct FrameFaults {
    spec: FaultSpec,
    draws: Draws,
    burst_left: u32,
    injected: BTreeMap<&'static str, u64>,
    /// Frames damaged on purpose, by sequence.
    damaged: BTreeSet<usize>,
}

impl FrameFaults {
    fn new(spec: &FaultSpec) -> Self {
        Self {
            spec: spec.clone(),
            draws: Draws::new(spec.seed, 4),
            burst_left: 0,
            injected: BTreeMap::new(),
            damaged: BTreeSet::new(),
        }
    }

    fn strikes(&mut self, fault: Fault) -> bool {
        let hit = self.draws.chance(self.spec.rate(fault));
        if hit {
            *self.injected.entry(fault.name()).or_default() += 1;
        }
        hit
    }

    /// Whether this frame goes out in a burst, unpaced.
    fn bursting(&mut self) -> bool {
        if self.burst_left > 0 {
            self.burst_left -= 1;
            return true;
        }
        if self.strikes(Fault::Burst) {
            self.burst_left = self.spec.burst_len.saturating_sub(1);
            return true;
        }
        false
    }

    /// Send `frame` with whatever fault strikes it: a capture time that repeats or goes back,
    /// the wrong shape, damaged samples under a header made for the clean ones, or samples
    /// cut short (the board then loses the next frame too, finding the header after).
    fn send(
        &mut self,
        link: &mut TcpStream,
        frame: &mut Frame,
        samples: &[u8],
        last_capture_us: &mut u64,
    ) -> Result<(), kestrel_host::frame_link::LinkError> {
        let sequence = frame.meta.sequence as usize;
        if *last_capture_us > 0 && self.strikes(Fault::Timestamp) {
            frame.meta.capture_us = self.draws.stale_time(*last_capture_us);
            self.damaged.insert(sequence);
        } else {
            *last_capture_us = frame.meta.capture_us;
        }
        if self.strikes(Fault::WrongSize) {
            let g = frame.geometry;
            frame.geometry.width = g.width * u32::from(g.bands);
            frame.geometry.bands = 1;
            self.damaged.insert(sequence);
        }
        let io = |e: std::io::Error| kestrel_host::frame_link::LinkError::Io(e.to_string());
        if self.strikes(Fault::Corrupt) {
            self.damaged.insert(sequence);
            let header = encode_header(frame, samples)
                .map_err(kestrel_host::frame_link::LinkError::Frame)?;
            let mut damaged = samples.to_vec();
            self.draws.damage(&mut damaged, 0);
            return link
                .write_all(&header)
                .and_then(|()| link.write_all(&damaged))
                .map_err(io);
        }
        if self.strikes(Fault::Truncated) {
            self.damaged.insert(sequence);
            self.damaged.insert(sequence + 1);
            let header = encode_header(frame, samples)
                .map_err(kestrel_host::frame_link::LinkError::Frame)?;
            let keep = self.draws.below(samples.len() as u64) as usize;
            return link
                .write_all(&header)
                .and_then(|()| link.write_all(samples.get(..keep).unwrap_or_default()))
                .map_err(io);
        }
        send_frame(link, frame, samples)
    }
}

/// A process's resident memory, kB, from /proc.
fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The telemetry link's faults, applied to bytes as they arrive at the bench.
struct LinkFaults {
    spec: FaultSpec,
    draws: Draws,
    dark_until: Option<Instant>,
    injected: BTreeMap<&'static str, u64>,
}

impl LinkFaults {
    /// Damage, lose or hold up `bytes` as the link's faults strike.
    fn apply(&mut self, bytes: &mut Vec<u8>) {
        if let Some(until) = self.dark_until {
            if Instant::now() < until {
                bytes.clear();
                return;
            }
            self.dark_until = None;
        }
        if self.draws.chance(self.spec.rate(Fault::LinkLoss)) {
            *self.injected.entry(Fault::LinkLoss.name()).or_default() += 1;
            self.dark_until = Some(Instant::now() + self.spec.outage);
            bytes.clear();
            return;
        }
        if self.draws.chance(self.spec.rate(Fault::LinkStall)) {
            *self.injected.entry(Fault::LinkStall.name()).or_default() += 1;
            std::thread::sleep(self.spec.stall);
        }
        let ber = self.spec.rate(Fault::LinkBitErrors);
        if ber > 0.0 {
            for byte in bytes.iter_mut() {
                if self.draws.chance(ber) {
                    *byte ^= 1 << self.draws.below(8);
                    *self
                        .injected
                        .entry(Fault::LinkBitErrors.name())
                        .or_default() += 1;
                }
            }
        }
    }
}

/// Frames between commands the bench sends up during a faulted run.
const COMMAND_EVERY: usize = 20;

/// The command link during a faulted run: a `report_health` command up to the board every
/// [`COMMAND_EVERY`] frames, with one bit flipped in some (`command_bit_errors`, a
/// probability per command). The board must refuse every damaged one and answer the others.
struct Uplink {
    stream: TcpStream,
    framer: CommandFramer,
    rate: f64,
    draws: Draws,
    next_sequence: u16,
    /// Sequence numbers sent, and whether each was damaged.
    sent: BTreeMap<u16, bool>,
}

impl Uplink {
    fn send(&mut self) -> anyhow::Result<()> {
        let sequence = self.next_sequence;
        self.next_sequence = self.next_sequence.wrapping_add(1).max(1);
        let mut bytes = self.framer.frame(&WireCommand::ReportHealth, sequence)?;
        let damaged = self.draws.chance(self.rate) && !bytes.is_empty();
        if damaged {
            let bit = self.draws.below(bytes.len() as u64 * 8);
            if let Some(byte) = bytes.get_mut((bit / 8) as usize) {
                *byte ^= 1 << (bit % 8);
            }
        }
        self.sent.insert(sequence, damaged);
        self.stream
            .write_all(&bytes)
            .context("the command link to the board")
    }

    /// What became of the commands, from the acknowledgements that came down.
    fn report(&self, acks: &[CommandAck]) -> CommandsReport {
        let mut r = CommandsReport {
            sent: self.sent.len(),
            damaged: self.sent.values().filter(|&&d| d).count(),
            ..CommandsReport::default()
        };
        let mut answered = BTreeSet::new();
        for ack in acks {
            let Some(&damaged) = self.sent.get(&ack.sequence) else {
                continue;
            };
            answered.insert(ack.sequence);
            match (damaged, ack.rejected.is_none()) {
                (true, true) => r.damaged_accepted += 1,
                (true, false) => r.damaged_refused += 1,
                (false, true) => r.accepted += 1,
                (false, false) => r.refused += 1,
            }
        }
        r.unanswered = self.sent.len() - answered.len();
        r
    }
}

/// Commands sent up during a faulted run, and their acknowledgements.
#[derive(Default, Serialize)]
struct CommandsReport {
    sent: usize,
    /// With a bit flipped on the way up.
    damaged: usize,
    /// Undamaged, acknowledged as done.
    accepted: usize,
    /// Undamaged, refused.
    refused: usize,
    /// Damaged and refused with a reason (most are dropped at their CRC, unanswered).
    damaged_refused: usize,
    /// Damaged yet executed: must be 0.
    damaged_accepted: usize,
    /// No acknowledgement came down: the command was dropped at its CRC, or the ack was lost
    /// on the faulty telemetry link.
    unanswered: usize,
}

/// A spawned board, stopped when dropped if it is still running.
struct Board(Option<Child>);

impl Board {
    /// Why the board is gone, if it is.
    fn exited(&mut self) -> Option<String> {
        let child = self.0.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }

    /// Wait up to `grace` for it to end, then stop it; its exit status.
    fn finish(&mut self, grace: Duration) -> Option<String> {
        let mut child = self.0.take()?;
        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status.to_string()),
                Ok(None) if started.elapsed() < grace => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let status = child.wait().map(|s| s.to_string());
                    return Some(format!(
                        "killed after {grace:?}: {}",
                        status.unwrap_or_else(|e| e.to_string())
                    ));
                }
            }
        }
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Accept the board's telemetry connection within `timeout`, unless the board dies first.
fn accept(
    listener: &TcpListener,
    timeout: Duration,
    board: &mut Board,
) -> anyhow::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let started = Instant::now();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("accepting the board's telemetry"),
        }
        if let Some(status) = board.exited() {
            bail!("the board exited ({status}) before connecting its telemetry; its log is above");
        }
        if started.elapsed() >= timeout {
            bail!(
                "the board did not connect its telemetry to {} within {timeout:?}",
                listener.local_addr()?
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Connect to the board's frame link, retrying while it starts, within `timeout`.
fn connect(address: &str, timeout: Duration, board: &mut Board) -> anyhow::Result<TcpStream> {
    let started = Instant::now();
    loop {
        let last = match address.to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                Some(a) => match TcpStream::connect_timeout(&a, Duration::from_secs(1)) {
                    Ok(stream) => return Ok(stream),
                    Err(e) => e.to_string(),
                },
                None => format!("{address} names no address"),
            },
            Err(e) => format!("{address}: {e}"),
        };
        if let Some(status) = board.exited() {
            bail!("the board exited ({status}) before its frame link opened; its log is above");
        }
        if started.elapsed() >= timeout {
            bail!("cannot reach the board's frame link at {address} within {timeout:?}: {last}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Read the telemetry until the board closes it, fails, or says nothing for `silence` after
/// the last frame was sent; how it ended when not cleanly, and the ground's counts.
fn receive(
    mut stream: TcpStream,
    mut ground: Ground,
    sent_all: &AtomicBool,
    silence: Duration,
    mut faults: Option<LinkFaults>,
) -> anyhow::Result<(GroundStats, Option<String>, BTreeMap<&'static str, u64>)> {
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    let (mut buffer, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
    let mut heard = Instant::now();
    let ended = loop {
        match stream.read(&mut chunk) {
            Ok(0) => break None,
            Ok(n) => {
                heard = Instant::now();
                let mut bytes = chunk.get(..n).unwrap_or_default().to_vec();
                // The campaign ends clean: the board's last health must arrive whole.
                if let Some(f) = faults
                    .as_mut()
                    .filter(|_| !sent_all.load(Ordering::Relaxed))
                {
                    f.apply(&mut bytes);
                }
                buffer.extend_from_slice(&bytes);
                let used = ground.take(&buffer)?;
                buffer.drain(..used);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if sent_all.load(Ordering::Relaxed) && heard.elapsed() >= silence {
                    break Some(format!(
                        "the board sent nothing for {silence:?} after the last frame"
                    ));
                }
            }
            Err(e) => break Some(format!("telemetry link: {e}")),
        }
    };
    let injected = faults.map(|f| f.injected).unwrap_or_default();
    Ok((ground.finish(&buffer)?, ended, injected))
}

/// The address to reach a board listening on `listen` from this machine: a wildcard
/// (`0.0.0.0`, `[::]`) becomes loopback.
fn loopback(listen: &str) -> String {
    match listen.rsplit_once(':') {
        Some(("0.0.0.0" | "[::]" | "", port)) => format!("127.0.0.1:{port}"),
        _ => listen.to_string(),
    }
}

pub fn run(args: &HilArgs) -> anyhow::Result<()> {
    crate::eval::check_report_path(args.report.as_deref())?;
    let config = FlightConfig::load(&args.config)?;
    let config_name = args.config.display();
    let SourceConfig::FrameLink {
        listen: board_listen,
        ..
    } = &config.source
    else {
        bail!("{config_name}: [source] kind must be \"frame-link\" for hardware in the loop");
    };
    let Some(telemetry_at) = config
        .downlink
        .link
        .as_deref()
        .and_then(|l| l.strip_prefix("tcp://"))
    else {
        bail!("{config_name}: [downlink] link must be tcp://HOST:PORT, where the bench listens for the board's telemetry");
    };
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        bail!("--rate must be 0 or more");
    }
    if !(args.timeout_s > 0.0 && args.timeout_s.is_finite()) {
        bail!("--timeout-s must be more than 0");
    }
    let timeout = Duration::from_secs_f64(args.timeout_s);
    let spawn: Vec<&str> = args
        .spawn
        .iter()
        .flat_map(|s| s.split_whitespace())
        .collect();
    let (board_at, board_name) = match (&args.board, spawn.first()) {
        (Some(board), _) => {
            let Some(address) = board.strip_prefix("tcp://") else {
                bail!("--board {board}: expected tcp://HOST:PORT");
            };
            (address.to_string(), board.clone())
        }
        (None, Some(_)) => (loopback(board_listen), spawn.join(" ")),
        (None, None) => bail!("give --board tcp://HOST:PORT or --spawn PROGRAM"),
    };
    let listen_at = args
        .listen
        .clone()
        .unwrap_or_else(|| telemetry_at.to_string());

    let model = ZooModel::load(&config.model.name)?;
    let labels = model.manifest.labels.clone();
    let dataset = args.dataset.clone().unwrap_or_else(|| {
        crate::sample_dataset(if model.manifest.task == "detect" {
            "nwpu-vhr10"
        } else {
            "eurosat-rgb"
        })
    });
    let truth = Truth::load(&model, &dataset, args.split, args.limit, args.repeat)?;
    let files = truth.files();
    let faults = args
        .faults
        .as_deref()
        .map(crate::faults::load_spec)
        .transpose()?;
    // A spawned board gets the backend faults in a copy of its configuration, and rejects
    // frames whose capture time does not move on.
    let board_config = match (&faults, spawn.is_empty()) {
        (Some(spec), false) => Some(faulted_config(&args.config, spec)?),
        _ => None,
    };
    if faults.is_some() && args.board.is_some() {
        eprintln!(
            "sim hil: the board's own configuration decides its backend faults (`faults = ...`)"
        );
    }

    let listener = TcpListener::bind(&listen_at)
        .with_context(|| format!("cannot listen for the board's telemetry on {listen_at}"))?;
    let mut board = Board(None);
    if let Some((program, rest)) = spawn.split_first() {
        let child = Command::new(program)
            .args(rest)
            .arg("--config")
            .arg(
                board_config
                    .as_ref()
                    .map_or(args.config.as_path(), |c| c.path()),
            )
            .spawn()
            .with_context(|| format!("cannot start the board: {}", spawn.join(" ")))?;
        board.0 = Some(child);
    }
    eprintln!(
        "sim hil: {} frames of {} to {board_name}, telemetry on {listen_at}",
        files.len(),
        dataset.display()
    );
    let telemetry = accept(&listener, timeout, &mut board)?;
    let mut link = connect(&board_at, timeout, &mut board)?;
    link.set_nodelay(true)?;
    link.set_write_timeout(Some(timeout))?;

    let (results, arrivals) = mpsc::channel();
    let log: Box<dyn Write + Send> = match &args.telemetry_log {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("{}: cannot create", path.display()))?,
        )),
        None => Box::new(std::io::sink()),
    };
    let ground = Ground::new(config.downlink.telemetry, None, log).observe(Box::new(
        move |message: &Telemetry| {
            if matches!(
                message,
                Telemetry::Classification(_)
                    | Telemetry::Detections(_)
                    | Telemetry::Health(_)
                    | Telemetry::Event(_)
                    | Telemetry::CommandAck(_)
            ) {
                let _ = results.send((Instant::now(), message.clone()));
            }
        },
    ));
    let sent_all = Arc::new(AtomicBool::new(false));
    let mut uplink = match faults.as_ref() {
        Some(spec) => Some(Uplink {
            stream: telemetry
                .try_clone()
                .context("the telemetry link, to send commands on")?,
            framer: CommandFramer::new(config.downlink.telemetry),
            rate: spec.rate(Fault::CommandBitErrors),
            draws: Draws::new(spec.seed, 5),
            next_sequence: 1,
            sent: BTreeMap::new(),
        }),
        None => None,
    };
    let link_faults = faults.as_ref().map(|spec| LinkFaults {
        spec: spec.clone(),
        draws: Draws::new(spec.seed, 3),
        dark_until: None,
        injected: BTreeMap::new(),
    });
    let receiver = {
        let sent_all = Arc::clone(&sent_all);
        std::thread::spawn(move || receive(telemetry, ground, &sent_all, timeout, link_faults))
    };
    let board_pid = board.0.as_ref().map(Child::id);
    let mut rss: Vec<(usize, u64)> = Vec::new();
    let mut last_rss = Instant::now();
    let mut frame_faults = faults.as_ref().map(FrameFaults::new);

    let started = Instant::now();
    let mut sent_at: Vec<Option<Instant>> = vec![None; files.len()];
    let mut failures = Vec::new();
    let mut ended = None;
    let mut progress = Progress::new(files.len());
    let mut last_capture_us = 0;
    for (sequence, path) in files.iter().enumerate() {
        if let Some(pid) = board_pid.filter(|_| last_rss.elapsed() >= RSS_EVERY) {
            last_rss = Instant::now();
            if let Some(kb) = rss_kb(pid) {
                rss.push((sequence, kb));
            }
        }
        if let Some(u) = uplink.as_mut().filter(|_| sequence % COMMAND_EVERY == 0) {
            if let Err(e) = u.send() {
                eprintln!("warning: {e:#}");
            }
        }
        if frame_faults
            .as_mut()
            .is_some_and(|f| f.strikes(Fault::Dropout))
        {
            continue;
        }
        let bursting = frame_faults.as_mut().is_some_and(FrameFaults::bursting);
        if args.rate > 0.0 && !bursting {
            let due = started + Duration::from_secs_f64(sequence as f64 / args.rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let image = match decode_image(path) {
            Ok(image) => image,
            Err(e) => {
                failures.push(Failure {
                    file: path.display().to_string(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let mut frame = Frame {
            geometry: image.geometry,
            meta: FrameMeta {
                sequence: sequence as u64,
                capture_us: (started.elapsed().as_micros() as u64).max(last_capture_us + 1),
                ..FrameMeta::default()
            },
        };
        let at = Instant::now();
        let sent = match frame_faults.as_mut() {
            Some(f) => f.send(&mut link, &mut frame, &image.samples, &mut last_capture_us),
            None => {
                last_capture_us = frame.meta.capture_us;
                send_frame(&mut link, &frame, &image.samples)
            }
        };
        if let Err(e) = sent {
            let sent = sent_at.iter().flatten().count();
            ended = Some(format!(
                "the board stopped taking frames after {sent} of {}: {e}",
                files.len()
            ));
            break;
        }
        sent_at[sequence] = Some(at);
        progress.update(sequence + 1, "sent");
    }
    // The end of the stream tells the board to drain its queues and send its last health.
    let _ = link.shutdown(Shutdown::Write);
    sent_all.store(true, Ordering::Relaxed);
    let (telemetry, link_ended, link_injected) = match receiver.join() {
        Ok(result) => result?,
        Err(_) => bail!("the telemetry thread failed"),
    };
    let elapsed = started.elapsed().as_secs_f64();
    let board_exit = board.finish(timeout);
    let ended = ended.or(link_ended);

    // Results by frame, the first of each; later ones and ones for frames never sent counted.
    let mut answers: Vec<Option<Received>> = (0..files.len()).map(|_| None).collect();
    let (mut duplicates, mut unexpected, mut board_health) = (0, 0, None);
    let mut board_events: BTreeMap<String, u64> = BTreeMap::new();
    let mut acks = Vec::new();
    for (at, message) in arrivals.try_iter() {
        if let Telemetry::CommandAck(ack) = message {
            acks.push(ack);
            continue;
        }
        if let Telemetry::Health(h) = message {
            board_health = Some(h);
            continue;
        }
        if let Telemetry::Event(e) = &message {
            let name = EVENTS
                .iter()
                .find(|info| info.id as u16 == e.id)
                .map_or_else(|| format!("0x{:04x}", e.id), |info| info.name.to_string());
            *board_events.entry(name).or_default() += 1;
            continue;
        }
        let Some((frame, answer)) = Answer::of(&message) else {
            continue;
        };
        let frame = frame as usize;
        match answers.get_mut(frame) {
            Some(slot @ None) if sent_at.get(frame).is_some_and(Option::is_some) => {
                *slot = Some(Received { answer, at })
            }
            Some(Some(_)) => duplicates += 1,
            _ => unexpected += 1,
        }
    }
    let deadline = Duration::from_millis(args.deadline_ms);
    let mut rtts: Vec<u64> = sent_at
        .iter()
        .zip(&answers)
        .filter_map(|(sent, received)| {
            let rtt = received.as_ref()?.at.checked_duration_since((*sent)?)?;
            Some(rtt.as_micros() as u64)
        })
        .collect();
    rtts.sort_unstable();
    // From the first frame sent to the last result back: the board's shutdown is not counted.
    let streaming = answers
        .iter()
        .flatten()
        .map(|r| r.at)
        .max()
        .and_then(|last| last.checked_duration_since(started))
        .map_or(elapsed, |d| d.as_secs_f64());
    let frames_sent = sent_at.iter().flatten().count();
    let results_received = answers.iter().flatten().count();
    let link_stats = LinkStats {
        frames: files.len(),
        frames_sent,
        results_received,
        lost: frames_sent - results_received,
        late: rtts
            .iter()
            .filter(|&&us| us > deadline.as_micros() as u64)
            .count(),
        deadline_ms: args.deadline_ms,
        duplicates,
        unexpected,
        rtt_us: Latency::of_sorted(&rtts),
        telemetry,
        board_health,
        ended,
        board_exit,
    };

    let in_process = if args.no_compare || faults.is_some() {
        None
    } else {
        eprintln!("sim hil: the same frames in-process, to compare");
        Some(compare(&config, &files, &answers)?)
    };
    let damaged = frame_faults
        .as_ref()
        .map(|f| f.damaged.clone())
        .unwrap_or_default();
    let top1_clean = match &truth {
        Truth::Labels(images) => {
            let (mut clean, mut correct) = (0u64, 0u64);
            for (frame, (image, received)) in images.iter().zip(&answers).enumerate() {
                if let (false, Some(Answer::Class(c))) = (
                    damaged.contains(&frame),
                    received.as_ref().map(|r| &r.answer),
                ) {
                    clean += 1;
                    correct += u64::from(usize::from(c.class) == image.label);
                }
            }
            Some(correct as f64 / clean.max(1) as f64)
        }
        Truth::Boxes { .. } => None,
    };
    let faults_report = faults.as_ref().map(|spec| {
        let mut injected = frame_faults
            .as_ref()
            .map(|f| f.injected.clone())
            .unwrap_or_default();
        injected.extend(link_injected);
        let commands = uplink.as_ref().map(|u| u.report(&acks));
        if let Some(c) = commands.as_ref().filter(|c| c.damaged > 0) {
            injected.insert(Fault::CommandBitErrors.name(), c.damaged as u64);
        }
        HilFaults {
            spec: spec.describe(),
            injected,
            damaged_frames: damaged.len(),
            commands,
        }
    });
    let board_rss_kb = rss_kb_report(&rss, files.len());
    let report = Report {
        ledger: link_stats
            .board_health
            .as_ref()
            .map(|h| LedgerReport::from(&h.ledger)),
        top1_clean,
        faults: faults_report,
        board_rss_kb,
        board_events,
        model: model.manifest.name.clone(),
        model_origin: model.origin.clone(),
        backend: config.model.backend.clone(),
        board: board_name,
        dataset: dataset.display().to_string(),
        split: format!("{:?}", Split::from(args.split)).to_lowercase(),
        scores: truth.score(&answers, &labels),
        labels,
        images: files.len(),
        latency_us: Latency::of_sorted(&rtts),
        throughput_fps: results_received as f64 / streaming.max(1e-9),
        elapsed_s: elapsed,
        failures,
        link: link_stats,
        in_process,
    };
    print_summary(&report);
    if let Some(path) = &args.report {
        crate::eval::write_report(path, &report)?;
    }
    if let Some(c) = report
        .faults
        .as_ref()
        .and_then(|f| f.commands.as_ref())
        .filter(|c| c.damaged_accepted > 0)
    {
        bail!(
            "the board executed {} of the {} commands damaged on the way up",
            c.damaged_accepted,
            c.damaged
        );
    }
    if let Some(c) = report.in_process.as_ref().filter(|c| c.mismatches > 0) {
        bail!(
            "{} of {} frames differ between the board and the in-process run: {}",
            c.mismatches,
            c.compared,
            c.differing.first().map_or("", String::as_str)
        );
    }
    if let Some(ended) = &report.link.ended {
        bail!("the run did not end cleanly: {ended}");
    }
    Ok(())
}

/// Run `files` through the configuration's model here, as the board does (the same step,
/// threshold and backend choice; nothing dropped), and compare each result with the board's.
fn compare(
    config: &FlightConfig,
    files: &[PathBuf],
    board: &[Option<Received>],
) -> anyhow::Result<Comparison> {
    let backend = BackendChoice::from_str(&config.model.backend, false)
        .map_err(|e| anyhow::anyhow!("model.backend: {e}"))?;
    let (model, backend, _) =
        crate::load_backend(&ModelArgs::new(config.model.name.clone(), backend))?;
    let backend_name = backend.name().to_string();
    let spec = model.preprocess_spec()?;
    let pipeline = PipelineConfig {
        queue_depth: config.pipeline.queue_depth,
        drop_policy: DropPolicy::Block,
        max_frame_samples: config.pipeline.max_frame_pixels.saturating_mul(4),
        scrub_every: 0,
        monotonic_capture: false,
    };
    let threshold = config.model.score_threshold.unwrap_or(f32::MIN);
    let source = FolderSource::new(files.to_vec());
    let clock = HostClock::default();
    let mut here: Vec<Option<Answer>> = vec![None; files.len()];
    let mut latencies = Vec::with_capacity(files.len());
    let mut input = vec![0.0; spec.input_len()];
    let mut output = vec![0.0; backend.output_len()];
    let started = Instant::now();
    if let (Some(mut detector), "detect") = (model.detector_config(), model.manifest.task.as_str())
    {
        if let Some(t) = config.model.score_threshold {
            detector.score_threshold = t;
        }
        let step =
            DetectorStep::<_, TILE_CAP>::new(backend, spec, detector, &mut input, &mut output)?;
        run_pipeline(source, step, &clock, pipeline, |o| {
            let found: FrameDetections = match o.result {
                Ok(found) => found,
                Err(_) => return,
            };
            latencies.push(o.latency_us);
            let kept: Vec<_> = found
                .as_slice()
                .iter()
                .filter(|d| d.score >= threshold)
                .copied()
                .collect();
            if let Some(slot) = here.get_mut(o.sequence as usize) {
                *slot = Some(Answer::Boxes(Box::new(detections_message(
                    o.sequence, &kept, 0,
                ))));
            }
        });
    } else {
        let step = ClassifierStep::new(backend, spec, &mut input, &mut output)?;
        run_pipeline(source, step, &clock, pipeline, |o| {
            let Ok(c) = o.result else {
                return;
            };
            latencies.push(o.latency_us);
            if let Some(slot) = here
                .get_mut(o.sequence as usize)
                .filter(|_| c.confidence() >= threshold)
            {
                *slot = Some(Answer::Class(classification_message(o.sequence, 0, &c, 0)));
            }
        });
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let (mut compared, mut mismatches, mut differing) = (0, 0, Vec::new());
    for (frame, (board, here)) in board.iter().zip(&here).enumerate() {
        let (Some(board), Some(here)) = (board, here) else {
            continue;
        };
        compared += 1;
        if board.answer != *here {
            mismatches += 1;
            if differing.len() < 10 {
                differing.push(format!(
                    "frame {frame}: board {:?}, in-process {here:?}",
                    board.answer
                ));
            }
        }
    }
    Ok(Comparison {
        backend: backend_name,
        compared,
        mismatches,
        differing,
        latency_us: Latency::of_sorted(&latencies),
        throughput_fps: latencies.len() as f64 / elapsed.max(1e-9),
        elapsed_s: elapsed,
    })
}

fn print_summary(r: &Report) {
    let l = &r.link;
    println!(
        "frames      {} sent of {}, {} results back, {} lost, {} late (over {} ms), {} failed to read",
        l.frames_sent,
        l.frames,
        l.results_received,
        l.lost,
        l.late,
        l.deadline_ms,
        r.failures.len()
    );
    match &r.scores {
        Scores::Classify(s) => println!(
            "top-1       {:.2}% ({} split of {}, scored from the board's telemetry)",
            100.0 * s.top1,
            r.split,
            r.dataset
        ),
        Scores::Detect(s) => println!(
            "mAP         {:.3} at IoU 0.5, {:.3} at 0.50:0.95 ({} split of {}, from the board's telemetry)",
            s.map50, s.map50_95, r.split, r.dataset
        ),
    }
    println!(
        "round trip  p50 {:.2} ms, p99 {:.2} ms per frame (send, board, telemetry)",
        r.latency_us.p50 as f64 / 1000.0,
        r.latency_us.p99 as f64 / 1000.0
    );
    println!(
        "throughput  {:.1} results/s over {:.2} s",
        r.throughput_fps, r.elapsed_s
    );
    println!("telemetry   {}", describe(&l.telemetry));
    if let Some(c) = &r.in_process {
        println!(
            "in-process  {} of {} frames equal the board's ({} backend here: p50 {:.2} ms per frame, {:.1} frames/s)",
            c.compared - c.mismatches,
            c.compared,
            c.backend,
            c.latency_us.p50 as f64 / 1000.0,
            c.throughput_fps
        );
    }
    if let Some(ledger) = &r.ledger {
        crate::eval::print_ledger(ledger);
    }
    if let Some(f) = &r.faults {
        let injected: Vec<String> = f.injected.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!(
            "faults      injected {}; {} frames damaged on purpose; top-1 on the rest {:.2}%",
            injected.join(", "),
            f.damaged_frames,
            100.0 * r.top1_clean.unwrap_or(0.0)
        );
        if let Some(c) = &f.commands {
            println!(
                "commands    {} sent up, {} with a bit flipped: {} of those executed, {} refused, the rest dropped at their CRC; undamaged: {} done, {} refused; {} unanswered",
                c.sent, c.damaged, c.damaged_accepted, c.damaged_refused, c.accepted, c.refused, c.unanswered
            );
        }
    }
    if !r.board_events.is_empty() {
        let events: Vec<String> = r
            .board_events
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!("events      {}", events.join(", "));
    }
    if let Some(m) = &r.board_rss_kb {
        println!(
            "board RSS   {} kB warm, {} kB last, {} kB max ({} samples; growth {} kB)",
            m.warm, m.last, m.max, m.samples, m.growth
        );
    }
    if let Some(exit) = &l.board_exit {
        println!("board       exited: {exit}");
    }
}
