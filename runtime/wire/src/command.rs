//! Commands to the payload, each with a stable id, and the gate that accepts or rejects them.
//!
//! A command travels as `[id: u16 big-endian][version: u8][sequence: u16 big-endian][postcard
//! body]` in a CCSDS TC packet ([`crate::ccsds::COMMAND_APID`]). [`CommandGate::accept`] decodes
//! and range-checks it and refuses a replay (a sequence number not newer than the last one
//! accepted); every command gets a [`CommandAck`], accepted or with a [`RejectReason`].

use serde::{Deserialize, Serialize};

use crate::message::{CommandAck, Event, EventId, ProductKind, RejectReason};
use crate::WireError;

/// Bytes before a command's body: id, version and sequence number.
pub const COMMAND_HEADER: usize = 5;

/// Bytes of the longest command: the header and a body of at most two varint `u32`s. A packet
/// claiming a longer command is noise (a bit flipped in its length, say), skipped at once
/// rather than waited for, which would hold up every command after it.
pub const MAX_COMMAND: usize = COMMAND_HEADER + 10;

/// What a command is, by its stable id (part of the wire format: never reuse or renumber).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum CommandId {
    /// [`Command::SetScoreThreshold`].
    SetScoreThreshold = 0x8001,
    /// [`Command::SwitchModel`].
    SwitchModel = 0x8002,
    /// [`Command::RequestProduct`].
    RequestProduct = 0x8003,
    /// [`Command::SetDownlinkBudget`].
    SetDownlinkBudget = 0x8004,
    /// [`Command::ReportHealth`].
    ReportHealth = 0x8005,
    /// [`Command::Pause`].
    Pause = 0x8006,
    /// [`Command::Resume`].
    Resume = 0x8007,
}

/// One row of the command table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandInfo {
    /// The stable id.
    pub id: CommandId,
    /// Name in the docs and the ground tools.
    pub name: &'static str,
    /// Version of its body.
    pub version: u8,
    /// What it does, and its arguments' ranges.
    pub meaning: &'static str,
}

/// Every command, as the docs' table lists it (a test checks the README against this).
pub const COMMANDS: [CommandInfo; 7] = [
    CommandInfo {
        id: CommandId::SetScoreThreshold,
        name: "set_score_threshold",
        version: 1,
        meaning: "report detections and classifications scoring at least `threshold` (0 to 1)",
    },
    CommandInfo {
        id: CommandId::SwitchModel,
        name: "switch_model",
        version: 1,
        meaning: "run the plan in `slot` (0 to 15), loaded and checked before the switch",
    },
    CommandInfo {
        id: CommandId::RequestProduct,
        name: "request_product",
        version: 1,
        meaning: "downlink a product of `kind` for `frame`",
    },
    CommandInfo {
        id: CommandId::SetDownlinkBudget,
        name: "set_downlink_budget",
        version: 1,
        meaning: "at most `bytes` (1 or more) every `window_s` seconds (1 or more)",
    },
    CommandInfo {
        id: CommandId::ReportHealth,
        name: "report_health",
        version: 1,
        meaning: "send a health snapshot now",
    },
    CommandInfo {
        id: CommandId::Pause,
        name: "pause",
        version: 1,
        meaning: "stop taking frames; keep the link up",
    },
    CommandInfo {
        id: CommandId::Resume,
        name: "resume",
        version: 1,
        meaning: "take frames again",
    },
];

/// Plan slots a board may hold.
pub const MODEL_SLOTS: u8 = 16;

impl CommandId {
    /// The id for `raw`, if it is one.
    pub fn from_u16(raw: u16) -> Option<Self> {
        COMMANDS.iter().map(|c| c.id).find(|id| *id as u16 == raw)
    }

    /// This command's row of [`COMMANDS`].
    pub fn info(self) -> CommandInfo {
        COMMANDS
            .iter()
            .copied()
            .find(|c| c.id == self)
            .unwrap_or(COMMANDS[0])
    }
}

