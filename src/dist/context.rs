//! The run context: who this process is in the job (rank, local rank, world size), the device it
//! computes on, whether it writes files, the collective it talks through, and the stop request a
//! signal leaves. Built once per process and passed to train, eval, predict and memory build, so
//! rank-0-only writing and the device choice per local rank are decided in one place.
use super::c10d::{NcclGroup, Store};
use super::env::JobEnv;
use super::ring::RingGroup;
use super::{Collective, SingleProcess};
use crate::config::{Backend, Config};
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tch::Device;

pub struct RunContext {
    pub group: Arc<dyn Collective>,
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub device: Device,
    /// Whether this process writes run files (rank 0).
    pub is_writer: bool,
    pub stop: StopFlag,
    /// The job's rendezvous store (multi-process runs); rank 0 may be serving it, so it lives as
    /// long as the context.
    pub store: Option<Arc<Store>>,
}

impl RunContext {
    /// One process, no sockets: the device from `model.device`, threads and seed from `run`.
    pub fn single(cfg: &Config) -> Result<RunContext> {
        setup_process(cfg);
        Ok(RunContext {
            group: Arc::new(SingleProcess),
            rank: 0,
            local_rank: 0,
            world_size: 1,
            device: cfg.model.device.device(0)?,
            is_writer: true,
            stop: StopFlag::default(),
            store: None,
        })
    }

    /// The context of this process in the job its launcher describes (see [`JobEnv`]): one
    /// process without sockets, or a rank that joins the job's TCPStore (serving it on rank 0
    /// unless torchrun's agent does) and connects the collective `dist.backend` picks — `nccl`
    /// for a CUDA device under `auto`, the TCP ring otherwise.
    pub fn for_job(cfg: &Config, job: &JobEnv) -> Result<RunContext> {
        // One process talks to nobody, unless NCCL is asked for by name (a world of one through
        // c10d, the GPU check of the NCCL path on a one-GPU machine).
        if job.world_size == 1 && cfg.dist.backend != Backend::Nccl {
            let mut ctx = RunContext::single(cfg)?;
            ctx.device = cfg.model.device.device(job.local_rank)?;
            ctx.local_rank = job.local_rank;
            return Ok(ctx);
        }
        setup_process(cfg);
        let device = cfg.model.device.device(job.local_rank)?;
        let timeout = std::time::Duration::from_secs(cfg.dist.timeout_s);
        tracing::info!(
            rank = job.rank, world_size = job.world_size, local_rank = job.local_rank,
            master = %format!("{}:{}", job.master_addr, job.master_port), ?device,
            "joining the job"
        );
        let store = Arc::new(join_store(job, timeout)?);
        let backend = match cfg.dist.backend {
            Backend::Auto if device.is_cuda() => Backend::Nccl,
            Backend::Auto => Backend::Cpu,
            b => b,
        };
        let group: Arc<dyn Collective> =
            match (backend, device) {
                (Backend::Nccl, Device::Cuda(i)) => Arc::new(NcclGroup::new(
                    store.clone(),
                    job.rank,
                    job.world_size,
                    i,
                    timeout,
                )?),
                (Backend::Nccl, _) => return Err(Error::Config(
                    "dist.backend = `nccl` needs a CUDA device (model.device); use `cpu` or `auto`"
                        .into(),
                )),
                _ => Arc::new(RingGroup::connect(
                    &store,
                    job.rank,
                    job.world_size,
                    &job.master_addr,
                    timeout,
                )?),
            };
        Ok(RunContext {
            group,
            rank: job.rank,
            local_rank: job.local_rank,
            world_size: job.world_size,
            device,
            is_writer: job.rank == 0,
            stop: StopFlag::default(),
            store: Some(store),
        })
    }

    /// Runs `prepare` (a model download, a cache) on local rank 0 first and on the other ranks
    /// after a barrier, so that ranks never fetch the same files at once. A failure on local rank
    /// 0 still reaches the barrier, so the others do not hang.
    pub fn local_rank_zero_first<T>(&self, prepare: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.world_size == 1 {
            return prepare();
        }
        if self.local_rank == 0 {
            let out = prepare();
            self.group.barrier()?;
            out
        } else {
            self.group.barrier()?;
            prepare()
        }
    }

