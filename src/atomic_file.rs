//! Writing a file so that readers and crashes see the old file or the new one, never half of
//! one, and nothing beside it is touched: a uniquely named temporary file in the target's
//! directory (the `tempfile` crate), fsynced, renamed over the target, then the directory
//! fsynced so the rename itself survives a power loss. A failure removes the temporary file.
use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

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
