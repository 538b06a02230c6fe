//! Commands from the ground over the telemetry link (a `tcp://` link is both ways): read on a
//! thread of their own in the link's framing, checked and carried out through
//! `kestrel_wire::CommandGate::execute`, with every acknowledgement and event sent back down.
//!
//! What a command changes lives in [`Controls`], shared with the run: the downlink reads the
//! score threshold, budget, product requests and health requests from it, the frame source
//! waits while it says paused, and a model switch goes through the backend's `SwitchHandle`
//! after the new model has been loaded and checked on this thread.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kestrel_backend::Backend;
use kestrel_hal::{Frame, FrameSource};
use kestrel_runtime::switch::SwitchHandle;
use kestrel_wire::ccsds::Decoder;
use kestrel_wire::mavlink::{Incoming, MavlinkDecoder, COMPONENT_ID};
use kestrel_wire::message::{EventId, ProductKind, RejectReason, Telemetry};
use kestrel_wire::{CommandGate, Commandable};

use crate::downlink::FramingArg;

/// The models `switch_model` may run, by slot, and how to load one.
pub struct Slots {
    /// Which of the 16 slots hold a model (slot 0 is the one running at start).
    pub filled: [bool; 16],
    /// Load the model in a slot and check that it can take over from the running one (same
    /// task, classes and input); called on the command thread, never the inference thread.
    #[allow(clippy::type_complexity)]
    pub load: Box<dyn FnMut(u8) -> Result<Box<dyn Backend + Send>, String> + Send>,
}

/// What commands have changed, shared by the command thread and the run.
#[derive(Default)]
pub struct Controls {
    /// Results scoring below this are not reported; `None`: as the model reports.
    pub min_score: Mutex<Option<f32>>,
    /// Frames are not taken while set.
    pub paused: AtomicBool,
    /// A new budget (bytes, window in seconds) for the downlink to take.
    pub budget: Mutex<Option<(u32, u32)>>,
    /// A health snapshot is wanted now.
    pub health_now: AtomicBool,
    /// Products asked for: (frame, kind).
    pub requests: Mutex<Vec<(u32, ProductKind)>>,
    /// Frames taken so far: a product can be asked for only for a frame not yet taken, since
    /// the simulator keeps no frames.
    pub frames_taken: AtomicU64,
    /// Acknowledgements and events waiting to go down.
    pub replies: Mutex<Vec<Telemetry>>,
}

/// The lock, whether or not a thread panicked holding it (the data are plain values).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Controls {
    /// Send `event` down with the command replies (first, ahead of results).
    pub fn report(&self, event: kestrel_wire::message::Event) {
        lock(&self.replies).push(Telemetry::Event(event));
    }

    /// Wait while paused.
    pub fn wait_while_paused(&self) {
        while self.paused.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether `frame` has a product of `kind` asked for; the request is used up.
    pub fn take_request(&self, frame: u32, kind: ProductKind) -> bool {
        let mut requests = lock(&self.requests);
        let before = requests.len();
        requests.retain(|r| *r != (frame, kind));
        requests.len() != before
    }
}

/// A frame source that takes no frame while the controls say paused.
pub struct Pausable<S> {
    pub inner: S,
    pub controls: Arc<Controls>,
}

impl<T, S: FrameSource<T>> FrameSource<T> for Pausable<S> {
    type Error = S::Error;

    fn next_frame(&mut self, samples: &mut [T]) -> Result<Option<Frame>, Self::Error> {
        self.controls.wait_while_paused();
        self.inner.next_frame(samples)
    }
}

/// The payload as commands see it.
pub struct Payload {
    pub controls: Arc<Controls>,
    /// The models `switch_model` may load.
    pub slots: Slots,
    pub active_slot: u8,
    pub switch: SwitchHandle,
    /// Product kinds this run makes on request.
    pub kinds: Vec<ProductKind>,
}

impl Payload {
    fn reply(&self, message: Telemetry) {
        lock(&self.controls.replies).push(message);
    }
}

