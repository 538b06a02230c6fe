//! Kestrel's board for Linux companion computers: Jetson Orin and others, on aarch64. It builds
//! and tests on x86-64 too, where the hardware is absent: every device is opened by path, says
//! clearly when it is not there, and is tested over a temporary folder shaped like the real one.
//!
//! - `flight`: the flight loop `kestrel-flight` runs;
//! - `spool::SpoolSource`: frames from a spool directory, each file processed once and moved
//!   to `done/` or `failed/`, surviving a restart;
//! - `thermal`: temperatures from `/sys/class/thermal`;
//! - `watchdog::LinuxWatchdog`: `/dev/watchdog`;
//! - `power_monitor`: the carrier board's INA3221 over `/dev/i2c-*`;
//! - `v4l2::V4l2Source`: a V4L2 camera (the `v4l2` feature).

pub mod config;
pub mod flight;
pub mod fuzzing;
pub mod spool;
pub mod thermal;
pub mod v4l2;
pub mod watchdog;

use std::path::Path;

use kestrel_ina3221::{Address, Config, Error, Ina3221, CHANNELS};
use linux_embedded_hal::I2cdev;

/// Why the power monitor could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PowerMonitorError {
    /// The I2C bus device cannot be opened.
    #[error("{bus}: cannot open the I2C bus: {reason}")]
    Bus {
        /// The device, e.g. `/dev/i2c-1`.
        bus: String,
        /// What the system said.
        reason: String,
    },
    /// The chip did not answer as an INA3221.
    #[error("{bus}: INA3221 at {address:#04x}: {reason}")]
    Chip {
        /// The device.
        bus: String,
        /// The chip's address.
        address: u8,
        /// What went wrong.
        reason: String,
    },
}

/// The INA3221 at `address` on the I2C bus device `bus` (a Jetson carrier board's is on
/// `/dev/i2c-1` at 0x40), with each channel's shunt in micro-ohms, checked and configured.
pub fn power_monitor(
    bus: &Path,
    address: Address,
    shunt_uohm: [u32; CHANNELS],
    config: &Config,
) -> Result<Ina3221<I2cdev>, PowerMonitorError> {
    let name = bus.display().to_string();
    let i2c = I2cdev::new(bus).map_err(|e| PowerMonitorError::Bus {
        bus: name.clone(),
        reason: e.to_string(),
    })?;
    Ina3221::new(i2c, address, shunt_uohm, config).map_err(|e| PowerMonitorError::Chip {
        bus: name,
        address: address as u8,
        reason: match e {
            Error::I2c(e) => format!("no answer: {e}"),
            Error::WrongDevice { manufacturer, die } => {
                format!("not an INA3221 (manufacturer id {manufacturer:#06x}, die id {die:#06x})")
            }
            Error::NoChannel(c) => format!("no channel {c}"),
            Error::ShuntTooSmall(r) => format!("a shunt of {r} micro-ohms is too small"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_i2c_bus_is_a_clear_error() {
        let opened = power_monitor(
            Path::new("/dev/i2c-kestrel-absent"),
            Address::Gnd,
            [5_000; 3],
            &Config::default(),
        );
        let Err(e) = opened else {
            panic!("an absent bus opened");
        };
        let text = e.to_string();
        assert!(
            text.starts_with("/dev/i2c-kestrel-absent: cannot open the I2C bus"),
            "{text}"
        );
    }
}
