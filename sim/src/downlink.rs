//! The simulator's downlink: results made into telemetry messages and products, queued by value
//! per byte under a byte budget (`kestrel_wire::downlink`), framed as CCSDS or MAVLink 2 and
//! written to a capture file or a TCP peer, as they would leave the vehicle; and the
//! data-reduction figures for the summary and the JSON report.

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::ValueEnum;
use image::{imageops, GrayImage, ImageEncoder, RgbImage};
use kestrel_runtime::classify::Classification as RuntimeClassification;
use kestrel_runtime::detect::Detection;
use kestrel_wire::ccsds::Framer;
use kestrel_wire::downlink::{value, DownlinkQueue, DownlinkStats, ItemWriter};
use kestrel_wire::mavlink::{MavlinkFramer, COMPONENT_ID};
use kestrel_wire::message::{
    Classification, Detections, Health, ProductKind, Ranked, WireBox, MAX_BOXES, TOP_K,
};
use kestrel_wire::{product, Framing, Telemetry};
use serde::Serialize;

/// Items the queue holds.
const SLOTS: usize = 128;
/// Bytes one item may hold: a product of up to about 16 KB (a 64-pixel crop is about half that).
const ITEM_MAX: usize = 16 * 1024;
/// Value of housekeeping (health): above any result, so it goes first.
const HOUSEKEEPING: f32 = 1.0e6;
/// Longest side of a detection crop product, pixels.
const CROP_MAX: u32 = 64;
/// MAVLink asks for a heartbeat a second.
const HEARTBEAT_US: u64 = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FramingArg {
    /// CCSDS space packets (a satellite's downlink).
    Ccsds,
    /// MAVLink 2 (a UAV's companion computer beside its autopilot).
    Mavlink,
}

#[derive(clap::Args, Clone, Debug)]
pub struct DownlinkArgs {
    /// Framing of the telemetry: CCSDS space packets or MAVLink 2.
    #[arg(long, value_enum, default_value_t = FramingArg::Ccsds)]
    pub telemetry: FramingArg,
    /// Where the telemetry goes: `file:PATH` (a capture: the bytes as they would cross the
    /// link) or `tcp://HOST:PORT`. Without it the bytes are counted, not kept.
    #[arg(long)]
    pub link: Option<String>,
    /// Downlink budget in bytes per window [default: none: everything produced is sent].
    #[arg(long)]
    pub downlink_budget: Option<u32>,
    /// The budget's window in seconds; 0 makes the whole run one pass, sent best first at its
    /// end, as at a ground-station pass.
    #[arg(long, default_value_t = 0.0)]
    pub downlink_window_s: f64,
    /// Class priorities for the downlink's value order, as LABEL=WEIGHT pairs separated by
    /// commas (a class not named weighs 1).
    #[arg(long, value_delimiter = ',')]
    pub priority: Vec<String>,
    /// Send no products (detection crops, class maps), only results and health.
    #[arg(long)]
    pub no_products: bool,
}

impl Default for DownlinkArgs {
    fn default() -> Self {
        Self {
            telemetry: FramingArg::Ccsds,
            link: None,
            downlink_budget: None,
            downlink_window_s: 0.0,
            priority: Vec::new(),
            no_products: false,
        }
    }
}

/// What left, in the JSON report.
#[derive(Serialize, Debug, Clone)]
pub struct DownlinkReport {
    pub framing: FramingArg,
    pub link: Option<String>,
    /// Bytes per window, null for none.
    pub budget_bytes: Option<u32>,
    /// 0: the whole run was one pass.
    pub window_s: f64,
    /// Bytes of the frames as the sensor delivered them.
    pub raw_bytes: u64,
    /// Bytes of the messages made (encoded, before framing).
    pub produced_bytes: u64,
    /// Bytes written to the link: framed messages and, on MAVLink, heartbeats.
    pub sent_bytes: u64,
    /// sent / raw.
    pub reduction_ratio: f64,
    /// Products made (each becomes one item of one or more parts).
    pub products: u64,
    /// Items still queued at the end (the budget ran out).
    pub left_in_queue: usize,
    /// What the queue did: offered, sent, refused and evicted by reason.
    pub queue: DownlinkStats,
    /// Why writing to the link failed, if it did (nothing more was written after).
    pub link_error: Option<String>,
}

enum AnyFramer {
    Ccsds(Framer),
    Mavlink(MavlinkFramer),
}

impl AnyFramer {
    fn as_framing(&mut self) -> &mut dyn Framing {
        match self {
            Self::Ccsds(f) => f,
            Self::Mavlink(f) => f,
        }
    }
}

