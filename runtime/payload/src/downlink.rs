//! The downlink: results made into telemetry messages and products, queued by value per byte
//! under a byte budget (`kestrel_wire::downlink`), framed as CCSDS or MAVLink 2 and written to a
//! capture file or a TCP peer; and the data-reduction figures for summaries and reports.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use image::{imageops, GrayImage, ImageEncoder, RgbImage};
use kestrel_runtime::classify::Classification as RuntimeClassification;
use kestrel_runtime::detect::Detection;
use kestrel_runtime::failover::Failover;
use kestrel_runtime::ledger::{DropReason, Ledger, RejectReason};
use kestrel_runtime::supervise::Restart;
use kestrel_runtime::switch::SwitchHandle;
use kestrel_runtime::threaded::FrameFailure;
use kestrel_runtime::BackendError;
use kestrel_wire::ccsds::Framer;
use kestrel_wire::command::MODEL_SLOTS;
use kestrel_wire::downlink::{value, DownlinkQueue, DownlinkStats, ItemWriter};
use kestrel_wire::mavlink::{MavlinkFramer, COMPONENT_ID};
use kestrel_wire::message::{
    Classification, Detections, Event, EventId, Health, LedgerCounts, ProductKind, Ranked, WireBox,
    MAX_BOXES, TOP_K,
};
use kestrel_wire::{product, Framing, Telemetry};
use serde::{Deserialize, Serialize};

use crate::command::{lock, Controls, Payload, Slots};

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

/// The link's framing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum FramingArg {
    /// CCSDS space packets (a satellite's downlink).
    Ccsds,
    /// MAVLink 2 (a UAV's companion computer beside its autopilot).
    Mavlink,
}

/// How results leave: framing, link, budget, priorities, products, model slots. `sim` takes
/// these as flags, the flight binary as its configuration's `[downlink]` table.
#[derive(Clone, Debug, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct DownlinkArgs {
    /// Framing of the telemetry: CCSDS space packets or MAVLink 2.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = FramingArg::Ccsds))]
    pub telemetry: FramingArg,
    /// Where the telemetry goes: `file:PATH` (a capture: the bytes as they would cross the
    /// link), `tcp://HOST:PORT`, or `udp://HOST:PORT` (a datagram per send; what is lost is
    /// lost, and the ground counts it). Commands come back on tcp:// and udp:// links.
    /// Without it the bytes are counted, not kept.
    #[cfg_attr(feature = "clap", arg(long))]
    pub link: Option<String>,
    /// Downlink budget in bytes per window [default: none: everything produced is sent].
    #[cfg_attr(feature = "clap", arg(long))]
    pub downlink_budget: Option<u32>,
    /// The budget's window in seconds; 0 makes the whole run one pass, sent best first at its
    /// end, as at a ground-station pass.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0.0))]
    pub downlink_window_s: f64,
    /// Class priorities for the downlink's value order, as LABEL=WEIGHT pairs separated by
    /// commas (a class not named weighs 1).
    #[cfg_attr(feature = "clap", arg(long, value_delimiter = ','))]
    pub priority: Vec<String>,
    /// Send no products (detection crops, class maps), only results and health.
    #[cfg_attr(feature = "clap", arg(long))]
    pub no_products: bool,
    /// A model the `switch_model` command may switch to, as SLOT=MODEL (slot 0 is --model;
    /// slots 1 to 15; it must be for the same task, classes and input).
    #[cfg_attr(feature = "clap", arg(long = "slot", value_name = "SLOT=MODEL"))]
    pub slots: Vec<String>,
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
            slots: Vec::new(),
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
    /// sent / raw; `None` (JSON null) when no frame came in.
    pub reduction_ratio: Option<f64>,
    /// Products made (each becomes one item of one or more parts).
    pub products: u64,
    /// Items still queued at the end (the budget ran out).
    pub left_in_queue: usize,
    /// What the queue did: offered, sent, refused and evicted by reason.
    pub queue: DownlinkStats,
    /// Why writing to the link failed, if it did (nothing more was written after).
    pub link_error: Option<String>,
    /// What became of the frames' results: the downlink's part of the frame ledger.
    pub results: ResultsReport,
    /// How every accepted frame ended.
    #[serde(skip)]
    pub ledger: Ledger,
}