    /// Waits for every rank (the end of a job: rank 0 may serve the store the others still use).
    pub fn finish(&self) -> Result<()> {
        self.group.barrier()
    }

    /// The same context with a stop flag that SIGINT and SIGTERM raise.
    pub fn with_signal_handling(mut self) -> Result<RunContext> {
        self.stop = StopFlag::on_signals()?;
        Ok(self)
    }

    pub fn is_rank_zero(&self) -> bool {
        self.rank == 0
    }
}

/// This rank's connection to the job's TCPStore, or its server on rank 0. A client checks that
/// the master address resolves first (c10d retries a name that does not resolve until the
/// timeout) and says who serves the store when it cannot be reached.
fn join_store(job: &JobEnv, timeout: std::time::Duration) -> Result<Store> {
    let (addr, port) = (&job.master_addr, job.master_port);
    let fail = |msg: String| Error::Collective {
        rank: job.rank,
        msg,
    };
    if !job.serves_store() {
        use std::net::ToSocketAddrs;
        if let Err(e) = (addr.as_str(), port).to_socket_addrs() {
            return Err(fail(format!(
                "MASTER_ADDR `{addr}` does not resolve ({e}): set it to the host of rank 0 (or the launcher's node)"
            )));
        }
    }
    Store::connect(
        addr,
        port,
        job.serves_store(),
        job.world_size,
        timeout,
        &format!("umtune/{}", job.run_id),
        job.rank,
    )
    .map_err(|e| {
        if job.serves_store() {
            return e;
        }
        let who = if job.agent_store {
            "the launcher (its agent store)"
        } else {
            "rank 0"
        };
        let why = match &e {
            Error::Collective { msg, .. } => msg.lines().next().unwrap_or_default().to_string(),
            other => other.to_string(),
        };
        fail(format!(
            "{who} did not answer at {addr}:{port} within {} s (dist.timeout_s): is it running, and are MASTER_ADDR/MASTER_PORT its address? ({why})",
            timeout.as_secs()
        ))
    })
}

/// libtorch's intra-op threads (`run.threads`, 0 keeps its default): the one place a process is
/// set up from its config. (The seed is set where the model is built, `TaskModel::build_from`.)
pub fn setup_process(cfg: &Config) {
    if cfg.run.threads > 0 {
        tch::set_num_threads(cfg.run.threads as i32);
    }
}

/// A request to stop, left by a signal handler (SIGINT, SIGTERM) or by a caller: the number of
/// the signal, 0 while none came. The trainer looks at it once per optimizer step.
#[derive(Clone, Default)]
pub struct StopFlag(Arc<AtomicUsize>);

impl StopFlag {
    /// A flag that SIGINT, SIGTERM and SIGUSR1 (SLURM's warning before a time limit) set (the
    /// handlers only store the signal number).
    pub fn on_signals() -> Result<StopFlag> {
        let flag = StopFlag::default();
        let seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for sig in [
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGUSR1,
        ] {
            let install = |e: std::io::Error| {
                Error::Internal(format!("installing the handler of signal {sig}: {e}"))
            };
            // Handlers run in the order registered: a second signal, after the first set
            // `seen`, ends the process at once (signal-hook's documented double-Ctrl-C pattern).
            signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, seen.clone())
                .map_err(install)?;
            signal_hook::flag::register(sig, seen.clone()).map_err(install)?;
            signal_hook::flag::register_usize(sig, flag.0.clone(), sig as usize)
                .map_err(install)?;
        }
        Ok(flag)
    }

    /// Asks to stop as if `signal` had arrived.
    pub fn raise(&self, signal: i32) {
        self.0.store(signal as usize, Ordering::SeqCst);
    }

    /// The signal that asked to stop, if one did.
    pub fn requested(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }
}

/// The conventional name of a stop signal.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        signal_hook::consts::SIGINT => "SIGINT",
        signal_hook::consts::SIGTERM => "SIGTERM",
        signal_hook::consts::SIGUSR1 => "SIGUSR1",
        _ => "a signal",
    }
}
