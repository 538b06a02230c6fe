//! A spool directory as a frame source, the way payload cameras hand images to a processor.
//!
//! Writers put finished image files into the directory (writing under a name starting with `.`
//! or ending `.part` or `.tmp`, then renaming into place, as spool writers do). The source takes
//! the oldest file that has not changed for a settling time, moves it to `processing/`, decodes
//! it and delivers it; when the next frame is asked for, the previous file has been handed over
//! and moves on to `done/`. A file that cannot be decoded (corrupt, or cut short) moves to
//! `failed/` beside a `<name>.reason` file saying why.
//!
//! After a restart, a file found in `processing/` was in flight when the process stopped: it
//! goes back to the spool and is processed again, so no file is lost; it is the only one that
//! can be processed twice. Sequence numbers continue from the files already in `done/` and
//! `failed/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kestrel_hal::{Frame, FrameMeta, FrameSource};
use kestrel_host::decode_image_within;

/// Why the spool failed, or why one of its files did.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool's folders cannot be made, listed or moved in.
    #[error("spool {path}: {reason}")]
    Folder {
        /// The folder or file.
        path: PathBuf,
        /// What the system said.
        reason: String,
    },
    /// A file could not be used; it is in `failed/` with the reason.
    #[error("{path}: {reason} (moved to failed/)")]
    Frame {
        /// Where it is now.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn folder_error(path: &Path, e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Folder {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// How the spool is read.
#[derive(Clone, Copy, Debug)]
pub struct SpoolOptions {
    /// A file must be unchanged this long before it is taken (a writer that does not rename
    /// may still be writing it).
    pub settle: Duration,
    /// How often an empty spool is looked at again.
    pub poll: Duration,
    /// End the stream when the spool is empty instead of waiting for more (replays, tests).
    pub stop_when_empty: bool,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        Self {
            settle: Duration::from_millis(200),
            poll: Duration::from_millis(50),
            stop_when_empty: false,
        }
    }
}

/// Frames from a spool directory; see the module's documentation.
#[derive(Debug)]
pub struct SpoolSource {
    spool: PathBuf,
    processing: PathBuf,
    done: PathBuf,
    failed: PathBuf,
    /// The file delivered last, still in `processing/`.
    current: Option<PathBuf>,
    next_sequence: u64,
    started: Instant,
    options: SpoolOptions,
    stop: Option<Arc<AtomicBool>>,
}

/// Whether a writer is still writing `name` by the spool protocol.
fn in_progress(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".part") || name.ends_with(".tmp")
}

fn files_in(folder: &Path) -> Result<Vec<PathBuf>, SpoolError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(folder).map_err(|e| folder_error(folder, e))? {
        let entry = entry.map_err(|e| folder_error(folder, e))?;
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        let name = entry.file_name();
        if is_file && !in_progress(&name.to_string_lossy()) {
            files.push(entry.path());
        }
    }
    Ok(files)
}

/// `file` moved into `folder`, keeping its name; the new path.
fn move_into(file: &Path, folder: &Path) -> Result<PathBuf, SpoolError> {
    let name = file
        .file_name()
        .ok_or_else(|| folder_error(file, "not a file name"))?;
    let target = folder.join(name);
    fs::rename(file, &target).map_err(|e| folder_error(file, format!("cannot move: {e}")))?;
    Ok(target)
}

impl SpoolSource {
    /// The spool at `spool`, with `processing/`, `done/` and `failed/` made inside it, and any
    /// file left in `processing/` by an earlier run put back to be processed again.
    pub fn open(spool: &Path, options: SpoolOptions) -> Result<Self, SpoolError> {
        let sub = |name: &str| -> Result<PathBuf, SpoolError> {
            let path = spool.join(name);
            fs::create_dir_all(&path).map_err(|e| folder_error(&path, e))?;
            Ok(path)
        };
        let (processing, done, failed) = (sub("processing")?, sub("done")?, sub("failed")?);
        for interrupted in files_in(&processing)? {
            move_into(&interrupted, spool)?;
        }
        let finished = files_in(&done)?.len()
            + files_in(&failed)?
                .iter()
                .filter(|f| f.extension().is_none_or(|e| e != "reason"))
                .count();
        Ok(Self {
            spool: spool.to_path_buf(),
            processing,
            done,
            failed,
            current: None,
            next_sequence: finished as u64,
            started: Instant::now(),
            options,
            stop: None,
        })
    }

    /// End the stream (rather than wait on an empty spool) once `stop` is set: a SIGTERM.
    pub fn stop_on(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// The file delivered last has been handed over: move it to `done/`.
    pub fn finish_current(&mut self) -> Result<(), SpoolError> {
        if let Some(current) = self.current.take() {
            move_into(&current, &self.done)?;
        }
        Ok(())
    }

    /// Hand over the file delivered last, then wait until a settled file is in the spool: the
    /// oldest, or `None` when stopped (or empty, with `stop_when_empty`). Waiting for files is
    /// idle time, not work: a caller that watches for stalls calls this first, outside the
    /// watch, and `next_frame` then finds the file at once.
    pub fn wait_for_file(&mut self) -> Result<Option<PathBuf>, SpoolError> {
        self.finish_current()?;
        loop {
            if self
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
            {
                return Ok(None);
            }
            match self.oldest()? {
                Some(file) => return Ok(Some(file)),
                None if self.options.stop_when_empty => return Ok(None),
                None => std::thread::sleep(self.options.poll),
            }
        }
    }

    /// The oldest settled file in the spool, if any.
    fn oldest(&self) -> Result<Option<PathBuf>, SpoolError> {
        let now = SystemTime::now();
        let mut candidates: Vec<(SystemTime, PathBuf)> = files_in(&self.spool)?
            .into_iter()
            .filter_map(|path| {
                let modified = fs::metadata(&path).and_then(|m| m.modified()).ok()?;
                let age = now.duration_since(modified).unwrap_or_default();
                (age >= self.options.settle).then_some((modified, path))
            })
            .collect();
        candidates.sort();
        Ok(candidates.into_iter().next().map(|(_, path)| path))
    }

    /// Move `file` (in `processing/`) to `failed/` with a reason file beside it.
    fn fail(&self, file: &Path, reason: String) -> SpoolError {
        let moved = move_into(file, &self.failed);
        let path = match moved {
            Ok(path) => {
                let mut note = path.clone().into_os_string();
                note.push(".reason");
                // The reason is also in the error; a reason file that cannot be written loses
                // nothing the caller does not get.
                let _ = fs::write(PathBuf::from(note), format!("{reason}\n"));
                path
            }
            Err(e) => return e,
        };
        SpoolError::Frame { path, reason }
    }
}

impl FrameSource<u8> for SpoolSource {
    type Error = SpoolError;

