//! Block-parallel deterministic gzip (see docs/adr/0004-deterministic-parallel-gzip.md).
//!
//! The input is cut into fixed blocks of [`BLOCK_SIZE`] bytes (the last one shorter). Each block
//! is compressed on its own as raw deflate, with the 32 KiB that precede it as the preset
//! dictionary, and ends with a sync flush (an empty stored block, so it stops on a byte
//! boundary); the last block is finished instead. Noise inside a block (random or already
//! compressed data, found by an integer test on 512-byte segments) is written as stored deflate
//! blocks instead of being searched for matches (`compress_block`). The blocks, concatenated,
//! make one deflate stream, wrapped in a single gzip member (header as flate2 writes it with
//! mtime 0 and OS 255; trailer with the CRC32 combined from the blocks' CRCs and the length mod
//! 2^32).
//!
//! Every block's bytes depend only on its own data, its dictionary and the level, so the whole
//! output depends only on the input and the level: never on the number of threads, on how the
//! writes were split, or on the machine's core count. One thread runs the very same code.
//!
//! Memory stays bounded: at most `2 * threads` blocks are in flight; [`write`](ParGzEncoder::write)
//! waits for the oldest when the window is full, and compressed blocks are written out in order as
//! soon as they are ready.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::{Compress, Crc, FlushCompress, Status};

/// Uncompressed bytes per independently compressed block (pigz's default block size).
pub const BLOCK_SIZE: usize = 128 * 1024;
/// Deflate's window: how much of the previous block each block may refer to.
const DICT_SIZE: usize = 32 * 1024;
/// The most a stored deflate block holds.
const STORED_MAX: usize = 65_535;

/// The gzip header flate2's `GzEncoder` writes for levels 2 to 8 with no name and mtime 0: so a
/// layer is still recognisably the same format as before, and carries no time.
fn header(level: u32) -> [u8; 10] {
    // XFL: 2 = best compression, 4 = fastest, as RFC 1952 (and flate2) say.
    let xfl = match level {
        9.. => 2,
        0 | 1 => 4,
        _ => 0,
    };
    [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255]
}

/// The threads layers are compressed with by default: every core, up to 8.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8)
}

struct Job {
    seq: u64,
    data: Vec<u8>,
    dict: Vec<u8>,
    last: bool,
}

struct Done {
    seq: u64,
    out: io::Result<Vec<u8>>,
    crc: Crc,
}

/// Compresses one block: raw deflate with `dict` preset, sync-flushed (or finished if `last`).
///
/// Noise (compressed files, random data) is stored as it is: deflate would spend its time
/// searching it for matches and then store it anyway. A whole block of noise is compressed at
/// level 0; in a mixed block, each run of noise ([`noise_runs`]) is written as stored deflate
/// blocks, and each run between them is deflated on its own with the 32 KiB of dictionary and
/// data before it as its dictionary, so it still refers back into the stored noise (a repeat of
/// it is matched) and into the text before. A block without noise is one deflate run.
///
/// Every run gets a fresh compressor. A reset one (`Compress::reset`) is NOT equivalent: zlib-rs
/// keeps the previous stream's window bytes, which can sway its match choices, so the bytes would
/// depend on which blocks a thread compressed before (the test with many varied blocks caught it).
fn compress_block(level: u32, data: &[u8], dict: &[u8], last: bool) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 8 + 64);
    if level == 0 || incompressible(data, dict) {
        deflate_into(&mut out, 0, data, dict, last)?;
        return Ok(out);
    }
    let mut at = 0;
    for (start, end) in noise_runs(data, dict) {
        if start > at {
            deflate_into(
                &mut out,
                level,
                &data[at..start],
                &window(data, dict, at),
                false,
            )?;
        }
        // After a sync flush the stream is on a byte boundary: stored blocks can follow.
        store_into(&mut out, &data[start..end], last && end == data.len());
        at = end;
    }
    if at < data.len() || data.is_empty() {
        deflate_into(&mut out, level, &data[at..], &window(data, dict, at), last)?;
    }
    Ok(out)
}

/// The (up to) 32 KiB of input before `data[at]`: the end of `dict`, then `data` up to `at`.
fn window<'a>(data: &'a [u8], dict: &'a [u8], at: usize) -> Cow<'a, [u8]> {
    if at >= DICT_SIZE {
        return Cow::Borrowed(&data[at - DICT_SIZE..at]);
    }
    if at == 0 {
        return Cow::Borrowed(&dict[dict.len().saturating_sub(DICT_SIZE)..]);
    }
    let from_dict = (DICT_SIZE - at).min(dict.len());
    Cow::Owned([&dict[dict.len() - from_dict..], &data[..at]].concat())
}

