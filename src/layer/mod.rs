//! Image layers: unpacking layer tarballs into snapshot directories, and producing a layer
//! tarball from the upper directory of an overlay mount.
//!
//! All of this runs inside the build's user namespace as "root": the uids and gids read and
//! written here are container IDs.
//!
//! # Unpacking ([`apply_layer`])
//!
//! Each layer is unpacked into its own empty directory, which later becomes one `lowerdir` of a
//! kernel overlayfs mount (`userxattr`). OCI whiteouts become overlay whiteouts:
//!
//! * `dir/.wh.name` becomes a character device 0/0 at `dir/name`;
//! * `dir/.wh..wh..opq` sets the xattr `user.overlay.opaque=y` on `dir` (or `trusted.overlay.opaque`
//!   with [`OverlayXattrs::Trusted`]);
//! * other `.wh..wh.*` names (aufs metadata) are skipped with a warning.
//!
//! Entries: regular files (content streamed), directories, symlinks (target stored as is, never
//! followed), hardlinks, FIFOs, and character/block devices (skipped with a warning where mknod
//! is not permitted, as in a user namespace). Owner (numeric, PAX `uid`/`gid` honoured) is set
//! with lchown unless [`ApplyOptions::chown`] is off; an ID the namespace does not map is an error
//! naming the path and the ID. Mode (with setuid/setgid/sticky) is set after the owner, since
//! chown clears setuid. Mtimes (PAX `mtime` with its fraction honoured) are set on everything
//! but hardlinks; directories get their mode and mtime last, deepest first, after their contents
//! are written. An entry whose name exists already replaces it (removed first, recursively for a
//! directory), except a directory over a directory, which is kept and takes the new metadata.
//! Global PAX headers are ignored; other entry types are skipped with a warning.
//!
//! Every parent directory is resolved from the destination's directory file descriptor, one
//! component at a time with `openat(O_NOFOLLOW | O_DIRECTORY)`, creating missing ones (mode 0755);
//! a symlink or a non-directory among the parents is an error, so no entry can reach outside the
//! destination. Names are cleaned first: a leading `/` is stripped (with a warning), `.` and empty
//! components are dropped, and a `..` component is an error. Hardlink targets go through the same
//! checks and must name an entry already unpacked in this layer. Xattrs stored in the tar (PAX
//! `SCHILY.xattr.*`) are NOT restored for now: file capabilities (`security.capability`) are lost.
//!
//! # Producing ([`diff_upper_to_blob`], [`dir_to_blob`])
//!
//! The layer is a compressed tar, written in one stream: tar bytes are hashed (the diff_id) and
//! then compressed into a [`BlobWriter`](crate::store::BlobWriter) that hashes the compressed
//! bytes (the digest). The compression ([`DiffOptions::compression`]) is gzip by default
//! (`application/vnd.oci.image.layer.v1.tar+gzip`): block-parallel deterministic gzip (`pargz`:
//! level 5 unless told otherwise, 128 KiB blocks each with the previous 32 KiB as dictionary, one member, header with
//! mtime 0, no file name, OS byte 255), or zstd (`...tar+zstd`, zstd's multi-threaded format).
//! Either way the bytes depend on the tar and the level only, not on the number of threads.
//!
//! The tar format, which the reproducibility tests rely on:
//!
//! * **Order**: depth-first; the names inside each directory sorted by their bytes; a directory's
//!   entry comes before its contents. The root directory itself has no entry. Example:
//!   `a/`, `a/x`, `a-b` (not full-path byte order).
//! * **Names**: relative, no leading `./` or `/`; directories end with `/`. Hardlink and symlink
//!   targets are written as found (hardlink targets are layer paths without a trailing `/`).
//! * **Headers** (as Go's `archive/tar` writes them for BuildKit/containerd): USTAR
//!   (`ustar\0` + `00`), numeric octal fields zero-padded and NUL-terminated, uid/gid numeric with
//!   empty uname/gname, devmajor/devminor always written (`0000000`), checksum as six octal digits,
//!   NUL, space. A name longer than 100 bytes is split into the USTAR prefix/name fields when it
//!   can be; only when a value cannot be represented in USTAR (a non-ASCII or unsplittable long
//!   name, a non-ASCII or >100-byte link target, uid/gid > 0o7777777, size or mtime > 0o77777777777)
//!   a PAX extended header (`x`, named `<dir>/PaxHeaders.0/<file>`, mode/uid/gid/mtime 0) with just
//!   those records, sorted by key, precedes the entry. No GNU headers, no other PAX records (no
//!   atime/ctime, no xattrs).
//! * **Mode**: permission bits plus setuid/setgid/sticky, WITHOUT the `S_IF*` file type bits
//!   (Go's `tar.FileInfoHeader` has not written those since Go 1.10; the type is in the type flag).
//! * **Types**: directories `5`, regular files `0` with their content, symlinks `2`, hardlinks `1`
//!   (size 0, target = the first path in walk order with the same device and inode; any non-directory
//!   type), FIFOs `6`, character/block devices `3`/`4` with their major/minor. Sockets are skipped
//!   with a warning.
//! * **Mtime**: whole seconds (sub-second part truncated); negative times become 0; with
//!   [`DiffOptions::source_date_epoch`] every mtime later than it is clamped to it.
//! * **Whiteouts** (upper dirs only): an overlay whiteout (character device 0/0) `dir/name` is
//!   written, in the place of `name`, as an empty regular file `dir/.wh.name` with mode 0, uid/gid
//!   0 and mtime 0 (or the source_date_epoch when set). A directory whose `user.overlay.opaque` or
//!   `trusted.overlay.opaque` xattr is `y` is written, then immediately `dir/.wh..wh..opq` (same
//!   fixed metadata as a whiteout), then its contents.
//! * **Xattrs**: none are written. An upper entry carrying `overlay.redirect` or `overlay.metacopy`
//!   (user. or trusted.) is an error: those overlay features must be off on our mounts.
//! * A file in the tree whose own name begins with `.wh.` is an error: it would read as a whiteout.
//! * The archive ends with two zero blocks (1024 bytes), no padding to a record size.