/// The ends of the frames whose result reached the downlink.
#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct ResultsReport {
    /// Results made.
    pub made: u64,
    /// Sent on a working link.
    pub sent: u64,
    /// Still queued at the end.
    pub queued: u64,
    /// Below the reporting threshold: not offered.
    pub below_threshold: u64,
    /// Refused by the downlink queue for more valuable items.
    pub refused_low_value: u64,
    /// Evicted from the downlink queue by more valuable items.
    pub evicted_low_value: u64,
    /// Too large for the link, or not framable.
    pub too_large: u64,
    /// Written after the link had failed.
    pub link_down: u64,
}

impl ResultsReport {
    /// Add these ends to `ledger`.
    pub fn settle(&self, ledger: &mut Ledger) {
        ledger.sent += self.sent;
        ledger.queued += self.queued;
        for (reason, n) in [
            (DropReason::BelowThreshold, self.below_threshold),
            (DropReason::DownlinkRefused, self.refused_low_value),
            (DropReason::DownlinkEvicted, self.evicted_low_value),
            (DropReason::DownlinkTooLarge, self.too_large),
            (DropReason::LinkDown, self.link_down),
        ] {
            ledger.drop_many(reason, n);
        }
    }
}

/// The ledger as health telemetry carries it.
pub fn ledger_counts(ledger: &Ledger) -> LedgerCounts {
    LedgerCounts {
        accepted: ledger.accepted,
        sent: ledger.sent,
        queued: ledger.queued,
        // The wire's arrays are the ledger's, reason for reason: a new reason that the wire
        // does not carry fails to compile here.
        dropped: ledger.dropped,
        rejected: ledger.rejected,
    }
}

/// The ledger as reports carry it: accepted, sent, queued, dropped and rejected by reason, and
/// `unaccounted` (0 when it balances).
#[derive(Serialize, Debug, Clone)]
pub struct LedgerReport {
    pub accepted: u64,
    pub sent: u64,
    pub queued: u64,
    pub dropped: std::collections::BTreeMap<&'static str, u64>,
    pub rejected: std::collections::BTreeMap<&'static str, u64>,
    pub unaccounted: i64,
}

impl From<&LedgerCounts> for LedgerReport {
    /// The ledger as health telemetry carried it.
    fn from(counts: &LedgerCounts) -> Self {
        let ledger = Ledger {
            accepted: counts.accepted,
            sent: counts.sent,
            queued: counts.queued,
            dropped: counts.dropped,
            rejected: counts.rejected,
        };
        Self::from(&ledger)
    }
}

