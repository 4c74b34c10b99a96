//! The launcher contract, read in one place: who started this process and where it sits in the
//! job. torchrun and `umtune-launch` set RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
//! GROUP_RANK, MASTER_ADDR, MASTER_PORT (and torchrun TORCHELASTIC_*); `srun` sets SLURM_PROCID,
//! SLURM_LOCALID, SLURM_STEP_NUM_TASKS, SLURM_NODEID and the node list, from which the first host
//! is the master (through `scontrol show hostnames`, SLURM's own hostlist expansion) on a port
//! derived from the job id unless MASTER_PORT is set. Neither: one process, no sockets.
use crate::error::{Error, Result};

/// Who launched the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// Started directly: world size 1.
    None,
    /// torchrun or umtune-launch (the torchrun variables).
    Torchrun,
    /// srun.
    Slurm,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnv {
    pub launcher: Launcher,
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent already serves the TCPStore (TORCHELASTIC_USE_AGENT_STORE=True): every
    /// rank is a client. Otherwise rank 0 serves it (Python's rule).
    pub agent_store: bool,
    /// Distinguishes restarts of one job in the store's keys.
    pub run_id: String,
}

/// The port srun jobs use when MASTER_PORT is not set: the job id folded into 20000..40000, so
/// two jobs on one node rarely collide.
pub fn slurm_port(job_id: u64) -> u16 {
    20000 + (job_id % 20000) as u16
}

impl JobEnv {
    /// The process's place in the job, from the real environment.
    pub fn from_process() -> Result<JobEnv> {
        JobEnv::from_vars(&|k| std::env::var(k).ok(), &slurm_hostnames)
    }

    /// One process, no sockets.
    pub fn single() -> JobEnv {
        JobEnv {
            launcher: Launcher::None,
            rank: 0,
            local_rank: 0,
            world_size: 1,
            local_world_size: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            agent_store: false,
            run_id: String::new(),
        }
    }

    /// The place in the job from `var` (the environment), `hostnames` expanding a SLURM node list.
    pub fn from_vars(
        var: &dyn Fn(&str) -> Option<String>,
        hostnames: &dyn Fn(&str) -> Result<Vec<String>>,
    ) -> Result<JobEnv> {
        let num = |k: &str| -> Result<Option<usize>> {
            var(k)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        Error::Config(format!(
                            "environment variable {k}=`{v}` is not a non-negative integer"
                        ))
                    })
                })
                .transpose()
        };
        let need = |k: &str, who: &str| -> Result<String> {
            var(k).filter(|v| !v.is_empty()).ok_or_else(|| {
                Error::Config(format!(
                    "{who} set RANK/WORLD_SIZE but not {k}: a multi-process run needs it"
                ))
            })
        };
        let port = |v: String| -> Result<u16> {
            v.trim().parse::<u16>().map_err(|_| {
                Error::Config(format!(
                    "environment variable MASTER_PORT=`{v}` is not a port"
                ))
            })
        };
        if let (Some(rank), Some(world_size)) = (num("RANK")?, num("WORLD_SIZE")?) {
            let who = "the launcher";
            let env = JobEnv {
                launcher: Launcher::Torchrun,
                rank,
                local_rank: num("LOCAL_RANK")?.unwrap_or(0),
                world_size,
                local_world_size: num("LOCAL_WORLD_SIZE")?.unwrap_or(world_size),
                node_rank: num("GROUP_RANK")?.unwrap_or(0),
                master_addr: if world_size > 1 {
                    need("MASTER_ADDR", who)?
                } else {
                    var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into())
                },
                master_port: if world_size > 1 {
                    port(need("MASTER_PORT", who)?)?
                } else {
                    var("MASTER_PORT").map(port).transpose()?.unwrap_or(0)
                },
                agent_store: var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True"),
                run_id: format!(
                    "{}.{}",
                    var("TORCHELASTIC_RUN_ID").unwrap_or_default(),
                    var("TORCHELASTIC_RESTART_COUNT").unwrap_or_default()
                ),
            };
            return env.checked();
        }
        // srun sets SLURM_STEP_NUM_TASKS; a batch script (sbatch without srun) has only the job's
        // SLURM_NTASKS and is one process.
        if let (Some(rank), Some(world_size)) = (num("SLURM_PROCID")?, num("SLURM_STEP_NUM_TASKS")?)
        {
            let job_id = var("SLURM_JOB_ID").unwrap_or_default();
            let nodelist = var("SLURM_STEP_NODELIST")
                .or_else(|| var("SLURM_JOB_NODELIST"))
                .unwrap_or_default();
            let master_addr = match var("MASTER_ADDR") {
                Some(a) => a,
                None if world_size == 1 => "127.0.0.1".into(),
                None => hostnames(&nodelist)?.into_iter().next().ok_or_else(|| {
                    Error::Config(format!(
                        "SLURM_STEP_NODELIST `{nodelist}` names no host to rendezvous on"
                    ))
                })?,
            };
            let master_port = match var("MASTER_PORT") {
                Some(p) => port(p)?,
                None => slurm_port(job_id.parse().unwrap_or(0)),
            };
            let env = JobEnv {
                launcher: Launcher::Slurm,
                rank,
                local_rank: num("SLURM_LOCALID")?.unwrap_or(0),
                world_size,
                local_world_size: tasks_on_this_node(var("SLURM_STEP_TASKS_PER_NODE")).unwrap_or(1),
                node_rank: num("SLURM_NODEID")?.unwrap_or(0),
                master_addr,
                master_port,
                agent_store: false,
                run_id: format!(
                    "slurm.{job_id}.{}",
                    var("SLURM_STEP_ID").unwrap_or_default()
                ),
            };
            return env.checked();
        }
        if num("SLURM_NTASKS")?.is_some_and(|n| n > 1) {
            tracing::warn!(
                "SLURM_NTASKS > 1 but this process was not started by srun: training in one process (run `srun umtune train ...` for one rank per task)"
            );
        }
        Ok(JobEnv::single())
    }

    fn checked(self) -> Result<JobEnv> {
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(Error::Config(format!(
                "rank {} is outside a world of size {} (check the launcher's RANK/WORLD_SIZE or SLURM_PROCID/SLURM_STEP_NUM_TASKS)",
                self.rank, self.world_size
            )));
        }
        Ok(self)
    }

    /// Whether this process serves the job's TCPStore.
    pub fn serves_store(&self) -> bool {
        !self.agent_store && self.rank == 0
    }
}

