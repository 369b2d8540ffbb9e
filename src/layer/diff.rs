//! Writing a layer from an overlay upper dir or a plain tree (format: see the module doc of
//! `layer`).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::compress::{self, Encoder};
use super::tarfmt::{self, AppendError, EntryHeader, TarWriter};
use super::{Compression, DiffOptions, LayerBlob, LayerCompression, LayerError};
use crate::store::{BlobWriter, Store};

/// Writes the changes recorded in an overlay upper dir as a compressed OCI layer (gzip unless
/// [`DiffOptions::compression`] says zstd) into the store, streamed: tar -> sha256 (diff_id) ->
/// compressor -> [`BlobWriter`] (digest). Always writes a
/// layer, even for an empty upper dir (see [`is_empty_upper`]); the caller decides.
///
/// Whiteouts (0/0 character devices) and opaque directories (`overlay.opaque` xattr) become OCI
/// whiteout entries; an entry with an `overlay.redirect` or `overlay.metacopy` xattr is an error.
pub fn diff_upper_to_blob(
    upper: &Path,
    store: &Store,
    opts: &DiffOptions,
) -> Result<LayerBlob, LayerError> {
    write_blob(upper, store, opts, Mode::Upper)
}

/// The same for a plain directory tree (a whole rootfs, a `FROM scratch` style layer): everything
/// is written as found; character devices 0/0 and overlay xattrs mean nothing special.
pub fn dir_to_blob(dir: &Path, store: &Store, opts: &DiffOptions) -> Result<LayerBlob, LayerError> {
    write_blob(dir, store, opts, Mode::Plain)
}

/// True if the upper dir records no change at all (no entries, not even a whiteout).
pub fn is_empty_upper(upper: &Path) -> Result<bool, LayerError> {
    let mut rd = fs::read_dir(upper).map_err(|e| LayerError::Io {
        op: "listing",
        path: upper.to_path_buf(),
        source: e,
    })?;
    Ok(rd.next().is_none())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Upper,
    Plain,
}

struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

type Sink = BufWriter<HashWriter<Encoder<BlobWriter>>>;

fn write_err(source: io::Error) -> LayerError {
    LayerError::Write { source }
}

fn write_blob(
    root: &Path,
    store: &Store,
    opts: &DiffOptions,
    mode: Mode,
) -> Result<LayerBlob, LayerError> {
    let mut walker = Walker::start(store, opts, mode)?;
    let md = fs::symlink_metadata(root).map_err(|e| LayerError::Io {
        op: "lstat",
        path: root.to_path_buf(),
        source: e,
    })?;
    if !md.is_dir() {
        return Err(LayerError::Io {
            op: "archiving",
            path: root.to_path_buf(),
            source: io::Error::other("not a directory"),
        });
    }
    walker.walk_dir(root, b"")?;

    walker.finish()
}

/// One entry of a layer written from a list rather than from a directory: see
/// [`entries_to_blob`].
#[derive(Debug, Clone)]
pub struct ListedEntry {
    /// The path in the layer, relative (`data/d0/f1`), plain components only.
    pub path: PathBuf,
    pub kind: ListedKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch (clamped like every other mtime).
    pub mtime: i64,
}

#[derive(Debug, Clone)]
pub enum ListedKind {
    Dir,
    /// A regular file whose bytes are read from `src`: what it holds when it is opened
    /// (without following a symlink); it must not change while it is read.
    File {
        src: PathBuf,
    },
    Symlink {
        target: PathBuf,
    },
}