impl Commandable for Payload {
    fn set_score_threshold(&mut self, threshold: f32) -> Result<(), RejectReason> {
        *lock(&self.controls.min_score) = Some(threshold);
        Ok(())
    }

    fn switch_model(&mut self, slot: u8) -> Result<(), RejectReason> {
        if !self
            .slots
            .filled
            .get(usize::from(slot))
            .copied()
            .unwrap_or(false)
        {
            eprintln!("warning: switch_model {slot} refused: slot {slot} is empty");
            return Err(RejectReason::OutOfRange);
        }
        let backend = (self.slots.load)(slot).map_err(|why| {
            eprintln!("warning: switch_model {slot} refused: {why}");
            RejectReason::Failed
        })?;
        self.switch.switch_to(backend).map_err(|e| {
            eprintln!("warning: switch_model {slot} refused: {e}");
            RejectReason::Failed
        })?;
        let old = std::mem::replace(&mut self.active_slot, slot);
        self.reply(Telemetry::Event(EventId::ModelSwitched.with([
            i32::from(old),
            i32::from(slot),
            0,
        ])));
        Ok(())
    }

    fn request_product(&mut self, frame: u32, kind: ProductKind) -> Result<(), RejectReason> {
        let gone = u64::from(frame) < self.controls.frames_taken.load(Ordering::Relaxed);
        if !self.kinds.contains(&kind) || gone {
            return Err(RejectReason::Failed);
        }
        lock(&self.controls.requests).push((frame, kind));
        Ok(())
    }

    fn set_downlink_budget(&mut self, bytes: u32, window_s: u32) -> Result<(), RejectReason> {
        *lock(&self.controls.budget) = Some((bytes, window_s));
        Ok(())
    }

    fn report_health(&mut self) -> Result<(), RejectReason> {
        self.controls.health_now.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn set_paused(&mut self, paused: bool) -> Result<(), RejectReason> {
        self.controls.paused.store(paused, Ordering::Relaxed);
        let event = if paused {
            EventId::Paused
        } else {
            EventId::Resumed
        };
        self.reply(Telemetry::Event(event.with([0; 3])));
        Ok(())
    }
}

/// Read commands from `link` in `framing` until it closes, carrying each out on `payload`.
/// A link that closes while paused resumes the run: a ground that is gone cannot send
/// `resume`.
pub fn listen(mut link: impl Read, framing: FramingArg, mut payload: Payload) {
    let mut gate = CommandGate::new();
    let mut ccsds = Decoder::new();
    let mut mavlink: Box<MavlinkDecoder<256>> = Box::new(MavlinkDecoder::new());
    let (mut buffer, mut chunk) = (Vec::new(), [0u8; 4096]);
    let mut carry_out = |bytes: &[u8], payload: &mut Payload| {
        let (ack, event) = gate.execute(bytes, payload);
        payload.reply(Telemetry::CommandAck(ack));
        if let Some(event) = event {
            payload.reply(Telemetry::Event(event));
        }
    };
    loop {
        let n = match link.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buffer.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        match framing {
            FramingArg::Ccsds => {
                while let Some((data, used)) = ccsds.next_command(&buffer[at..]) {
                    let data = data.to_vec();
                    at += used;
                    carry_out(&data, &mut payload);
                }
            }
            FramingArg::Mavlink => {
                while let Some((frame, used)) = mavlink.next(&buffer[at..]) {
                    at += used;
                    if let Incoming::Command { bytes, target } = frame.incoming {
                        // Addressed to this component, or to every component of system 1.
                        if target.0 == 1 && (target.1 == COMPONENT_ID || target.1 == 0) {
                            carry_out(&bytes, &mut payload);
                        }
                    }
                }
            }
        }
        buffer.drain(..at);
    }
    if payload.controls.paused.swap(false, Ordering::Relaxed) {
        eprintln!("warning: the command link closed while paused; resuming");
        payload.reply(Telemetry::Event(EventId::Resumed.with([0; 3])));
    }
}
