//! Link fix-ups for libtorch from the PyTorch wheel.
//!
//! tch's build script asks for `torch_cuda`, but the default `--as-needed` linker flag drops it
//! because no symbol is referenced directly, and CUDA then looks absent at run time. We re-add it
//! with `--no-as-needed`, and bake an rpath to `torch/lib` so the binaries and tests find libtorch
//! without LD_LIBRARY_PATH.
use std::path::PathBuf;
use std::process::Command;

fn torch_lib_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(dir).join("lib"));
    }
    let python = if std::env::var_os("VIRTUAL_ENV").is_some() {
        "python"
    } else {
        "python3"
    };
    let out = Command::new(python)
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    println!("cargo:rerun-if-env-changed=PATH");
    let Some(lib) = torch_lib_dir() else {
        println!("cargo:warning=could not locate torch/lib; run `make venv` first");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // cudarc dlopens `libnccl.so`; `make venv` links it to the wheel's libnccl.so.2 here.
    let nccl = lib.join("../../nvidia/nccl/lib");
    if nccl.exists() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nccl.display());
    }
    println!("cargo:rustc-env=UMTUNE_TORCH_LIB={}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
