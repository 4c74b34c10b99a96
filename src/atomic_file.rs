//! Writing a file so that readers and crashes see the old file or the new one, never half of
//! one, and nothing beside it is touched: a uniquely named temporary file in the target's
//! directory (the `tempfile` crate), fsynced, renamed over the target, then the directory
//! fsynced so the rename itself survives a power loss. A failure removes the temporary file.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

/// Size and sha256 of a file as it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub sha256: String,
}

/// The size and sha256 of the file at `path`.
pub fn digest(path: &Path) -> Result<FileDigest> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let bytes = std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, e))?;
    let sha256 = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(FileDigest { bytes, sha256 })
}

/// The size and sha256 of `bytes`.
pub fn digest_of(bytes: &[u8]) -> FileDigest {
    let sha256 = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    FileDigest {
        bytes: bytes.len() as u64,
        sha256,
    }
}

/// Fails naming `path` when it is not the file `recorded_in` recorded as `want` (truncated,
/// replaced or corrupt).
pub fn check_digest(path: &Path, want: &FileDigest, recorded_in: &str) -> Result<()> {
    compare(path, &digest(path)?, want, recorded_in)
}

/// [`check_digest`] of a file already read (or mapped) into `bytes`.
pub fn check_bytes(path: &Path, bytes: &[u8], want: &FileDigest, recorded_in: &str) -> Result<()> {
    compare(path, &digest_of(bytes), want, recorded_in)
}

fn compare(path: &Path, got: &FileDigest, want: &FileDigest, recorded_in: &str) -> Result<()> {
    if got.bytes != want.bytes {
        return Err(Error::format(
            path,
            format!(
                "is {} bytes, {recorded_in} recorded {}: the file is truncated or was replaced",
                got.bytes, want.bytes
            ),
        ));
    }
    if got.sha256 != want.sha256 {
        return Err(Error::format(
            path,
            format!(
                "sha256 {} differs from the {} that {recorded_in} recorded: the file is corrupt",
                got.sha256, want.sha256
            ),
        ));
    }
    Ok(())
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

/// Makes a directory's entries (a rename into it) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}