/// A command and its arguments.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Command {
    /// Report results scoring at least `threshold`.
    SetScoreThreshold {
        /// 0 to 1.
        threshold: f32,
    },
    /// Run the plan in `slot`.
    SwitchModel {
        /// 0 to [`MODEL_SLOTS`] - 1.
        slot: u8,
    },
    /// Downlink a product for a frame.
    RequestProduct {
        /// The frame's sequence number.
        frame: u32,
        /// What to send.
        kind: ProductKind,
    },
    /// Set the downlink byte budget.
    SetDownlinkBudget {
        /// Bytes per window, at least 1.
        bytes: u32,
        /// Window length in seconds, at least 1.
        window_s: u32,
    },
    /// Send a health snapshot now.
    ReportHealth,
    /// Stop taking frames.
    Pause,
    /// Take frames again.
    Resume,
}

#[derive(Serialize, Deserialize)]
struct Threshold(f32);
#[derive(Serialize, Deserialize)]
struct Slot(u8);
#[derive(Serialize, Deserialize)]
struct Product(u32, ProductKind);
#[derive(Serialize, Deserialize)]
struct Budget(u32, u32);

impl Command {
    /// Its id.
    pub fn id(&self) -> CommandId {
        match self {
            Self::SetScoreThreshold { .. } => CommandId::SetScoreThreshold,
            Self::SwitchModel { .. } => CommandId::SwitchModel,
            Self::RequestProduct { .. } => CommandId::RequestProduct,
            Self::SetDownlinkBudget { .. } => CommandId::SetDownlinkBudget,
            Self::ReportHealth => CommandId::ReportHealth,
            Self::Pause => CommandId::Pause,
            Self::Resume => CommandId::Resume,
        }
    }

    /// Whether its arguments are in range.
    pub fn in_range(&self) -> bool {
        match *self {
            Self::SetScoreThreshold { threshold } => (0.0..=1.0).contains(&threshold),
            Self::SwitchModel { slot } => slot < MODEL_SLOTS,
            Self::SetDownlinkBudget { bytes, window_s } => bytes > 0 && window_s > 0,
            Self::RequestProduct { .. } | Self::ReportHealth | Self::Pause | Self::Resume => true,
        }
    }

    /// Encode with `sequence` into the front of `buf` (the ground side); the bytes written.
    pub fn encode<'b>(&self, sequence: u16, buf: &'b mut [u8]) -> Result<&'b [u8], WireError> {
        let info = self.id().info();
        let (head, body) = buf
            .split_at_mut_checked(COMMAND_HEADER)
            .ok_or(WireError::BufferTooSmall)?;
        let [id_high, id_low] = (info.id as u16).to_be_bytes();
        let [seq_high, seq_low] = sequence.to_be_bytes();
        head.copy_from_slice(&[id_high, id_low, info.version, seq_high, seq_low]);
        let written = match *self {
            Self::SetScoreThreshold { threshold } => {
                postcard::to_slice(&Threshold(threshold), body)
            }
            Self::SwitchModel { slot } => postcard::to_slice(&Slot(slot), body),
            Self::RequestProduct { frame, kind } => postcard::to_slice(&Product(frame, kind), body),
            Self::SetDownlinkBudget { bytes, window_s } => {
                postcard::to_slice(&Budget(bytes, window_s), body)
            }
            Self::ReportHealth | Self::Pause | Self::Resume => postcard::to_slice(&(), body),
        }
        .map_err(|_| WireError::BufferTooSmall)?
        .len();
        buf.get(..COMMAND_HEADER + written)
            .ok_or(WireError::BufferTooSmall)
    }
}

/// The body of `bytes`, which it must fill exactly; anything else is a malformed command.
fn body_of<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, RejectReason> {
    crate::message::body_of(bytes).map_err(|_| RejectReason::Malformed)
}

/// What a payload does with the commands it accepts. Each method does the command, or says
/// why it cannot ([`RejectReason::Failed`], or [`RejectReason::OutOfRange`] for an argument
/// this payload cannot take, such as an empty model slot).
pub trait Commandable {
    /// Report results scoring at least `threshold` (already checked to be 0 to 1).
    fn set_score_threshold(&mut self, threshold: f32) -> Result<(), RejectReason>;
    /// Load and check the plan in `slot`, then make it the active model between two frames.
    fn switch_model(&mut self, slot: u8) -> Result<(), RejectReason>;
    /// Downlink a product of `kind` for `frame`.
    fn request_product(&mut self, frame: u32, kind: ProductKind) -> Result<(), RejectReason>;
    /// At most `bytes` every `window_s` seconds, from the next window on.
    fn set_downlink_budget(&mut self, bytes: u32, window_s: u32) -> Result<(), RejectReason>;
    /// Send a health snapshot now.
    fn report_health(&mut self) -> Result<(), RejectReason>;
    /// Stop taking frames (`true`) or take them again (`false`).
    fn set_paused(&mut self, paused: bool) -> Result<(), RejectReason>;
}

