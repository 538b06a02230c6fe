//! The frame link over a byte stream (TCP for hardware in the loop): [`send_frame`] on the bench,
//! [`StreamSource`] on the board. The format is `kestrel_wire::framelink`'s: a 72-byte header,
//! then the samples, checked by their CRC.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use kestrel_hal::{Frame, FrameSource};
use kestrel_wire::framelink::{
    check_samples, decode_header, encode_header, FrameLinkError, FRAME_HEADER_LEN, FRAME_MAGIC,
};

/// Why a frame did not arrive.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A header or the samples did not check out; the frame is skipped.
    #[error("frame link: {0}")]
    Frame(FrameLinkError),
    /// The frame is larger than the board's frame buffer; it is skipped.
    #[error("frame link: a {width}x{height}x{bands} frame exceeds the frame buffer ({capacity} samples)")]
    TooLarge {
        /// Its width.
        width: u32,
        /// Its height.
        height: u32,
        /// Its bands.
        bands: u16,
        /// The buffer's samples.
        capacity: usize,
    },
    /// The sender went quiet for longer than the link's timeout.
    #[error("frame link: nothing arrived for {0:?}")]
    Silent(Duration),
    /// The stream ended inside a frame.
    #[error("frame link: the stream ended inside a frame")]
    Truncated,
    /// The stream failed.
    #[error("frame link: {0}")]
    Io(String),
}

/// Send one frame: its header, then its samples.
pub fn send_frame(link: &mut impl Write, frame: &Frame, samples: &[u8]) -> Result<(), LinkError> {
    let header = encode_header(frame, samples).map_err(LinkError::Frame)?;
    link.write_all(&header)
        .and_then(|()| link.write_all(samples))
        .map_err(|e| LinkError::Io(e.to_string()))
}

/// Frames from a byte stream.
#[derive(Debug)]
pub struct StreamSource<R> {
    reader: R,
    timeout: Duration,
    /// Bytes skipped to find a frame header (noise, or the rest of a bad frame).
    pub skipped_bytes: u64,
}

/// What filling a buffer from the stream came to.
enum Filled {
    Whole,
    /// The stream ended before the first byte.
    Ended,
}

impl<R: Read> StreamSource<R> {
    /// Frames from `reader`; `timeout` is how long a silent sender is waited for before each
    /// frame is reported missing (the reader's own timeout must be set no longer, as
    /// [`StreamSource::listen`] does for TCP).
    pub fn new(reader: R, timeout: Duration) -> Self {
        Self {
            reader,
            timeout,
            skipped_bytes: 0,
        }
    }

    /// Fill `buf` from the stream.
    fn fill(&mut self, buf: &mut [u8]) -> Result<Filled, LinkError> {
        let started = Instant::now();
        let mut at = 0;
        while at < buf.len() {
            match self.reader.read(buf.get_mut(at..).unwrap_or_default()) {
                Ok(0) if at == 0 => return Ok(Filled::Ended),
                Ok(0) => return Err(LinkError::Truncated),
                Ok(n) => at += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if started.elapsed() >= self.timeout {
                        return Err(LinkError::Silent(self.timeout));
                    }
                }
                Err(e) => return Err(LinkError::Io(e.to_string())),
            }
        }
        Ok(Filled::Whole)
    }

    /// The next header, skipping bytes until one starts with `KFRM`.
    fn header(&mut self) -> Result<Option<[u8; FRAME_HEADER_LEN]>, LinkError> {
        let mut header = [0u8; FRAME_HEADER_LEN];
        if let Filled::Ended = self.fill(&mut header)? {
            return Ok(None);
        }
        while !header.starts_with(&FRAME_MAGIC) {
            header.copy_within(1.., 0);
            self.skipped_bytes += 1;
            let last = header.len() - 1;
            if let Filled::Ended = self.fill(&mut header[last..])? {
                return Err(LinkError::Truncated);
            }
        }
        Ok(Some(header))
    }
}

impl StreamSource<TcpStream> {
    /// Listen on `address` for one sender, for at most `accept_timeout`; reads then wait at
    /// most `timeout` for each frame.
    pub fn listen(
        address: impl ToSocketAddrs,
        accept_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, LinkError> {
        let io = |e: std::io::Error| LinkError::Io(e.to_string());
        let listener = TcpListener::bind(address).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        let started = Instant::now();
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if started.elapsed() >= accept_timeout {
                        return Err(LinkError::Silent(accept_timeout));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(io(e)),
            }
        };
        stream.set_nonblocking(false).map_err(io)?;
        // Short reads, so that the frame's own deadline is checked often.
        stream
            .set_read_timeout(Some(
                timeout
                    .min(Duration::from_millis(100))
                    .max(Duration::from_millis(1)),
            ))
            .map_err(io)?;
        Ok(Self::new(stream, timeout))
    }
}

impl<R: Read> FrameSource<u8> for StreamSource<R> {
    type Error = LinkError;

