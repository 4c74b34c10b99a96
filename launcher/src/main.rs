//! `umtune-launch`: one worker per device on this node, with torchrun's environment contract
//! (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT,
//! TORCHELASTIC_USE_AGENT_STORE), so workers run the same under it, under torchrun and under srun.
//!
//! - Node 0's launcher serves the job's c10d TCPStore (libtorch's, through umtune's shim); the
//!   workers join it as clients, as they join torchrun's agent store.
//! - Every output line of worker k is prefixed with `[rank k]`.
//! - Fail-fast: when a worker exits non-zero or dies, the others get SIGTERM, then SIGKILL after
//!   `--grace-s`; the launcher names the rank and its exit status or signal, and exits with that
//!   worker's status (128 + N for a worker killed by signal N), so a caller tells "stopped on a
//!   signal after saving" (128 + the signal, every rank agreeing) from "failed" (1) or "bad
//!   configuration" (2). A worker that exits 0 while others still run ends the job too, after
//!   `--exit-grace-s` (ranks finish a run within moments of each other; one that left early
//!   would leave the others waiting in a collective until `dist.timeout_s`).
//!   Workers run in their own process groups with PR_SET_PDEATHSIG, so none outlives the launcher.
//! - Threads: each worker gets `OMP_NUM_THREADS` = this node's cores / workers (at least 1) unless
//!   the launcher's environment sets it (torchrun sets 1 when it starts several workers); a
//!   worker's `run.threads` overrides it. Without it every worker takes all cores.
//! - SIGINT, SIGTERM, SIGUSR1 and SIGUSR2 are forwarded to every worker (SLURM's warning signal
//!   before a time limit is SIGUSR1, which torchrun does not forward).
//! - Under SLURM with one launcher per node (`srun --ntasks-per-node 1 umtune-launch ...`), the
//!   node count, node rank and master address come from SLURM's variables.
use clap::Parser;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use umtune::dist::c10d::Store;
use umtune::dist::env::{slurm_hostnames, slurm_port};

#[derive(Parser, Debug)]
#[command(
    name = "umtune-launch",
    version,
    about = "Spawns one umtune worker per device (torchrun's environment contract)",
    after_help = "Example: umtune-launch --nproc-per-node 2 -- umtune train configs/default.toml"
)]
struct Args {
    /// Workers on this node (one per GPU).
    #[arg(long, default_value_t = 1)]
    nproc_per_node: usize,
    /// Nodes in the job (default: SLURM_NNODES under SLURM, else 1).
    #[arg(long)]
    nnodes: Option<usize>,
    /// This node's rank (default: SLURM_NODEID under SLURM, else 0).
    #[arg(long)]
    node_rank: Option<usize>,
    /// The address of node 0, where the store is served (default: SLURM's first node, else
    /// 127.0.0.1).
    #[arg(long)]
    master_addr: Option<String>,
    /// The store's port (default: a free one on one node; derived from SLURM_JOB_ID under SLURM;
    /// else 29500).
    #[arg(long)]
    master_port: Option<u16>,
    /// Seconds between SIGTERM and SIGKILL when the job is torn down.
    #[arg(long, default_value_t = 10)]
    grace_s: u64,
    /// Seconds the other workers may still run after one exited successfully, before the job is
    /// stopped as failed.
    #[arg(long, default_value_t = 120)]
    exit_grace_s: u64,
    /// Seconds the store waits for workers (rendezvous timeout).
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// The worker command, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn env_num(k: &str) -> Option<usize> {
    std::env::var(k).ok()?.parse().ok()
}

/// (nnodes, node_rank, master_addr, master_port) from the flags, SLURM, or one-node defaults.
fn layout(a: &Args) -> Result<(usize, usize, String, u16), String> {
    let slurm = std::env::var("SLURM_JOB_ID").ok();
    let nnodes = a
        .nnodes
        .or_else(|| slurm.as_ref().and(env_num("SLURM_NNODES")))
        .unwrap_or(1);
    let node_rank = a
        .node_rank
        .or_else(|| slurm.as_ref().and(env_num("SLURM_NODEID")))
        .unwrap_or(0);
    if node_rank >= nnodes {
        return Err(format!(
            "--node-rank {node_rank} is outside --nnodes {nnodes}"
        ));
    }
    let master_addr = match (&a.master_addr, &slurm) {
        (Some(m), _) => m.clone(),
        (None, Some(_)) if nnodes > 1 => {
            let list = std::env::var("SLURM_JOB_NODELIST").unwrap_or_default();
            slurm_hostnames(&list)
                .map_err(|e| e.to_string())?
                .into_iter()
                .next()
                .ok_or_else(|| format!("SLURM_JOB_NODELIST `{list}` names no host"))?
        }
        _ => "127.0.0.1".into(),
    };
    let master_port = match (a.master_port, &slurm) {
        (Some(p), _) => p,
        (None, Some(id)) => slurm_port(id.parse().unwrap_or(0)),
        (None, None) if nnodes == 1 => 0,
        _ => 29500,
    };
    Ok((nnodes, node_rank, master_addr, master_port))
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s} ({})", signal_name(s)),
        _ => "an unknown status".into(),
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => "signal",
    }
}

