//! `kestrel-flight`: the binary flashed to a Jetson or a UAV companion computer. It reads one
//! TOML configuration, runs the pipeline on frames from a spool directory or a frame link until
//! it is stopped, sends results, products and health as telemetry and takes commands on the
//! same link, feeds the watchdog, and on SIGTERM or SIGINT drains its queues and sends a last
//! health snapshot. Logs go through the `log` facade (`RUST_LOG`, default `info`).
//!
//!     kestrel-flight --config /etc/kestrel/flight.toml [--check]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kestrel_backend::{Backend, BackendError};
use kestrel_cuda::{CudaBackend, CudaError, CudaOptions};
use kestrel_hal::{Frame, FrameSource, Watchdog};
use kestrel_host::frame_link::StreamSource;
use kestrel_host::HostClock;
use kestrel_jetson::config::{FlightConfig, ModelConfig, SourceConfig};
use kestrel_jetson::flight::{self, Stage, Stages, Tally};
use kestrel_jetson::spool::{SpoolOptions, SpoolSource};
use kestrel_jetson::thermal;
use kestrel_jetson::v4l2::{PixelFormat, V4l2Source};
use kestrel_jetson::watchdog::{notify_systemd, LinuxWatchdog};
use kestrel_payload::command::{Controls, Pausable, Slots};
use kestrel_payload::downlink::{
    failover_event, health_message, restart_event, slot_pairs, Downlink,
};
use kestrel_runtime::failover::{Failover, FailoverBackend};
use kestrel_runtime::faults::{Draws, Fault, FaultSpec};
use kestrel_runtime::step::{ClassifierStep, DetectorStep};
use kestrel_runtime::supervise::{preferred, Factory, Restart};
use kestrel_runtime::switch::SwitchableBackend;
use kestrel_runtime::threaded::{DropPolicy, PipelineConfig};
use kestrel_runtime::tmr::Guard;
use models::ZooModel;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: kestrel-flight --config FILE [--check]\n\n\
        Runs Kestrel on this board as FILE says (see boards/jetson/flight-*.toml) until SIGTERM.\n\
        --check reads and checks FILE, then exits: 0 when it is good.";
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{usage}");
        return ExitCode::SUCCESS;
    }
    let config_path = match args.as_slice() {
        [flag, path] | [flag, path, _] if flag == "--config" => PathBuf::from(path),
        _ => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    let config = match FlightConfig::load(&config_path) {
        Ok(config) => config,
        Err(e) => {
            log::error!("configuration refused: {e}");
            return ExitCode::from(2);
        }
    };
    if args.iter().any(|a| a == "--check") {
        println!("{}: good", config_path.display());
        return ExitCode::SUCCESS;
    }
    match fly(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The configured backend for `model` first, then what it falls back to, in the order CUDA,
/// the int8 plan on the CPU, tract: a frame one fails on with a device fault runs on the next.
/// Without `fallbacks`, only the first: what a restart after a hang builds again.
fn backend_chain(
    model: &ZooModel,
    choice: &str,
    fallbacks: bool,
) -> anyhow::Result<Vec<Box<dyn Backend + Send>>> {
    let mut chain: Vec<Box<dyn Backend + Send>> = Vec::new();
    if choice == "cuda" {
        if let Some(plan) = model.plan_bytes()? {
            match CudaBackend::new(plan, &CudaOptions::default()) {
                Ok(cuda) => chain.push(Box::new(cuda)),
                Err(CudaError::NotAvailable(why)) => {
                    log::warn!("CUDA is not available ({why}); running int8 on the CPU")
                }
                Err(e) => log::error!(
                    "CUDA cannot run {} ({e}); running int8 on the CPU",
                    model.origin
                ),
            }
        }
    }
    if choice != "tract" && (fallbacks || chain.is_empty()) {
        match model.int8_backend()? {
            Some(int8) => chain.push(Box::new(int8)),
            None if choice == "auto" => {}
            None => bail!(
                "model {} has no compiled plan; use backend = \"tract\"",
                model.origin
            ),
        }
    }
    if !fallbacks && !chain.is_empty() {
        return Ok(chain);
    }
    match model.tract_backend() {
        Ok(tract) => chain.push(Box::new(tract)),
        // The last resort is optional; the first backend is not.
        Err(e) if !chain.is_empty() => {
            log::warn!("no tract fallback for {}: {e:#}", model.origin)
        }
        Err(e) => return Err(e.into()),
    }
    Ok(chain)
}

/// `model` on its failover chain, each change of backend logged and sent down as an event.
fn load_backend(
    model: &ZooModel,
    config: &ModelConfig,
    faults: Option<&FaultSpec>,
    controls: &Arc<Controls>,
) -> anyhow::Result<Box<dyn Backend + Send>> {
    let mut chain = backend_chain(model, &config.backend, true)?;
    // The preferred backend on a supervised worker: a call past the deadline is a hang, the
    // frame runs on the next backend, and the preferred one is built again from storage. A
    // hardware-in-the-loop campaign's backend faults go on it, as on a device that fails.
    if let Some(spec) = faults.filter(|f| f.any_backend()) {
        log::warn!(
            "fault injection on the preferred backend: {}",
            spec.describe()
        );
    }
    let tmr = if config.tmr {
        let head = model.detector_config().map(|d| (d.head, d.score_threshold));
        let guard = Guard::for_classes(&config.tmr_classes, &model.manifest.labels, head)
            .map_err(|e| anyhow::anyhow!("model.tmr_classes: {e}"))?;
        match &guard {
            Guard::Every => {
                log::info!("the preferred backend runs under triple-modular redundancy")
            }
            Guard::Priority { .. } => log::info!(
                "triple-modular redundancy for frames whose first run finds {}",
                config.tmr_classes.join(", ")
            ),
        }
        Some(guard)
    } else {
        None
    };
    let rebuild: Factory = {
        let (name, choice) = (config.name.clone(), config.backend.clone());
        Arc::new(move || {
            let built = ZooModel::load(&name)
                .map_err(anyhow::Error::from)
                .and_then(|model| backend_chain(&model, &choice, false))
                .map(|chain| chain.into_iter().next());
            match built {
                Ok(Some(backend)) => Ok(backend),
                Ok(None) => Err(BackendError::NotAvailable),
                Err(e) => {
                    log::error!("the restarted backend cannot load {name}: {e:#}");
                    Err(BackendError::NotAvailable)
                }
            }
        })
    };
    let on_restart = {
        let controls = Arc::clone(controls);
        Box::new(move |restart: Restart| {
            if restart.loaded {
                log::warn!(
                    "the preferred backend was restarted after a hang (restart {})",
                    restart.count
                );
            } else {
                log::error!(
                    "the preferred backend could not be restarted (restart {})",
                    restart.count
                );
            }
            controls.report(restart_event(&restart));
        })
    };
    let first = chain.remove(0);
    // 0: unsupervised, on the inference thread (a hang then stalls the stage).
    let deadline = (config.deadline_s > 0.0).then(|| Duration::from_secs_f64(config.deadline_s));
    let (first, _watch) = preferred(first, rebuild, faults, tmr, deadline, on_restart)?;
    chain.insert(0, first);
    let names: Vec<&'static str> = chain.iter().map(|b| b.name()).collect();
    log::info!(
        "{}: backends in order of failover: {}",
        model.origin,
        names.join(", ")
    );
    let controls = Arc::clone(controls);
    let on_change = move |change: Failover| {
        let name = |i: usize| names.get(i).copied().unwrap_or("?");
        match change {
            Failover::FailedOver {
                from,
                to,
                error,
                recovery_us,
            } => log::error!(
                "backend {} failed ({error}); the frame ran on {} ({recovery_us} µs from the failure to the result)",
                name(from),
                name(to)
            ),
            Failover::Restored { from } => {
                log::warn!("backend {} runs frames again, instead of {}", name(0), name(from))
            }
            Failover::Corrupt { index, restored } => log::error!(
                "scrub: the model on {} was corrupt; {}",
                name(index),
                if restored {
                    "restored from its golden copy, recent frames run again"
                } else {
                    "the restore FAILED"
                }
            ),
        }
        controls.report(failover_event(&change));
    };
    let chain = FailoverBackend::new(chain, config.failover_retry_frames, Box::new(on_change))?;
    Ok(Box::new(chain))
}

/// The frame sources the configuration can name, ending the stream on a stop signal.
enum Source {
    Spool(SpoolSource),
    Link(StreamSource<std::net::TcpStream>),
    Camera(V4l2Source),
}

/// The source as the pipeline's ingest stage takes it: ended by a stop signal, and watched
/// while it delivers a frame (a spool's wait for files is not watched: it is idle).
struct Stoppable {
    source: Source,
    stop: Arc<AtomicBool>,
    stages: Arc<Stages>,
    /// A campaign's `stage_stall` fault: the stage stalls `stall_ms` before some frames.
    stalls: Option<(FaultSpec, Draws)>,
}

impl FrameSource<u8> for Stoppable {
    type Error = String;

    fn next_frame(&mut self, buffer: &mut [u8]) -> Result<Option<Frame>, String> {
        if self.stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        if let Source::Spool(s) = &mut self.source {
            if s.wait_for_file().map_err(|e| e.to_string())?.is_none() {
                return Ok(None);
            }
        }
        let (source, stalls) = (&mut self.source, &mut self.stalls);
        self.stages.busy(Stage::Ingest, || {
            if let Some((spec, draws)) = stalls.as_mut() {
                if draws.chance(spec.rate(Fault::StageStall)) {
                    log::warn!(
                        "fault injection: the ingest stage stalls for {:?}",
                        spec.stall
                    );
                    std::thread::sleep(spec.stall);
                }
            }
            match source {
                Source::Spool(s) => s.next_frame(buffer).map_err(|e| e.to_string()),
                Source::Link(s) => s.next_frame(buffer).map_err(|e| e.to_string()),
                Source::Camera(s) => s.next_frame(buffer).map_err(|e| e.to_string()),
            }
        })
    }
}

fn open_source(config: &SourceConfig, stop: &Arc<AtomicBool>) -> anyhow::Result<Source> {
    Ok(match config {
        SourceConfig::Spool { path, settle_s } => {
            let options = SpoolOptions {
                settle: Duration::from_secs_f64(*settle_s),
                ..SpoolOptions::default()
            };
            let spool = SpoolSource::open(path, options)?.stop_on(Arc::clone(stop));
            log::info!("frames from the spool {}", path.display());
            Source::Spool(spool)
        }
        SourceConfig::V4l2 {
            device,
            width,
            height,
            format,
            buffers,
            timeout_s,
        } => {
            let format = PixelFormat::from_fourcc(format.as_bytes())
                .context("source.format was checked at load")?;
            let timeout = Duration::from_secs_f64(*timeout_s);
            let camera = V4l2Source::open(device, *width, *height, format, *buffers, timeout)?;
            log::info!(
                "frames from the camera {} at {width}x{height}",
                device.display()
            );
            Source::Camera(camera)
        }
        SourceConfig::FrameLink { listen, timeout_s } => {
            let timeout = Duration::from_secs_f64(*timeout_s);
            log::info!("waiting up to {timeout_s} s for a frame link on {listen}");
            Source::Link(StreamSource::listen(listen.as_str(), timeout, timeout)?)
        }
    })
}

fn fly(config: &FlightConfig) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("signal handler")?;
    }
    let model = ZooModel::load(&config.model.name)?;
    let labels = model.manifest.labels.clone();
    let spec = model.preprocess_spec()?;
    let mut downlink = Downlink::new(&config.downlink, &labels)?;
    let controls = downlink.controls();
    let faults = config
        .faults
        .as_deref()
        .map(FaultSpec::parse)
        .transpose()
        .context("faults")?;
    let backend = load_backend(&model, &config.model, faults.as_ref(), &controls)?;
    log::info!(
        "model {} ({}) on {}",
        model.manifest.name,
        model.manifest.task,
        backend.name()
    );
    let (backend, switch) = SwitchableBackend::new(backend);
    downlink.listen_for_commands(slots(config, &model, &controls)?, switch, &[])?;
    if let (Some(threshold), Ok(mut min_score)) =
        (config.model.score_threshold, controls.min_score.lock())
    {
        *min_score = Some(threshold);
    }

    // The hardware watchdog, if configured, and systemd's (a `Type=notify` unit with
    // `WatchdogSec=`), fed from one thread while every stage is healthy: a stage stuck on one
    // frame for longer than pipeline.stall_s starves them, and the board restarts.
    let mut device = config
        .watchdog
        .as_ref()
        .map(|w| LinuxWatchdog::open(&w.device))
        .transpose()?;
    let every = Duration::from_secs_f64(config.watchdog.as_ref().map_or(1.0, |w| w.feed_s));
    let stall = Duration::from_secs_f64(config.pipeline.stall_s);
    // Ingest may wait for a quiet sensor up to the source's own timeout before it is stalled.
    let ingest_wait = match &config.source {
        SourceConfig::FrameLink { timeout_s, .. } | SourceConfig::V4l2 { timeout_s, .. } => {
            Duration::from_secs_f64(*timeout_s)
        }
        SourceConfig::Spool { .. } => Duration::ZERO,
    };
    let stages = Arc::new(Stages::new(ingest_wait));
    let feeder = {
        let (stop, stages) = (Arc::clone(&stop), Arc::clone(&stages));
        std::thread::spawn(move || {
            let mut starving = false;
            while !stop.load(Ordering::Relaxed) {
                match stages.stalled(stall) {
                    Some((stage, busy)) => {
                        if !starving {
                            log::error!(
                                "the {} stage has been on one frame for {busy:.1?} (limit {stall:?}): the watchdogs are no longer fed",
                                stage.name()
                            );
                        }
                        starving = true;
                    }
                    None => {
                        if starving {
                            log::warn!("every stage is moving again: the watchdogs are fed");
                        }
                        starving = false;
                        if let Some(Err(e)) = device.as_mut().map(Watchdog::feed) {
                            log::error!("{e}");
                        }
                        notify_systemd("WATCHDOG=1");
                    }
                }
                std::thread::sleep(every);
            }
            if let Some(Err(e)) = device.as_mut().map(Watchdog::stop) {
                log::warn!("{e}");
            }
        })
    };
    let mut zones = match &config.health.thermal {
        Some(root) => thermal::zones(root)?,
        None => Vec::new(),
    };

    let source = Stoppable {
        source: open_source(&config.source, &stop)?,
        stop: Arc::clone(&stop),
        stages: Arc::clone(&stages),
        stalls: faults
            .clone()
            .filter(|f| f.rate(Fault::StageStall) > 0.0)
            .map(|spec| {
                let draws = Draws::new(spec.seed, 4);
                (spec, draws)
            }),
    };
    notify_systemd("READY=1");
    let source = Pausable {
        inner: source,
        controls: Arc::clone(&controls),
    };
    let pipeline = PipelineConfig {
        queue_depth: config.pipeline.queue_depth,
        drop_policy: match config.pipeline.drop_policy.as_str() {
            "block" => DropPolicy::Block,
            "drop-newest" => DropPolicy::DropNewest,
            _ => DropPolicy::DropOldest,
        },
        max_frame_samples: config.pipeline.max_frame_pixels.saturating_mul(4),
        scrub_every: config.model.scrub_frames,
        monotonic_capture: config.pipeline.monotonic_capture,
    };
    let clock = HostClock::default();
    let started = Instant::now();
    let mut tally = Tally::new(Duration::from_secs_f64(config.health.interval_s));
    let mut input = vec![0.0; spec.input_len()];
    let mut output = vec![0.0; backend.output_len()];
    let health = if model.manifest.task == "detect" {
        let Some(mut detector) = model.detector_config() else {
            bail!("model {} has no detector configuration", model.origin);
        };
        if let Some(threshold) = config.model.score_threshold {
            detector.score_threshold = threshold;
        }
        let step = DetectorStep::new(backend, spec, detector, &mut input, &mut output)?;
        flight::detect(
            source,
            step,
            &clock,
            pipeline,
            &mut downlink,
            &mut tally,
            &stages,
        )
    } else {
        let step = ClassifierStep::new(backend, spec, &mut input, &mut output)?;
        flight::classify(
            source,
            step,
            &clock,
            pipeline,
            &mut downlink,
            &mut tally,
            &stages,
        )
    };
    stop.store(true, Ordering::Relaxed);
    let latencies = tally.sorted_latencies();
    let mut last = health_message(&health, latencies, started.elapsed().as_micros() as u64);
    last.temperature_mc = thermal::hottest_mc(&mut zones);
    let report = downlink.finish(last);
    log::info!(
        "stopped: {} frames in, {} done, {} dropped; {} bytes sent of {} raw",
        health.frames_in,
        health.frames_done,
        health.frames_dropped,
        report.sent_bytes,
        report.raw_bytes
    );
    let ledger = &report.ledger;
    log::info!(
        "ledger: {} accepted = {} sent + {} queued + {} dropped + {} rejected ({} unaccounted); scrubs {} ({} corrupt, {} restored)",
        ledger.accepted,
        ledger.sent,
        ledger.queued,
        ledger.dropped.iter().sum::<u64>(),
        ledger.rejected.iter().sum::<u64>(),
        ledger.unaccounted(),
        health.scrub.scrubs,
        health.scrub.corrupt,
        health.scrub.restored
    );
    if let Some(e) = report.link_error {
        log::error!("telemetry link: {e}");
    }
    notify_systemd("STOPPING=1");
    let _ = feeder.join();
    Ok(())
}

