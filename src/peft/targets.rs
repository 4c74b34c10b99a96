//! Which modules get adapters: PEFT's default target modules for each method and architecture
//! (as `peft.utils.constants.TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING` lists them), the
//! configured list otherwise, and the error for a list that matches nothing.
use crate::config::PeftMethod;
use crate::error::Error;
use crate::models::ArchConfig;

/// PEFT's default targets for each method and architecture.
pub fn default_targets(method: PeftMethod, arch: &ArchConfig) -> Vec<String> {
    let gpt2 = matches!(arch, ArchConfig::Gpt2(_));
    let names: &[&str] = match (method, gpt2) {
        (PeftMethod::Ia3, true) => &["c_attn", "mlp.c_proj"],
        (PeftMethod::Ia3, false) => &["k_proj", "v_proj", "down_proj"],
        (PeftMethod::Houlsby, true) => &["c_proj"],
        (PeftMethod::Houlsby, false) => &["o_proj", "down_proj"],
        (_, true) => &["c_attn"],
        (_, false) => &["q_proj", "v_proj"],
    };
    names.iter().map(|n| n.to_string()).collect()
}

/// The configured targets, or the defaults when none are configured.
pub fn resolve_targets(
    configured: &[String],
    method: PeftMethod,
    arch: &ArchConfig,
) -> Vec<String> {
    if configured.is_empty() {
        default_targets(method, arch)
    } else {
        configured.to_vec()
    }
}

/// The error for a target list that matched no module (it would silently train the head alone).
pub fn no_match(targets: &[String], source: &str, arch: &ArchConfig) -> Error {
    let known = match arch {
        ArchConfig::Gpt2(_) => "c_attn, c_proj (attn.c_proj, mlp.c_proj), c_fc",
        ArchConfig::Llama(_) => "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
    };
    Error::Config(format!(
        "peft.targets = {targets:?} matches no module of `{source}`; its linear layers are {known}"
    ))
}
