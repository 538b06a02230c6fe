//! Kestrel's hardware boundary: the traits a board implements so that the flight pipeline never
//! names a board. `no_std`, no allocation. Where embedded-hal 1.0 or embedded-io has the trait
//! (GPIO pins, delays, I2C, byte streams), Kestrel builds on it; each trait here has a typed
//! error.
//!
//! - [`FrameSource`]: frames with their metadata (sequence, capture time, position, attitude);
//! - [`MonotonicClock`];
//! - [`Watchdog`];
//! - [`ByteLink`]: embedded-io `Read` + `Write`, for telemetry and commands;
//! - [`PowerMonitor`] and [`TemperatureSensor`];
//! - [`TriggerOutput`], with [`PulseTrigger`] over an embedded-hal output pin.
#![no_std]
#![deny(missing_docs)]
#![forbid(unsafe_code)]
// Flight code returns typed errors; it never panics on any input (tests may).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

/// Size and band count of one frame, with samples stored band-interleaved by pixel (HWC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FrameGeometry {
    /// Pixels per row.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Samples per pixel (3 for RGB, 13 for Sentinel-2 L1C).
    pub bands: u16,
}

impl FrameGeometry {
    /// Number of samples in the frame, or `None` if it does not fit in `usize`.
    pub fn sample_count(&self) -> Option<usize> {
        (self.width as usize)
            .checked_mul(self.height as usize)?
            .checked_mul(self.bands as usize)
    }
}

/// Where the vehicle was when a frame was captured (WGS84).
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Position {
    /// Latitude, degrees north.
    pub latitude_deg: f64,
    /// Longitude, degrees east.
    pub longitude_deg: f64,
    /// Altitude above the ellipsoid, metres.
    pub altitude_m: f32,
}

/// How the vehicle (or the sensor) was pointed when a frame was captured.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Attitude {
    /// Roll, degrees.
    pub roll_deg: f32,
    /// Pitch, degrees.
    pub pitch_deg: f32,
    /// Yaw (heading), degrees.
    pub yaw_deg: f32,
}

/// What a source knows of a frame besides its samples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FrameMeta {
    /// The frame's sequence number at the source (the sensor's counter, which may skip).
    pub sequence: u64,
    /// Capture time, microseconds on the board's [`MonotonicClock`].
    pub capture_us: u64,
    /// Where, when the source knows.
    pub position: Option<Position>,
    /// Which way it looked, when the source knows.
    pub attitude: Option<Attitude>,
}

/// One delivered frame: its geometry and metadata.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Frame {
    /// Size and bands of the samples written.
    pub geometry: FrameGeometry,
    /// Sequence, time and pose.
    pub meta: FrameMeta,
}

/// A sensor, file reader or link that delivers frames into a caller-owned buffer.
pub trait FrameSource<S> {
    /// Why one frame could not be delivered. The source has moved past that frame, so the
    /// caller counts the error and asks for the next one.
    type Error;

    /// Write the next frame's samples into `buffer` and return its geometry and metadata, or
    /// `Ok(None)` at the end of the stream. The samples occupy
    /// `buffer[..frame.geometry.sample_count()]`.
    fn next_frame(&mut self, buffer: &mut [S]) -> Result<Option<Frame>, Self::Error>;
}

/// A monotonic microsecond clock for latency accounting and pacing.
pub trait MonotonicClock {
    /// Microseconds since an arbitrary fixed origin; never goes backwards.
    fn now_us(&self) -> u64;
}

/// A hardware watchdog: the board resets unless it is fed in time. Feed it only while every
/// stage of the payload is healthy.
pub trait Watchdog {
    /// Why it could not be fed or stopped.
    type Error;

    /// Restart the countdown.
    fn feed(&mut self) -> Result<(), Self::Error>;

    /// Stop it for a clean shutdown, where the hardware allows (Linux's "magic close").
    fn stop(&mut self) -> Result<(), Self::Error>;
}

/// A byte link for telemetry and commands (a UART, a UDP or TCP socket): embedded-io's `Read`
/// and `Write`, whose `ErrorType` is its typed error.
pub trait ByteLink: embedded_io::Read + embedded_io::Write {}

impl<T: embedded_io::Read + embedded_io::Write> ByteLink for T {}