/// Writes a layer holding exactly `entries`, in the layer format's order (depth first, names
/// sorted by their bytes, whatever order they come in), streamed like [`diff_upper_to_blob`].
/// A COPY whose files nothing reads afterwards becomes its layer this way, without writing
/// the files anywhere first (engine `direct_copy`).
pub fn entries_to_blob(
    entries: &mut [ListedEntry],
    store: &Store,
    opts: &DiffOptions,
) -> Result<LayerBlob, LayerError> {
    // Path's order compares component by component: a directory's entries follow it at once.
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let mut walker = Walker::start(store, opts, Mode::Plain)?;
    for e in entries.iter() {
        if let Some(name) = e.path.file_name()
            && name.as_bytes().starts_with(b".wh.")
        {
            return Err(LayerError::WhiteoutName {
                path: e.path.clone(),
            });
        }
        let mut name = e.path.as_os_str().as_bytes().to_vec();
        let mut h = EntryHeader {
            typeflag: tarfmt::TYPE_REG,
            mode: e.mode & 0o7777,
            uid: u64::from(e.uid),
            gid: u64::from(e.gid),
            mtime: walker.clamp(e.mtime),
            ..Default::default()
        };
        match &e.kind {
            ListedKind::Dir => {
                name.push(b'/');
                h.name = name;
                h.typeflag = tarfmt::TYPE_DIR;
                walker.append(&e.path, &h, None)?;
            }
            ListedKind::Symlink { target } => {
                h.name = name;
                h.typeflag = tarfmt::TYPE_SYMLINK;
                h.linkname = target.as_os_str().as_bytes().to_vec();
                walker.append(&e.path, &h, None)?;
            }
            ListedKind::File { src } => {
                // Non-blocking: a FIFO put in the file's place must not hang the build.
                let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
                let mut file = File::options()
                    .read(true)
                    .custom_flags(flags.bits())
                    .open(src)
                    .map_err(io_err("opening", src))?;
                let md = file.metadata().map_err(io_err("fstat", src))?;
                if !md.is_file() {
                    return Err(io_err("reading", src)(io::Error::other(
                        "no longer a regular file",
                    )));
                }
                h.name = name;
                h.size = md.len();
                walker.append_file(src, &h, &mut file)?;
            }
        }
    }
    walker.finish()
}

/// Writes the same layer again in another compression: the blob at `src` (compressed with
/// `from`) is decompressed and compressed with `to` into a new blob, streamed. The diff_id is
/// the sha256 of the uncompressed stream and does not change; the caller checks it against the
/// one it knows.
pub fn recompress(
    src: &Path,
    from: Compression,
    to: LayerCompression,
    store: &Store,
    threads: Option<usize>,
) -> Result<LayerBlob, LayerError> {
    let file = File::open(src).map_err(io_err("opening", src))?;
    let mut reader = compress::decoder(file, from)?;
    let blob = store.blob_writer()?;
    let threads = threads.unwrap_or_else(super::pargz::default_threads);
    let mut hashing = HashWriter {
        inner: Encoder::new(blob, to, threads).map_err(write_err)?,
        hasher: Sha256::new(),
    };
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(LayerError::Read { source }),
        };
        hashing.write_all(&buf[..n]).map_err(write_err)?;
    }
    seal(hashing, to, vec![])
}

/// Ends a layer's stream: the diff ID from the tar's hash, the compressor finished, the blob
/// committed to the store.
fn seal(
    hashing: HashWriter<Encoder<BlobWriter>>,
    compression: LayerCompression,
    warnings: Vec<String>,
) -> Result<LayerBlob, LayerError> {
    let diff_id = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
    let blob = hashing.inner.finish().map_err(write_err)?;
    let (digest, size) = blob.commit(None)?;
    Ok(LayerBlob {
        digest,
        diff_id,
        size,
        media_type: compression.media_type().to_string(),
        warnings,
    })
}

struct Walker<'a> {
    mode: Mode,
    opts: &'a DiffOptions,
    tar: TarWriter<Sink>,
    /// (dev, ino) of non-directories with more than one link -> the first layer path written.
    links: HashMap<(u64, u64), Vec<u8>>,
    warnings: Vec<String>,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LayerError + 'a {
    move |source| LayerError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Looks at the overlay xattrs of an upper entry: errors on redirect/metacopy, returns whether
