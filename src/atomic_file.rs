//! Writing a file so that readers and crashes see the old file or the new one, never half of
//! one, and nothing beside it is touched: a uniquely named temporary file in the target's
//! directory (the `tempfile` crate), fsynced, renamed over the target, then the directory
//! fsynced so the rename itself survives a power loss. A failure removes the temporary file.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

/// Size and checksums of a file as it was written. Loading checks the size and the xxh3, a 64-bit
/// checksum at memory speed (twentyfold sha256's, even with the CPU's SHA instructions): it
/// catches truncation, torn writes and flipped bytes as surely as sha256 does, and the files are
/// no defence against someone who can also rewrite their record. The sha256 stays in the record
/// for `sha256sum` and other tools, and is what records written before the xxh3 are checked with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xxh3: Option<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn xxh3_hex(bytes: &[u8]) -> String {
    xxh3_string(twox_hash::XxHash3_64::oneshot(bytes))
}

fn xxh3_string(hash: u64) -> String {
    format!("{hash:016x}")
}

/// The size and checksums of the file at `path`.
pub fn digest(path: &Path) -> Result<FileDigest> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(digest_of(&bytes))
}

/// The size and checksums of `bytes`.
pub fn digest_of(bytes: &[u8]) -> FileDigest {
    digest_of_parts(&[bytes])
}

/// The size and checksums of the concatenation of `parts`.
fn digest_of_parts(parts: &[&[u8]]) -> FileDigest {
    use std::hash::Hasher;
    let (mut sha, mut xxh) = (Sha256::new(), twox_hash::XxHash3_64::new());
    for part in parts {
        sha.update(part);
        xxh.write(part);
    }
    FileDigest {
        bytes: parts.iter().map(|p| p.len() as u64).sum(),
        sha256: hex(&sha.finalize()),
        xxh3: Some(xxh3_string(xxh.finish())),
    }
}

/// Fails naming `path` when it is not the file `recorded_in` recorded as `want` (truncated,
/// replaced or corrupt).
pub fn check_digest(path: &Path, want: &FileDigest, recorded_in: &str) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: only read; umtune replaces files by renaming, never in place.
    let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
        .map_err(|e| Error::io(path, e))?;
    check_bytes(path, &map, want, recorded_in)
}

/// [`check_digest`] of a file already read (or mapped) into `bytes`: its size, then its xxh3
/// (its sha256 when the record has no xxh3).
pub fn check_bytes(path: &Path, bytes: &[u8], want: &FileDigest, recorded_in: &str) -> Result<()> {
    if bytes.len() as u64 != want.bytes {
        return Err(Error::format(
            path,
            format!(
                "is {} bytes, {recorded_in} recorded {}: the file is truncated or was replaced",
                bytes.len(),
                want.bytes
            ),
        ));
    }
    let (what, got, recorded) = match &want.xxh3 {
        Some(x) => ("xxh3", xxh3_hex(bytes), x),
        None => ("sha256", hex(&Sha256::digest(bytes)), &want.sha256),
    };
    if &got != recorded {
        return Err(Error::format(
            path,
            format!(
                "{what} checksum {got} differs from the {recorded} that {recorded_in} recorded: the file is corrupt"
            ),
        ));
    }
    Ok(())
}

/// Writes the concatenation of `parts` to `path` atomically and returns its digest, computed on
/// a second thread while the first writes and syncs (so hashing adds no time on two cores).
pub fn write_parts_atomic_digest(path: &Path, parts: &[&[u8]]) -> Result<FileDigest> {
    digest_while(parts, || {
        write_atomic_with(path, |tmp| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(tmp)
                .map_err(|e| Error::io(tmp, e))?;
            write_parts(tmp, &mut f, parts)
        })
    })
}

/// Writes the concatenation of `parts` to the new file `path` and syncs it, without the
/// rename of [`write_parts_atomic_digest`]: for the files of a directory that is published
/// whole (synced, then renamed into place), such as a checkpoint's `step_N.tmp`.
pub fn write_parts_new_digest(path: &Path, parts: &[&[u8]]) -> Result<FileDigest> {
    digest_while(parts, || {
        let mut f = std::fs::File::create_new(path).map_err(|e| Error::io(path, e))?;
        write_parts(path, &mut f, parts)?;
        f.sync_all().map_err(|e| Error::io(path, e))
    })
}

fn write_parts(path: &Path, f: &mut std::fs::File, parts: &[&[u8]]) -> Result<()> {
    parts
        .iter()
        .try_for_each(|p| f.write_all(p))
        .map_err(|e| Error::io(path, e))
}

/// Runs `write` while a second thread computes the digest of the concatenated `parts`.
fn digest_while(parts: &[&[u8]], write: impl FnOnce() -> Result<()>) -> Result<FileDigest> {
    std::thread::scope(|s| {
        let digest = s.spawn(|| digest_of_parts(parts));
        write()?;
        Ok(digest.join().expect("hashing does not panic"))
    })
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(tmp)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(|e| Error::io(tmp, e))
    })
}

/// Has `write` fill a temporary file (given by path, for writers that open files themselves,
/// such as libtorch's safetensors writer), then publishes it at `path` atomically.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    // On any error below, dropping `tmp` deletes the temporary file.
    write(tmp.path())?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    sync_dir(dir)
}

/// Moves a staged file `from` over `to` and syncs the directory; a `from` already moved (by
/// another reader completing the same save) is fine.
pub fn move_into_place(from: &Path, to: &Path) -> Result<()> {
    match std::fs::rename(from, to) {
        Ok(()) => sync_dir(to.parent().unwrap_or(Path::new("."))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(to, e)),
    }
}

/// Makes a directory's entries (a rename into it) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}
