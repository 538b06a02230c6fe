//! `sim decode`: the ground side. Reads a telemetry byte stream (a capture file, or a TCP
//! sender), prints every message as a JSON line, joins products, and reports sequence gaps,
//! CRC failures, truncated packets and unknown ids. To a TCP sender it can send commands.

use std::io::{BufWriter, ErrorKind, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use kestrel_wire::ccsds::{Decoder, Framer, StreamStats};
use kestrel_wire::command::COMMANDS;
use kestrel_wire::mavlink::{Incoming, MavlinkDecoder, MavlinkFramer, COMPONENT_ID};
use kestrel_wire::message::{ProductKind, Telemetry};
use kestrel_wire::product::{Product, ProductStats, Reassembler};
use kestrel_wire::Command;
use serde_json::{json, Value};

use kestrel_payload::downlink::FramingArg;

#[derive(clap::Args)]
pub struct DecodeArgs {
    /// A capture file (as `--link file:PATH` writes it), `tcp://HOST:PORT` to listen there
    /// for one sender (`sim eval ... --link tcp://HOST:PORT` connects to it), or
    /// `udp://HOST:PORT` to take datagrams there (`--link udp://HOST:PORT`).
    source: String,
    /// With udp://, stop after this many seconds without a datagram, once one has arrived.
    #[arg(long, default_value_t = 5.0)]
    idle_s: f64,
    /// The stream's framing.
    #[arg(long, value_enum, default_value_t = FramingArg::Ccsds)]
    telemetry: FramingArg,
    /// Write the JSON lines here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write each whole product here as `<product>-frame<frame>-<kind>.png`.
    #[arg(long)]
    products: Option<PathBuf>,
    /// With tcp:// or udp://, send this command to the sender as soon as it connects or its
    /// first datagram arrives (repeat for more,
    /// sent in order with sequence numbers from 1): `set_score_threshold 0.5`,
    /// `switch_model 1`, `request_product FRAME thumbnail|crop|classmap`,
    /// `set_downlink_budget BYTES WINDOW_S`, `report_health`, `pause`, `resume`.
    #[arg(long = "command", value_name = "COMMAND")]
    commands: Vec<String>,
}

/// A command written as its name and arguments, as `--command` takes it.
fn parse_command(text: &str) -> anyhow::Result<Command> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let arg = |i: usize| -> anyhow::Result<&str> {
        words
            .get(i)
            .copied()
            .with_context(|| format!("--command {text}: argument {i} is missing"))
    };
    let number = |i: usize| -> anyhow::Result<u32> {
        arg(i)?
            .parse()
            .with_context(|| format!("--command {text}: argument {i} must be a whole number"))
    };
    let command = match words.first().copied().unwrap_or_default() {
        "set_score_threshold" => Command::SetScoreThreshold {
            threshold: arg(1)?
                .parse()
                .with_context(|| format!("--command {text}: the threshold must be a number"))?,
        },
        "switch_model" => Command::SwitchModel {
            slot: u8::try_from(number(1)?).unwrap_or(u8::MAX),
        },
        "request_product" => Command::RequestProduct {
            frame: number(1)?,
            kind: match arg(2)? {
                "thumbnail" => ProductKind::Thumbnail,
                "crop" => ProductKind::DetectionCrop,
                "classmap" => ProductKind::ClassMap,
                other => anyhow::bail!(
                    "--command {text}: no product kind {other} (thumbnail, crop, classmap)"
                ),
            },
        },
        "set_downlink_budget" => Command::SetDownlinkBudget {
            bytes: number(1)?,
            window_s: number(2)?,
        },
        "report_health" => Command::ReportHealth,
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        other => anyhow::bail!(
            "--command {text}: no command {other:?} (the commands are {})",
            COMMANDS.map(|c| c.name).join(", ")
        ),
    };
    if !command.in_range() {
        // Sent anyway: the payload's rejection is worth seeing; but say so here too.
        eprintln!(
            "warning: --command {text}: an argument is out of range; the payload will refuse it"
        );
    }
    Ok(command)
}