mod apply;
mod compress;
mod diff;
mod pargz;
mod tarfmt;
mod treediff;

#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};

pub use apply::apply_layer;
pub use compress::{LayerCompression, MEDIA_TYPE_OCI_LAYER_ZSTD};
pub use diff::{
    ListedEntry, ListedKind, diff_upper_to_blob, dir_to_blob, entries_to_blob, is_empty_upper,
    recompress,
};
pub use pargz::{
    BLOCK_SIZE as GZIP_BLOCK_SIZE, ParGzEncoder, default_threads as default_compression_threads,
};
pub use treediff::{
    CopyMarks, Kept, adopt_tree, diff_tree_to_upper, materialize, materialize_in_place,
    normalize_fuse_upper,
};

use crate::store::StoreError;

/// Media type of the layers this module writes.
pub const MEDIA_TYPE_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    /// Only ADD archives come in these two; no layer media type names them.
    Bzip2,
    Xz,
}

impl Compression {
    /// The compression of a layer with this media type (OCI and Docker schema 2 layer types).
    pub fn from_media_type(media_type: &str) -> Result<Self, LayerError> {
        // Media types may carry parameters (`; foo=bar`); they don't change the compression.
        let base = media_type.split(';').next().unwrap_or("").trim();
        match base {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(Compression::Zstd),
            _ => Err(LayerError::UnsupportedMediaType {
                media_type: media_type.to_string(),
                hint: "expected an OCI or Docker layer media type (tar, tar+gzip or tar+zstd)",
            }),
        }
    }
}

