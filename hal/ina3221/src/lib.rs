//! Driver for Texas Instruments' INA3221, the three-channel shunt and bus voltage monitor that
//! Jetson carrier boards use for their power rails, generic over embedded-hal 1.0's I2C.
//! `no_std`, no allocation.
//!
//! From the datasheet (SBOS576):
//! - registers are 16 bits, big-endian: write the register's address, then read two bytes;
//!   write the address and two bytes to set one;
//! - `0x00` configuration: reset (bit 15), channel enables (14..12), averaging (11..9), bus
//!   voltage conversion time (8..6), shunt voltage conversion time (5..3), mode (2..0);
//! - `0x01`/`0x02`, `0x03`/`0x04`, `0x05`/`0x06`: shunt and bus voltage of channels 1 to 3,
//!   two's complement in bits 15..3: 40 µV per step for the shunt, 8 mV for the bus;
//! - `0xFE` manufacturer id 0x5449 ("TI"), `0xFF` die id 0x3220;
//! - the address is 0x40 to 0x43, by where the A0 pin is tied.
//!
//! The chip measures voltages only: current is the shunt voltage over the shunt's resistance,
//! which the board supplies, and power is bus voltage times current.
#![no_std]
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

use embedded_hal::i2c::I2c;
use kestrel_hal::{PowerMonitor, RailPower};

/// Manufacturer id register.
const MANUFACTURER_ID_REGISTER: u8 = 0xFE;
/// Die id register.
const DIE_ID_REGISTER: u8 = 0xFF;
/// Configuration register.
const CONFIGURATION: u8 = 0x00;
/// What the manufacturer id register holds: "TI".
pub const MANUFACTURER_ID: u16 = 0x5449;
/// What the die id register holds.
pub const DIE_ID: u16 = 0x3220;
/// Shunt voltage per step, microvolts.
pub const SHUNT_UV_PER_STEP: i32 = 40;
/// Bus voltage per step, millivolts.
pub const BUS_MV_PER_STEP: i32 = 8;
/// The smallest shunt this driver takes, micro-ohms: at full scale (163.8 mV) it is 1638 A,
/// and power at 32.76 V still fits an `i32` of milliwatts.
pub const MIN_SHUNT_UOHM: u32 = 100;
/// Channels.
pub const CHANNELS: usize = 3;

/// The 7-bit I2C address, by where the A0 pin is tied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Address {
    /// A0 to ground.
    Gnd = 0x40,
    /// A0 to VS.
    Vs = 0x41,
    /// A0 to SDA.
    Sda = 0x42,
    /// A0 to SCL.
    Scl = 0x43,
}

/// Samples averaged per reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Averaging {
    /// 1 (the power-on default).
    X1 = 0,
    /// 4.
    X4 = 1,
    /// 16.
    X16 = 2,
    /// 64.
    X64 = 3,
    /// 128.
    X128 = 4,
    /// 256.
    X256 = 5,
    /// 512.
    X512 = 6,
    /// 1024.
    X1024 = 7,
}

/// Time of one conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ConversionTime {
    /// 140 µs.
    Us140 = 0,
    /// 204 µs.
    Us204 = 1,
    /// 332 µs.
    Us332 = 2,
    /// 588 µs.
    Us588 = 3,
    /// 1.1 ms (the power-on default).
    Us1100 = 4,
    /// 2.116 ms.
    Us2116 = 5,
    /// 4.156 ms.
    Us4156 = 6,
    /// 8.244 ms.
    Us8244 = 7,
}

/// How the chip measures. Mode is always shunt and bus, continuous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Channels 1 to 3 on.
    pub channels: [bool; CHANNELS],
    /// Samples averaged.
    pub averaging: Averaging,
    /// Bus voltage conversion time.
    pub bus_conversion: ConversionTime,
    /// Shunt voltage conversion time.
    pub shunt_conversion: ConversionTime,
}

impl Default for Config {
    /// The power-on configuration: every channel, no averaging, 1.1 ms conversions.
    fn default() -> Self {
        Self {
            channels: [true; CHANNELS],
            averaging: Averaging::X1,
            bus_conversion: ConversionTime::Us1100,
            shunt_conversion: ConversionTime::Us1100,
        }
    }
}

/// Shunt and bus, continuous.
const MODE_CONTINUOUS: u16 = 0b111;

impl Config {
    /// The configuration register's value.
    pub fn register(&self) -> u16 {
        let [one, two, three] = self.channels.map(u16::from);
        (one << 14)
            | (two << 13)
            | (three << 12)
            | ((self.averaging as u16) << 9)
            | ((self.bus_conversion as u16) << 6)
            | ((self.shunt_conversion as u16) << 3)
            | MODE_CONTINUOUS
    }
}

/// What went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error<E> {
    /// The I2C transaction failed.
    I2c(E),
    /// The chip at the address is not an INA3221.
    WrongDevice {
        /// Its manufacturer id.
        manufacturer: u16,
        /// Its die id.
        die: u16,
    },
    /// No such channel (there are three: 0, 1, 2).
    NoChannel(usize),
    /// A shunt of less than [`MIN_SHUNT_UOHM`].
    ShuntTooSmall(u32),
}