/// Copies `from` to our stdout or stderr line by line, each line prefixed with the rank.
fn relay(from: impl std::io::Read + Send + 'static, rank: usize, to_stderr: bool) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).split(b'\n') {
            let Ok(line) = line else { break };
            let mut out: Vec<u8> = format!("[rank {rank}] ").into_bytes();
            out.extend(line);
            out.push(b'\n');
            let _ = if to_stderr {
                std::io::stderr().lock().write_all(&out)
            } else {
                std::io::stdout().lock().write_all(&out)
            };
        }
    });
}

/// Sends `sig` to each live worker's process group.
fn signal_all(children: &[(usize, Child)], sig: i32) {
    for (_, c) in children {
        // SAFETY: kill(2) on the worker's process group (its pid: each worker leads its group).
        unsafe { libc::kill(-(c.id() as i32), sig) };
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("umtune-launch: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(a: &Args) -> Result<ExitCode, String> {
    if a.nproc_per_node == 0 {
        return Err("--nproc-per-node must be at least 1".into());
    }
    let (nnodes, node_rank, master_addr, port) = layout(a)?;
    let world = nnodes * a.nproc_per_node;
    // Node 0 serves the store (port 0: a free one); the workers are its clients. Node 0 also
    // names the job (the workers' key prefix), and the other nodes' launchers read that name, so
    // every node's workers meet under one prefix.
    let timeout = Duration::from_secs(a.timeout_s);
    let serve = node_rank == 0;
    // Node 0 serves on the master address's interface (loopback on one node), so the store is
    // not reachable from networks the job does not use.
    let bind = match (serve, nnodes) {
        (true, 1) => "127.0.0.1",
        _ => master_addr.as_str(),
    };
    let store = Store::connect(
        bind,
        port,
        serve,
        world,
        timeout,
        "umtune-launch",
        node_rank,
    )
    .map_err(|e| match serve {
        true => format!("serving the TCPStore on port {port}: {e}"),
        false => format!("joining node 0's TCPStore at {master_addr}:{port}: {e}"),
    })?;
    let port = store.port();
    let run_id = if serve {
        let id = format!("{:016x}", rand::random::<u64>());
        store
            .set("run_id", id.as_bytes())
            .map_err(|e| format!("publishing the job's id: {e}"))?;
        id
    } else {
        let id = store
            .get("run_id")
            .map_err(|e| format!("reading the job's id from node 0: {e}"))?;
        String::from_utf8_lossy(&id).into_owned()
    };

    // Signals first, so none is lost between spawning and waiting.
    let pending = Arc::new(AtomicUsize::new(0));
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2] {
        signal_hook::flag::register_usize(sig, pending.clone(), sig as usize)
            .map_err(|e| format!("installing the handler of signal {sig}: {e}"))?;
    }
    let threads = worker_threads(a.nproc_per_node);
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..a.nproc_per_node {
        let rank = node_rank * a.nproc_per_node + local;
        let mut cmd = Command::new(&a.command[0]);
        cmd.args(&a.command[1..])
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", a.nproc_per_node.to_string())
            .env("GROUP_RANK", node_rank.to_string())
            .env("ROLE_RANK", rank.to_string())
            .env("ROLE_WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", &master_addr)
            .env("MASTER_PORT", port.to_string())
            .env("TORCHELASTIC_USE_AGENT_STORE", "True")
            .env("TORCHELASTIC_RUN_ID", &run_id)
            .env("TORCHELASTIC_RESTART_COUNT", "0")
            .env("OMP_NUM_THREADS", &threads)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                signal_all(&children, libc::SIGKILL);
                return Err(format!("starting rank {rank} (`{}`): {e}", a.command[0]));
            }
        };
        relay(child.stdout.take().expect("piped"), rank, false);
        relay(child.stderr.take().expect("piped"), rank, true);
        children.push((rank, child));
    }

    // Wait: all done, or the first failure tears the job down.
    let mut failure: Option<Failure> = None;
    let mut forwarded: Option<i32> = None;
    let mut first_exit: Option<(usize, Instant)> = None;
    let mut teardown: Option<Instant> = None;
    let mut killed = false;
    loop {
        let sig = pending.swap(0, Ordering::SeqCst);
        if sig != 0 {
            eprintln!(
                "umtune-launch: forwarding {} to the workers",
                signal_name(sig as i32)
            );
            signal_all(&children, sig as i32);
            forwarded.get_or_insert(sig as i32);
        }
        let mut still = Vec::new();
        for (rank, mut c) in children.drain(..) {
            match c.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() && failure.is_none() {
                        failure = Some(Failure::Exited(rank, status));
                    }
                    first_exit.get_or_insert((rank, Instant::now()));
                }
                Ok(None) => still.push((rank, c)),
                Err(e) => {
                    failure.get_or_insert(Failure::Other(format!("waiting for rank {rank}: {e}")));
                    still.push((rank, c));
                }
            }
        }
        children = still;
        if children.is_empty() {
            break;
        }
        if let (None, Some((rank, at))) = (&failure, first_exit) {
            if at.elapsed() > Duration::from_secs(a.exit_grace_s) {
                let left: Vec<String> = children.iter().map(|(r, _)| r.to_string()).collect();
                failure = Some(Failure::Other(format!(
                    "rank {rank} exited successfully {} s before rank(s) {} (--exit-grace-s): they would wait for it until dist.timeout_s",
                    a.exit_grace_s,
                    left.join(", ")
                )));
            }
        }
        if let Some(f) = &failure {
            match teardown {
                None => {
                    eprintln!(
                        "umtune-launch: {}; stopping the other ranks (SIGTERM)",
                        f.describe()
                    );
                    signal_all(&children, libc::SIGTERM);
                    teardown = Some(Instant::now());
                }
                Some(t) if !killed && t.elapsed() > Duration::from_secs(a.grace_s) => {
                    eprintln!(
                        "umtune-launch: ranks still running after {} s: SIGKILL",
                        a.grace_s
                    );
                    signal_all(&children, libc::SIGKILL);
                    killed = true;
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the relays drain the last lines.
    std::thread::sleep(Duration::from_millis(100));
    drop(store);
    let Some(f) = failure else {
        return Ok(ExitCode::SUCCESS);
    };
    let code = f.exit_code();
    match forwarded {
        Some(sig) if i32::from(code) == 128 + sig => eprintln!(
            "umtune-launch: the workers stopped on the forwarded {} ({}; a training run saved its checkpoint first)",
            signal_name(sig),
            f.describe()
        ),
        _ => eprintln!("umtune-launch: {}", f.describe()),
    }
    Ok(ExitCode::from(code))
}

/// Why the job ended early.
enum Failure {
    /// The first worker that exited unsuccessfully, and how.
    Exited(usize, ExitStatus),
    Other(String),
}

impl Failure {
    fn describe(&self) -> String {
        match self {
            Failure::Exited(rank, status) => {
                format!("rank {rank} failed with {}", describe(*status))
            }
            Failure::Other(msg) => msg.clone(),
        }
    }

    /// The launcher's own exit status: the failed worker's (128 + N when signal N killed it, as
    /// a shell reports it), 1 otherwise.
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Exited(_, status) => match (status.code(), status.signal()) {
                (Some(c), _) => u8::try_from(c).ok().filter(|&c| c != 0).unwrap_or(1),
                (None, Some(s)) => u8::try_from(128 + s).unwrap_or(1),
                _ => 1,
            },
            Failure::Other(_) => 1,
        }
    }
}

/// `OMP_NUM_THREADS` for each of `workers` workers: the launcher's own value if set, else this
/// node's cores (those this process may run on) shared out, at least 1; said once in the log.
fn worker_threads(workers: usize) -> String {
    if let Ok(set) = std::env::var("OMP_NUM_THREADS") {
        return set;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let each = (cores / workers).max(1);
    eprintln!(
        "umtune-launch: OMP_NUM_THREADS={each} per worker ({cores} cores / {workers} workers; set OMP_NUM_THREADS or run.threads to change)"
    );
    each.to_string()
}
