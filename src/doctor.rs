//! `umtune doctor`: what this machine offers the trainer, one fact per line.
use crate::config::asset_cache;
use crate::dist::nccl::{self, NcclStatus};
use crate::models::resolve::default_model_path;

pub struct Fact {
    pub name: &'static str,
    pub value: String,
    /// False for what `make run` needs and this machine lacks; `umtune doctor` then fails.
    pub ok: bool,
}

/// The facts as `umtune doctor` prints them: one `name  value` line each.
pub fn table(facts: &[Fact]) -> String {
    facts
        .iter()
        .map(|f| format!("{:<24} {}\n", f.name, f.value))
        .collect()
}

/// An error naming the facts `make run` needs and this machine lacks.
pub fn check(facts: &[Fact]) -> crate::error::Result<()> {
    let missing: Vec<&str> = facts.iter().filter(|f| !f.ok).map(|f| f.name).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(crate::error::Error::Config(format!(
        "missing: {} (see above)",
        missing.join(", ")
    )))
}

pub fn facts() -> Vec<Fact> {
    let mut out = Vec::new();
    let mut add = |name, value: String| {
        out.push(Fact {
            name,
            value,
            ok: true,
        })
    };
    add("umtune", env!("CARGO_PKG_VERSION").to_string());
    add("libtorch", torch_version());
    add(
        "libtorch dir",
        option_env!("UMTUNE_TORCH_LIB")
            .unwrap_or("(not recorded at build)")
            .to_string(),
    );
    let cuda = tch::Cuda::is_available();
    add("cuda available", cuda.to_string());
    add("cuda devices", tch::Cuda::device_count().to_string());
    add(
        "cudnn available",
        tch::Cuda::cudnn_is_available().to_string(),
    );
    add(
        "nccl",
        match nccl::probe() {
            NcclStatus::Loaded { version } => {
                format!("loadable (version {})", nccl::format_version(version))
            }
            NcclStatus::Missing { hint } => format!("not loadable: {hint}"),
        },
    );
    add("cpu threads (libtorch)", tch::get_num_threads().to_string());
    add(
        "cpu cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .to_string(),
    );
    add("asset cache", asset_cache().display().to_string());
    add(
        "hugging face cache",
        hf_hub::Cache::from_env().path().display().to_string(),
    );
    let default = default_model_path();
    let present = default.exists();
    out.push(Fact {
        name: "default model",
        value: format!(
            "{} ({})",
            default.display(),
            if present {
                "present"
            } else {
                "missing: run `make assets`"
            }
        ),
        ok: present,
    });
    let data = asset_cache().join("data").join("uci-sentiment");
    let present = data.is_dir();
    out.push(Fact {
        name: "default dataset",
        value: format!(
            "{} ({})",
            data.display(),
            if present {
                "present"
            } else {
                "missing: run `make data`"
            }
        ),
        ok: present,
    });
    out
}

fn torch_version() -> String {
    // The PyTorch wheel's version.txt sits next to lib/.
    option_env!("UMTUNE_TORCH_LIB")
        .map(|lib| std::path::Path::new(lib).join("../version.py"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("__version__ = ")
                    .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
            })
        })
        .unwrap_or_else(|| "2.11 (tch 0.24)".to_string())
}
