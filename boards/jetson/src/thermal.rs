//! Temperatures from Linux's thermal zones: `/sys/class/thermal/thermal_zone*/`, each with a
//! `type` (on a Jetson: `cpu-thermal`, `gpu-thermal`, `soc0-thermal`, ...) and a `temp` in
//! millidegrees Celsius.

use std::fs;
use std::path::{Path, PathBuf};

use kestrel_hal::TemperatureSensor;

/// Where Linux lists its thermal zones.
pub const SYSFS_THERMAL: &str = "/sys/class/thermal";

/// Why a zone could not be listed or read.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct ThermalError {
    /// The file or folder.
    pub path: PathBuf,
    /// What went wrong.
    pub reason: String,
}

/// One thermal zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThermalZone {
    /// Its `type`.
    pub name: String,
    temp: PathBuf,
}

/// The thermal zones under `root` (normally [`SYSFS_THERMAL`]), in name order of their folders.
pub fn zones(root: &Path) -> Result<Vec<ThermalZone>, ThermalError> {
    let error = |path: &Path, reason: String| ThermalError {
        path: path.to_path_buf(),
        reason,
    };
    let entries = fs::read_dir(root).map_err(|e| error(root, e.to_string()))?;
    let mut folders: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
        .map(|e| e.path())
        .collect();
    folders.sort();
    folders
        .into_iter()
        .map(|folder| {
            let kind = folder.join("type");
            let name = fs::read_to_string(&kind).map_err(|e| error(&kind, e.to_string()))?;
            Ok(ThermalZone {
                name: name.trim().to_string(),
                temp: folder.join("temp"),
            })
        })
        .collect()
}

impl TemperatureSensor for ThermalZone {
    type Error = ThermalError;

    fn temperature_mc(&mut self) -> Result<i32, ThermalError> {
        let error = |reason: String| ThermalError {
            path: self.temp.clone(),
            reason,
        };
        let text = fs::read_to_string(&self.temp).map_err(|e| error(e.to_string()))?;
        text.trim()
            .parse()
            .map_err(|_| error(format!("not a temperature: {:?}", text.trim())))
    }
}

/// The hottest of `zones` that can be read, millidegrees Celsius (health telemetry carries
/// one figure); `None` when none can.
pub fn hottest_mc(zones: &mut [ThermalZone]) -> Option<i32> {
    zones
        .iter_mut()
        .filter_map(|z| z.temperature_mc().ok())
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder shaped like /sys/class/thermal.
    fn sysfs(zones: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (i, (kind, temp)) in zones.iter().enumerate() {
            let zone = dir.path().join(format!("thermal_zone{i}"));
            fs::create_dir(&zone).unwrap();
            fs::write(zone.join("type"), format!("{kind}\n")).unwrap();
            fs::write(zone.join("temp"), format!("{temp}\n")).unwrap();
        }
        // Other entries of the real folder are not zones.
        fs::create_dir(dir.path().join("cooling_device0")).unwrap();
        dir
    }

    #[test]
    fn zones_are_listed_by_type_and_read_in_millidegrees() {
        let dir = sysfs(&[
            ("cpu-thermal", "48500"),
            ("gpu-thermal", "51250"),
            ("tj-thermal", "-1000"),
        ]);
        let mut zones = zones(dir.path()).unwrap();
        let names: Vec<&str> = zones.iter().map(|z| z.name.as_str()).collect();
        assert_eq!(names, ["cpu-thermal", "gpu-thermal", "tj-thermal"]);
        assert_eq!(zones[0].temperature_mc().unwrap(), 48_500);
        assert_eq!(zones[2].temperature_mc().unwrap(), -1_000);
        assert_eq!(hottest_mc(&mut zones), Some(51_250));
    }

    #[test]
    fn a_bad_reading_is_an_error_naming_the_file_and_the_others_still_count() {
        let dir = sysfs(&[("cpu-thermal", "garbage"), ("gpu-thermal", "40000")]);
        let mut zones = zones(dir.path()).unwrap();
        let e = zones[0].temperature_mc().unwrap_err();
        assert!(e.to_string().contains("thermal_zone0/temp"), "{e}");
        assert_eq!(hottest_mc(&mut zones), Some(40_000));
        let missing = super::zones(&dir.path().join("absent")).unwrap_err();
        assert!(missing.to_string().contains("absent"), "{missing}");
    }
}