/// The first count of SLURM's tasks-per-node notation (`2(x3),1`): this node's tasks when the
/// layout is uniform, which is all it is used for (logging).
fn tasks_on_this_node(spec: Option<String>) -> Option<usize> {
    let spec = spec?;
    let first = spec.split(',').next()?;
    first.split('(').next()?.trim().parse().ok()
}

/// Expands a SLURM host list (`node[01-04],gpu7`) with `scontrol show hostnames`.
pub fn slurm_hostnames(list: &str) -> Result<Vec<String>> {
    let out = std::process::Command::new("scontrol")
        .args(["show", "hostnames", list])
        .output()
        .map_err(|e| {
            Error::Config(format!(
                "expanding SLURM's node list `{list}` needs `scontrol` ({e}); or set MASTER_ADDR"
            ))
        })?;
    if !out.status.success() {
        return Err(Error::Config(format!(
            "`scontrol show hostnames {list}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<JobEnv> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        JobEnv::from_vars(&|k| m.get(k).cloned(), &|list| {
            Ok(list.split(',').map(|h| h.replace("[1-2]", "1")).collect())
        })
    }

    #[test]
    fn torchrun_variables() {
        let e = env(&[
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("GROUP_RANK", "1"),
            ("MASTER_ADDR", "n0"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap();
        assert_eq!(
            (e.launcher, e.rank, e.local_rank, e.world_size, e.node_rank),
            (Launcher::Torchrun, 3, 1, 4, 1)
        );
        assert_eq!((e.master_addr.as_str(), e.master_port), ("n0", 29500));
        assert!(!e.serves_store());
    }

    #[test]
    fn slurm_variables_and_batch_script() {
        let e = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_STEP_NODELIST", "node[1-2]"),
            ("SLURM_JOB_ID", "123456"),
            ("SLURM_STEP_TASKS_PER_NODE", "1(x2)"),
        ])
        .unwrap();
        assert_eq!(
            (e.launcher, e.world_size, e.local_world_size),
            (Launcher::Slurm, 2, 1)
        );
        assert_eq!(e.master_addr, "node1");
        assert_eq!(e.master_port, slurm_port(123456));
        assert!(e.serves_store());
        // The batch script itself: the job's task count, but one process.
        let b = env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]).unwrap();
        assert_eq!(b, JobEnv::single());
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = env(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(e.to_string().contains("RANK=`x`"), "{e}");
        let e = env(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "1"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("outside a world of size 2"), "{e}");
        let e = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(e.to_string().contains("MASTER_ADDR"), "{e}");
    }
}
