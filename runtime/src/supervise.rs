//! A backend that may hang, supervised: it runs on a worker thread of its own, and a call
//! (an inference, a scrub, a restore) it does not answer within the deadline is a hang. The
//! caller gets [`BackendError::Hung`] at the deadline, so that a failover chain runs the frame
//! on its next backend and nothing waits on the stuck one. The stuck worker is abandoned (a
//! thread cannot be killed: it ends if its call ever returns, and its answer is thrown away)
//! and the backend is restarted in-process: a new worker builds a fresh one from the factory.
//!
//! The restart does not block the stage: until the new worker has loaded its model, calls are
//! answered [`BackendError::NotAvailable`], and the chain keeps running frames on its fallback,
//! trying this one again as it does after any fault. A worker that panics is restarted the same
//! way. At most [`MAX_STUCK`] stuck workers are kept: past that, none is started (each holds a
//! thread and a model's memory) until one of them ends, and the stage stays on its fallback.

use std::boxed::Box;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use std::vec::Vec;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use kestrel_backend::{Backend, BackendError, Landed, Scrub, Upset};

use crate::faults::{BackendFaults, FaultSpec, FaultyBackend};
use crate::tmr::{Guard, TmrBackend, Votes};
use crate::waits::{prime_thread, primed_channel};

/// Builds a fresh backend for a restarted worker (loads the plan again, opens a new device
/// context). Called on the new worker's thread, so a load that hangs blocks nothing.
pub type Factory = Arc<dyn Fn() -> Result<Box<dyn Backend + Send>, BackendError> + Send + Sync>;

/// Stuck workers kept at most before restarts stop.
pub const MAX_STUCK: usize = 3;

/// What supervision has seen, for health and reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SupervisionStats {
    /// Calls not answered within the deadline.
    pub hangs: u64,
    /// Workers that ended unasked (the backend panicked).
    pub deaths: u64,
    /// New workers started.
    pub restarts: u64,
    /// New workers whose backend could not be built, or that could not be started.
    pub restart_failures: u64,
}

/// A restart, as reported to the caller's `on_restart` (an event on the telemetry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restart {
    /// Restarts so far, this one included.
    pub count: u64,
    /// Whether the new worker loaded its backend.
    pub loaded: bool,
}

enum Request {
    Run { input: Vec<f32>, output: Vec<f32> },
    Scrub,
    Restore,
    Upset(Upset),
}

enum Reply {
    Ready(Result<(), BackendError>),
    Ran {
        input: Vec<f32>,
        output: Vec<f32>,
        result: Result<(), BackendError>,
        /// The backend panicked; the worker has ended.
        panicked: bool,
    },
    Scrubbed(Scrub),
    Restored(Result<(), BackendError>),
    Landed(Landed),
}

struct Worker {
    requests: Sender<Request>,
    replies: Receiver<Reply>,
    thread: JoinHandle<()>,
    ready: bool,
}

/// A backend on a supervised worker thread; see the module documentation.
pub struct SupervisedBackend {
    name: &'static str,
    input_len: usize,
    output_len: usize,
    deadline: Duration,
    factory: Factory,
    worker: Option<Worker>,
    stuck: Vec<JoinHandle<()>>,
    /// The input and output buffers the worker borrows for a call, kept between calls so that
    /// the steady state allocates nothing; lost with a stuck worker.
    buffers: Option<(Vec<f32>, Vec<f32>)>,
    on_restart: Box<dyn FnMut(Restart) + Send>,
    /// What supervision has seen.
    pub stats: Arc<Mutex<SupervisionStats>>,
}

impl SupervisedBackend {
    /// Run `backend` on a worker thread, a call it does not answer within `deadline` being a
    /// hang; `factory` builds its replacement after a hang, and `on_restart` hears of each.
    pub fn new(
        backend: Box<dyn Backend + Send>,
        factory: Factory,
        deadline: Duration,
        on_restart: Box<dyn FnMut(Restart) + Send>,
    ) -> Result<Self, BackendError> {
        let (name, input_len, output_len) =
            (backend.name(), backend.input_len(), backend.output_len());
        let mut worker = spawn(Some(backend), Arc::clone(&factory))?;
        // The first worker was handed its backend: it is ready at once.
        match worker.replies.recv() {
            Ok(Reply::Ready(Ok(()))) => worker.ready = true,
            Ok(Reply::Ready(Err(e))) => return Err(e),
            Ok(_) | Err(_) => return Err(BackendError::NotAvailable),
        }
        Ok(Self {
            name,
            input_len,
            output_len,
            deadline,
            factory,
            worker: Some(worker),
            stuck: Vec::new(),
            buffers: Some((vec![0.0; input_len], vec![0.0; output_len])),
            on_restart,
            stats: Arc::default(),
        })
    }

