//! Gzip on every CPU, as pigz does it: the input is cut into blocks of [`BLOCK`] bytes, each
//! compressed on a thread of its own as raw deflate primed with the 32 KiB before it and
//! ended by a sync flush (the last one by the stream's end), and the pieces are written in
//! order between one gzip header and trailer. The result is one ordinary gzip member any
//! gzip reads; it depends only on the input, the level and the deflate implementation
//! (flate2's zlib-rs backend), never on the threads' timing, so the same layer gets the same
//! digest. (The digests differ from those of Kiln before 2026-12-04, which compressed with
//! miniz_oxide in one piece: a layer exported again after an upgrade gets a new digest.)

use std::collections::VecDeque;
use std::io::{self, Write};
use std::thread::JoinHandle;

use flate2::{Compress, Compression, Crc, FlushCompress, Status};

/// Bytes compressed as one piece.
pub const BLOCK: usize = 1 << 20;
/// What deflate can refer back to: the dictionary each piece is primed with.
const WINDOW: usize = 32 << 10;
/// The gzip header flate2's `GzEncoder` writes too: no name, no time, unknown system.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// A gzip writer compressing on up to `threads` threads.
pub struct ParallelGzip<W: Write> {
    inner: W,
    level: Compression,
    threads: usize,
    crc: Crc,
    /// Input not yet handed to a thread.
    pending: Vec<u8>,
    /// The last [`WINDOW`] bytes handed to a thread.
    window: Vec<u8>,
    /// Pieces being compressed, oldest first.
    running: VecDeque<JoinHandle<io::Result<Vec<u8>>>>,
    started: bool,
}

impl<W: Write> ParallelGzip<W> {
    /// Compresses into `inner` at `level`, on as many threads as there are CPUs.
    pub fn new(inner: W, level: Compression) -> ParallelGzip<W> {
        let threads = crate::compression_threads();
        ParallelGzip {
            inner,
            level,
            threads,
            crc: Crc::new(),
            pending: Vec::with_capacity(BLOCK),
            window: Vec::new(),
            running: VecDeque::new(),
            started: false,
        }
    }

    /// Compresses what is left, writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header()?;
        self.hand_over(true)?;
        while let Some(piece) = self.running.pop_front() {
            let piece = join(piece)?;
            self.inner.write_all(&piece)?;
        }
        self.inner.write_all(&self.crc.sum().to_le_bytes())?;
        self.inner.write_all(&self.crc.amount().to_le_bytes())?;
        self.inner.flush()?;
        Ok(self.inner)
    }

    fn header(&mut self) -> io::Result<()> {
        if !self.started {
            self.started = true;
            self.inner.write_all(&HEADER)?;
        }
        Ok(())
    }

    /// Hands the pending input to a thread, after writing out the oldest pieces while as
    /// many threads run as there are CPUs.
    fn hand_over(&mut self, last: bool) -> io::Result<()> {
        while self.running.len() >= self.threads {
            let piece = join(self.running.pop_front().expect("running"))?;
            self.inner.write_all(&piece)?;
        }
        let block = std::mem::replace(&mut self.pending, Vec::with_capacity(BLOCK));
        let dictionary = std::mem::take(&mut self.window);
        self.window = block[block.len().saturating_sub(WINDOW)..].to_vec();
        if self.window.len() < WINDOW {
            // A short block (only ever the last) keeps the older bytes too.
            let keep = dictionary.len().min(WINDOW - self.window.len());
            let mut window = dictionary[dictionary.len() - keep..].to_vec();
            window.extend_from_slice(&self.window);
            self.window = window;
        }
        let level = self.level;
        self.running.push_back(std::thread::spawn(move || compress(&block, &dictionary, level, last)));
        Ok(())
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.header()?;
        let taken = buf.len().min(BLOCK - self.pending.len());
        self.pending.extend_from_slice(&buf[..taken]);
        self.crc.update(&buf[..taken]);
        if self.pending.len() == BLOCK {
            self.hand_over(false)?;
        }
        Ok(taken)
    }

    /// Pieces are written as they are done; a flush does not cut a block short.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn join(piece: JoinHandle<io::Result<Vec<u8>>>) -> io::Result<Vec<u8>> {
    piece.join().map_err(|_| io::Error::other("a gzip compression thread panicked"))?
}

/// Raw deflate of `block` primed with `dictionary`, ended by a sync flush, or by the stream's
/// end when `last`.
fn compress(block: &[u8], dictionary: &[u8], level: Compression, last: bool) -> io::Result<Vec<u8>> {
    let mut deflate = Compress::new(level, false);
    if !dictionary.is_empty() {
        deflate.set_dictionary(dictionary).map_err(io::Error::other)?;
    }
    let flush = if last { FlushCompress::Finish } else { FlushCompress::Sync };
    let mut out = Vec::with_capacity(block.len() / 2 + 1024);
    let mut input = block;
    loop {
        if out.capacity() - out.len() < 1024 {
            out.reserve(out.capacity().max(64 << 10));
        }
        let before = deflate.total_in();
        let status = deflate.compress_vec(input, &mut out, flush).map_err(io::Error::other)?;
        input = &input[(deflate.total_in() - before) as usize..];
        // Done when the input is in and the flush's end is out (room was left over).
        match status {
            Status::StreamEnd => return Ok(out),
            Status::Ok | Status::BufError if input.is_empty() && !last && out.capacity() > out.len() => {
                return Ok(out);
            }
            Status::Ok | Status::BufError => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    fn gzip(input: &[u8], chunk: usize) -> Vec<u8> {
        let mut writer = ParallelGzip::new(Vec::new(), Compression::default());
        for piece in input.chunks(chunk.max(1)) {
            writer.write_all(piece).unwrap();
        }
        writer.finish().unwrap()
    }

    fn gunzip(compressed: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(compressed).read_to_end(&mut out).unwrap();
        out
    }

    /// Text with repeats that reach back across block edges, and noise.
    fn sample(len: usize) -> Vec<u8> {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        (0..len)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                if (i / 4096) % 3 == 0 { state as u8 } else { b"kiln builds layers "[i % 19] }
            })
            .collect()
    }

    #[test]
    fn what_it_writes_is_gzip_of_the_input_at_every_size() {
        for len in [0, 1, WINDOW - 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + WINDOW + 7] {
            let input = sample(len);
            let compressed = gzip(&input, 100_000);
            assert_eq!(gunzip(&compressed), input, "{len} bytes");
            assert!(compressed.len() < len / 2 + 1024, "{len} bytes compressed to {}", compressed.len());
        }
    }

    #[test]
    fn the_output_depends_only_on_the_input() {
        let input = sample(2 * BLOCK + 12_345);
        assert_eq!(gzip(&input, 1 << 16), gzip(&input, 777));
        let mut one_thread = ParallelGzip::new(Vec::new(), Compression::default());
        one_thread.threads = 1;
        one_thread.write_all(&input).unwrap();
        assert_eq!(one_thread.finish().unwrap(), gzip(&input, 1 << 16));
    }

    #[test]
    fn gzip_itself_reads_it() {
        let input = sample(BLOCK + 5000);
        let mut child = std::process::Command::new("gzip")
            .arg("-dc")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let compressed = gzip(&input, 4096);
        let writer = std::thread::spawn(move || stdin.write_all(&compressed));
        let output = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(output.status.success());
        assert_eq!(output.stdout, input);
    }
}