/// One power rail's reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RailPower {
    /// Bus (load-side) voltage, millivolts.
    pub bus_mv: i32,
    /// Current, milliamperes (negative: flowing back).
    pub current_ma: i32,
    /// Power, milliwatts.
    pub power_mw: i32,
}

/// A power monitor with one or more rails.
pub trait PowerMonitor {
    /// Why a reading failed.
    type Error;

    /// How many rails it reads.
    fn rails(&self) -> usize;

    /// Read rail `rail` (0-based).
    fn read_rail(&mut self, rail: usize) -> Result<RailPower, Self::Error>;

    /// The power of every rail together, milliwatts (the health telemetry's figure).
    fn total_power_mw(&mut self) -> Result<i64, Self::Error> {
        let mut total = 0i64;
        for rail in 0..self.rails() {
            total += i64::from(self.read_rail(rail)?.power_mw);
        }
        Ok(total)
    }
}

/// A temperature sensor.
pub trait TemperatureSensor {
    /// Why a reading failed.
    type Error;

    /// Temperature, millidegrees Celsius.
    fn temperature_mc(&mut self) -> Result<i32, Self::Error>;
}

/// An output that triggers something outside the board (a camera's shutter, a strobe).
pub trait TriggerOutput {
    /// Why it could not fire.
    type Error;

    /// Fire once.
    fn trigger(&mut self) -> Result<(), Self::Error>;
}

/// A trigger that drives an embedded-hal output pin high for `width_us` microseconds.
#[derive(Debug)]
pub struct PulseTrigger<P, D> {
    pin: P,
    delay: D,
    width_us: u32,
}

impl<P: embedded_hal::digital::OutputPin, D: embedded_hal::delay::DelayNs> PulseTrigger<P, D> {
    /// A trigger on `pin`, pulses timed by `delay`, the pin driven low to start with.
    pub fn new(mut pin: P, delay: D, width_us: u32) -> Result<Self, P::Error> {
        pin.set_low()?;
        Ok(Self {
            pin,
            delay,
            width_us,
        })
    }

    /// The pin and delay back.
    pub fn release(self) -> (P, D) {
        (self.pin, self.delay)
    }
}

impl<P: embedded_hal::digital::OutputPin, D: embedded_hal::delay::DelayNs> TriggerOutput
    for PulseTrigger<P, D>
{
    type Error = P::Error;

    fn trigger(&mut self) -> Result<(), Self::Error> {
        self.pin.set_high()?;
        self.delay.delay_us(self.width_us);
        // Low again even if this fails part-way: the error is the caller's to count.
        self.pin.set_low()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal_mock::eh1::delay::CheckedDelay;
    use embedded_hal_mock::eh1::delay::Transaction as DelayTransaction;
    use embedded_hal_mock::eh1::digital::{Mock as PinMock, State, Transaction as PinTransaction};

    #[test]
    fn a_pulse_trigger_drives_the_pin_high_for_its_width_then_low() {
        let pin = PinMock::new(&[
            PinTransaction::set(State::Low),
            PinTransaction::set(State::High),
            PinTransaction::set(State::Low),
            PinTransaction::set(State::High),
            PinTransaction::set(State::Low),
        ]);
        let delay = CheckedDelay::new(&[
            DelayTransaction::delay_us(250),
            DelayTransaction::delay_us(250),
        ]);
        let mut trigger = PulseTrigger::new(pin, delay, 250).unwrap();
        trigger.trigger().unwrap();
        trigger.trigger().unwrap();
        let (mut pin, mut delay) = trigger.release();
        pin.done();
        delay.done();
    }

    /// Two rails of fixed readings.
    struct Rails;

    impl PowerMonitor for Rails {
        type Error = ();
        fn rails(&self) -> usize {
            2
        }
        fn read_rail(&mut self, rail: usize) -> Result<RailPower, ()> {
            Ok(RailPower {
                bus_mv: 5_000,
                current_ma: 1_000,
                power_mw: [5_000, i32::MAX][rail],
            })
        }
    }

    #[test]
    fn total_power_sums_every_rail_without_overflow() {
        assert_eq!(Rails.total_power_mw(), Ok(5_000 + i64::from(i32::MAX)));
    }
}