    fn next_frame(&mut self, buffer: &mut [u8]) -> Result<Option<Frame>, SpoolError> {
        let Some(file) = self.wait_for_file()? else {
            return Ok(None);
        };
        let file = move_into(&file, &self.processing)?;
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let capture_us = self.started.elapsed().as_micros() as u64;
        // A header claiming more than the frame buffer holds is refused before decoding.
        let image = match decode_image_within(&file, buffer.len()) {
            Ok(image) => image,
            Err(e) => return Err(self.fail(&file, e.reason)),
        };
        let Some(target) = buffer.get_mut(..image.samples.len()) else {
            let reason = "the decoder gave more samples than it said".to_string();
            return Err(self.fail(&file, reason));
        };
        target.copy_from_slice(&image.samples);
        self.current = Some(file);
        Ok(Some(Frame {
            geometry: image.geometry,
            meta: FrameMeta {
                sequence,
                capture_us,
                ..FrameMeta::default()
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, value: u8) {
        image::GrayImage::from_pixel(4, 3, image::Luma([value]))
            .save(path)
            .unwrap();
    }

    fn options() -> SpoolOptions {
        SpoolOptions {
            settle: Duration::ZERO,
            poll: Duration::from_millis(1),
            stop_when_empty: true,
        }
    }

    fn names(folder: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn each_file_is_processed_once_and_moved_to_done_or_failed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path();
        write_png(&spool.join("a.png"), 10);
        std::thread::sleep(Duration::from_millis(20));
        fs::write(spool.join("b.png"), b"\x89PNG\r\n\x1a\n cut short").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        write_png(&spool.join("c.png"), 30);
        fs::write(spool.join(".d.png"), b"still being written").unwrap();
        fs::write(spool.join("e.png.part"), b"still being written").unwrap();

        let mut source = SpoolSource::open(spool, options()).unwrap();
        let mut buffer = [0u8; 64];
        let a = source.next_frame(&mut buffer).unwrap().unwrap();
        assert_eq!((a.meta.sequence, buffer[0]), (0, 10));
        assert_eq!(names(&spool.join("processing")), ["a.png"]);
        let b = source.next_frame(&mut buffer).unwrap_err();
        assert!(b.to_string().contains("b.png"), "{b}");
        let c = source.next_frame(&mut buffer).unwrap().unwrap();
        assert_eq!((c.meta.sequence, buffer[0]), (2, 30));
        assert!(source.next_frame(&mut buffer).unwrap().is_none());

        assert_eq!(names(&spool.join("done")), ["a.png", "c.png"]);
        assert_eq!(names(&spool.join("failed")), ["b.png", "b.png.reason"]);
        let reason = fs::read_to_string(spool.join("failed/b.png.reason")).unwrap();
        assert!(reason.contains("decode"), "{reason}");
        // Files still being written are left for later.
        assert!(spool.join(".d.png").exists() && spool.join("e.png.part").exists());
    }

    #[test]
    fn a_restart_loses_nothing_and_reprocesses_only_the_file_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path();
        for (i, name) in ["a.png", "b.png", "c.png"].iter().enumerate() {
            write_png(&spool.join(name), i as u8);
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut buffer = [0u8; 64];
        {
            let mut source = SpoolSource::open(spool, options()).unwrap();
            source.next_frame(&mut buffer).unwrap().unwrap(); // a
            source.next_frame(&mut buffer).unwrap().unwrap(); // b, in flight when "stopped"
        }
        assert_eq!(names(&spool.join("done")), ["a.png"]);
        assert_eq!(names(&spool.join("processing")), ["b.png"]);
        let mut source = SpoolSource::open(spool, options()).unwrap();
        let mut seen = Vec::new();
        while let Some(frame) = source.next_frame(&mut buffer).unwrap() {
            seen.push((frame.meta.sequence, buffer[0]));
        }
        assert_eq!(seen, [(1, 1), (2, 2)], "b again, then c; numbering goes on");
        assert_eq!(names(&spool.join("done")), ["a.png", "b.png", "c.png"]);
        assert!(names(&spool.join("processing")).is_empty());
    }

    #[test]
    fn a_file_still_changing_waits_for_the_settling_time() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("fresh.png"), 1);
        let settled = SpoolOptions {
            settle: Duration::from_secs(3600),
            ..options()
        };
        let mut source = SpoolSource::open(dir.path(), settled).unwrap();
        assert!(source.next_frame(&mut [0u8; 64]).unwrap().is_none());
        assert!(dir.path().join("fresh.png").exists());
    }

    #[test]
    fn an_unusable_spool_folder_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-folder");
        fs::write(&file, b"").unwrap();
        let e = SpoolSource::open(&file, options()).unwrap_err();
        assert!(e.to_string().contains("not-a-folder"), "{e}");
    }
}