/// What ADD finds in a local source file, from its first bytes (as Docker decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// A tar archive, plain or compressed (gzip, bzip2, xz, zstd): ADD unpacks it.
    Tar(Compression),
    /// Anything else, a compressed file that holds no tar included: ADD copies it as a file.
    NotAnArchive,
}

/// Sniffs a file's first bytes for a tar archive, plain or compressed with gzip, bzip2, xz or
/// zstd (the compressions Docker's ADD unpacks).
pub fn archive_kind(path: &Path) -> std::io::Result<ArchiveKind> {
    use std::io::Read;
    let mut head = Vec::with_capacity(512);
    std::fs::File::open(path)?
        .take(512)
        .read_to_end(&mut head)?;
    let is_tar = |b: &[u8]| b.len() >= 262 && &b[257..262] == b"ustar";
    let compression = if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(b"BZh") {
        Compression::Bzip2
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Compression::Xz
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        return Ok(if is_tar(&head) {
            ArchiveKind::Tar(Compression::None)
        } else {
            ArchiveKind::NotAnArchive
        });
    };
    let mut inner = Vec::with_capacity(512);
    // A compressed file that is not a tar (or not readable as its magic says) is copied as it
    // is, as Docker does.
    if let Ok(d) = compress::decoder(std::fs::File::open(path)?, compression) {
        let _ = d.take(512).read_to_end(&mut inner);
    }
    Ok(if is_tar(&inner) {
        ArchiveKind::Tar(compression)
    } else {
        ArchiveKind::NotAnArchive
    })
}

/// The compression of a tar archive that [`archive_kind`] recognised.
pub fn sniff_compression(path: &Path) -> Result<Compression, LayerError> {
    match archive_kind(path) {
        Ok(ArchiveKind::Tar(c)) => Ok(c),
        Ok(_) => Err(LayerError::UnsupportedMediaType {
            media_type: path.display().to_string(),
            hint: "not a tar archive (plain, gzip, bzip2, xz or zstd)",
        }),
        Err(e) => Err(LayerError::UnsupportedMediaType {
            media_type: format!("{}: {e}", path.display()),
            hint: "cannot read the archive",
        }),
    }
}

/// Where a single-ID build keeps the owner a file had in its image (`"UID:GID"`, decimal).
///
/// With one mapped ID every unpacked file belongs to the namespace's root, so its real owner
/// would be lost as soon as a step copies it up (overlayfs, fuse-overlayfs) or the copy
/// snapshotter copies it. The xattr travels with the file (copy-up copies `user.*` xattrs; the
/// copy snapshotter copies this one) and the layer writer puts the owner back; the xattr
/// itself never reaches a layer. A step cannot change it: `chown` to another ID fails in a
/// single-ID namespace, and a file the step makes anew has no such xattr.
pub const OWNER_XATTR: &str = "user.shmocker.owner";

/// Parses an [`OWNER_XATTR`] value.
pub fn parse_owner(value: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(value).ok()?;
    let (u, g) = s.split_once(':')?;
    Some((u.parse().ok()?, g.parse().ok()?))
}

/// Which xattr namespace overlayfs uses for its metadata on the mounts these layers serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverlayXattrs {
    /// `user.overlay.*`: mounts with `userxattr` (always the case inside a user namespace).
    #[default]
    User,
    /// `trusted.overlay.*`: mounts made by real root without `userxattr`.
    Trusted,
}

impl OverlayXattrs {
    fn opaque(self) -> &'static str {
        match self {
            OverlayXattrs::User => "user.overlay.opaque",
            OverlayXattrs::Trusted => "trusted.overlay.opaque",
        }
    }
}

/// How [`apply_layer`] unpacks.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Set each entry's owner from the tar. False when the user namespace maps a single ID
    /// (everything then stays owned by the namespace's root).
    pub chown: bool,
    /// Without `chown`: keep each regular file's and directory's owner (when it is not 0:0)
    /// in the xattr [`OWNER_XATTR`], so that a step which changes the file in place gives a
    /// layer with the owner the image had, not the single mapped ID.
    pub record_owner: bool,
    /// Where to write opaque-directory markers.
    pub overlay_xattrs: OverlayXattrs,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            chown: true,
            record_owner: false,
            overlay_xattrs: OverlayXattrs::User,
        }
    }
}