pub struct Downlink {
    args: DownlinkArgs,
    framer: AnyFramer,
    queue: Box<DownlinkQueue<SLOTS, ITEM_MAX>>,
    link: Option<Box<dyn Write>>,
    link_error: Option<String>,
    priorities: Vec<f32>,
    started: Instant,
    last_heartbeat_us: Option<u64>,
    raw_bytes: u64,
    sent_bytes: u64,
    products: u64,
    item: Vec<u8>,
    out: Vec<u8>,
}

/// The link named by `--link`.
fn open_link(spec: &str) -> anyhow::Result<Box<dyn Write>> {
    if let Some(path) = spec.strip_prefix("file:") {
        let path = PathBuf::from(path);
        let file = std::fs::File::create(&path)
            .with_context(|| format!("--link {spec}: cannot create {}", path.display()))?;
        return Ok(Box::new(std::io::BufWriter::new(file)));
    }
    if let Some(address) = spec.strip_prefix("tcp://") {
        let stream = TcpStream::connect(address)
            .with_context(|| format!("--link {spec}: cannot connect to {address}"))?;
        return Ok(Box::new(stream));
    }
    bail!("--link {spec}: expected file:PATH or tcp://HOST:PORT")
}

/// Priorities by class index from LABEL=WEIGHT pairs.
fn priorities(pairs: &[String], labels: &[String]) -> anyhow::Result<Vec<f32>> {
    let mut weights = vec![1.0; labels.len()];
    for pair in pairs {
        let Some((label, weight)) = pair.split_once('=') else {
            bail!("--priority {pair}: expected LABEL=WEIGHT");
        };
        let Some(class) = labels.iter().position(|l| l == label) else {
            bail!(
                "--priority {pair}: no class {label} (the model's are {})",
                labels.join(", ")
            );
        };
        let weight: f32 = weight
            .parse()
            .ok()
            .filter(|w: &f32| w.is_finite() && *w >= 0.0)
            .with_context(|| {
                format!("--priority {pair}: the weight must be a number, 0 or more")
            })?;
        weights[class] = weight;
    }
    Ok(weights)
}

impl Downlink {
    pub fn new(args: &DownlinkArgs, labels: &[String]) -> anyhow::Result<Self> {
        if !(args.downlink_window_s >= 0.0 && args.downlink_window_s.is_finite()) {
            bail!("--downlink-window-s must be 0 or more");
        }
        if args.downlink_budget == Some(0) {
            bail!("--downlink-budget must be 1 or more");
        }
        let framer = match args.telemetry {
            FramingArg::Ccsds => AnyFramer::Ccsds(Framer::new()),
            FramingArg::Mavlink => AnyFramer::Mavlink(MavlinkFramer::new(1, COMPONENT_ID)),
        };
        let window_us = match (args.downlink_budget, args.downlink_window_s) {
            (None, _) => 1,
            // One pass: the window never ends within a run.
            (Some(_), 0.0) => u64::MAX,
            (Some(_), w) => (w * 1e6) as u64,
        };
        let budget = args.downlink_budget.unwrap_or(u32::MAX);
        let link = args.link.as_deref().map(open_link).transpose()?;
        Ok(Self {
            args: args.clone(),
            framer,
            queue: Box::new(DownlinkQueue::new(budget, window_us)),
            link,
            link_error: None,
            priorities: priorities(&args.priority, labels)?,
            started: Instant::now(),
            last_heartbeat_us: None,
            raw_bytes: 0,
            sent_bytes: 0,
            products: 0,
            item: vec![0; ITEM_MAX],
            out: vec![0; 4 * ITEM_MAX],
        })
    }

    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Whether results are held for one pass at the end rather than sent as they come.
    fn one_pass(&self) -> bool {
        self.args.downlink_budget.is_some() && self.args.downlink_window_s == 0.0
    }

    /// A frame of `bytes` arrived from the sensor.
    pub fn frame_in(&mut self, bytes: u64) {
        self.raw_bytes += bytes;
    }

    /// One classified frame or tile.
    pub fn classification(&mut self, frame: u64, tile: u16, c: &RuntimeClassification) {
        let top = c
            .top
            .iter()
            .take(TOP_K)
            .map(|r| Ranked {
                class: r.class,
                score: r.probability,
            })
            .collect();
        let message = Telemetry::Classification(Classification {
            frame: frame as u32,
            capture_us: self.now_us(),
            tile,
            class: c.class(),
            score: c.confidence(),
            top,
        });
        let worth = value(&self.priorities, c.class(), c.confidence());
        self.offer(&[message], worth);
    }