    fn count(&self, what: impl FnOnce(&mut SupervisionStats)) {
        what(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The worker, ready for a call: one is started if there is none, and a starting one is
    /// asked (without waiting) whether it has loaded its backend.
    fn ready_worker(&mut self) -> Result<&Worker, BackendError> {
        if self.worker.is_none() {
            self.stuck.retain(|t| !t.is_finished());
            if self.stuck.len() >= MAX_STUCK {
                return Err(BackendError::Hung);
            }
            let started = spawn(None, Arc::clone(&self.factory));
            let restarts = {
                let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                stats.restarts += 1;
                if started.is_err() {
                    stats.restart_failures += 1;
                }
                stats.restarts
            };
            match started {
                Ok(worker) => self.worker = Some(worker),
                Err(e) => {
                    (self.on_restart)(Restart {
                        count: restarts,
                        loaded: false,
                    });
                    return Err(e);
                }
            }
        }
        let Some(worker) = self.worker.as_ref() else {
            return Err(BackendError::NotAvailable);
        };
        if !worker.ready {
            let loaded = match worker.replies.try_recv() {
                Err(TryRecvError::Empty) => return Err(BackendError::NotAvailable),
                Ok(Reply::Ready(Ok(()))) => Ok(()),
                Ok(Reply::Ready(Err(e))) => Err(e),
                Ok(_) | Err(TryRecvError::Disconnected) => Err(BackendError::NotAvailable),
            };
            let count = self.stats.lock().map_or(0, |s| s.restarts);
            (self.on_restart)(Restart {
                count,
                loaded: loaded.is_ok(),
            });
            match loaded {
                Ok(()) => {
                    if let Some(worker) = self.worker.as_mut() {
                        worker.ready = true;
                    }
                }
                Err(e) => {
                    self.count(|s| s.restart_failures += 1);
                    self.worker = None;
                    return Err(e);
                }
            }
        }
        self.worker.as_ref().ok_or(BackendError::NotAvailable)
    }

    /// Send `request` to the worker and wait for its reply until the deadline.
    fn call(&mut self, request: Request) -> Result<Reply, BackendError> {
        let deadline = self.deadline;
        let worker = self.ready_worker()?;
        let answer = match worker.requests.send(request) {
            Ok(()) => worker.replies.recv_timeout(deadline),
            Err(_) => Err(RecvTimeoutError::Disconnected),
        };
        match answer {
            Ok(reply) => Ok(reply),
            Err(RecvTimeoutError::Timeout) => {
                self.count(|s| s.hangs += 1);
                if let Some(worker) = self.worker.take() {
                    self.stuck.push(worker.thread);
                }
                Err(BackendError::Hung)
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.count(|s| s.deaths += 1);
                self.worker = None;
                Err(BackendError::Execution)
            }
        }
    }
}

/// Start a worker on `backend`, or on one `factory` builds on the worker's own thread.
fn spawn(
    backend: Option<Box<dyn Backend + Send>>,
    factory: Factory,
) -> Result<Worker, BackendError> {
    // The worker waits on requests, the caller on replies: both waits made once here and at
    // the worker's start (`waits`). Neither channel fills: one call is in flight at a time.
    let (requests, inbox) = primed_channel::<Request>(1, None);
    let (outbox, replies) = primed_channel::<Reply>(1, None);
    let thread = std::thread::Builder::new()
        .name("kestrel-backend".into())
        .spawn(move || {
            prime_thread();
            serve(backend, &*factory, inbox, outbox)
        })
        .map_err(|_| BackendError::NotAvailable)?;
    Ok(Worker {
        requests,
        replies,
        thread,
        ready: false,
    })
}

/// The worker: build the backend if it was not handed one, say whether it is ready, then
/// answer calls until the supervisor lets go of it.
fn serve(
    backend: Option<Box<dyn Backend + Send>>,
    factory: &(dyn Fn() -> Result<Box<dyn Backend + Send>, BackendError> + Send + Sync),
    inbox: Receiver<Request>,
    outbox: Sender<Reply>,
) {
    let mut backend = match backend.map_or_else(factory, Ok) {
        Ok(backend) => backend,
        Err(e) => {
            let _ = outbox.send(Reply::Ready(Err(e)));
            return;
        }
    };
    if outbox.send(Reply::Ready(Ok(()))).is_err() {
        return;
    }
    for request in inbox {
        let reply = match request {
            Request::Run { input, mut output } => {
                let ran = catch_unwind(AssertUnwindSafe(|| backend.run(&input, &mut output)));
                let panicked = ran.is_err();
                let reply = Reply::Ran {
                    input,
                    output,
                    result: ran.unwrap_or(Err(BackendError::Execution)),
                    panicked,
                };
                if panicked {
                    // A backend that panicked may be left inconsistent: this worker ends, and
                    // the next call starts a fresh one.
                    let _ = outbox.send(reply);
                    return;
                }
                reply
            }
            Request::Scrub => Reply::Scrubbed(backend.scrub()),
            Request::Restore => Reply::Restored(backend.restore()),
            Request::Upset(upset) => Reply::Landed(backend.upset(upset)),
        };
        if outbox.send(reply).is_err() {
            return;
        }
    }
}

impl Backend for SupervisedBackend {
    fn name(&self) -> &'static str {
        self.name
    }

    fn input_len(&self) -> usize {
        self.input_len
    }

    fn output_len(&self) -> usize {
        self.output_len
    }

    fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError> {
        self.check_lengths(input, output)?;
        // Made again only after a stuck worker kept the last ones.
        let (mut to_worker, from_worker) = self
            .buffers
            .take()
            .unwrap_or_else(|| (Vec::with_capacity(input.len()), vec![0.0; output.len()]));
        to_worker.clear();
        to_worker.extend_from_slice(input);
        let reply = self.call(Request::Run {
            input: to_worker,
            output: from_worker,
        })?;
        let Reply::Ran {
            input: to_worker,
            output: from_worker,
            result,
            panicked,
        } = reply
        else {
            return Err(BackendError::Execution);
        };
        if panicked {
            self.count(|s| s.deaths += 1);
            self.worker = None;
        }
        if result.is_ok() {
            let answered = from_worker.get(..output.len()).unwrap_or_default();
            if answered.len() != output.len() {
                return Err(BackendError::Execution);
            }
            output.copy_from_slice(answered);
        }
        self.buffers = Some((to_worker, from_worker));
        result
    }

    fn scrub(&mut self) -> Scrub {
        match self.call(Request::Scrub) {
            Ok(Reply::Scrubbed(found)) => found,
            // A worker that cannot answer has nothing checked; the next restart loads a fresh
            // copy of the model.
            _ => Scrub::Uncovered,
        }
    }

    fn restore(&mut self) -> Result<(), BackendError> {
        match self.call(Request::Restore)? {
            Reply::Restored(result) => result,
            _ => Err(BackendError::Execution),
        }
    }

    fn upset(&mut self, upset: Upset) -> Landed {
        match self.call(Request::Upset(upset)) {
            Ok(Reply::Landed(landed)) => landed,
            _ => Landed::Missed,
        }
    }
}

/// What [`preferred`] wired in, shared with whoever reports it.
pub struct PreferredWatch {
    /// What the injected backend faults did, when `faults` had any.
    pub injected: Option<Arc<Mutex<BackendFaults>>>,
    /// Triple-modular redundancy's votes, under `tmr`.
    pub votes: Option<Arc<Mutex<Votes>>>,
    /// Hangs and restarts, when supervised.
    pub supervision: Option<Arc<Mutex<SupervisionStats>>>,
}

/// The first backend of a failover chain as flight runs it: `backend` with `faults`' backend
/// faults injected (as the device that fails), under triple-modular redundancy for the
/// inferences `tmr` guards (none when `None`), on
/// a supervised worker whose call past `deadline` is a hang (no `deadline`: on the caller's
/// thread, unsupervised, a hang stalling it). After a hang, `rebuild` makes a
/// fresh backend and the same wrappers go round it: the faults go on with the same draws, the
/// votes with the same counts. `sim` and `kestrel-flight` both build theirs here.
pub fn preferred(
    backend: Box<dyn Backend + Send>,
    rebuild: Factory,
    faults: Option<&FaultSpec>,
    tmr: Option<Guard>,
    deadline: Option<Duration>,
    on_restart: Box<dyn FnMut(Restart) + Send>,
) -> Result<(Box<dyn Backend + Send>, PreferredWatch), BackendError> {
    let faults = faults.filter(|f| f.any_backend());
    // The wrappers' shared state: a sibling of the first faulty backend (its inner backend is
    // never run) and the first voter's counts.
    let template = faults.map(|spec| FaultyBackend::new(Box::new(Unbuilt), spec));
    let injected = template.as_ref().map(|t| Arc::clone(&t.injected));
    let tmr = tmr.map(|guard| (guard, Arc::<Mutex<Votes>>::default()));
    let votes = tmr.as_ref().map(|(_, votes)| Arc::clone(votes));
    let template = Mutex::new(template);
    let wrap = {
        move |inner: Box<dyn Backend + Send>| -> Box<dyn Backend + Send> {
            let template = template.lock().unwrap_or_else(|p| p.into_inner());
            let inner: Box<dyn Backend + Send> = match template.as_ref() {
                Some(t) => Box::new(t.sibling(inner)),
                None => inner,
            };
            match &tmr {
                Some((guard, votes)) => {
                    let mut voted = TmrBackend::guarding(inner, guard.clone());
                    voted.votes = Arc::clone(votes);
                    Box::new(voted)
                }
                None => inner,
            }
        }
    };
    let first = wrap(backend);
    let watch = |supervision| PreferredWatch {
        injected,
        votes,
        supervision,
    };
    let Some(deadline) = deadline else {
        return Ok((first, watch(None)));
    };
    let wrap = Arc::new(wrap);
    let factory: Factory = Arc::new(move || rebuild().map(|fresh| wrap(fresh)));
    let supervised = SupervisedBackend::new(first, factory, deadline, on_restart)?;
    let supervision = Arc::clone(&supervised.stats);
    Ok((Box::new(supervised), watch(Some(supervision))))
}

/// A backend that runs nothing: it stands in while a real one is built or wrapped (the fault
/// template's inner backend, a backend taken out of its place to be wrapped).
pub struct Unbuilt;

impl Backend for Unbuilt {
    fn name(&self) -> &'static str {
        "unbuilt"
    }
    fn input_len(&self) -> usize {
        0
    }
    fn output_len(&self) -> usize {
        0
    }
    fn run(&mut self, _: &[f32], _: &mut [f32]) -> Result<(), BackendError> {
        Err(BackendError::NotAvailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    /// Doubles its input; hangs for `hang` on the calls whose number `hangs_on` says, panics on
    /// those `panics_on` says. Calls are counted across restarts.
    struct Flaky {
        calls: Arc<AtomicU64>,
        hangs_on: fn(u64) -> bool,
        panics_on: fn(u64) -> bool,
        hang: Duration,
    }

    impl Backend for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn input_len(&self) -> usize {
            2
        }
        fn output_len(&self) -> usize {
            2
        }
        fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            if (self.panics_on)(call) {
                panic!("a driver bug");
            }
            if (self.hangs_on)(call) {
                std::thread::sleep(self.hang);
            }
            for (o, i) in output.iter_mut().zip(input) {
                *o = 2.0 * i;
            }
            Ok(())
        }
    }

