//! The places and switches umtune reads from the environment besides its config: the asset
//! cache and Hugging Face's offline switch (the launcher's variables are `dist::env`'s).
use std::path::PathBuf;

/// Where `make assets` puts models, tokenizers and datasets: `$UMTUNE_CACHE` or
/// `~/.cache/umtune`.
pub fn asset_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("UMTUNE_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("umtune")
}

/// `HF_HUB_OFFLINE=1`: never try to download from the hub.
pub fn hub_offline() -> bool {
    std::env::var_os("HF_HUB_OFFLINE").is_some_and(|v| v == "1")
}