/// Accepts commands in order, refusing malformed, unknown, out-of-range and replayed ones.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommandGate {
    last: Option<u16>,
}

impl CommandGate {
    /// A gate that has accepted nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decode and check one command (a TC packet's data field): the command and its
    /// acknowledgement, or the rejection's acknowledgement. Never panics.
    pub fn accept(&mut self, bytes: &[u8]) -> Result<(Command, CommandAck), CommandAck> {
        let reject = |command, sequence, reason| CommandAck {
            command,
            sequence,
            rejected: Some(reason),
        };
        let Some((&[id_high, id_low, version, seq_high, seq_low], body)) =
            bytes.split_first_chunk::<COMMAND_HEADER>()
        else {
            return Err(reject(0, 0, RejectReason::Malformed));
        };
        let (raw, sequence) = (
            u16::from_be_bytes([id_high, id_low]),
            u16::from_be_bytes([seq_high, seq_low]),
        );
        let Some(id) = CommandId::from_u16(raw) else {
            return Err(reject(raw, sequence, RejectReason::UnknownCommand));
        };
        if version != id.info().version {
            return Err(reject(raw, sequence, RejectReason::Malformed));
        }
        let command = match id {
            CommandId::SetScoreThreshold => {
                body_of(body).map(|Threshold(threshold)| Command::SetScoreThreshold { threshold })
            }
            CommandId::SwitchModel => body_of(body).map(|Slot(slot)| Command::SwitchModel { slot }),
            CommandId::RequestProduct => {
                body_of(body).map(|Product(frame, kind)| Command::RequestProduct { frame, kind })
            }
            CommandId::SetDownlinkBudget => body_of(body)
                .map(|Budget(bytes, window_s)| Command::SetDownlinkBudget { bytes, window_s }),
            CommandId::ReportHealth => body_of::<()>(body).map(|()| Command::ReportHealth),
            CommandId::Pause => body_of::<()>(body).map(|()| Command::Pause),
            CommandId::Resume => body_of::<()>(body).map(|()| Command::Resume),
        }
        .map_err(|reason| reject(raw, sequence, reason))?;
        if !command.in_range() {
            return Err(reject(raw, sequence, RejectReason::OutOfRange));
        }
        // Newer means ahead by less than half the sequence space, so the count may wrap.
        if let Some(last) = self.last {
            let ahead = sequence.wrapping_sub(last);
            if ahead == 0 || ahead >= 0x8000 {
                return Err(reject(raw, sequence, RejectReason::StaleSequence));
            }
        }
        self.last = Some(sequence);
        Ok((
            command,
            CommandAck {
                command: raw,
                sequence,
                rejected: None,
            },
        ))
    }
}