/// Frames commands as a ground station sends them, in one framing, its packet counters going
/// on from command to command.
pub struct CommandFramer {
    framing: FramingArg,
    ccsds: Framer,
    mavlink: MavlinkFramer,
}

impl CommandFramer {
    pub fn new(framing: FramingArg) -> Self {
        Self {
            framing,
            ccsds: Framer::new(),
            mavlink: MavlinkFramer::new(255, 190),
        }
    }

    /// `command` with its `sequence` number, framed.
    pub fn frame(&mut self, command: &Command, sequence: u16) -> anyhow::Result<Vec<u8>> {
        let mut buf = [0u8; 512];
        let len = match self.framing {
            FramingArg::Ccsds => self.ccsds.frame_command(command, sequence, &mut buf)?.len(),
            FramingArg::Mavlink => {
                self.mavlink
                    .frame_command(command, sequence, (1, COMPONENT_ID), &mut buf)?
            }
        };
        Ok(buf[..len].to_vec())
    }
}

/// `commands`, framed in `framing` from a ground station, with sequence numbers from 1.
fn frame_commands(commands: &[Command], framing: FramingArg) -> anyhow::Result<Vec<u8>> {
    let mut framer = CommandFramer::new(framing);
    let mut out = Vec::new();
    for (i, command) in commands.iter().enumerate() {
        out.extend(framer.frame(command, i as u16 + 1)?);
    }
    Ok(out)
}

/// Joined MAVLink messages may be this long: a 128-segment message.
const MAVLINK_MAX: usize = 16 * 1024;

enum AnyDecoder {
    Ccsds(Decoder),
    Mavlink(Box<MavlinkDecoder<MAVLINK_MAX>>),
}

/// A message as JSON: its name and its fields (a product part's bytes as their count).
fn message_json(message: &Telemetry) -> Value {
    let name = message.id().info().name;
    let fields = match message {
        Telemetry::Classification(m) => serde_json::to_value(m),
        Telemetry::Detections(m) => serde_json::to_value(m),
        Telemetry::Health(m) => serde_json::to_value(m),
        Telemetry::Event(m) => serde_json::to_value(m),
        Telemetry::CommandAck(m) => serde_json::to_value(m),
        Telemetry::ProductPart(m) => Ok(json!({
            "product": m.product,
            "frame": m.frame,
            "kind": m.kind,
            "class": m.class,
            "part": m.part,
            "parts": m.parts,
            "bytes": m.data.len(),
        })),
    };
    json!({ "type": name, "fields": fields.unwrap_or(Value::Null) })
}

fn kind_name(kind: ProductKind) -> &'static str {
    match kind {
        ProductKind::DetectionCrop => "crop",
        ProductKind::Thumbnail => "thumbnail",
        ProductKind::ClassMap => "classmap",
    }
}

/// What the ground does with each message besides writing its JSON line.
pub type Observer = Box<dyn FnMut(&Telemetry) + Send>;

/// The ground decoder: telemetry bytes in, a JSON line per message out, products joined.
pub struct Ground {
    decoder: AnyDecoder,
    products: Reassembler,
    product_dir: Option<PathBuf>,
    out: Box<dyn Write + Send>,
    lines: u64,
    observer: Option<Observer>,
}

/// What the ground counted of a stream: the decoder's counts, MAVLink messages that lost a
/// segment, and products.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct GroundStats {
    #[serde(flatten)]
    pub stream: StreamStats,
    pub lost_messages: u64,
    pub products: ProductStats,
}

impl Ground {
    /// A decoder for `framing` writing JSON lines to `out` and, with `product_dir`, each whole
    /// product as a PNG there.
    pub fn new(
        framing: FramingArg,
        product_dir: Option<PathBuf>,
        out: Box<dyn Write + Send>,
    ) -> Self {
        let decoder = match framing {
            FramingArg::Ccsds => AnyDecoder::Ccsds(Decoder::new()),
            FramingArg::Mavlink => AnyDecoder::Mavlink(Box::new(MavlinkDecoder::new())),
        };
        Self {
            decoder,
            products: Reassembler::new(),
            product_dir,
            out,
            lines: 0,
            observer: None,
        }
    }

