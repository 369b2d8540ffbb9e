//! Block-parallel deterministic gzip (see docs/adr/0004-deterministic-parallel-gzip.md).
//!
//! The input is cut into fixed blocks of [`BLOCK_SIZE`] bytes (the last one shorter). Each block
//! is compressed on its own as raw deflate, with the 32 KiB that precede it as the preset
//! dictionary, and ends with a sync flush (an empty stored block, so it stops on a byte
//! boundary); the last block is finished instead. The blocks, concatenated, make one deflate
//! stream, wrapped in a single gzip member (header as flate2 writes it with mtime 0 and OS 255;
//! trailer with the CRC32 combined from the blocks' CRCs and the length mod 2^32).
//!
//! Every block's bytes depend only on its own data, its dictionary and the level, so the whole
//! output depends only on the input and the level: never on the number of threads, on how the
//! writes were split, or on the machine's core count. One thread runs the very same code.
//!
//! Memory stays bounded: at most `2 * threads` blocks are in flight; [`write`](ParGzEncoder::write)
//! waits for the oldest when the window is full, and compressed blocks are written out in order as
//! soon as they are ready.

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
/// Every block gets a fresh compressor. A reset one (`Compress::reset`) is NOT equivalent: zlib-rs
/// keeps the previous stream's window bytes, which can sway its match choices, so the bytes would
/// depend on which blocks a thread compressed before (the test with many varied blocks caught it).
fn compress_block(level: u32, data: &[u8], dict: &[u8], last: bool) -> io::Result<Vec<u8>> {
    // Noise (compressed files, random data) is stored as it is: deflate would spend its time
    // searching for matches and then store the block anyway.
    let level = if level > 0 && incompressible(data, dict) {
        0
    } else {
        level
    };
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
    let mut out = Vec::with_capacity(data.len() + data.len() / 8 + 64);
    loop {
        let consumed = c.total_in() as usize;
        let (room, before) = (out.capacity() - out.len(), c.total_out());
        let status = c
            .compress_vec(&data[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        if room > 0 && c.total_out() == before && c.total_in() as usize == consumed {
            if matches!(status, Status::StreamEnd) || !last {
                return Ok(out);
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
            return Ok(out);
        }
        out.reserve(out.capacity().max(64 * 1024));
    }
}

/// Blocks shorter than this are always compressed (the test needs enough bytes to be sure).
const NOISE_MIN: usize = 16 * 1024;
/// The byte histogram's chi-square against a uniform one stays below this for noise: about 255
/// (the degrees of freedom) for random bytes, give or take 25; text and structured binary data
/// are in the tens of thousands. Above it, Huffman coding alone would gain something.
const NOISE_MAX_CHI2: u64 = 400;

/// Whether deflate can do nothing with `data` (preceded by `dict`): its bytes are spread evenly
/// (nothing for Huffman coding) and no 8-byte sequence shows up twice in `dict` + `data`
/// (nothing for LZ77 matches). Integer arithmetic only, on the block's own bytes, so the answer,
/// and with it the output, is the same on every machine.
///
/// The repeat check looks at content-defined samples: the 8-byte windows whose hash falls in
/// 1/64 of the range. A sequence that appears twice is sampled at both places, so a repeat of
/// 64 bytes or more is found wherever it sits; for noise, ~2,500 samples of 8 random bytes
/// essentially never collide.
fn incompressible(data: &[u8], dict: &[u8]) -> bool {
    if data.len() < NOISE_MIN {
        return false;
    }
    let mut counts = [0u64; 256];
    for &b in data {
        counts[b as usize] += 1;
    }
    let n = data.len() as u64;
    // chi2 = sum((c - n/256)^2) / (n/256) = sum((256c - n)^2) / (256 n), kept in integers.
    let sum: u64 = counts.iter().map(|&c| (256 * c).abs_diff(n).pow(2)).sum();
    if sum / (256 * n) >= NOISE_MAX_CHI2 {
        return false;
    }
    let mut samples: Vec<u64> = dict
        .windows(8)
        .chain(data.windows(8))
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .filter(|v| v.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58 == 0)
        .collect();
    samples.sort_unstable();
    // Overlapping windows of one long run (a run of zeros) are equal too: any pair counts.
    samples.windows(2).all(|p| p[0] != p[1])
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
        let mut enc = ParGzEncoder::new(Vec::new(), 6, threads);
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
