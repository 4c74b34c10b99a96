//! Link fix-ups for libtorch from the PyTorch wheel.
//!
//! tch's build script asks for `torch_cuda`, but the default `--as-needed` linker flag drops it
//! because no symbol is referenced directly, and CUDA then looks absent at run time. We re-add it
//! with `--no-as-needed`, and bake an rpath to `torch/lib` so the binaries and tests find libtorch
//! without LD_LIBRARY_PATH.
//!
//! It also compiles the c10d shim (src/ffi/shim): libtorch's own TCPStore and ProcessGroupNCCL
//! behind a C ABI, built with the `cc` crate against the wheel's headers and the flags torch-sys
//! compiles libtch with. The NCCL half needs the CUDA runtime headers the wheel lacks; `make venv`
//! installs them from pip into `$VIRTUAL_ENV/cuda-headers`. Without them the NCCL entries are
//! compiled as stubs that say so (the build never needs a GPU or a CUDA toolkit).
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
    compile_shim(&lib);
    // cudarc dlopens `libnccl.so`; `make venv` links it to the wheel's libnccl.so.2 here.
    let nccl = lib.join("../../nvidia/nccl/lib");
    if nccl.exists() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nccl.display());
    }
    println!("cargo:rustc-env=UMTUNE_TORCH_LIB={}", lib.display());
    // For dependents' build scripts (DEP_UMTUNE_C10D_TORCH_LIB): their binaries need the rpath too.
    println!("cargo:torch_lib={}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// The CUDA runtime headers ProcessGroupNCCL.hpp includes: `UMTUNE_CUDA_HEADERS`, or where
/// `make venv` puts them.
fn cuda_header_dirs(site_packages: &std::path::Path) -> Option<Vec<PathBuf>> {
    let extra = match std::env::var_os("UMTUNE_CUDA_HEADERS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("VIRTUAL_ENV")?).join("cuda-headers"),
    }
    .join("nvidia/cu13/include");
    let dirs = vec![
        extra,
        site_packages.join("nvidia/cu13/include"),
        site_packages.join("nvidia/nccl/include"),
    ];
    let needed = [
        dirs[0].join("crt/host_defines.h"),
        dirs[1].join("cuda_runtime_api.h"),
        dirs[2].join("nccl.h"),
    ];
    needed.iter().all(|p| p.exists()).then_some(dirs)
}

fn compile_shim(lib: &std::path::Path) {
    for f in [
        "shim.h",
        "store.cpp",
        "nccl.cpp",
        "random.cpp",
        "quant.cpp",
        "cuda_memory.cpp",
        "optim.cpp",
        "precision.cpp",
    ] {
        println!("cargo:rerun-if-changed=src/ffi/shim/{f}");
    }
    println!("cargo:rerun-if-env-changed=UMTUNE_CUDA_HEADERS");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let torch = lib.parent().expect("torch/lib has a parent");
    let site_packages = torch.parent().expect("torch has a parent");
    // The wheel is built with the C++11 ABI (torch._C._GLIBCXX_USE_CXX11_ABI), as torch-sys assumes.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .include("src/ffi/shim")
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .define("GLOG_USE_GLOG_EXPORT", None)
        .file("src/ffi/shim/store.cpp")
        .file("src/ffi/shim/nccl.cpp")
        .file("src/ffi/shim/random.cpp")
        .file("src/ffi/shim/quant.cpp")
        .file("src/ffi/shim/cuda_memory.cpp")
        .file("src/ffi/shim/optim.cpp")
        .file("src/ffi/shim/precision.cpp");
    match cuda_header_dirs(site_packages) {
        Some(dirs) if lib.join("libtorch_cuda.so").exists() => {
            for d in dirs {
                build.include(d);
            }
            build.define("USE_C10D_NCCL", None).define("USE_CUDA", None);
            build.compile("umtune_c10d");
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-lc10_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
        _ => {
            println!(
                "cargo:warning=CUDA/NCCL headers not found (run `make venv`): the nccl backend is compiled out"
            );
            build.define("UMTUNE_NO_NCCL", None);
            build.compile("umtune_c10d");
        }
    }
}