    /// Also hand every decoded message to `observer`.
    pub fn observe(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    fn emit(&mut self, line: &Value) -> anyhow::Result<()> {
        self.lines += 1;
        writeln!(self.out, "{line}").context("cannot write the JSON lines")
    }

    fn message(&mut self, mut line: Value, message: &Telemetry) -> anyhow::Result<()> {
        if let Some(observer) = &mut self.observer {
            observer(message);
        }
        line["message"] = message_json(message);
        self.emit(&line)?;
        if let Telemetry::ProductPart(part) = message {
            if let Some(product) = self.products.push(part) {
                self.product(&product)?;
            }
        }
        Ok(())
    }

    fn product(&mut self, p: &Product) -> anyhow::Result<()> {
        let file = match &self.product_dir {
            Some(dir) => {
                let path = dir.join(format!(
                    "{}-frame{}-{}.png",
                    p.product,
                    p.frame,
                    kind_name(p.kind)
                ));
                std::fs::write(&path, &p.png)
                    .with_context(|| format!("{}: cannot write", path.display()))?;
                Some(path.display().to_string())
            }
            None => None,
        };
        self.emit(&json!({
            "product": p.product,
            "frame": p.frame,
            "kind": p.kind,
            "class": p.class,
            "bytes": p.png.len(),
            "file": file,
        }))
    }

    /// Take what whole packets or frames `stream` holds; the bytes used.
    pub fn take(&mut self, stream: &[u8]) -> anyhow::Result<usize> {
        let mut at = 0;
        loop {
            let rest = stream.get(at..).unwrap_or_default();
            match &mut self.decoder {
                AnyDecoder::Ccsds(decoder) => {
                    let Some((packet, used)) = decoder.next(rest) else {
                        return Ok(at);
                    };
                    at += used;
                    let line = json!({ "apid": packet.apid, "sequence": packet.sequence });
                    match &packet.message {
                        Ok(message) => self.message(line, message)?,
                        Err(e) => {
                            let mut line = line;
                            line["error"] = e.to_string().into();
                            self.emit(&line)?;
                        }
                    }
                }
                AnyDecoder::Mavlink(decoder) => {
                    let Some((frame, used)) = decoder.next(rest) else {
                        return Ok(at);
                    };
                    at += used;
                    let line = json!({
                        "system": frame.system_id,
                        "component": frame.component_id,
                        "sequence": frame.sequence,
                    });
                    match &frame.incoming {
                        Incoming::Telemetry(Ok(message)) => self.message(line, message)?,
                        Incoming::Telemetry(Err(e)) => {
                            let mut line = line;
                            line["error"] = e.to_string().into();
                            self.emit(&line)?;
                        }
                        Incoming::Heartbeat { mavtype } => {
                            let mut line = line;
                            line["heartbeat"] = json!({ "mavtype": mavtype });
                            self.emit(&line)?;
                        }
                        Incoming::Text(text) => {
                            let mut line = line;
                            line["statustext"] = text.as_str().into();
                            self.emit(&line)?;
                        }
                        Incoming::Command { .. } | Incoming::Segment | Incoming::Other(_) => {}
                    }
                }
            }
        }
    }

    /// The end of the stream, with `rest` its undecoded bytes: the counts, and the JSON
    /// lines flushed.
    pub fn finish(&mut self, rest: &[u8]) -> anyhow::Result<GroundStats> {
        self.products.finish();
        let (stream, lost_messages) = match &mut self.decoder {
            AnyDecoder::Ccsds(d) => {
                d.finish(rest);
                (d.stats, 0)
            }
            AnyDecoder::Mavlink(d) => {
                d.finish(rest);
                (d.stats, d.lost_messages)
            }
        };
        let stats = GroundStats {
            stream,
            lost_messages,
            products: self.products.stats,
        };
        self.emit(&json!({ "stats": stats }))?;
        self.out.flush().context("cannot write the JSON lines")?;
        Ok(stats)
    }
}

/// Datagrams as a byte stream, ending after `idle` without one (once one has arrived); the
/// commands go to the sender of the first.
struct UdpGround {
    socket: UdpSocket,
    idle: Duration,
    commands: Vec<u8>,
    heard: Option<Instant>,
}

impl Read for UdpGround {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.socket.recv_from(buf) {
                Ok((n, peer)) => {
                    if self.heard.is_none() && !self.commands.is_empty() {
                        eprintln!("sim decode: first datagram from {peer}; sending the commands");
                        self.socket.send_to(&self.commands, peer)?;
                    }
                    self.heard = Some(Instant::now());
                    if n > 0 {
                        return Ok(n);
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if self.heard.is_some_and(|t| t.elapsed() >= self.idle) {
                        return Ok(0);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The stream to decode; commands go to a TCP sender as soon as it connects, or to a UDP one
/// when its first datagram arrives.
fn open_source(args: &DecodeArgs, commands: Vec<u8>) -> anyhow::Result<Box<dyn Read>> {
    let source = &args.source;
    if let Some(address) = source.strip_prefix("tcp://") {
        let listener =
            TcpListener::bind(address).with_context(|| format!("{source}: cannot listen"))?;
        eprintln!("sim decode: listening on {address} for one sender");
        let (mut stream, peer) = listener.accept().context("accepting a sender")?;
        eprintln!("sim decode: {peer} connected");
        stream
            .write_all(&commands)
            .with_context(|| format!("{peer}: cannot send the commands"))?;
        return Ok(Box::new(stream));
    }
    if let Some(address) = source.strip_prefix("udp://") {
        if !(args.idle_s > 0.0 && args.idle_s.is_finite()) {
            anyhow::bail!("--idle-s must be more than 0");
        }
        let socket =
            UdpSocket::bind(address).with_context(|| format!("{source}: cannot listen"))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        eprintln!(
            "sim decode: taking datagrams on {address}, until {} s without one",
            args.idle_s
        );
        return Ok(Box::new(UdpGround {
            socket,
            idle: Duration::from_secs_f64(args.idle_s),
            commands,
            heard: None,
        }));
    }
    if !commands.is_empty() {
        anyhow::bail!(
            "--command needs a tcp:// or udp:// source: a capture file cannot take commands"
        );
    }
    let file = std::fs::File::open(Path::new(source))
        .with_context(|| format!("{source}: cannot open the capture"))?;
    Ok(Box::new(file))
}

pub fn run(args: &DecodeArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.products {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create folder", dir.display()))?;
    }
    let out: Box<dyn Write + Send> = match &args.out {
        Some(path) => Box::new(BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("{}: cannot create", path.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout())),
    };
    let mut ground = Ground::new(args.telemetry, args.products.clone(), out);
    let commands = args
        .commands
        .iter()
        .map(|c| parse_command(c))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let commands = frame_commands(&commands, args.telemetry)?;
    let mut source = open_source(args, commands)?;
    let (mut buffer, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
    loop {
        let n = match source.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("warning: {}: {e}; decoding what arrived", args.source);
                break;
            }
        };
        buffer.extend_from_slice(&chunk[..n]);
        let used = ground.take(&buffer)?;
        buffer.drain(..used);
    }
    let stats = ground.finish(&buffer)?;
    eprintln!("sim decode: {}", describe(&stats));
    Ok(())
}

/// One line for people: what a stream held and what went wrong in it.
pub fn describe(stats: &GroundStats) -> String {
    let (s, products) = (stats.stream, stats.products);
    format!(
        "{} packets, {} messages, {} products whole ({} lost); {} sequence gaps, {} out of order, {} CRC failures, {} truncated, {} unknown ids, {} malformed, {} bytes skipped{}",
        s.packets,
        s.messages,
        products.complete,
        products.lost,
        s.sequence_gaps,
        s.out_of_order,
        s.crc_failures,
        s.truncated,
        s.unknown_ids,
        s.malformed,
        s.skipped_bytes,
        if stats.lost_messages > 0 {
            format!(", {} messages lost a segment", stats.lost_messages)
        } else {
            String::new()
        }
    )
}
