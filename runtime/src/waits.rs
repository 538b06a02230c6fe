//! Crossbeam allocates twice, lazily, the first time a thread waits on a channel: the thread's
//! wait context, and room in the waiter list of the channel end it waits on (kept once made).
//! In the flight loop that first wait comes whenever load first makes a thread wait, which may
//! be hours into a flight (a busy machine reproduces it: `flight_no_alloc` saw 48- and 96-byte
//! allocations mid-run). These make both at start instead, where nothing is in flight.

use crossbeam_channel::{bounded, never, Receiver, Select, Sender};

/// The calling thread's wait context.
pub fn prime_thread() {
    // `never` has no messages: nothing is received, but the thread's context is made.
    wait_once(&never::<()>());
}

/// One receive on `receiver` that does not wait: it registers the calling thread as a waiter
/// on it (making its context and the receivers' waiter list) and takes the message where
/// there is one (none where the caller primes an empty channel).
fn wait_once<T>(receiver: &Receiver<T>) {
    let mut select = Select::new();
    select.recv(receiver);
    if let Ok(operation) = select.try_select() {
        let _ = operation.recv(receiver);
    };
}

/// A bounded channel of `capacity` whose receivers' waiter list (and the calling thread's wait
/// context) is made. `filler`, where given, makes the senders' list too: the channel is filled
/// with its values while no receiver can take them, then emptied.
pub fn primed_channel<T>(
    capacity: usize,
    filler: Option<&dyn Fn() -> T>,
) -> (Sender<T>, Receiver<T>) {
    let (sender, receiver) = bounded(capacity);
    // No other handle to the channel exists: the receive finds nothing and registers as a
    // waiter.
    wait_once(&receiver);
    if let Some(filler) = filler.filter(|_| capacity > 0) {
        while sender.try_send(filler()).is_ok() {}
        let mut select = Select::new();
        select.send(&sender);
        // Full: the send registers as a waiter. (Should there be room, the value is sent and
        // taken back below with the others.)
        if let Ok(operation) = select.try_select() {
            let _ = operation.send(&sender, filler());
        }
        while receiver.try_recv().is_ok() {}
    }
    (sender, receiver)
}