/// The models `switch_model` may load: the running one in slot 0, then `[downlink] slots`,
/// each checked against the running one when loaded.
fn slots(
    config: &FlightConfig,
    running: &ZooModel,
    controls: &Arc<Controls>,
) -> anyhow::Result<Slots> {
    let mut names: Vec<Option<String>> = vec![None; 16];
    names[0] = Some(config.model.name.clone());
    for (slot, name) in slot_pairs(&config.downlink.slots)? {
        names[usize::from(slot)] = Some(name);
    }
    let filled = std::array::from_fn(|i| names[i].is_some());
    let model_config = config.model.clone();
    let controls = Arc::clone(controls);
    let shape = running.shape();
    let load = move |slot: u8| -> Result<Box<dyn Backend + Send>, String> {
        let Some(Some(name)) = names.get(usize::from(slot)) else {
            return Err(format!("slot {slot} is empty"));
        };
        let model = ZooModel::load(name).map_err(|e| format!("{e:#}"))?;
        let backend =
            load_backend(&model, &model_config, None, &controls).map_err(|e| format!("{e:#}"))?;
        shape
            .admits(&model)
            .map_err(|why| format!("slot {slot}: {why}"))?;
        log::info!("slot {slot} ({name}) loaded and checked");
        Ok(backend)
    };
    Ok(Slots {
        filled,
        load: Box::new(load),
    })
}