impl From<&Ledger> for LedgerReport {
    fn from(ledger: &Ledger) -> Self {
        Self {
            accepted: ledger.accepted,
            sent: ledger.sent,
            queued: ledger.queued,
            dropped: DropReason::ALL
                .iter()
                .map(|&r| (r.name(), ledger.dropped(r)))
                .collect(),
            rejected: RejectReason::ALL
                .iter()
                .map(|&r| (r.name(), ledger.rejected(r)))
                .collect(),
            unaccounted: ledger.unaccounted() as i64,
        }
    }
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

/// The link's sending side: where bytes go, what was sent, and whether it failed.
struct LinkOut {
    writer: Option<Box<dyn Write + Send>>,
    /// Bytes sent (counted even without a writer, or after it failed).
    sent_bytes: u64,
    /// Why writing failed; nothing more is written after.
    error: Option<String>,
}

impl LinkOut {
    /// Write `bytes`; whether they went out (false once the link has failed).
    fn write(&mut self, bytes: &[u8]) -> bool {
        self.sent_bytes += bytes.len() as u64;
        if self.error.is_some() {
            return false;
        }
        if let Some(writer) = &mut self.writer {
            if let Err(e) = writer.write_all(bytes) {
                eprintln!("warning: telemetry link: {e}; nothing more is written to it");
                self.error = Some(e.to_string());
                return false;
            }
        }
        true
    }
}

pub struct Downlink {
    args: DownlinkArgs,
    controls: Arc<Controls>,
    /// The link's way back, when it has one (`tcp://`, `udp://`): commands arrive on it.
    commands: Option<Box<dyn Read + Send>>,
    frames_seen: u64,
    results: u64,
    framer: AnyFramer,
    queue: Box<DownlinkQueue<SLOTS, ITEM_MAX>>,
    link: LinkOut,
    priorities: Vec<f32>,
    started: Instant,
    last_heartbeat_us: Option<u64>,
    raw_bytes: u64,
    products: u64,
    below_threshold: u64,
    results_link_down: u64,
    /// The pipeline's part of the frame ledger: frames accepted, dropped before a result,
    /// rejected.
    ledger: Ledger,
    item: Vec<u8>,
    out: Vec<u8>,
}

/// A UDP telemetry link: each send one datagram to the ground; commands are the datagrams the
/// ground sends back to this socket.
struct UdpLink(UdpSocket);

impl Write for UdpLink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.send(buf) {
            // Nobody listening (yet): the datagram is lost, as on a radio link, and the
            // ground counts the gap.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(buf.len()),
            sent => sent,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Read for UdpLink {
    /// The next non-empty datagram (an empty one would read as the end of the link).
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.0.recv(buf) {
                Ok(0) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                received => return received,
            }
        }
    }
}

/// The way out a link spec names, and its way back for commands when it has one.
type OpenedLink = (Box<dyn Write + Send>, Option<Box<dyn Read + Send>>);

/// The link named by `--link`, and its way back for commands when it has one.
fn open_link(spec: &str) -> anyhow::Result<OpenedLink> {
    if let Some(path) = spec.strip_prefix("file:") {
        let path = PathBuf::from(path);
        let file = std::fs::File::create(&path)
            .with_context(|| format!("--link {spec}: cannot create {}", path.display()))?;
        return Ok((Box::new(std::io::BufWriter::new(file)), None));
    }
    if let Some(address) = spec.strip_prefix("tcp://") {
        let stream = TcpStream::connect(address)
            .with_context(|| format!("--link {spec}: cannot connect to {address}"))?;
        // Each packet leaves when it is written: Nagle's wait would add tens of milliseconds
        // to a result's latency on the ground.
        stream
            .set_nodelay(true)
            .with_context(|| format!("--link {spec}: cannot set TCP_NODELAY"))?;
        let back = stream
            .try_clone()
            .with_context(|| format!("--link {spec}: cannot read commands from it"))?;
        return Ok((Box::new(stream), Some(Box::new(back))));
    }
    if let Some(address) = spec.strip_prefix("udp://") {
        let ground = address
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .with_context(|| format!("--link {spec}: {address} is not an address"))?;
        let any: SocketAddr = if ground.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let socket = UdpSocket::bind(any)
            .and_then(|s| s.connect(ground).map(|()| s))
            .with_context(|| format!("--link {spec}: cannot open a UDP socket to {ground}"))?;
        let back = socket
            .try_clone()
            .with_context(|| format!("--link {spec}: cannot read commands from it"))?;
        return Ok((Box::new(UdpLink(socket)), Some(Box::new(UdpLink(back)))));
    }
    bail!("--link {spec}: expected file:PATH, tcp://HOST:PORT or udp://HOST:PORT")
}