    /// A frame's detections (best first), and a crop product of each sent box from `image`.
    pub fn detections(&mut self, frame: u64, found: &[Detection], image: Option<&RgbImage>) {
        let boxes: heapless::Vec<WireBox, MAX_BOXES> = found
            .iter()
            .take(MAX_BOXES)
            .map(|d| WireBox {
                x: d.x,
                y: d.y,
                w: d.w,
                h: d.h,
                class: d.class,
                score: d.score,
            })
            .collect();
        let worth = found
            .iter()
            .map(|d| value(&self.priorities, d.class, d.score))
            .fold(0.0, f32::max);
        let message = Telemetry::Detections(Detections {
            frame: frame as u32,
            capture_us: self.now_us(),
            boxes,
            left_out: found.len().saturating_sub(MAX_BOXES) as u32,
        });
        self.offer(&[message], worth);
        let Some(image) = image.filter(|_| !self.args.no_products) else {
            return;
        };
        for d in found.iter().take(MAX_BOXES) {
            let png = crop_png(image, d);
            let worth = value(&self.priorities, d.class, d.score);
            self.product(frame, ProductKind::DetectionCrop, d.class, &png, worth);
        }
    }

    /// A scene's class map: one grey pixel per tile, its value the tile's class.
    pub fn class_map(&mut self, frame: u64, map: &GrayImage, worth: f32) {
        if self.args.no_products {
            return;
        }
        let png = png_bytes(
            map.as_raw(),
            map.width(),
            map.height(),
            image::ExtendedColorType::L8,
        );
        self.product(frame, ProductKind::ClassMap, 0, &png, worth);
    }

    fn product(&mut self, frame: u64, kind: ProductKind, class: u16, png: &[u8], worth: f32) {
        let number = self.products as u32;
        self.products += 1;
        let Ok(parts) = product::split(number, frame as u32, kind, class, png) else {
            self.queue.stats.refused_too_large += 1;
            return;
        };
        let messages: Vec<Telemetry> = parts.map(Telemetry::ProductPart).collect();
        self.offer(&messages, worth);
    }

    /// Queue `messages` as one item, then send what the budget allows now.
    fn offer(&mut self, messages: &[Telemetry], worth: f32) {
        let mut writer = ItemWriter::new(&mut self.item);
        let fits = messages.iter().all(|m| writer.push(m).is_ok());
        if fits {
            self.queue.offer(writer.bytes(), worth);
        } else {
            // Larger than an item: counted as the queue counts its own.
            self.queue.stats.offered += 1;
            self.queue.stats.refused_too_large += 1;
        }
        if !self.one_pass() {
            self.pump();
        }
    }