    fn next_frame(&mut self, buffer: &mut [u8]) -> Result<Option<Frame>, LinkError> {
        let Some(header) = self.header()? else {
            return Ok(None);
        };
        let header = decode_header(&header).map_err(LinkError::Frame)?;
        let samples = header.samples as usize;
        let g = header.frame.geometry;
        let Some(target) = buffer.get_mut(..samples) else {
            // Read past it so that the next frame is found where it starts.
            let mut rest = vec![0u8; samples];
            self.fill(&mut rest)?;
            return Err(LinkError::TooLarge {
                width: g.width,
                height: g.height,
                bands: g.bands,
                capacity: buffer.len(),
            });
        };
        if let Filled::Ended = self.fill(target)? {
            if samples > 0 {
                return Err(LinkError::Truncated);
            }
        }
        check_samples(&header, target).map_err(LinkError::Frame)?;
        Ok(Some(header.frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kestrel_hal::{FrameGeometry, FrameMeta};

    fn frame(sequence: u64, width: u32) -> (Frame, Vec<u8>) {
        let geometry = FrameGeometry {
            width,
            height: 2,
            bands: 3,
        };
        let meta = FrameMeta {
            sequence,
            capture_us: 1_000 * sequence,
            ..FrameMeta::default()
        };
        let samples = (0..width * 6)
            .map(|i| (i as u64 + sequence) as u8)
            .collect();
        (Frame { geometry, meta }, samples)
    }

    #[test]
    fn frames_cross_a_stream_and_bad_ones_are_skipped_with_their_reason() {
        let mut stream = Vec::new();
        for (i, width) in [(0, 4), (1, 4), (2, 100), (3, 4)] {
            let (f, s) = frame(i, width);
            send_frame(&mut stream, &f, &s).unwrap();
            if i == 0 {
                stream.extend_from_slice(b"noise");
            }
        }
        // Frame 1's samples damaged after sending.
        let (_, first) = frame(0, 4);
        let damaged = FRAME_HEADER_LEN + first.len() + 5 + FRAME_HEADER_LEN + 3;
        stream[damaged] ^= 0xff;
        let mut source = StreamSource::new(stream.as_slice(), Duration::from_secs(1));
        let mut buffer = [0u8; 64];
        let got = source.next_frame(&mut buffer).unwrap().unwrap();
        assert_eq!((got.meta.sequence, &buffer[..24]), (0, first.as_slice()));
        let crc = source.next_frame(&mut buffer).unwrap_err();
        assert!(
            matches!(crc, LinkError::Frame(FrameLinkError::Crc)),
            "{crc}"
        );
        assert_eq!(source.skipped_bytes, 5);
        let large = source.next_frame(&mut buffer).unwrap_err();
        assert!(
            matches!(large, LinkError::TooLarge { width: 100, .. }),
            "{large}"
        );
        let last = source.next_frame(&mut buffer).unwrap().unwrap();
        assert_eq!(last.meta.capture_us, 3_000);
        assert!(source.next_frame(&mut buffer).unwrap().is_none());
        // Cut inside a frame.
        let (f, s) = frame(9, 4);
        let mut cut = Vec::new();
        send_frame(&mut cut, &f, &s).unwrap();
        cut.truncate(FRAME_HEADER_LEN + 3);
        let mut source = StreamSource::new(cut.as_slice(), Duration::from_secs(1));
        assert!(matches!(
            source.next_frame(&mut buffer),
            Err(LinkError::Truncated)
        ));
    }

    #[test]
    fn frames_cross_tcp_on_loopback_and_a_silent_sender_is_reported_in_bounded_time() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let sender = std::thread::spawn(move || {
            let mut link = loop {
                match TcpStream::connect(("127.0.0.1", port)) {
                    Ok(link) => break link,
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            };
            let (f, s) = frame(7, 4);
            send_frame(&mut link, &f, &s).unwrap();
            // Then silence, longer than the board waits.
            std::thread::sleep(Duration::from_millis(600));
        });
        let mut source = StreamSource::listen(
            ("127.0.0.1", port),
            Duration::from_secs(5),
            Duration::from_millis(200),
        )
        .unwrap();
        let mut buffer = [0u8; 64];
        let got = source.next_frame(&mut buffer).unwrap().unwrap();
        assert_eq!(got.meta.sequence, 7);
        let started = Instant::now();
        let silent = source.next_frame(&mut buffer).unwrap_err();
        assert!(matches!(silent, LinkError::Silent(_)), "{silent}");
        assert!(started.elapsed() < Duration::from_millis(500));
        sender.join().unwrap();
        assert!(
            source.next_frame(&mut buffer).unwrap().is_none(),
            "the sender closed"
        );
    }

    #[test]
    fn nobody_connecting_is_reported_in_bounded_time() {
        let started = Instant::now();
        let e = StreamSource::listen(
            "127.0.0.1:0",
            Duration::from_millis(50),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, LinkError::Silent(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
