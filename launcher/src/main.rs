//! `umtune-launch`: will spawn one umtune worker per device (torchrun / SLURM environment
//! contract, fail-fast, restarts). Until the distributed issue lands it only says so.
fn main() -> std::process::ExitCode {
    eprintln!(
        "umtune-launch {}: multi-worker launching is not implemented yet; run `umtune` directly",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::from(2)
}