/// One channel's reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    /// Shunt voltage, microvolts.
    pub shunt_uv: i32,
    /// Bus voltage, millivolts.
    pub bus_mv: i32,
    /// Current, milliamperes.
    pub current_ma: i32,
    /// Power, milliwatts.
    pub power_mw: i32,
}

/// An INA3221 on an I2C bus, with each channel's shunt resistance.
#[derive(Debug)]
pub struct Ina3221<I> {
    i2c: I,
    address: u8,
    shunt_uohm: [u32; CHANNELS],
}

/// A register's value as two's complement in bits 15..3: the signed step count.
fn steps(raw: u16) -> i32 {
    i32::from((raw as i16) >> 3)
}

impl<I: I2c> Ina3221<I> {
    /// The chip at `address`, checked to be an INA3221 by its ids, then configured. `shunt_uohm`
    /// is each channel's shunt resistance in micro-ohms.
    pub fn new(
        i2c: I,
        address: Address,
        shunt_uohm: [u32; CHANNELS],
        config: &Config,
    ) -> Result<Self, Error<I::Error>> {
        if let Some(&small) = shunt_uohm.iter().find(|&&r| r < MIN_SHUNT_UOHM) {
            return Err(Error::ShuntTooSmall(small));
        }
        let mut chip = Self {
            i2c,
            address: address as u8,
            shunt_uohm,
        };
        let manufacturer = chip.read_register(MANUFACTURER_ID_REGISTER)?;
        let die = chip.read_register(DIE_ID_REGISTER)?;
        if (manufacturer, die) != (MANUFACTURER_ID, DIE_ID) {
            return Err(Error::WrongDevice { manufacturer, die });
        }
        chip.configure(config)?;
        Ok(chip)
    }

    /// Write `config` (averaging, conversion times, channels).
    pub fn configure(&mut self, config: &Config) -> Result<(), Error<I::Error>> {
        let [high, low] = config.register().to_be_bytes();
        self.i2c
            .write(self.address, &[CONFIGURATION, high, low])
            .map_err(Error::I2c)
    }

    /// The configuration the chip holds.
    pub fn configuration(&mut self) -> Result<u16, Error<I::Error>> {
        self.read_register(CONFIGURATION)
    }

    fn read_register(&mut self, register: u8) -> Result<u16, Error<I::Error>> {
        let mut bytes = [0u8; 2];
        self.i2c
            .write_read(self.address, &[register], &mut bytes)
            .map_err(Error::I2c)?;
        Ok(u16::from_be_bytes(bytes))
    }

    /// Channel `channel` (0 to 2): its shunt and bus voltage, and the current and power they
    /// give with its shunt.
    pub fn read(&mut self, channel: usize) -> Result<Reading, Error<I::Error>> {
        let shunt_uohm = *self
            .shunt_uohm
            .get(channel)
            .ok_or(Error::NoChannel(channel))?;
        // Channel n's shunt register is 1 + 2n, its bus register the next.
        let shunt_register = 1 + 2 * channel as u8;
        let shunt_uv = steps(self.read_register(shunt_register)?) * SHUNT_UV_PER_STEP;
        let bus_mv = steps(self.read_register(shunt_register + 1)?) * BUS_MV_PER_STEP;
        // mA = µV / µΩ * 1000; mW = mV * mA / 1000. In i64, then within i32 by the shunt limit.
        let current_ma = i64::from(shunt_uv) * 1000 / i64::from(shunt_uohm);
        let power_mw = i64::from(bus_mv) * current_ma / 1000;
        Ok(Reading {
            shunt_uv,
            bus_mv,
            current_ma: current_ma as i32,
            power_mw: power_mw as i32,
        })
    }

    /// The bus back.
    pub fn release(self) -> I {
        self.i2c
    }
}

impl<I: I2c> PowerMonitor for Ina3221<I> {
    type Error = Error<I::Error>;

    fn rails(&self) -> usize {
        CHANNELS
    }

    fn read_rail(&mut self, rail: usize) -> Result<RailPower, Self::Error> {
        let r = self.read(rail)?;
        Ok(RailPower {
            bus_mv: r.bus_mv,
            current_ma: r.current_ma,
            power_mw: r.power_mw,
        })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction};
    use std::vec;
    use std::vec::Vec;

    const ADDRESS: u8 = 0x40;

    /// The transactions of `new`: both ids read, then the configuration written.
    fn probe(manufacturer: u16, die: u16, config: u16) -> Vec<Transaction> {
        vec![
            Transaction::write_read(ADDRESS, vec![0xFE], manufacturer.to_be_bytes().to_vec()),
            Transaction::write_read(ADDRESS, vec![0xFF], die.to_be_bytes().to_vec()),
            Transaction::write(
                ADDRESS,
                [vec![0x00], config.to_be_bytes().to_vec()].concat(),
            ),
        ]
    }

    fn read(register: u8, value: u16) -> Transaction {
        Transaction::write_read(ADDRESS, vec![register], value.to_be_bytes().to_vec())
    }