/// The `--slot N=MODEL` pairs as (slot, model), slots 1 to 15.
pub fn slot_pairs(pairs: &[String]) -> anyhow::Result<Vec<(u8, String)>> {
    pairs
        .iter()
        .map(|pair| {
            let parsed = pair
                .split_once('=')
                .and_then(|(slot, name)| Some((slot.parse::<u8>().ok()?, name)));
            match parsed {
                Some((slot @ 1..MODEL_SLOTS, name)) => Ok((slot, name.to_string())),
                _ => bail!("--slot {pair}: expected SLOT=MODEL with a slot from 1 to 15"),
            }
        })
        .collect()
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
        let (link, commands) = match args.link.as_deref().map(open_link).transpose()? {
            Some((link, commands)) => (Some(link), commands),
            None => (None, None),
        };
        Ok(Self {
            args: args.clone(),
            controls: Arc::new(Controls::default()),
            commands,
            frames_seen: 0,
            results: 0,
            framer,
            queue: Box::new(DownlinkQueue::new(budget, window_us)),
            link: LinkOut {
                writer: link,
                sent_bytes: 0,
                error: None,
            },
            priorities: priorities(&args.priority, labels)?,
            started: Instant::now(),
            last_heartbeat_us: None,
            raw_bytes: 0,
            products: 0,
            below_threshold: 0,
            results_link_down: 0,
            ledger: Ledger::default(),
            item: vec![0; ITEM_MAX],
            out: vec![0; 4 * ITEM_MAX],
        })
    }

    /// The settings it was made with.
    pub fn args(&self) -> &DownlinkArgs {
        &self.args
    }

    /// What commands change.
    pub fn controls(&self) -> Arc<Controls> {
        Arc::clone(&self.controls)
    }

    /// Take commands from the link's way back, if it has one, on a thread of their own:
    /// `slots` are the models `switch_model` may load, `switch` swaps them in, `kinds` are the
    /// products made on request.
    pub fn listen_for_commands(
        &mut self,
        slots: Slots,
        switch: SwitchHandle,
        kinds: &[ProductKind],
    ) -> anyhow::Result<()> {
        let Some(link) = self.commands.take() else {
            if self.args.slots.is_empty() {
                return Ok(());
            }
            bail!("--slot needs a command link: --link tcp://HOST:PORT or udp://HOST:PORT");
        };
        let payload = Payload {
            controls: self.controls(),
            slots,
            active_slot: 0,
            switch,
            kinds: kinds.to_vec(),
        };
        let framing = self.args.telemetry;
        std::thread::Builder::new()
            .name("commands".into())
            .spawn(move || crate::command::listen(link, framing, payload))
            .context("cannot start the command thread")?;
        Ok(())
    }

    /// Results scoring below this are not reported (the `set_score_threshold` command).
    fn min_score(&self) -> f32 {
        lock(&self.controls.min_score).unwrap_or(f32::MIN)
    }

    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Whether results are held for one pass at the end rather than sent as they come.
    fn one_pass(&self) -> bool {
        self.args.downlink_budget.is_some() && self.args.downlink_window_s == 0.0
    }

    /// A frame of `bytes` arrived from the sensor: accepted, in the ledger.
    pub fn frame_in(&mut self, bytes: u64) {
        self.raw_bytes += bytes;
        self.frames_seen += 1;
        self.ledger.accepted += 1;
        self.controls
            .frames_taken
            .store(self.frames_seen, Ordering::Relaxed);
    }

    /// An accepted frame that ends without a result: dropped or rejected, in the ledger.
    pub fn frame_failed<E>(&mut self, failure: &FrameFailure<E>) {
        failure.settle(&mut self.ledger);
    }

    /// How every accepted frame has ended so far.
    pub fn ledger(&self) -> Ledger {
        let mut ledger = self.ledger;
        self.results().settle(&mut ledger);
        ledger
    }

    /// One classified frame or tile.
    pub fn classification(&mut self, frame: u64, tile: u16, c: &RuntimeClassification) {
        self.results += 1;
        if c.confidence() < self.min_score() {
            self.below_threshold += 1;
            self.pump();
            return;
        }
        let message = classification_message(frame, tile, c, self.now_us());
        let worth = value(&self.priorities, c.class(), c.confidence());
        self.offer_as(&[Telemetry::Classification(message)], worth, true);
    }

    /// A frame's result again, changed by a re-run after a scrub restored the model: not a
    /// new result in the ledger, but it goes down so the ground has the right one.
    pub fn correction(&mut self, frame: u64, c: &RuntimeClassification) {
        let message = classification_message(frame, 0, c, self.now_us());
        let worth = value(&self.priorities, c.class(), c.confidence());
        self.offer(&[Telemetry::Classification(message)], worth);
    }

    /// A frame's detections again, changed by a re-run after a scrub restored the model (see
    /// [`Downlink::correction`]); without crops.
    pub fn detections_correction(&mut self, frame: u64, found: &[Detection]) {
        let message = Telemetry::Detections(detections_message(frame, found, self.now_us()));
        self.offer(&[message], HOUSEKEEPING);
    }

    /// What has become of the results so far (the ledger's downlink part).
    pub fn results(&self) -> ResultsReport {
        ResultsReport {
            made: self.results,
            sent: self.queue.results.sent - self.results_link_down,
            queued: self.queue.results_queued() as u64,
            below_threshold: self.below_threshold,
            refused_low_value: self.queue.results.refused_low_value,
            evicted_low_value: self.queue.results.evicted_low_value,
            too_large: self.queue.results.too_large,
            link_down: self.results_link_down,
        }
    }

    /// A frame's detections (best first) from the score threshold up, and a crop product of
    /// each sent box from `image`.
    pub fn detections(&mut self, frame: u64, found: &[Detection], image: Option<&RgbImage>) {
        self.results += 1;
        // Best first: those from the threshold up are a prefix (no copy on the hot path).
        let min_score = self.min_score();
        let found = found
            .get(..found.partition_point(|d| d.score >= min_score))
            .unwrap_or_default();
        let worth = found
            .iter()
            .map(|d| value(&self.priorities, d.class, d.score))
            .fold(0.0, f32::max);
        let message = Telemetry::Detections(detections_message(frame, found, self.now_us()));
        self.offer_as(&[message], worth, true);
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

    /// Whether `frame` has a product of `kind` asked for (the request is then used up).
    pub fn wants(&self, frame: u64, kind: ProductKind) -> bool {
        self.controls.take_request(frame as u32, kind)
    }

    /// A thumbnail of `image`, at most `CROP_MAX` pixels a side, worth as much as health.
    pub fn thumbnail(&mut self, frame: u64, image: &RgbImage) {
        let png = rgb_png(&within_crop_max(image));
        self.product(frame, ProductKind::Thumbnail, 0, &png, HOUSEKEEPING);
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
        self.offer_as(messages, worth, false);
    }

    /// [`Downlink::offer`]; `result`: the item carries a frame's result, followed by the ledger.
    fn offer_as(&mut self, messages: &[Telemetry], worth: f32, result: bool) {
        self.enqueue(messages, worth, result);
        if !self.one_pass() {
            self.pump();
        }
    }

    /// Queue `messages` as one item, sending nothing.
    fn enqueue(&mut self, messages: &[Telemetry], worth: f32, result: bool) {
        let mut writer = ItemWriter::new(&mut self.item);
        let fits = messages.iter().all(|m| writer.push(m).is_ok());
        if fits && result {
            self.queue.offer_result(writer.bytes(), worth);
        } else if fits {
            self.queue.offer(writer.bytes(), worth);
        } else {
            // Larger than an item: counted as the queue counts its own.
            self.queue.stats.offered += 1;
            self.queue.stats.refused_too_large += 1;
            self.queue.results.too_large += u64::from(result);
        }
    }

    /// Take what commands asked for: a new budget, acknowledgements and events, a health
    /// snapshot. The replies are queued, not sent: `pump`, which calls this, sends them next.
    /// Offering them would pump from in here, and replies the command thread added meanwhile
    /// would go down before the rest of these (acknowledgements out of command order).
    fn take_commands(&mut self) {
        if let Some((bytes, window_s)) = lock(&self.controls.budget).take() {
            self.args.downlink_budget = Some(bytes);
            self.args.downlink_window_s = f64::from(window_s);
            self.queue
                .set_budget(bytes, u64::from(window_s) * 1_000_000);
        }
        let replies = std::mem::take(&mut *lock(&self.controls.replies));
        for reply in replies {
            self.enqueue(&[reply], HOUSEKEEPING, false);
        }
        if self.controls.health_now.swap(false, Ordering::Relaxed) {
            let health = Health {
                uptime_us: self.now_us(),
                frames_in: self.frames_seen,
                frames_done: self.results,
                ..Health::default()
            };
            self.queue_health(health);
        }
    }

    /// Queue `health`, with the downlink's own queue depth and drops, and the ledger, filled
    /// in; the next `pump` sends it.
    fn queue_health(&mut self, mut health: Health) {
        health.ledger = ledger_counts(&self.ledger());
        let stats = self.queue.stats;
        let count = |n: u64| n.min(u64::from(u32::MAX)) as u32;
        health.downlink_queue = self.queue.len().min(usize::from(u16::MAX)) as u16;
        health.downlink_dropped = [
            count(stats.refused_low_value),
            count(stats.evicted_low_value),
            count(stats.refused_too_large),
        ];
        self.enqueue(&[Telemetry::Health(health)], HOUSEKEEPING, false);
    }

    /// Send what the current window's budget allows, and a heartbeat when one is due.
    fn pump(&mut self) {
        self.take_commands();
        let now = self.now_us();
        if let AnyFramer::Mavlink(mav) = &mut self.framer {
            let due = self
                .last_heartbeat_us
                .is_none_or(|last| now.saturating_sub(last) >= HEARTBEAT_US);
            if due {
                self.last_heartbeat_us = Some(now);
                if let Ok(len) = mav.heartbeat(&mut self.out) {
                    self.link.write(&self.out[..len]);
                }
            }
        }
        let mut results_sent = self.queue.results.sent;
        while let Some(len) = self
            .queue
            .send(now, self.framer.as_framing(), &mut self.out)
        {
            let delivered = self.link.write(&self.out[..len]);
            if self.queue.results.sent > results_sent && !delivered {
                self.results_link_down += 1;
            }
            results_sent = self.queue.results.sent;
        }
    }

    /// The end of the run: a last health snapshot, the pass sent best first within its budget,
    /// the link flushed; the figures.
    pub fn finish(mut self, health: Health) -> DownlinkReport {
        self.queue_health(health);
        self.pump();
        if let Some(writer) = &mut self.link.writer {
            if let Err(e) = writer.flush() {
                self.link.error.get_or_insert(e.to_string());
            }
        }
        DownlinkReport {
            framing: self.args.telemetry,
            link: self.args.link.clone(),
            budget_bytes: self.args.downlink_budget,
            window_s: self.args.downlink_window_s,
            raw_bytes: self.raw_bytes,
            produced_bytes: self.queue.stats.offered_bytes,
            sent_bytes: self.link.sent_bytes,
            reduction_ratio: (self.raw_bytes > 0)
                .then(|| self.link.sent_bytes as f64 / self.raw_bytes as f64),
            products: self.products,
            left_in_queue: self.queue.len(),
            queue: self.queue.stats,
            results: self.results(),
            ledger: self.ledger(),
            link_error: self.link.error,
        }
    }
}