/// What [`apply_layer`] did.
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    /// Entries skipped or changed, one sentence each (devices that could not be created, absolute
    /// names made relative, unknown entry types, ...).
    pub warnings: Vec<String>,
    /// Tar entries read (every member, including whiteouts and skipped ones; not counting the
    /// PAX/GNU extension headers that belong to a member).
    pub entries: u64,
    /// `sha256:<hex>` of the uncompressed tar stream, read to its end: compare it with the image
    /// config's `rootfs.diff_ids`.
    pub diff_id: String,
}

/// A layer written into the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// `sha256:<hex>` of the compressed blob (its name in the store).
    pub digest: String,
    /// `sha256:<hex>` of the uncompressed tar.
    pub diff_id: String,
    /// Size of the compressed blob in bytes.
    pub size: u64,
    pub media_type: String,
    /// Things left out of the layer (sockets), one sentence each.
    pub warnings: Vec<String>,
}

/// How [`diff_upper_to_blob`] and [`dir_to_blob`] write.
#[derive(Debug, Clone, Default)]
pub struct DiffOptions {
    /// When set, every mtime later than this (seconds since the epoch) is clamped to it, and
    /// whiteouts get this mtime instead of 0.
    pub source_date_epoch: Option<i64>,
    /// gzip (the default) or zstd, with its level.
    pub compression: LayerCompression,
    /// Compression threads; None: [`default_compression_threads`]. The blob's bytes are the
    /// same whatever this is.
    pub threads: Option<usize>,
    /// Take an entry's owner from its [`OWNER_XATTR`] where it has one (single-ID builds).
    pub recorded_owners: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("unsupported layer media type {media_type:?}: {hint}")]
    UnsupportedMediaType {
        media_type: String,
        hint: &'static str,
    },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "reading the layer tar stream: {source}; the blob is corrupt, truncated or not a tar of the declared compression"
    )]
    Read {
        #[source]
        source: io::Error,
    },
    #[error("writing the layer: {source}")]
    Write {
        #[source]
        source: io::Error,
    },
    #[error(
        "layer entry {path:?} is unsafe: {reason}; refusing to unpack it (the image is broken or hostile)"
    )]
    UnsafePath { path: String, reason: &'static str },
    #[error(
        "layer entry {path:?}: {component:?} on its way is a symlink or not a directory; refusing to follow it out of the layer (the image is broken or hostile)"
    )]
    NotADirectory { path: String, component: String },
    #[error(
        "layer entry {path:?} is a hardlink to {target:?}, which is not an earlier entry of this layer: {source}"
    )]
    HardlinkTarget {
        path: String,
        target: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot give {} the owner {uid}:{gid}: {source}; the ID is probably outside this user namespace's ID map: configure subordinate IDs for the user in /etc/subuid and /etc/subgid that cover it, or unpack without chown (single-ID mode)",
        path.display()
    )]
    Chown {
        path: PathBuf,
        uid: u64,
        gid: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} has the overlay xattr {xattr}: overlay redirect_dir and metacopy must be off on build mounts; this upper dir cannot be turned into a layer",
        path.display()
    )]
    UnsupportedOverlayFeature { path: PathBuf, xattr: String },
    #[error(
        "{} is named like a whiteout (.wh. prefix): it cannot be stored in a layer, since unpacking would read it as a deletion; rename it",
        path.display()
    )]
    WhiteoutName { path: PathBuf },
    #[error(
        "{} changed size while it was being archived (expected {expected} bytes, read {actual}); is something still writing to the build's files?",
        path.display()
    )]
    FileChanged {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{} cannot be written in a tar header: {reason}", path.display())]
    Unrepresentable { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}
