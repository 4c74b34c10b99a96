//! The link fix-ups of build.rs: libtorch_cuda stays linked (so CUDA is visible where present)
//! and NCCL from the pip wheel loads through cudarc.
use umtune::dist::nccl::{self, NcclStatus};

#[test]
fn torch_cuda_is_linked_despite_as_needed() -> Result<(), Box<dyn std::error::Error>> {
    let lib = std::path::Path::new(env!("UMTUNE_TORCH_LIB"));
    if !lib.join("libtorch_cuda.so").exists() {
        return Err(format!(
            "{} has no libtorch_cuda.so: the CUDA wheel is expected",
            lib.display()
        )
        .into());
    }
    // Touch libtorch so that the process has loaded it and its dependencies.
    let _ = tch::Cuda::is_available();
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    assert!(
        maps.contains("libtorch_cuda.so"),
        "libtorch_cuda.so is not loaded: --as-needed dropped it"
    );
    Ok(())
}

#[test]
fn nccl_from_the_wheel_is_loadable() {
    match nccl::probe() {
        NcclStatus::Loaded { version } => assert!(version >= 22000, "NCCL version {version}"),
        NcclStatus::Missing { hint } => panic!("NCCL not loadable: {hint}"),
    }
}

#[test]
fn doctor_reports_every_fact() {
    let names: Vec<&str> = umtune::doctor::facts().iter().map(|f| f.name).collect();
    for want in [
        "libtorch",
        "cuda available",
        "cuda devices",
        "nccl",
        "cpu threads (libtorch)",
        "default model",
        "hugging face cache",
    ] {
        assert!(names.contains(&want), "doctor lacks `{want}`: {names:?}");
    }
    assert_eq!(nccl::format_version(22809), "2.28.9");
}