/// it is an opaque directory.
fn overlay_xattrs(path: &Path, is_dir: bool) -> Result<bool, LayerError> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if e.kind() == io::ErrorKind::Unsupported => return Ok(false),
        Err(e) => return Err(io_err("listing xattrs of", path)(e)),
    };
    let mut opaque = false;
    for name in names {
        let n = name.as_bytes();
        let Some(key) = n
            .strip_prefix(b"user.overlay.")
            .or_else(|| n.strip_prefix(b"trusted.overlay."))
        else {
            continue;
        };
        match key {
            b"redirect" | b"metacopy" => {
                return Err(LayerError::UnsupportedOverlayFeature {
                    path: path.to_path_buf(),
                    xattr: name.to_string_lossy().into_owned(),
                });
            }
            b"opaque" if is_dir => {
                let v = xattr::get(path, &name).map_err(io_err("reading xattr of", path))?;
                if v.as_deref() == Some(b"y") {
                    opaque = true;
                }
            }
            _ => {}
        }
    }
    Ok(opaque)
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parent.len() + 1 + name.len());
    if !parent.is_empty() {
        v.extend_from_slice(parent);
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

impl<'a> Walker<'a> {
    /// A walker writing into a new blob of `store`: tar -> sha256 -> compressor -> blob.
    fn start(store: &Store, opts: &'a DiffOptions, mode: Mode) -> Result<Self, LayerError> {
        let blob = store.blob_writer()?;
        let threads = opts.threads.unwrap_or_else(super::pargz::default_threads);
        let enc = Encoder::new(blob, opts.compression, threads).map_err(write_err)?;
        let sink: Sink = BufWriter::with_capacity(
            128 * 1024,
            HashWriter {
                inner: enc,
                hasher: Sha256::new(),
            },
        );
        Ok(Walker {
            mode,
            opts,
            tar: TarWriter::new(sink),
            links: HashMap::new(),
            warnings: Vec::new(),
        })
    }

    /// Ends the tar stream and commits the blob.
    fn finish(self) -> Result<LayerBlob, LayerError> {
        let opts = self.opts;
        let Walker { tar, warnings, .. } = self;
        let sink = tar.finish().map_err(write_err)?;
        let hashing = sink.into_inner().map_err(|e| write_err(e.into_error()))?;
        seal(hashing, opts.compression, warnings)
    }

    fn clamp(&self, t: i64) -> i64 {
        let t = t.max(0);
        match self.opts.source_date_epoch {
            Some(e) if t > e => e.max(0),
            _ => t,
        }
    }

    fn header(&self, name: Vec<u8>, typeflag: u8, md: &Metadata) -> EntryHeader {
        EntryHeader {
            name,
            typeflag,
            mode: md.mode() & 0o7777,
            uid: u64::from(md.uid()),
            gid: u64::from(md.gid()),
            size: 0,
            mtime: self.clamp(md.mtime()),
            ..Default::default()
        }
    }

    /// [`DiffOptions::recorded_owners`]: the owner from [`super::OWNER_XATTR`], if any.
    fn recorded_owner(&self, path: &Path, h: &mut EntryHeader) -> Result<(), LayerError> {
        if !self.opts.recorded_owners {
            return Ok(());
        }
        let value = match xattr::get(path, super::OWNER_XATTR) {
            Ok(v) => v,
            // A filesystem without user xattrs has recorded nothing.
            Err(e) if e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) => None,
            Err(e) => return Err(io_err("reading the recorded owner (xattr) of", path)(e)),
        };
        if let Some((uid, gid)) = value.as_deref().and_then(super::parse_owner) {
            h.uid = uid;
            h.gid = gid;
        }
        Ok(())
    }

    /// An empty regular file with fixed metadata: whiteouts and opaque markers.
    fn marker(&self, name: Vec<u8>) -> EntryHeader {
        EntryHeader {
            name,
            typeflag: tarfmt::TYPE_REG,
            mtime: self.clamp(self.opts.source_date_epoch.unwrap_or(0)),
            ..Default::default()
        }
    }

    fn append(
        &mut self,
        path: &Path,
        h: &EntryHeader,
        data: Option<&mut dyn Read>,
    ) -> Result<(), LayerError> {
        self.tar.append(h, data).map_err(|e| match e {
            AppendError::Header(reason) => LayerError::Unrepresentable {
                path: path.to_path_buf(),
                reason,
            },
            AppendError::ShortRead { actual } => LayerError::FileChanged {
                path: path.to_path_buf(),
                expected: h.size,
                actual,
            },
            AppendError::Source(e) => io_err("reading", path)(e),
            AppendError::Write(e) => write_err(e),
        })
    }

    /// Appends a regular file of `h.size` bytes read from `file`. A file that grew while it
    /// was read would not match its header either: that is an error too.
    fn append_file(
        &mut self,
        path: &Path,
        h: &EntryHeader,
        file: &mut File,
    ) -> Result<(), LayerError> {
        self.append(path, h, Some(file))?;
        let mut extra = [0u8; 1];
        if file.read(&mut extra).map_err(io_err("reading", path))? != 0 {
            return Err(LayerError::FileChanged {
                path: path.to_path_buf(),
                expected: h.size,
                actual: h.size + 1,
            });
        }
        Ok(())
    }

    fn walk_dir(&mut self, dir: &Path, rel: &[u8]) -> Result<(), LayerError> {
        let mut names: Vec<OsString> = fs::read_dir(dir)
            .map_err(io_err("listing", dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err("listing", dir))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));

        for name in names {
            let path = dir.join(&name);
            let name = name.as_bytes();
            if name.starts_with(b".wh.") {
                return Err(LayerError::WhiteoutName { path });
            }
            let rel_child = join(rel, name);
            let md = fs::symlink_metadata(&path).map_err(io_err("lstat", &path))?;
            let ft = md.file_type();

            let mut opaque = false;
            if self.mode == Mode::Upper {
                if ft.is_char_device() && md.rdev() == 0 {
                    let mut wh = b".wh.".to_vec();
                    wh.extend_from_slice(name);
                    let h = self.marker(join(rel, &wh));
                    self.append(&path, &h, None)?;
                    continue;
                }
                opaque = overlay_xattrs(&path, ft.is_dir())?;
            }

            if ft.is_dir() {
                let mut dname = rel_child.clone();
                dname.push(b'/');
                let mut h = self.header(dname, tarfmt::TYPE_DIR, &md);
                self.recorded_owner(&path, &mut h)?;
                self.append(&path, &h, None)?;
                if opaque {
                    let h = self.marker(join(&rel_child, b".wh..wh..opq"));
                    self.append(&path, &h, None)?;
                }
                self.walk_dir(&path, &rel_child)?;
                continue;
            }
            if ft.is_socket() {
                self.warnings.push(format!(
                    "left out {}: sockets can't be stored in a layer",
                    path.display()
                ));
                continue;
            }

            if md.nlink() > 1 {
                let key = (md.dev(), md.ino());
                if let Some(first) = self.links.get(&key) {
                    let mut h = self.header(rel_child, tarfmt::TYPE_LINK, &md);
                    h.linkname = first.clone();
                    self.append(&path, &h, None)?;
                    continue;
                }
                self.links.insert(key, rel_child.clone());
            }

            if ft.is_file() {
                let mut h = self.header(rel_child, tarfmt::TYPE_REG, &md);
                self.recorded_owner(&path, &mut h)?;
                h.size = md.len();
                let mut file = File::options()
                    .read(true)
                    .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                    .open(&path)
                    .map_err(io_err("opening", &path))?;
                self.append_file(&path, &h, &mut file)?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(io_err("readlink", &path))?;
                let mut h = self.header(rel_child, tarfmt::TYPE_SYMLINK, &md);
                h.linkname = target.as_os_str().as_bytes().to_vec();
                self.append(&path, &h, None)?;
            } else if ft.is_fifo() {
                let h = self.header(rel_child, tarfmt::TYPE_FIFO, &md);
                self.append(&path, &h, None)?;
            } else if ft.is_char_device() || ft.is_block_device() {
                let flag = if ft.is_char_device() {
                    tarfmt::TYPE_CHAR
                } else {
                    tarfmt::TYPE_BLOCK
                };
                let mut h = self.header(rel_child, flag, &md);
                h.devmajor = nix::sys::stat::major(md.rdev());
                h.devminor = nix::sys::stat::minor(md.rdev());
                self.append(&path, &h, None)?;
            } else {
                self.warnings
                    .push(format!("left out {}: unknown file type", path.display()));
            }
        }
        Ok(())
    }
}
