//! The launcher links libtorch through umtune (the TCPStore); its binary needs the same rpath to
//! the wheel's torch/lib that umtune's build script gives umtune's binaries.
fn main() {
    if let Ok(lib) = std::env::var("DEP_UMTUNE_C10D_TORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