    /// Send what the current window's budget allows, and a heartbeat when one is due.
    fn pump(&mut self) {
        let now = self.now_us();
        if let AnyFramer::Mavlink(mav) = &mut self.framer {
            let due = self
                .last_heartbeat_us
                .is_none_or(|last| now.saturating_sub(last) >= HEARTBEAT_US);
            if due {
                self.last_heartbeat_us = Some(now);
                if let Ok(len) = mav.heartbeat(&mut self.out) {
                    let bytes = self.out[..len].to_vec();
                    self.write(&bytes);
                }
            }
        }
        while let Some(len) = self
            .queue
            .send(now, self.framer.as_framing(), &mut self.out)
        {
            let bytes = self.out[..len].to_vec();
            self.write(&bytes);
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.sent_bytes += bytes.len() as u64;
        if self.link_error.is_some() {
            return;
        }
        if let Some(link) = &mut self.link {
            if let Err(e) = link.write_all(bytes) {
                eprintln!("warning: telemetry link: {e}; nothing more is written to it");
                self.link_error = Some(e.to_string());
            }
        }
    }

    /// The end of the run: a last health snapshot, the pass sent best first within its budget,
    /// the link flushed; the figures.
    pub fn finish(mut self, health: Health) -> DownlinkReport {
        let message = Telemetry::Health(health);
        self.offer(&[message], HOUSEKEEPING);
        self.pump();
        if let Some(link) = &mut self.link {
            if let Err(e) = link.flush() {
                self.link_error.get_or_insert(e.to_string());
            }
        }
        DownlinkReport {
            framing: self.args.telemetry,
            link: self.args.link.clone(),
            budget_bytes: self.args.downlink_budget,
            window_s: self.args.downlink_window_s,
            raw_bytes: self.raw_bytes,
            produced_bytes: self.queue.stats.offered_bytes,
            sent_bytes: self.sent_bytes,
            reduction_ratio: self.sent_bytes as f64 / self.raw_bytes.max(1) as f64,
            products: self.products,
            left_in_queue: self.queue.len(),
            queue: self.queue.stats,
            link_error: self.link_error,
        }
    }
}

/// A health snapshot from the runtime's counters and sorted latencies.
pub fn health_message(
    health: &kestrel_runtime::health::Health,
    sorted_latency_us: &[u64],
    uptime_us: u64,
) -> Health {
    use kestrel_runtime::health::ErrorKind;
    let mut errors = [0u64; kestrel_wire::message::ERROR_KINDS];
    for (slot, kind) in errors.iter_mut().zip(ErrorKind::ALL) {
        *slot = health.errors(kind);
    }
    let percentile = |p| crate::eval::percentile(sorted_latency_us, p).min(u32::MAX as u64) as u32;
    Health {
        uptime_us,
        frames_in: health.frames_in,
        frames_done: health.frames_done,
        frames_dropped: health.frames_dropped,
        errors,
        queue_depth: 0,
        latency_p50_us: percentile(50.0),
        latency_p99_us: percentile(99.0),
        temperature_mc: None,
        power_mw: None,
    }
}

/// One summary line.
pub fn print_summary(r: &DownlinkReport) {
    let kb = |b: u64| b as f64 / 1024.0;
    let budget = match (r.budget_bytes, r.window_s) {
        (None, _) => "no budget".to_string(),
        (Some(b), 0.0) => format!("budget {b} B for the pass"),
        (Some(b), w) => format!("budget {b} B per {w} s"),
    };
    let framing = match r.framing {
        FramingArg::Ccsds => "CCSDS",
        FramingArg::Mavlink => "MAVLink 2",
    };
    println!(
        "downlink    {:.1} KB sent as {framing} ({budget}) of {:.1} KB raw: {:.3}%; {} items sent, {} dropped, {} left queued; {} products",
        kb(r.sent_bytes),
        kb(r.raw_bytes),
        100.0 * r.reduction_ratio,
        r.queue.sent,
        r.queue.refused_low_value + r.queue.evicted_low_value + r.queue.refused_too_large,
        r.left_in_queue,
        r.products,
    );
    if let Some(e) = &r.link_error {
        println!("            link failed: {e}");
    }
}

/// A PNG of `samples`.
fn png_bytes(samples: &[u8], width: u32, height: u32, colour: image::ExtendedColorType) -> Vec<u8> {
    let mut png = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new(&mut png);
    // Writing into memory cannot fail for a well-formed image; an empty product is sent if it
    // somehow does.
    let _ = encoder.write_image(samples, width, height, colour);
    png
}

/// A crop around `d` (a quarter of its size again on each side), at most [`CROP_MAX`] pixels
/// on its longer side.
fn crop_png(image: &RgbImage, d: &Detection) -> Vec<u8> {
    let (w, h) = (image.width() as f32, image.height() as f32);
    let x0 = (d.x - d.w / 4.0).clamp(0.0, w - 1.0);
    let y0 = (d.y - d.h / 4.0).clamp(0.0, h - 1.0);
    let x1 = (d.x + d.w * 1.25).clamp(x0 + 1.0, w);
    let y1 = (d.y + d.h * 1.25).clamp(y0 + 1.0, h);
    let crop = imageops::crop_imm(
        image,
        x0 as u32,
        y0 as u32,
        (x1 - x0) as u32,
        (y1 - y0) as u32,
    )
    .to_image();
    let longer = crop.width().max(crop.height());
    let crop = if longer > CROP_MAX {
        let scale = CROP_MAX as f32 / longer as f32;
        let nw = ((crop.width() as f32 * scale).round() as u32).max(1);
        let nh = ((crop.height() as f32 * scale).round() as u32).max(1);
        imageops::resize(&crop, nw, nh, imageops::FilterType::Triangle)
    } else {
        crop
    };
    png_bytes(
        crop.as_raw(),
        crop.width(),
        crop.height(),
        image::ExtendedColorType::Rgb8,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_are_named_by_label_and_bad_ones_are_refused() {
        let labels: Vec<String> = ["plane", "ship"].map(String::from).to_vec();
        assert_eq!(priorities(&["ship=4".into()], &labels).unwrap(), [1.0, 4.0]);
        for bad in ["ship", "boat=2", "ship=-1", "ship=x"] {
            let e = priorities(&[bad.into()], &labels).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