impl CommandGate {
    /// Accept one command and carry it out on `payload`: its acknowledgement, and an event to
    /// send with it (a `command_rejected` for every refusal, whether by the gate or by the
    /// payload). Never panics.
    pub fn execute(
        &mut self,
        bytes: &[u8],
        payload: &mut impl Commandable,
    ) -> (CommandAck, Option<Event>) {
        let done = self.accept(bytes).and_then(|(command, ack)| {
            let result = match command {
                Command::SetScoreThreshold { threshold } => payload.set_score_threshold(threshold),
                Command::SwitchModel { slot } => payload.switch_model(slot),
                Command::RequestProduct { frame, kind } => payload.request_product(frame, kind),
                Command::SetDownlinkBudget { bytes, window_s } => {
                    payload.set_downlink_budget(bytes, window_s)
                }
                Command::ReportHealth => payload.report_health(),
                Command::Pause => payload.set_paused(true),
                Command::Resume => payload.set_paused(false),
            };
            result.map(|()| ack).map_err(|reason| CommandAck {
                rejected: Some(reason),
                ..ack
            })
        });
        match done {
            Ok(ack) => (ack, None),
            Err(ack) => {
                let reason = ack.rejected.map_or(0, RejectReason::code);
                let event = EventId::CommandRejected.with([
                    i32::from(ack.command),
                    i32::from(ack.sequence),
                    reason,
                ]);
                (ack, Some(event))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ccsds::{Decoder, Framer};

    fn every_command() -> [Command; 7] {
        [
            Command::SetScoreThreshold { threshold: 0.35 },
            Command::SwitchModel { slot: 15 },
            Command::RequestProduct {
                frame: u32::MAX,
                kind: ProductKind::ClassMap,
            },
            Command::SetDownlinkBudget {
                bytes: 2_000_000,
                window_s: 600,
            },
            Command::ReportHealth,
            Command::Pause,
            Command::Resume,
        ]
    }

    #[test]
    fn every_command_fits_the_longest_a_decoder_waits_for() {
        assert!(every_command()
            .iter()
            .all(|c| encoded(c, u16::MAX).len() <= MAX_COMMAND));
        let widest = Command::SetDownlinkBudget {
            bytes: u32::MAX,
            window_s: u32::MAX,
        };
        assert_eq!(
            encoded(&widest, 1).len(),
            MAX_COMMAND,
            "two u32 varints at their longest"
        );
    }

    #[test]
    fn a_flipped_length_holds_up_no_command_after_it() {
        let mut framer = Framer::new();
        let mut buf = [0u8; 64];
        let mut damaged = framer
            .frame_command(&Command::ReportHealth, 1, &mut buf)
            .unwrap()
            .to_vec();
        damaged[4] ^= 0x80; // the data length's high byte: 32 KB more to wait for
        let mut stream = damaged;
        stream.extend_from_slice(framer.frame_command(&Command::Pause, 2, &mut buf).unwrap());
        let mut decoder = Decoder::new();
        let (data, used) = decoder
            .next_command(&stream)
            .expect("the next command, now");
        assert_eq!(used, stream.len());
        let (command, _) = CommandGate::new().accept(data).unwrap();
        assert_eq!(command, Command::Pause);
    }

    fn encoded(command: &Command, sequence: u16) -> std::vec::Vec<u8> {
        let mut buf = [0u8; 64];
        command.encode(sequence, &mut buf).unwrap().to_vec()
    }

    #[test]
    fn every_command_crosses_the_link_and_is_acknowledged() {
        let (mut framer, mut gate) = (Framer::new(), CommandGate::new());
        let mut stream = std::vec::Vec::new();
        let mut buf = [0u8; 64];
        for (i, command) in every_command().iter().enumerate() {
            stream.extend_from_slice(
                framer
                    .frame_command(command, 100 + i as u16, &mut buf)
                    .unwrap(),
            );
            stream.extend_from_slice(&[0x5a; 3]); // noise between packets
        }
        let (mut decoder, mut at) = (Decoder::new(), 0);
        for (i, expected) in every_command().iter().enumerate() {
            let (data, used) = decoder.next_command(&stream[at..]).unwrap();
            at += used;
            let (command, ack) = gate.accept(data).unwrap();
            assert_eq!(&command, expected);
            assert_eq!(ack.command, expected.id() as u16);
            assert_eq!((ack.sequence, ack.rejected), (100 + i as u16, None));
        }
        assert_eq!(decoder.stats.packets, 7);
        // Telemetry decoding does not take command packets for messages.
        assert!(Decoder::new().next(&stream).is_none());
    }

    #[test]
    fn bad_commands_are_rejected_with_their_reason() {
        let reason =
            |gate: &mut CommandGate, bytes: &[u8]| gate.accept(bytes).unwrap_err().rejected;
        let mut gate = CommandGate::new();
        let threshold = encoded(&Command::SetScoreThreshold { threshold: 0.5 }, 1);
        assert_eq!(
            reason(&mut gate, &threshold[..threshold.len() - 1]),
            Some(RejectReason::Malformed)
        );
        assert_eq!(
            reason(&mut gate, &[threshold.as_slice(), &[0]].concat()),
            Some(RejectReason::Malformed)
        );
        assert_eq!(reason(&mut gate, &[0x80]), Some(RejectReason::Malformed));
        let mut unknown = threshold.clone();
        unknown[1] = 0x7f;
        assert_eq!(gate.accept(&unknown).unwrap_err().command, 0x807f);
        assert_eq!(
            reason(&mut gate, &unknown),
            Some(RejectReason::UnknownCommand)
        );
        for out_of_range in [
            Command::SetScoreThreshold { threshold: 1.5 },
            Command::SetScoreThreshold {
                threshold: f32::NAN,
            },
            Command::SwitchModel { slot: MODEL_SLOTS },
            Command::SetDownlinkBudget {
                bytes: 0,
                window_s: 60,
            },
            Command::SetDownlinkBudget {
                bytes: 10,
                window_s: 0,
            },
        ] {
            assert_eq!(
                reason(&mut gate, &encoded(&out_of_range, 2)),
                Some(RejectReason::OutOfRange)
            );
        }
        // Nothing so far was accepted; now sequence 10 is, and 10 again or 9 are replays.
        assert!(gate.accept(&encoded(&Command::Pause, 10)).is_ok());
        assert_eq!(
            reason(&mut gate, &encoded(&Command::Resume, 10)),
            Some(RejectReason::StaleSequence)
        );
        assert_eq!(
            reason(&mut gate, &encoded(&Command::Resume, 9)),
            Some(RejectReason::StaleSequence)
        );
        assert!(gate.accept(&encoded(&Command::Resume, 11)).is_ok());
        // The count may wrap: 65535 then 0 is in order.
        let mut gate = CommandGate::new();
        assert!(gate.accept(&encoded(&Command::Pause, u16::MAX)).is_ok());
        assert!(gate.accept(&encoded(&Command::Resume, 0)).is_ok());
    }

    /// A payload that records what it was told, and has models in slots 0 and 1 only.
    #[derive(Default)]
    struct Recorder {
        done: std::vec::Vec<Command>,
    }

    impl Commandable for Recorder {
        fn set_score_threshold(&mut self, threshold: f32) -> Result<(), RejectReason> {
            self.done.push(Command::SetScoreThreshold { threshold });
            Ok(())
        }
        fn switch_model(&mut self, slot: u8) -> Result<(), RejectReason> {
            if slot > 1 {
                return Err(RejectReason::OutOfRange);
            }
            self.done.push(Command::SwitchModel { slot });
            Ok(())
        }
        fn request_product(&mut self, frame: u32, kind: ProductKind) -> Result<(), RejectReason> {
            self.done.push(Command::RequestProduct { frame, kind });
            Ok(())
        }
        fn set_downlink_budget(&mut self, bytes: u32, window_s: u32) -> Result<(), RejectReason> {
            self.done
                .push(Command::SetDownlinkBudget { bytes, window_s });
            Ok(())
        }
        fn report_health(&mut self) -> Result<(), RejectReason> {
            self.done.push(Command::ReportHealth);
            Ok(())
        }
        fn set_paused(&mut self, paused: bool) -> Result<(), RejectReason> {
            self.done.push(if paused {
                Command::Pause
            } else {
                Command::Resume
            });
            Ok(())
        }
    }

    #[test]
    fn executed_commands_reach_the_payload_and_refusals_raise_an_event() {
        let (mut gate, mut payload) = (CommandGate::new(), Recorder::default());
        for (i, command) in every_command().iter().enumerate() {
            let command = match command {
                Command::SwitchModel { .. } => Command::SwitchModel { slot: 1 },
                other => *other,
            };
            let (ack, event) = gate.execute(&encoded(&command, i as u16 + 1), &mut payload);
            assert_eq!((ack.rejected, event), (None, None));
        }
        assert_eq!(payload.done.len(), 7);
        // The payload refuses slot 9; the gate refuses a replay; both raise command_rejected.
        let (ack, event) = gate.execute(
            &encoded(&Command::SwitchModel { slot: 9 }, 20),
            &mut payload,
        );
        assert_eq!(ack.rejected, Some(RejectReason::OutOfRange));
        assert_eq!(
            event,
            Some(Event {
                id: EventId::CommandRejected as u16,
                severity: crate::message::Severity::Warning,
                args: [0x8002, 20, RejectReason::OutOfRange.code()],
            })
        );
        let (ack, event) = gate.execute(&encoded(&Command::Pause, 20), &mut payload);
        assert_eq!(ack.rejected, Some(RejectReason::StaleSequence));
        assert_eq!(event.unwrap().args[2], RejectReason::StaleSequence.code());
        assert_eq!(payload.done.len(), 7, "nothing refused was done");
    }
}