/// The event a change of the active backend goes down as.
pub fn failover_event(change: &Failover) -> Event {
    let index = |i: usize| i32::try_from(i).unwrap_or(i32::MAX);
    match *change {
        Failover::FailedOver {
            from, to, error, ..
        } => EventId::BackendFailover.with([index(from), index(to), fault_code(error)]),
        Failover::Restored { from } => EventId::BackendRestored.with([index(from), 0, 0]),
        Failover::Corrupt {
            index: at,
            restored,
        } => EventId::ModelCorrupt.with([index(at), i32::from(restored), 0]),
    }
}

/// The event a supervised backend's restart after a hang goes down as; the preferred backend,
/// the one supervised, is the chain's first.
pub fn restart_event(restart: &Restart) -> Event {
    let count = i32::try_from(restart.count).unwrap_or(i32::MAX);
    EventId::BackendRestarted.with([0, count, i32::from(restart.loaded)])
}

/// A backend fault's code in a `backend_failover` event (the README's event table).
fn fault_code(error: BackendError) -> i32 {
    match error {
        BackendError::Execution => 1,
        BackendError::NotAvailable => 2,
        BackendError::OutOfMemory => 3,
        BackendError::LaunchFailed => 4,
        BackendError::DeviceLost => 5,
        BackendError::Hung => 6,
        BackendError::InputLength { .. } | BackendError::OutputLength { .. } => 0,
    }
}