    #[test]
    fn the_power_on_configuration_is_the_datasheets_default() {
        assert_eq!(Config::default().register(), 0x7127);
        let quiet = Config {
            channels: [true, false, true],
            averaging: Averaging::X1024,
            bus_conversion: ConversionTime::Us8244,
            shunt_conversion: ConversionTime::Us140,
        };
        // 1 0 1 | 111 | 111 | 000 | 111 after the reset bit.
        assert_eq!(quiet.register(), 0b0101_1111_1100_0111);
    }

    #[test]
    fn it_checks_the_ids_configures_and_reads_every_channel() {
        let config = Config {
            averaging: Averaging::X16,
            ..Config::default()
        };
        let mut expected = probe(MANUFACTURER_ID, DIE_ID, 0x7527);
        expected.extend([
            // Channel 1: 10 mV across 10 mΩ = 1 A at 12 V.
            read(0x01, 250 << 3),
            read(0x02, 1500 << 3),
            // Channel 2: -40 µV (one step back) at 5 V over 5 mΩ: -8 mA.
            read(0x03, (-1i16 << 3) as u16),
            read(0x04, 625 << 3),
            // Channel 3: off, reads zero.
            read(0x05, 0),
            read(0x06, 0),
        ]);
        let mut chip = Ina3221::new(
            Mock::new(&expected),
            Address::Gnd,
            [10_000, 5_000, 5_000],
            &config,
        )
        .unwrap();
        assert_eq!(
            chip.read(0).unwrap(),
            Reading {
                shunt_uv: 10_000,
                bus_mv: 12_000,
                current_ma: 1_000,
                power_mw: 12_000
            }
        );
        assert_eq!(
            chip.read(1).unwrap(),
            Reading {
                shunt_uv: -40,
                bus_mv: 5_000,
                current_ma: -8,
                power_mw: -40
            }
        );
        assert_eq!(chip.read_rail(2).unwrap(), RailPower::default());
        assert_eq!(chip.read(3), Err(Error::NoChannel(3)));
        chip.release().done();
    }

    #[test]
    fn the_arithmetic_holds_at_the_register_limits() {
        let mut expected = probe(MANUFACTURER_ID, DIE_ID, 0x7127);
        expected.extend([
            // Full scale positive: 4095 steps, 163.8 mV and 32.76 V.
            read(0x01, 0x7FF8),
            read(0x02, 0x7FF8),
            // Full scale negative: -4096 steps, -163.84 mV; the bus the same.
            read(0x01, 0x8000),
            read(0x02, 0x8000),
            // The three low bits are not data.
            read(0x01, 0x0007),
            read(0x02, 0x0007),
        ]);
        let mut chip = Ina3221::new(
            Mock::new(&expected),
            Address::Gnd,
            [MIN_SHUNT_UOHM; 3],
            &Config::default(),
        )
        .unwrap();
        let top = chip.read(0).unwrap();
        assert_eq!((top.shunt_uv, top.bus_mv), (163_800, 32_760));
        assert_eq!(top.current_ma, 1_638_000);
        assert_eq!(top.power_mw, 53_660_880);
        let bottom = chip.read(0).unwrap();
        assert_eq!((bottom.shunt_uv, bottom.bus_mv), (-163_840, -32_768));
        assert_eq!(bottom.current_ma, -1_638_400);
        assert_eq!(bottom.power_mw, 53_687_091);
        assert_eq!(
            chip.read(0).unwrap(),
            Reading {
                shunt_uv: 0,
                bus_mv: 0,
                current_ma: 0,
                power_mw: 0
            }
        );
        chip.release().done();
    }

    #[test]
    fn another_chip_or_a_tiny_shunt_is_refused() {
        let expected = [
            read(0xFE, 0x5449),
            read(0xFF, 0x2260), // an INA226's die id
        ];
        let mut i2c = Mock::new(&expected);
        let refused = Ina3221::new(i2c.clone(), Address::Gnd, [5_000; 3], &Config::default());
        assert_eq!(
            refused.unwrap_err(),
            Error::WrongDevice {
                manufacturer: 0x5449,
                die: 0x2260
            }
        );
        i2c.done();
        let mut untouched = Mock::new(&[]);
        let refused = Ina3221::new(
            untouched.clone(),
            Address::Vs,
            [5_000, 99, 5_000],
            &Config::default(),
        );
        assert_eq!(refused.unwrap_err(), Error::ShuntTooSmall(99));
        untouched.done();
    }

    #[test]
    fn a_bus_error_is_returned_not_a_panic() {
        use embedded_hal::i2c::ErrorKind;
        let expected =
            [Transaction::write_read(ADDRESS, vec![0xFE], vec![0, 0]).with_error(ErrorKind::Bus)];
        let mut i2c = Mock::new(&expected);
        let failed = Ina3221::new(i2c.clone(), Address::Gnd, [5_000; 3], &Config::default());
        assert_eq!(failed.unwrap_err(), Error::I2c(ErrorKind::Bus));
        i2c.done();
    }
}
