//! NCCL through cudarc's `nccl` module, loaded dynamically so that builds need no CUDA.
//!
//! cudarc looks for `libnccl.so` (and `.so.<cuda major>` and a few others) while the PyTorch wheel
//! ships only `libnccl.so.2` in `site-packages/nvidia/nccl/lib`. `make venv` adds the `libnccl.so`
//! link there and the build script puts that directory on the binaries' rpath.

/// Outcome of trying to load NCCL.
#[derive(Debug, Clone, PartialEq)]
pub enum NcclStatus {
    /// Loaded; version as NCCL encodes it (e.g. 22809 for 2.28.9).
    Loaded { version: i32 },
    /// Not loadable; says why and what to do.
    Missing { hint: String },
}

pub fn probe() -> NcclStatus {
    // SAFETY: dlopen of a well-known shared library; nothing from it is called if it is absent.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        let hint = match find_versioned() {
            Some(path) => format!(
                "found {} but no `libnccl.so` beside it: run `make venv` (it adds the link) or `ln -s libnccl.so.2 {}/libnccl.so`",
                path.display(),
                path.parent().map(|p| p.display().to_string()).unwrap_or_default()
            ),
            None => "no libnccl.so on the library path (pip's nvidia-nccl-cu13 ships one)".into(),
        };
        return NcclStatus::Missing { hint };
    }
    match cudarc::nccl::result::get_nccl_version() {
        Ok(version) => NcclStatus::Loaded { version },
        Err(e) => NcclStatus::Missing {
            hint: format!("libnccl.so loaded but ncclGetVersion failed: {e:?}"),
        },
    }
}

/// `libnccl.so.2` next to the torch wheel, for the hint.
fn find_versioned() -> Option<std::path::PathBuf> {
    let torch_lib = std::path::Path::new(option_env!("UMTUNE_TORCH_LIB")?);
    let candidate = torch_lib.join("../../nvidia/nccl/lib/libnccl.so.2");
    candidate.exists().then_some(candidate)
}

/// "2.28.9" from NCCL's integer encoding.
pub fn format_version(code: i32) -> String {
    let (major, minor, patch) = if code >= 10000 {
        (code / 10000, (code % 10000) / 100, code % 100)
    } else {
        (code / 1000, (code % 1000) / 100, code % 100)
    };
    format!("{major}.{minor}.{patch}")
}