/// An RGB copy of interleaved 8-bit samples (one band is grey; the first three of more), to
/// cut products from.
pub fn rgb_image(samples: &[u8], width: u32, height: u32, bands: u16) -> RgbImage {
    let bands = usize::from(bands.max(1));
    RgbImage::from_fn(width, height, |x, y| {
        let i = (y as usize * width as usize + x as usize) * bands;
        let sample = |b: usize| samples.get(i + b.min(bands - 1)).copied().unwrap_or(0);
        image::Rgb([sample(0), sample(1), sample(2)])
    })
}

/// The message a classified frame or tile goes down as (the best [`TOP_K`] classes).
pub fn classification_message(
    frame: u64,
    tile: u16,
    c: &RuntimeClassification,
    capture_us: u64,
) -> Classification {
    let top = c
        .top
        .iter()
        .take(TOP_K)
        .map(|r| Ranked {
            class: r.class,
            score: r.probability,
        })
        .collect();
    Classification {
        frame: frame as u32,
        capture_us,
        tile,
        class: c.class(),
        score: c.confidence(),
        top,
    }
}

/// The message a frame's detections (best first) go down as: the first [`MAX_BOXES`], and a
/// count of the rest.
pub fn detections_message(frame: u64, found: &[Detection], capture_us: u64) -> Detections {
    let boxes = found
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
    Detections {
        frame: frame as u32,
        capture_us,
        boxes,
        left_out: found.len().saturating_sub(MAX_BOXES) as u32,
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
    let percentile = |p| crate::percentile(sorted_latency_us, p).min(u64::from(u32::MAX)) as u32;
    Health {
        uptime_us,
        frames_in: health.frames_in,
        frames_done: health.frames_done,
        frames_dropped: health.frames_dropped,
        errors,
        latency_p50_us: percentile(50.0),
        latency_p99_us: percentile(99.0),
        ..Health::default()
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
    // No frames in (every image failed): no ratio to give, rather than bytes over nothing.
    let ratio = r.reduction_ratio.map_or("no frames".to_string(), |ratio| {
        format!("{:.3}%", 100.0 * ratio)
    });
    println!(
        "downlink    {:.1} KB sent as {framing} ({budget}) of {:.1} KB raw: {ratio}; {} items sent, {} dropped, {} left queued; {} products",
        kb(r.sent_bytes),
        kb(r.raw_bytes),
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
    rgb_png(&within_crop_max(&crop))
}

/// `image`, scaled down to at most [`CROP_MAX`] pixels on its longer side if it is larger.
fn within_crop_max(image: &RgbImage) -> RgbImage {
    let longer = image.width().max(image.height());
    if longer <= CROP_MAX {
        return image.clone();
    }
    let scale = CROP_MAX as f32 / longer as f32;
    let w = ((image.width() as f32 * scale).round() as u32).max(1);
    let h = ((image.height() as f32 * scale).round() as u32).max(1);
    imageops::resize(image, w, h, imageops::FilterType::Triangle)
}

/// A PNG of an RGB image.
fn rgb_png(image: &RgbImage) -> Vec<u8> {
    png_bytes(
        image.as_raw(),
        image.width(),
        image.height(),
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
