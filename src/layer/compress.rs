//! The compressions of layer blobs: what a build writes ([`LayerCompression`]), the encoder that
//! writes it, and the decoders for every compression a layer or an ADD archive may come in.

use std::io::{self, BufReader, Read, Write};

use super::pargz::ParGzEncoder;
use super::{Compression, LayerError};

pub const MEDIA_TYPE_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// How the layers a build makes are compressed (`--compression`, or `compression=` and
/// `compression-level=` on `--output`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    /// Block-parallel deterministic gzip (see `pargz`), zlib levels 0-9.
    Gzip { level: u32 },
    /// zstd, levels 1-22, always in zstd's multi-threaded format (output independent of the
    /// number of workers).
    Zstd { level: i32 },
}

impl Default for LayerCompression {
    /// gzip level 5: on real layers as small as level 6 to within 1 %, and on text up to 2.6x
    /// faster (ADR 0012).
    fn default() -> Self {
        LayerCompression::Gzip { level: 5 }
    }
}

impl LayerCompression {
    /// From the name (gzip, zstd) and an optional level; the error says what is allowed.
    pub fn parse(name: &str, level: Option<&str>) -> Result<Self, String> {
        let level = match level {
            None => None,
            Some(l) => Some(
                l.trim()
                    .parse::<i32>()
                    .map_err(|_| format!("compression level {l:?} is not a number"))?,
            ),
        };
        match name {
            "gzip" => match level {
                None => Ok(LayerCompression::default()),
                Some(l @ 0..=9) => Ok(LayerCompression::Gzip { level: l as u32 }),
                Some(l) => Err(format!(
                    "gzip compression level {l} is out of range: use 0-9"
                )),
            },
            "zstd" => match level {
                None => Ok(LayerCompression::Zstd { level: 3 }),
                Some(l @ 1..=22) => Ok(LayerCompression::Zstd { level: l }),
                Some(l) => Err(format!(
                    "zstd compression level {l} is out of range: use 1-22"
                )),
            },
            other => Err(format!(
                "unknown compression {other:?}: use gzip or zstd (uncompressed and estargz layers are not written)"
            )),
        }
    }

    /// The OCI media type of the layers written with this compression.
    pub fn media_type(self) -> &'static str {
        match self {
            LayerCompression::Gzip { .. } => super::MEDIA_TYPE_OCI_LAYER_GZIP,
            LayerCompression::Zstd { .. } => MEDIA_TYPE_OCI_LAYER_ZSTD,
        }
    }

    /// The stream compression these layers are read back with.
    pub fn compression(self) -> Compression {
        match self {
            LayerCompression::Gzip { .. } => Compression::Gzip,
            LayerCompression::Zstd { .. } => Compression::Zstd,
        }
    }

    /// A short name with the level, for cache keys and messages: `gzip-6`, `zstd-3`.
    pub fn label(self) -> String {
        match self {
            LayerCompression::Gzip { level } => format!("gzip-{level}"),
            LayerCompression::Zstd { level } => format!("zstd-{level}"),
        }
    }
}

/// The compressing end of a layer blob.
pub(super) enum Encoder<W: Write> {
    Gzip(ParGzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

/// zstd's multi-threaded job size for layers (see [`Encoder::new`]).
pub const ZSTD_JOB_SIZE: u32 = 2 << 20;

impl<W: Write> Encoder<W> {
    pub fn new(inner: W, compression: LayerCompression, threads: usize) -> io::Result<Self> {
        Ok(match compression {
            LayerCompression::Gzip { level } => {
                Encoder::Gzip(ParGzEncoder::new(inner, level, threads))
            }
            LayerCompression::Zstd { level } => {
                let mut enc = zstd::stream::write::Encoder::new(inner, level)?;
                // At least one worker even on one core: zstd's multi-threaded format cuts the
                // input into jobs by size alone, so its output is the same for any worker count,
                // whereas the single-threaded format differs from it.
                enc.multithread(threads.max(1) as u32)?;
                // A fixed job size: part of the format (so of the digest), and what bounds the
                // memory: zstd keeps a few jobs' input and output per worker, ~130 MB at its
                // default 8 MiB jobs for level 3, about a quarter of that at 2 MiB.
                enc.set_parameter(zstd::zstd_safe::CParameter::JobSize(ZSTD_JOB_SIZE))?;
                enc.include_checksum(true)?;
                Encoder::Zstd(enc)
            }
        })
    }

    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }

    /// Flushes the sink only: a compressor flush would put a boundary in the stream that depends
    /// on when it was called, and the output must depend on the input alone.
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.get_mut().flush(),
        }
    }
}

/// A reader of the uncompressed stream. Every decoder reads concatenated members/frames/streams
/// to the end, as the tools that wrote them allow.
pub(super) fn decoder<'a, R: Read + 'a>(
    reader: R,
    compression: Compression,
) -> Result<Box<dyn Read + 'a>, LayerError> {
    const BUF: usize = 64 * 1024;
    Ok(match compression {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
            BUF, reader,
        ))),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(BUF, reader))
                .map_err(|source| LayerError::Read { source })?,
        ),
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(BufReader::with_capacity(
            BUF, reader,
        ))),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(
            BufReader::with_capacity(BUF, reader),
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_output_is_the_same_for_any_worker_count_across_many_jobs() {
        // 24 MiB: several of zstd's multi-threaded jobs at level 3, so the workers really split it.
        let mut data = Vec::with_capacity(24 << 20);
        let mut x: u64 = 88172645463325252;
        while data.len() < 24 << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(3) {
                data.extend_from_slice(&x.to_le_bytes());
            } else {
                data.extend_from_slice(format!("record {} ok\n", x % 5000).as_bytes());
            }
        }
        let run = |threads: usize, chunk: usize| {
            let mut e =
                Encoder::new(Vec::new(), LayerCompression::Zstd { level: 3 }, threads).unwrap();
            for c in data.chunks(chunk) {
                e.write_all(c).unwrap();
            }
            e.flush().unwrap();
            e.finish().unwrap()
        };
        let one = run(1, 1 << 20);
        assert_eq!(run(2, 100_000), one);
        assert_eq!(run(4, 3 << 20), one);
        let back = zstd::decode_all(&one[..]).unwrap();
        assert!(back == data);
    }
}