    /// The deadline of the hang tests: well under their 400 ms hangs.
    const SHORT: Duration = Duration::from_millis(50);

    fn supervised(
        hangs_on: fn(u64) -> bool,
        panics_on: fn(u64) -> bool,
        builds: Arc<AtomicU64>,
        deadline: Duration,
    ) -> (SupervisedBackend, Arc<Mutex<Vec<Restart>>>) {
        let calls = Arc::new(AtomicU64::new(0));
        let make = move || Flaky {
            calls: Arc::clone(&calls),
            hangs_on,
            panics_on,
            hang: Duration::from_millis(400),
        };
        let first = Box::new(make());
        let factory: Factory = Arc::new(move || {
            builds.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(make()) as Box<dyn Backend + Send>)
        });
        let restarts = Arc::new(Mutex::new(Vec::new()));
        let heard = Arc::clone(&restarts);
        let backend = SupervisedBackend::new(
            first,
            factory,
            deadline,
            Box::new(move |r| heard.lock().unwrap().push(r)),
        )
        .unwrap();
        (backend, restarts)
    }

    /// Run until the restarted worker answers (it loads on its own thread), at most 2 s.
    fn run_until_ready(backend: &mut SupervisedBackend, input: &[f32], output: &mut [f32]) {
        let until = Instant::now() + Duration::from_secs(2);
        loop {
            match backend.run(input, output) {
                Ok(()) => return,
                Err(BackendError::NotAvailable) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn a_hang_answers_at_the_deadline_and_the_backend_is_restarted() {
        let builds = Arc::new(AtomicU64::new(0));
        let (mut backend, restarts) = supervised(|c| c == 1, |_| false, Arc::clone(&builds), SHORT);
        let mut output = [0.0; 2];
        backend.run(&[1.0, 2.0], &mut output).unwrap();
        assert_eq!(output, [2.0, 4.0]);

        let started = Instant::now();
        assert_eq!(
            backend.run(&[1.0, 2.0], &mut output),
            Err(BackendError::Hung)
        );
        let waited = started.elapsed();
        assert!(waited < Duration::from_millis(300), "waited {waited:?}");

        run_until_ready(&mut backend, &[3.0, 4.0], &mut output);
        assert_eq!(output, [6.0, 8.0], "the restarted worker's answer");
        assert_eq!(builds.load(Ordering::SeqCst), 1, "one fresh backend built");
        let stats = *backend.stats.lock().unwrap();
        assert_eq!(
            (stats.hangs, stats.restarts, stats.restart_failures),
            (1, 1, 0)
        );
        assert_eq!(
            *restarts.lock().unwrap(),
            [Restart {
                count: 1,
                loaded: true
            }]
        );
        // Its scrub, restore and upset go through the new worker too.
        assert_eq!(backend.scrub(), Scrub::Uncovered);
        assert_eq!(backend.restore(), Err(BackendError::NotAvailable));
    }

    #[test]
    fn a_panicking_backend_costs_one_call_and_is_restarted() {
        let builds = Arc::new(AtomicU64::new(0));
        // A deadline the panic's backtrace cannot outlast.
        let (mut backend, _) = supervised(
            |_| false,
            |c| c == 0,
            Arc::clone(&builds),
            Duration::from_secs(30),
        );
        let mut output = [0.0; 2];
        assert_eq!(
            backend.run(&[1.0, 1.0], &mut output),
            Err(BackendError::Execution)
        );
        run_until_ready(&mut backend, &[1.0, 1.0], &mut output);
        assert_eq!(output, [2.0, 2.0]);
        assert_eq!(backend.stats.lock().unwrap().deaths, 1);
    }

    #[test]
    fn restarts_stop_while_too_many_workers_are_stuck() {
        let builds = Arc::new(AtomicU64::new(0));
        // Every call hangs: each restart gets stuck in turn.
        let (mut backend, _) = supervised(|_| true, |_| false, Arc::clone(&builds), SHORT);
        let mut output = [0.0; 2];
        let mut hung = 0;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            match backend.run(&[1.0, 1.0], &mut output) {
                Err(BackendError::Hung) => hung += 1,
                Err(BackendError::NotAvailable) => std::thread::sleep(Duration::from_millis(1)),
                other => panic!("{other:?}"),
            }
            if backend.stuck.len() >= MAX_STUCK {
                break;
            }
        }
        assert_eq!(backend.stuck.len(), MAX_STUCK, "after {hung} hangs");
        let built = builds.load(Ordering::SeqCst);
        assert_eq!(
            backend.run(&[1.0, 1.0], &mut output),
            Err(BackendError::Hung)
        );
        assert_eq!(
            builds.load(Ordering::SeqCst),
            built,
            "no new worker started"
        );
        // Once the stuck calls return, their workers end and restarts start again.
        std::thread::sleep(Duration::from_millis(500));
        assert!(matches!(
            backend.run(&[1.0, 1.0], &mut output),
            Err(BackendError::NotAvailable | BackendError::Hung)
        ));
        // The new worker builds its backend on its own thread.
        let until = Instant::now() + Duration::from_secs(2);
        while builds.load(Ordering::SeqCst) == built && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(builds.load(Ordering::SeqCst), built + 1);
    }
}
