//! The Linux watchdog device (`/dev/watchdog`): opening it arms the watchdog, every write feeds
//! it, and writing `V` before closing disarms it ("magic close"), where the driver allows. The
//! timeout is the driver's (or the kernel command line's); the flight binary's systemd unit sets
//! its own watchdog on top.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use kestrel_hal::Watchdog;

/// Where Linux puts the first watchdog.
pub const DEV_WATCHDOG: &str = "/dev/watchdog";

/// Why the watchdog could not be opened, fed or stopped.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct WatchdogError {
    /// The device.
    pub path: PathBuf,
    /// What the system said.
    pub reason: String,
}

/// An open, armed Linux watchdog.
#[derive(Debug)]
pub struct LinuxWatchdog {
    path: PathBuf,
    device: File,
}

impl LinuxWatchdog {
    /// Open (and so arm) the watchdog at `path`.
    pub fn open(path: &Path) -> Result<Self, WatchdogError> {
        let device = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| WatchdogError {
                path: path.to_path_buf(),
                reason: format!("cannot open the watchdog: {e}"),
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            device,
        })
    }

    fn write(&mut self, byte: u8) -> Result<(), WatchdogError> {
        self.device
            .write_all(&[byte])
            .and_then(|()| self.device.flush())
            .map_err(|e| WatchdogError {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }
}

impl Watchdog for LinuxWatchdog {
    type Error = WatchdogError;

    fn feed(&mut self) -> Result<(), WatchdogError> {
        // Any byte but `V` feeds it.
        self.write(0)
    }

    fn stop(&mut self) -> Result<(), WatchdogError> {
        self.write(b'V')
    }
}

/// Tell systemd `state` (`READY=1`, `WATCHDOG=1`, `STOPPING=1`) on `$NOTIFY_SOCKET`, as a
/// `Type=notify` unit with `WatchdogSec=` expects; nothing when not started by systemd. Returns
/// whether it was sent.
pub fn notify_systemd(state: &str) -> bool {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sender) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = socket.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        // An abstract socket name.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|address| sender.send_to_addr(state.as_bytes(), &address))
        }
        None => sender.send_to(state.as_bytes(), Path::new(&socket)),
    };
    sent.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feeding_writes_a_byte_and_stopping_writes_the_magic_v() {
        let dir = tempfile::tempdir().unwrap();
        let device = dir.path().join("watchdog");
        std::fs::write(&device, b"").unwrap();
        let mut watchdog = LinuxWatchdog::open(&device).unwrap();
        watchdog.feed().unwrap();
        watchdog.feed().unwrap();
        watchdog.stop().unwrap();
        assert_eq!(std::fs::read(&device).unwrap(), [0, 0, b'V']);
    }

    #[test]
    fn a_missing_device_is_a_clear_error() {
        let e = LinuxWatchdog::open(Path::new("/nonexistent/watchdog")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/watchdog"), "{e}");
        assert!(e.to_string().contains("cannot open the watchdog"), "{e}");
    }

    #[test]
    fn systemd_hears_the_state_on_its_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        // The one test that sets this variable.
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(notify_systemd("WATCHDOG=1"));
        let mut buf = [0u8; 64];
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(!notify_systemd("WATCHDOG=1"));
    }
}