/// Appends `data` as raw deflate at `level` with `dict` preset, sync-flushed (finished if `last`).
fn deflate_into(
    out: &mut Vec<u8>,
    level: u32,
    data: &[u8],
    dict: &[u8],
    last: bool,
) -> io::Result<()> {
    let mut c = Compress::new(flate2::Compression::new(level), false);
    if level > 0 && !dict.is_empty() {
        c.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    // Deflate's worst case is a little over the input; start there and grow if ever needed.
    out.reserve(data.len() + data.len() / 8 + 64);
    loop {
        let consumed = c.total_in() as usize;
        let (room, before) = (out.capacity() - out.len(), c.total_out());
        let status = c
            .compress_vec(&data[consumed..], out, flush)
            .map_err(io::Error::other)?;
        if room > 0 && c.total_out() == before && c.total_in() as usize == consumed {
            if matches!(status, Status::StreamEnd) || !last {
                return Ok(());
            }
            return Err(io::Error::other("deflate made no progress"));
        }
        let done = c.total_in() as usize == data.len()
            && match status {
                Status::StreamEnd => true,
                // A sync flush is complete once it left spare room in the output.
                Status::Ok | Status::BufError => !last && out.len() < out.capacity(),
            };
        if done {
            return Ok(());
        }
        out.reserve(out.capacity().max(64 * 1024));
    }
}

/// Appends `data` as stored deflate blocks (RFC 1951 3.2.4) of at most 65,535 bytes each, the
/// last one with BFINAL set if `last`. The stream must be on a byte boundary: at the start of a
/// block, after a sync flush or after other stored blocks.
fn store_into(out: &mut Vec<u8>, data: &[u8], last: bool) {
    // Empty data would write no block at all, and so no BFINAL: runs are never empty.
    debug_assert!(!data.is_empty(), "an empty stored run");
    let n = data.len().div_ceil(STORED_MAX);
    for (i, chunk) in data.chunks(STORED_MAX).enumerate() {
        // BFINAL (bit 0), BTYPE 00 (bits 1-2), then padding to the byte boundary.
        out.push(u8::from(last && i + 1 == n));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
}

/// Blocks shorter than this are always compressed (the test needs enough bytes to be sure).
const NOISE_MIN: usize = 16 * 1024;
/// The byte histogram's chi-square against a uniform one stays below this for noise: about 255
/// (the degrees of freedom) for random bytes, give or take 23 whatever the length; text and
/// structured binary data are in the thousands even over 512 bytes (a tar header alone puts a
/// segment far above it), and random 7-bit bytes (which Huffman coding shrinks by 1/8) give
/// about n + 255, 767 over 512 bytes. Data spread evenly over some 240 of the 256 values scores
/// around 320 and is taken for noise, though Huffman coding would gain about 1 % on it.
const NOISE_MAX_CHI2: u64 = 400;
/// Inside a mixed block, noise is looked for in segments of this many bytes (the last segment
/// takes the block's remainder too): tar's record size, and the shortest over which the
/// chi-square still tells random bytes from 7-bit ones. On the files20k data, 512-byte segments
/// stored more of the noise, in less CPU time, than 1, 2 or 4 KiB ones.
const SEGMENT: usize = 512;
/// The shortest run of noise segments stored as it is. Each run costs a sync flush (5 bytes), a
/// new deflate block header for the text after it (its Huffman tables, ~100 bytes) and a
/// compressor set up with a 32 KiB dictionary; shorter runs are deflated with their neighbours.
/// (2 KiB and 4 KiB cost the same CPU on files20k; 2 KiB stored more.)
const NOISE_RUN_MIN: usize = 4 * SEGMENT;

/// Whether the bytes of `data` are spread evenly over the 256 values (nothing for Huffman
/// coding): the chi-square of its histogram against a uniform one, in integers.
fn flat(data: &[u8]) -> bool {
    let mut counts = [0u64; 256];
    for &b in data {
        counts[b as usize] += 1;
    }
    let n = data.len() as u64;
    // chi2 = sum((c - n/256)^2) / (n/256) = sum((256c - n)^2) / (256 n), kept in integers.
    let sum: u64 = counts.iter().map(|&c| (256 * c).abs_diff(n).pow(2)).sum();
    sum / (256 * n) < NOISE_MAX_CHI2
}

/// The content-defined samples of `bytes`: the 8-byte windows whose hash falls in 1/64 of the
/// range, with their offsets. A sequence that appears twice is sampled at both places, so a
/// repeat is all but sure to show once it is a few hundred bytes long (one of 512 bytes holds
/// no sample in 1 case of 3,000); for noise, samples of 8 random bytes essentially never collide.
fn samples(bytes: &[u8]) -> impl Iterator<Item = (u64, usize)> + '_ {
    bytes
        .windows(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .enumerate()
        .filter(|(_, v)| v.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58 == 0)
        .map(|(i, v)| (v, i))
}

/// Whether deflate can do nothing with `data` (preceded by `dict`): its bytes are spread evenly
/// (nothing for Huffman coding) and no sampled 8-byte sequence shows up twice in `dict` + `data`
/// (nothing for LZ77 matches). Integer arithmetic only, on the block's own bytes, so the answer,
/// and with it the output, is the same on every machine.
fn incompressible(data: &[u8], dict: &[u8]) -> bool {
    if data.len() < NOISE_MIN || !flat(data) {
        return false;
    }
    let mut samples: Vec<u64> = samples(dict).chain(samples(data)).map(|s| s.0).collect();
    samples.sort_unstable();
    // Overlapping windows of one long run (a run of zeros) are equal too: any pair counts.
    samples.windows(2).all(|p| p[0] != p[1])
}

/// The runs of noise in a mixed block, as `(start, end)` offsets in `data`, in order: runs of at
/// least [`NOISE_RUN_MIN`] bytes of [`SEGMENT`]s that are [`flat`] and hold no sampled 8-byte
/// sequence that also occurs in the 32 KiB before it (in `dict` + `data`, deflate's reach), so
/// that deflate would find neither a Huffman gain nor a match in them. A random file that shows
/// up twice is deflated the second time (its match is found); the first copy may be stored, and
/// stays in the window the second one refers to. Like [`incompressible`], integers only.
fn noise_runs(data: &[u8], dict: &[u8]) -> Vec<(usize, usize)> {
    let segments = data.len() / SEGMENT;
    if data.len() < NOISE_RUN_MIN {
        return Vec::new();
    }
    let bounds = |s: usize| {
        let start = s * SEGMENT;
        let end = if s + 1 == segments {
            data.len()
        } else {
            start + SEGMENT
        };
        (start, end)
    };
    let mut noisy: Vec<bool> = (0..segments)
        .map(|s| {
            let (start, end) = bounds(s);
            flat(&data[start..end])
        })
        .collect();
    if !noisy.iter().any(|&n| n) {
        return Vec::new();
    }
    // Offsets in dict + data: the dictionary's samples come first.
    let mut found: Vec<(u64, usize)> = samples(dict)
        .chain(samples(data).map(|(v, i)| (v, i + dict.len())))
        .collect();
    found.sort_unstable();
    for p in found.windows(2) {
        let ((a, from), (b, to)) = (p[0], p[1]);
        if a == b && to - from <= DICT_SIZE && to >= dict.len() {
            noisy[((to - dict.len()) / SEGMENT).min(segments - 1)] = false;
        }
    }
    let mut runs = Vec::new();
    let mut s = 0;
    while s < segments {
        if !noisy[s] {
            s += 1;
            continue;
        }
        let first = s;
        while s < segments && noisy[s] {
            s += 1;
        }
        let (start, end) = (bounds(first).0, bounds(s - 1).1);
        if end - start >= NOISE_RUN_MIN {
            runs.push((start, end));
        }
    }
    runs
}

fn run_job(level: u32, job: Job) -> Done {
    let mut crc = Crc::new();
    crc.update(&job.data);
    Done {
        seq: job.seq,
        out: compress_block(level, &job.data, &job.dict, job.last),
        crc,
    }
}

struct Pool {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn start(threads: usize, level: u32) -> io::Result<Pool> {
        let (job_tx, job_rx) = sync_channel::<Job>(threads);
        let (done_tx, done_rx) = sync_channel::<Done>(threads * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = Arc::clone(&job_rx);
            let tx = done_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("gzip-{i}"))
                .spawn(move || {
                    loop {
                        // A poisoned lock means another worker panicked: stop too.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        let seq = job.seq;
                        // A panic must not leave the writer waiting for this block forever.
                        let done =
                            std::panic::catch_unwind(AssertUnwindSafe(|| run_job(level, job)))
                                .unwrap_or_else(|_| Done {
                                    seq,
                                    out: Err(io::Error::other("a gzip worker thread panicked")),
                                    crc: Crc::new(),
                                });
                        if tx.send(done).is_err() {
                            return;
                        }
                    }
                })?;
            workers.push(handle);
        }
        Ok(Pool {
            jobs: Some(job_tx),
            done: done_rx,
            workers,
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the job queue ends the workers once they have handed in their blocks; drain
        // what they still send so none of them blocks on a full queue.
        self.jobs = None;
        while self.done.recv().is_ok() {}
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A gzip writer whose output depends only on the input and the level (module doc).
///
/// Call [`finish`](Self::finish) to write the last block and the trailer; dropped without it, the
/// output is incomplete. [`flush`](Write::flush) flushes the inner writer only: forcing out a
/// partial block would make the bytes depend on when flush was called.
pub struct ParGzEncoder<W: Write> {
    inner: Option<W>,
    level: u32,
    threads: usize,
    pool: Option<Pool>,
    /// The block being filled.
    block: Vec<u8>,
    /// The last DICT_SIZE bytes before `block`.
    dict: Vec<u8>,
    /// The next block's sequence number, and the next one to write out.
    next_seq: u64,
    next_out: u64,
    /// Compressed blocks that came back ahead of their turn.
    ready: BTreeMap<u64, (Vec<u8>, Crc)>,
    crc: Crc,
    header_written: bool,
}

impl<W: Write> ParGzEncoder<W> {
    /// `level` 0-9 as zlib's; `threads` compressors (at least 1; 1 compresses in the caller's
    /// thread). The output is the same whatever `threads` is.
    pub fn new(inner: W, level: u32, threads: usize) -> Self {
        ParGzEncoder {
            inner: Some(inner),
            level: level.min(9),
            threads: threads.max(1),
            pool: None,
            block: Vec::with_capacity(BLOCK_SIZE),
            dict: Vec::new(),
            next_seq: 0,
            next_out: 0,
            ready: BTreeMap::new(),
            crc: Crc::new(),
            header_written: false,
        }
    }

    fn inner(&mut self) -> &mut W {
        self.inner.as_mut().expect("ParGzEncoder used after finish")
    }

    fn write_header(&mut self) -> io::Result<()> {
        if !self.header_written {
            let h = header(self.level);
            self.inner().write_all(&h)?;
            self.header_written = true;
        }
        Ok(())
    }

    /// Writes out, in order, every block that is ready.
    fn drain_ready(&mut self) -> io::Result<()> {
        while let Some((out, crc)) = self.ready.remove(&self.next_out) {
            self.write_header()?;
            self.inner().write_all(&out)?;
            self.crc.combine(&crc);
            self.next_out += 1;
        }
        Ok(())
    }

    /// Waits for one block to come back from the workers.
    fn receive_one(&mut self) -> io::Result<()> {
        let pool = self.pool.as_ref().expect("blocks in flight without a pool");
        let done = pool
            .done
            .recv()
            .map_err(|_| io::Error::other("a gzip worker thread stopped unexpectedly"))?;
        self.ready.insert(done.seq, (done.out?, done.crc));
        self.drain_ready()
    }

    /// Hands the current block over for compression (or compresses it here with one thread).
    fn dispatch(&mut self, last: bool) -> io::Result<()> {
        let data = std::mem::replace(&mut self.block, Vec::with_capacity(BLOCK_SIZE));
        // Only the last block can be shorter than a block, so every other block has a whole
        // window to hand on as the next one's dictionary.
        let dict = if last {
            std::mem::take(&mut self.dict)
        } else {
            std::mem::replace(&mut self.dict, data[data.len() - DICT_SIZE..].to_vec())
        };
        let job = Job {
            seq: self.next_seq,
            data,
            dict,
            last,
        };
        self.next_seq += 1;
        if self.threads == 1 || (self.pool.is_none() && last) {
            // One thread, or a stream that fits in a single block: no pool needed.
            let done = run_job(self.level, job);
            self.ready.insert(done.seq, (done.out?, done.crc));
            return self.drain_ready();
        }
        if self.pool.is_none() {
            self.pool = Some(Pool::start(self.threads, self.level)?);
        }
        while self.next_seq - self.next_out > 2 * self.threads as u64 {
            self.receive_one()?;
        }
        let sent = self
            .pool
            .as_ref()
            .and_then(|p| p.jobs.as_ref())
            .map(|tx| tx.send(job).is_ok())
            .unwrap_or(false);
        if !sent {
            return Err(io::Error::other(
                "a gzip worker thread stopped unexpectedly",
            ));
        }
        Ok(())
    }

    /// Compresses what is left, writes the gzip trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.dispatch(true)?;
        while self.next_out < self.next_seq {
            self.receive_one()?;
        }
        self.pool = None;
        let crc = self.crc.sum();
        let len = self.crc.amount();
        let mut inner = self.inner.take().expect("finish called once");
        inner.write_all(&crc.to_le_bytes())?;
        inner.write_all(&len.to_le_bytes())?;
        Ok(inner)
    }
}

impl<W: Write> Write for ParGzEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut taken = 0;
        while taken < buf.len() {
            // A full block is only sent once more input arrives: the last block must be the one
            // `finish` compresses with the final flag.
            if self.block.len() == BLOCK_SIZE {
                self.dispatch(false)?;
            }
            let n = (BLOCK_SIZE - self.block.len()).min(buf.len() - taken);
            self.block.extend_from_slice(&buf[taken..taken + n]);
            taken += n;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Mixed data: runs of text, repeats and pseudo-random bytes.
    fn sample(len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 3 {
                0 => out.extend_from_slice(b"the quick brown fox jumps over the lazy dog\n"),
                1 => out.extend(std::iter::repeat_n((x >> 8) as u8, (x % 300) as usize)),
                _ => out.extend((0..(x % 200)).map(|i| (x >> (i % 56)) as u8)),
            }
        }
        out.truncate(len);
        out
    }

    fn compress(data: &[u8], threads: usize, chunk: usize) -> Vec<u8> {
        compress_at(6, data, threads, chunk)
    }

    fn compress_at(level: u32, data: &[u8], threads: usize, chunk: usize) -> Vec<u8> {
        let mut enc = ParGzEncoder::new(Vec::new(), level, threads);
        for c in data.chunks(chunk.max(1)) {
            enc.write_all(c).unwrap();
        }
        enc.finish().unwrap()
    }

    #[test]
    fn output_is_the_same_for_any_thread_count_and_write_pattern() {
        for len in [
            0,
            1,
            DICT_SIZE - 1,
            BLOCK_SIZE - 1,
            BLOCK_SIZE,
            BLOCK_SIZE + 1,
            BLOCK_SIZE + DICT_SIZE / 2,
            5 * BLOCK_SIZE + 12345,
        ] {
            let data = sample(len);
            let one = compress(&data, 1, 65536);
            for (threads, chunk) in [(1, 1000), (2, 65536), (2, 7), (4, 300_000), (4, 4096)] {
                if len > 200_000 && chunk < 100 {
                    continue;
                }
                assert_eq!(
                    compress(&data, threads, chunk),
                    one,
                    "{len} bytes, {threads} threads, writes of {chunk}"
                );
            }
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&one[..])
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "{len} bytes round trip");
        }
    }

    /// Text, structured binary and noise in runs of a few KB, as in real layers.
    fn varied(len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        while out.len() < len {
            let r = next();
            match r % 8 {
                0..=3 => {
                    for _ in 0..64 {
                        let v = next();
                        out.extend_from_slice(
                            format!("let v{} = f({}, \"{}\");\n", v % 97, v % 10_000, v % 13)
                                .as_bytes(),
                        );
                    }
                }
                4 | 5 => {
                    for i in 0..4096u64 {
                        out.extend_from_slice(&((i * (r % 17)) as u32).to_le_bytes());
                    }
                    out.extend(std::iter::repeat_n(0u8, (r % 4096) as usize));
                }
                _ => {
                    for _ in 0..2048 {
                        out.extend_from_slice(&next().to_le_bytes());
                    }
                }
            }
        }
        out.truncate(len);
        out
    }

    #[test]
    fn many_varied_blocks_are_the_same_for_1_2_and_4_threads() {
        // 96 blocks: enough that the workers take blocks in different orders and any state a
        // compressor kept from one block to another would show.
        let data = varied(96 * BLOCK_SIZE + 777);
        let one = compress(&data, 1, 128 * 1024);
        assert_eq!(compress(&data, 2, 128 * 1024), one, "2 threads");
        assert_eq!(compress(&data, 4, 50_000), one, "4 threads");
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&one[..])
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data);
    }

    #[test]
    fn blocks_refer_back_to_the_previous_block() {
        // 64 KiB of noise repeated: with the dictionary the repeats compress to almost nothing.
        let noise = sample(4 * BLOCK_SIZE)
            .iter()
            .enumerate()
            .map(|(i, b)| b.wrapping_mul(31).wrapping_add((i * 7919 % 251) as u8))
            .take(20_000)
            .collect::<Vec<u8>>();
        let data: Vec<u8> = noise.iter().cycle().take(8 * BLOCK_SIZE).copied().collect();
        let gz = compress(&data, 2, 65536);
        assert!(
            gz.len() < 3 * noise.len(),
            "{} bytes for {} bytes of repeated 20 KB noise",
            gz.len(),
            data.len()
        );
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn only_noise_is_stored_as_it_is() {
        let rand = noise(BLOCK_SIZE, 7);
        assert!(incompressible(&rand, &[]));
        assert!(incompressible(&rand, &noise(DICT_SIZE, 8)));
        // Anything deflate can use: text, structure, a repeat inside the block or of the
        // dictionary, a short block.
        assert!(!incompressible(&sample(BLOCK_SIZE), &[]));
        assert!(!incompressible(&varied(BLOCK_SIZE), &[]));
        let mut repeat = rand.clone();
        repeat.copy_within(1000..1200, 90_000);
        assert!(!incompressible(&repeat, &[]), "a 200-byte repeat");
        assert!(!incompressible(&rand, &rand[BLOCK_SIZE - DICT_SIZE..]));
        let mut zeros = rand.clone();
        zeros[5000..5300].fill(0);
        assert!(!incompressible(&zeros, &[]), "a run of zeros");
        assert!(!incompressible(&rand[..NOISE_MIN - 1], &[]));
        // Stored blocks still make a gzip stream that decodes, the same for any thread count.
        let data: Vec<u8> = [
            noise(3 * BLOCK_SIZE, 9),
            sample(2 * BLOCK_SIZE),
            noise(BLOCK_SIZE + 5, 10),
        ]
        .concat();
        let one = compress(&data, 1, 65536);
        assert_eq!(compress(&data, 2, 1000), one);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&one[..])
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data);
        assert!(one.len() < data.len() - BLOCK_SIZE, "the text compressed");
    }

    /// Text of words, as in source files and docs.
    fn words(len: usize, seed: u64) -> Vec<u8> {
        const W: [&str; 12] = [
            "the", "layer", "image", "build", "of", "registry", "digest", "and", "copy", "push",
            "cache", "step",
        ];
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(W[(x % 12) as usize].as_bytes());
            out.push(if x.is_multiple_of(11) { b'\n' } else { b' ' });
        }
        out.truncate(len);
        out
    }

    /// A tar-like stream as a COPY of many small files makes (files20k): a 512-byte header, then
    /// 1 to 19 KiB of random bytes or of text, padded to 512 bytes. Also returns where the
    /// random files are.
    fn small_files(len: usize, seed: u64) -> (Vec<u8>, Vec<std::ops::Range<usize>>) {
        let mut out = Vec::with_capacity(len + 20_000);
        let mut random = Vec::new();
        let mut i = 0u64;
        while out.len() < len {
            let mut header = [0u8; 512];
            let name = format!("data/d{:03}/f{:05}", i / 100, i);
            header[..name.len()].copy_from_slice(name.as_bytes());
            header[124..136].copy_from_slice(format!("{:011o}\0", i * 1024).as_bytes());
            out.extend_from_slice(&header);
            let size = 1024 * (1 + (seed.wrapping_mul(31).wrapping_add(i * 7) % 19) as usize);
            if i % 2 == 1 {
                random.push(out.len()..out.len() + size);
                out.extend(noise(size, seed ^ (i + 1)));
            } else {
                out.extend(words(size, seed ^ (i + 1)));
            }
            out.resize(out.len().next_multiple_of(512), 0);
            i += 1;
        }
        out.truncate(len);
        random.retain(|r| r.end <= len);
        (out, random)
    }

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut back)
            .unwrap();
        back
    }

    /// Whether `needle` appears, byte for byte, in `hay`: stored data does, deflated does not.
    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn noise_inside_a_mixed_block_is_stored_and_the_rest_deflated() {
        // Text, 40 KiB of noise, text: the block as a whole is not noise.
        let rand = noise(40 * 1024, 21);
        let data = [
            words(30_000, 1),
            rand.clone(),
            words(BLOCK_SIZE - 30_000 - 40 * 1024, 2),
        ]
        .concat();
        assert!(!incompressible(&data, &[]));
        let runs = noise_runs(&data, &[]);
        // The noise, to within a segment at each end.
        assert_eq!(runs.len(), 1, "{runs:?}");
        let (start, end) = runs[0];
        assert!((30_000..30_000 + SEGMENT).contains(&start), "{runs:?}");
        assert!(
            end <= 30_000 + rand.len() && end + SEGMENT > 30_000 + rand.len(),
            "{runs:?}"
        );
        // Stored: the noise is in the output as it is; the text is deflated.
        let out = compress_block(6, &data, &[], false).unwrap();
        assert!(contains(&out, &rand[4096..8192]), "noise not stored");
        assert!(out.len() < rand.len() + 20_000, "{} bytes", out.len());
        // Only noise: text is deflated.
        assert!(noise_runs(&words(BLOCK_SIZE, 3), &[]).is_empty());
        // A tar header (a name and zeros) between two random files is deflated.
        let mut header = [0u8; 512];
        header[..20].copy_from_slice(b"data/d001/f00123.bin");
        let tar = [noise(8192, 41), header.to_vec(), noise(8192, 42)].concat();
        let runs = noise_runs(&tar, &[]);
        assert_eq!(runs, [(0, 8192), (8704, tar.len())]);
        // Random 7-bit bytes: flat to the eye, but Huffman coding gains 1/8 on them.
        let seven: Vec<u8> = noise(BLOCK_SIZE, 5).iter().map(|b| b & 0x7f).collect();
        assert!(
            noise_runs(&seven, &[]).is_empty(),
            "7-bit bytes taken for noise"
        );
        // A run shorter than NOISE_RUN_MIN is deflated with its neighbours.
        let short = [
            words(40 * SEGMENT, 4),
            noise(NOISE_RUN_MIN - SEGMENT, 6),
            words(20_000, 5),
        ]
        .concat();
        assert!(noise_runs(&short, &[]).is_empty());
    }

    #[test]
    fn a_repeat_of_noise_inside_a_block_is_still_matched() {
        // A 3,000-byte random file copied twice into a layer, 8 KB of text apart, then more
        // noise; against the same data with a fresh random file in the second place.
        let file = noise(3000, 31);
        let layer = |second: &[u8]| {
            [
                words(10_000, 7),
                file.clone(),
                words(8_000, 8),
                second.to_vec(),
                noise(20_000, 33),
                words(10_000, 9),
            ]
            .concat()
        };
        let repeated = layer(&file);
        let fresh = layer(&noise(3000, 32));
        let second = 10_000 + 3000 + 8_000..10_000 + 3000 + 8_000 + 3000;
        // The first copy and the later noise are stored; no segment of the second copy is.
        let runs = noise_runs(&repeated, &[]);
        assert!(
            runs.iter().any(|&(s, e)| s < 13_000 && e > 10_000),
            "{runs:?}"
        );
        assert!(
            runs.iter()
                .all(|&(s, e)| e <= second.start || s >= second.end),
            "a segment of the repeat is stored: {runs:?}"
        );
        assert!(runs.iter().any(|&(s, _)| s >= second.end), "{runs:?}");
        let (r, f) = (
            compress_block(6, &repeated, &[], false).unwrap(),
            compress_block(6, &fresh, &[], false).unwrap(),
        );
        assert!(
            r.len() + 2800 < f.len(),
            "repeat {} bytes, fresh {} bytes: the repeat was not matched",
            r.len(),
            f.len()
        );
        // The same across a block boundary: the first copy at the end of the dictionary.
        let dict = [words(40_000, 10), file.clone()].concat();
        let dict = &dict[dict.len() - DICT_SIZE..];
        let data = [words(5_000, 11), file.clone(), noise(30_000, 34)].concat();
        let runs = noise_runs(&data, dict);
        assert!(
            runs.iter().all(|&(s, e)| e <= 5_000 || s >= 8_000),
            "a segment of the repeat is stored: {runs:?}"
        );
        let other = [words(5_000, 11), noise(3000, 35), noise(30_000, 34)].concat();
        let (r, f) = (
            compress_block(6, &data, dict, false).unwrap(),
            compress_block(6, &other, dict, false).unwrap(),
        );
        assert!(r.len() + 2800 < f.len(), "{} vs {} bytes", r.len(), f.len());
        // And through the encoder, for any thread count.
        for data in [&repeated, &fresh] {
            let one = compress(data, 1, 65536);
            assert_eq!(compress(data, 2, 999), one);
            assert!(gunzip(&one) == *data);
        }
    }

    /// Runs `cmd args` with `input` on stdin and returns its stdout; a missing tool fails.
    fn run_tool(cmd: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
        use std::process::{Command, Stdio};
        let mut child = Command::new(cmd)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("`{cmd}` is needed by this test (apt-get install {cmd}): {e}")
            });
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(
            out.status.success(),
            "`{cmd} {}` failed: {}",
            args.join(" "),
            out.status
        );
        out.stdout
    }

    #[test]
    fn small_files_are_the_same_for_any_thread_count_and_decode_with_gzip_and_pigz() {
        let (files, random) = small_files(12 * BLOCK_SIZE + 3333, 77);
        let mut cases = vec![files.clone()];
        // Streams whose last block ends in a stored run (BFINAL on a stored block), whose first
        // block does, and whose last block is all noise but short.
        cases.push([words(40_000, 12), noise(30_000, 36)].concat());
        cases.push(
            [
                words(BLOCK_SIZE - 20_000, 13),
                noise(20_000, 37),
                words(50_000, 14),
            ]
            .concat(),
        );
        cases.push([files[..3 * BLOCK_SIZE].to_vec(), noise(10_000, 38)].concat());
        for (i, data) in cases.iter().enumerate() {
            let one = compress(data, 1, 128 * 1024);
            for (threads, chunk) in [(1, 4096), (2, 128 * 1024), (2, 777), (4, 50_000)] {
                assert_eq!(
                    compress(data, threads, chunk),
                    one,
                    "case {i}: {threads} threads, writes of {chunk}"
                );
            }
            assert!(gunzip(&one) == *data, "case {i}: flate2 GzDecoder");
            let mut back = Vec::new();
            flate2::read::MultiGzDecoder::new(&one[..])
                .read_to_end(&mut back)
                .unwrap();
            assert!(back == *data, "case {i}: flate2 MultiGzDecoder");
            assert!(
                run_tool("gzip", &["-dc"], &one) == *data,
                "case {i}: gzip -dc"
            );
            assert!(
                run_tool("pigz", &["-dc"], &one) == *data,
                "case {i}: pigz -dc"
            );
        }
        // The small files' noise was stored: the middle of each random file of 3 KiB or more
        // is in the output as it is.
        let one = compress(&files, 2, 128 * 1024);
        let big: Vec<_> = random.iter().filter(|r| r.len() >= 3072).collect();
        assert!(big.len() > 20);
        for r in big {
            let mid = r.start + r.len() / 2;
            assert!(
                contains(&one, &files[mid - 256..mid + 256]),
                "{r:?} not stored"
            );
        }
        assert!(
            one.len() < files.len() * 3 / 4,
            "{} of {} bytes",
            one.len(),
            files.len()
        );
    }

    /// Random mixes of noise, text, zeros and repeats of earlier bytes, in pieces of random
    /// length, so that runs of noise start and end anywhere: at block edges, in the last block,
    /// at the end of the stream.
    fn pieces(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut out = Vec::with_capacity(len + 40_000);
        while out.len() < len {
            let (kind, n) = (next() % 5, 1 + (next() % 40_000) as usize);
            match kind {
                0 | 1 => out.extend(noise(n, next())),
                2 => out.extend(words(n, next())),
                3 => out.extend(std::iter::repeat_n(0u8, n % 3000)),
                _ => {
                    // A copy of earlier bytes, from within deflate's reach or beyond it.
                    let from = out.len().saturating_sub(1 + (next() % 50_000) as usize);
                    let n = n.min(out.len() - from);
                    out.extend_from_within(from..from + n);
                }
            }
        }
        out.truncate(len);
        out
    }

    #[test]
    fn random_mixes_round_trip_and_are_the_same_for_any_thread_count() {
        // Blocks that are not noise as a whole but hold runs of it: what this test is about.
        let mut mixed = 0;
        for seed in 1..=24u64 {
            let len = (seed as usize * 97_531) % (5 * BLOCK_SIZE) + seed as usize;
            let data = pieces(len, seed);
            for (i, block) in data.chunks(BLOCK_SIZE).enumerate() {
                let dict = &data[(i * BLOCK_SIZE).saturating_sub(DICT_SIZE)..i * BLOCK_SIZE];
                if !incompressible(block, dict) && !noise_runs(block, dict).is_empty() {
                    mixed += 1;
                }
            }
            let one = compress(&data, 1, 128 * 1024);
            let (threads, chunk) = [(2, 3000), (3, 128 * 1024 + 1), (4, 65_536)][seed as usize % 3];
            assert_eq!(
                compress(&data, threads, chunk),
                one,
                "seed {seed}: {threads} threads, writes of {chunk}"
            );
            assert!(gunzip(&one) == data, "seed {seed}: round trip");
            if seed % 6 == 0 {
                assert!(
                    run_tool("gzip", &["-dc"], &one) == data,
                    "seed {seed}: gzip -dc"
                );
            }
        }
        assert!(mixed >= 20, "only {mixed} blocks with runs of noise");
    }

    #[test]
    fn every_level_writes_the_same_valid_stream_for_any_thread_count() {
        // Levels 1 (deflate_quick), 2-3 (fast), 4-6 (medium) and 7-9 (slow) each write their
        // own block headers before the stored runs.
        for level in 1..=9 {
            let data = pieces(3 * BLOCK_SIZE + 7_777, u64::from(level) * 5);
            let one = compress_at(level, &data, 1, 128 * 1024);
            assert_eq!(compress_at(level, &data, 3, 10_000), one, "level {level}");
            assert!(gunzip(&one) == data, "level {level}: round trip");
            assert!(
                run_tool("gzip", &["-dc"], &one) == data,
                "level {level}: gzip -dc"
            );
        }
    }

    #[test]
    fn stored_runs_longer_than_a_stored_block_are_split() {
        // A tar header, then a compressed file filling the block: the block as a whole is not
        // flat (the header's zeros), so its noise is one run of 130,560 bytes: three stored
        // blocks, the last one of the stream with BFINAL only.
        let block = |seed| [vec![0u8; 512], noise(BLOCK_SIZE - 512, seed)].concat();
        let cases = [
            // In a middle block, then ending the stream, then followed by text.
            [block(1), block(2), words(BLOCK_SIZE, 3)].concat(),
            [words(BLOCK_SIZE, 4), block(5)].concat(),
            [
                block(6),
                block(7)[..BLOCK_SIZE - 3_000].to_vec(),
                words(3_000, 8),
            ]
            .concat(),
        ];
        for (i, data) in cases.iter().enumerate() {
            // The block with the header and the compressed file, and the 32 KiB before it.
            let at = if i == 1 { BLOCK_SIZE } else { 0 };
            let (b, dict) = (
                &data[at..at + BLOCK_SIZE],
                &data[at.saturating_sub(DICT_SIZE)..at],
            );
            assert!(
                !incompressible(b, dict),
                "case {i}: the block as a whole is not noise"
            );
            assert!(
                noise_runs(b, dict).iter().any(|(s, e)| e - s > STORED_MAX),
                "case {i}: a run longer than one stored block"
            );
            let one = compress(data, 1, 128 * 1024);
            assert_eq!(compress(data, 2, 4096), one, "case {i}");
            assert!(gunzip(&one) == *data, "case {i}: round trip");
            assert!(
                run_tool("gzip", &["-dc"], &one) == *data,
                "case {i}: gzip -dc"
            );
        }
    }

    #[test]
    fn header_and_trailer_are_gzips() {
        let data = sample(3 * BLOCK_SIZE + 5);
        let gz = compress(&data, 2, 10_000);
        assert_eq!(&gz[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
        let mut crc = Crc::new();
        crc.update(&data);
        let n = gz.len();
        assert_eq!(gz[n - 8..n - 4], crc.sum().to_le_bytes());
        assert_eq!(gz[n - 4..], (data.len() as u32).to_le_bytes());
    }
}
