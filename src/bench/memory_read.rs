//! `umtune bench-memory-read`: one rank of a job (torchrun, umtune-launch) times the sharded
//! memory's read — the two-stage one and the all-gathering one it replaced — on the same shards
//! and queries, with the bytes the CPU ring counted for each.
use super::median;
use crate::config::{Config, MemoryConfig};
use crate::dist::RunContext;
use crate::error::{Error, Result};
use crate::memory::ShardedKvMemory;
use serde_json::{json, Value};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// `umtune bench-memory-read`'s arguments.
#[derive(clap::Args, Debug)]
pub struct MemoryReadArgs {
    /// Entries in the memory, all ranks together.
    #[arg(long, default_value_t = 16384)]
    pub capacity: usize,
    #[arg(long, default_value_t = 128)]
    pub d_key: i64,
    #[arg(long, default_value_t = 576)]
    pub d_value: i64,
    /// Queries per rank.
    #[arg(long, default_value_t = 64)]
    pub queries: i64,
    #[arg(long, default_value_t = 16)]
    pub k: usize,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
}

pub fn memory_read(args: &MemoryReadArgs) -> Result<Value> {
    let job = crate::dist::env::JobEnv::from_process()?;
    let mut cfg = Config::default();
    cfg.model.device = crate::config::DeviceSpec::Cpu;
    cfg.run.threads = 1;
    let ctx = RunContext::for_job(&cfg, &job)?;
    let group = ctx.group.as_ref();
    let (rank, w) = (group.rank(), group.world_size());
    let mem_cfg = MemoryConfig {
        capacity: args.capacity,
        key_size: args.d_key,
        ..Default::default()
    };
    let mut memory = ShardedKvMemory::new(&mem_cfg, args.d_value, rank, w, Device::Cpu);
    // Every rank writes its share of a full ring of random unit keys (seeded by rank).
    tch::manual_seed(rank as i64);
    let unit = |n: i64, d: i64| {
        let t = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
        &t / t.norm_scalaropt_dim(2, [1], true)
    };
    let n = (args.capacity / w) as i64;
    let ids = Tensor::arange(n, (Kind::Int64, Device::Cpu)) + n * rank as i64;
    memory.write(
        group,
        &unit(n, args.d_key),
        &Tensor::randn([n, args.d_value], (Kind::Float, Device::Cpu)),
        &ids,
    )?;
    let queries = unit(args.queries, args.d_key);
    let query_ids = ids.narrow(0, 0, args.queries.min(n));
    let query_ids = if query_ids.size()[0] < args.queries {
        Tensor::arange(args.queries, (Kind::Int64, Device::Cpu))
    } else {
        query_ids
    };
    let _guard = tch::no_grad_guard();
    let time = |gathering: bool| -> Result<(f64, u64)> {
        let read = |m: &ShardedKvMemory| {
            if gathering {
                m.read_gathering(group, &queries, &query_ids, args.k)
            } else {
                m.read(group, &queries, &query_ids, args.k)
            }
        };
        // The warm-up read's bytes (the timed ones have barriers between them).
        let before = group.traffic().unwrap_or_default();
        read(&memory)?;
        let per_read = group.traffic().unwrap_or_default().received - before.received;
        let mut times = Vec::new();
        for _ in 0..args.iters.max(1) {
            group.barrier()?;
            let start = Instant::now();
            read(&memory)?;
            times.push(start.elapsed().as_secs_f64());
        }
        Ok((median(times), per_read))
    };
    let (two_stage, two_stage_bytes) = time(false)?;
    let (gathering, gathering_bytes) = time(true)?;
    // Every rank's figures, so that the slowest rank's read is reported.
    let mine = Tensor::from_slice(&[two_stage, gathering]);
    let all = crate::host::f64s(&group.all_gather_same(&mine)?)
        .map_err(|e| Error::Internal(e.to_string()))?;
    let slowest = |i: usize| all.iter().skip(i).step_by(2).copied().fold(0.0, f64::max);
    let out = json!({
        "rank": rank, "world_size": w, "capacity": args.capacity, "d_key": args.d_key,
        "d_value": args.d_value, "queries_per_rank": args.queries, "k": args.k,
        "two_stage_secs": slowest(0), "gathering_secs": slowest(1),
        "two_stage_bytes_rank0": two_stage_bytes, "gathering_bytes_rank0": gathering_bytes,
    });
    ctx.finish()?;
    Ok(out)
}
