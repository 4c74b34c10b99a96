//! Data parallelism over real processes and real launchers: the collective backends' shared
//! conformance suite, the c10d store against Python's, `umtune-launch` / torchrun parity with one
//! process, fail-fast on a killed worker, and a rank that never arrives.
mod common;

use common::process::*;
use common::TestResult;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};
use umtune::dist::c10d::Store;
use umtune::dist::ring::RingGroup;
use umtune::dist::{Collective, InProcessGroup, ReduceOp};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `body(group)` on `world` ranks, one thread each, connected by `backend`; the results in
/// rank order.
fn on_ranks<T: Send + 'static>(
    backend: &str,
    world: usize,
    body: impl Fn(&dyn Collective) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let body = Arc::new(body);
    let groups: Vec<Box<dyn Collective>> = match backend {
        "inprocess" => InProcessGroup::new(world)
            .into_iter()
            .map(|g| Box::new(g) as Box<dyn Collective>)
            .collect(),
        "ring" => common::ring_groups(world),
        other => panic!("unknown backend {other}"),
    };
    let handles: Vec<_> = groups
        .into_iter()
        .map(|g| {
            let body = body.clone();
            std::thread::spawn(move || body(g.as_ref()))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Rank `rank`'s deterministic test tensor of `n` elements.
fn data(rank: usize, n: i64, kind: Kind) -> Tensor {
    (Tensor::arange(n, (Kind::Double, tch::Device::Cpu)) * 0.001 + rank as f64 * 0.5 - 0.25)
        .to_kind(kind)
}

fn conformance(backend: &'static str, world: usize) {
    // All-reduce: sum and mean, zero-length, scalar, f32/bf16/f64/i64, a large uneven buffer.
    let cases: Vec<(i64, Kind)> = vec![
        (0, Kind::Float),
        (1, Kind::Float),
        (7, Kind::Float),
        (1000, Kind::BFloat16),
        (33, Kind::Double),
        (5, Kind::Int64),
        (6_000_001, Kind::Float),
    ];
    for (n, kind) in cases {
        for op in [ReduceOp::Sum, ReduceOp::Mean] {
            if kind == Kind::Int64 && op == ReduceOp::Mean {
                continue;
            }
            let out = on_ranks(backend, world, move |g| {
                let mut t = data(g.rank(), n, kind);
                g.all_reduce(&mut t, op).unwrap();
                t
            });
            let mut want = (0..world)
                .map(|r| data(r, n, kind).to_kind(Kind::Double))
                .fold(
                    Tensor::zeros([n], (Kind::Double, tch::Device::Cpu)),
                    |a, b| a + b,
                );
            if op == ReduceOp::Mean {
                want /= world as f64;
            }
            let tol = if kind == Kind::BFloat16 { 2e-2 } else { 1e-5 };
            for (r, t) in out.iter().enumerate() {
                assert_eq!(t.kind(), kind, "{backend}: rank {r} dtype changed");
                assert_eq!(t.size(), vec![n]);
                if n > 0 {
                    let d = (t.to_kind(Kind::Double) - &want)
                        .abs()
                        .max()
                        .double_value(&[]);
                    assert!(
                        d <= tol * (1.0 + n as f64 * 0.001),
                        "{backend} W={world} {kind:?} n={n} {op:?}: rank {r} off by {d}"
                    );
                }
            }
        }
    }
    // A 0-d tensor.
    let out = on_ranks(backend, world, |g| {
        let mut t = Tensor::from(g.rank() as f64 + 1.0);
        g.all_reduce(&mut t, ReduceOp::Sum).unwrap();
        t
    });
    let want = (world * (world + 1) / 2) as f64;
    assert!(out
        .iter()
        .all(|t| t.dim() == 0 && t.double_value(&[]) == want));

    // Broadcast from a root other than 0, f32 and bf16, large.
    for (n, kind) in [
        (0, Kind::Float),
        (3, Kind::BFloat16),
        (3_000_000, Kind::Float),
    ] {
        let root = world - 1;
        let out = on_ranks(backend, world, move |g| {
            let mut t = data(g.rank(), n, kind);
            g.broadcast(&mut t, root).unwrap();
            t
        });
        for t in &out {
            assert!(
                t.equal(&data(root, n, kind)),
                "{backend}: broadcast differs"
            );
        }
    }

    // All-gather with different first dimensions, one of them zero.
    let out = on_ranks(backend, world, |g| {
        let rows = (g.rank() as i64 * 2) % 5;
        let t = Tensor::arange(rows * 3, (Kind::Float, tch::Device::Cpu)).view([rows, 3])
            + 100.0 * g.rank() as f64;
        g.all_gather(&t).unwrap()
    });
    for parts in &out {
        assert_eq!(parts.len(), world);
        for (r, p) in parts.iter().enumerate() {
            let rows = (r as i64 * 2) % 5;
            let want = Tensor::arange(rows * 3, (Kind::Float, tch::Device::Cpu)).view([rows, 3])
                + 100.0 * r as f64;
            assert!(p.equal(&want), "{backend}: all-gather of rank {r} differs");
        }
    }
    // Same-shape gather and the barrier.
    let out = on_ranks(backend, world, |g| {
        g.barrier().unwrap();
        g.all_gather_same(&Tensor::from_slice(&[g.rank() as i64, 7]))
            .unwrap()
    });
    let want: Vec<i64> = (0..world as i64).flat_map(|r| [r, 7]).collect();
    for t in out {
        assert_eq!(Vec::<i64>::try_from(t.reshape([-1])).unwrap(), want);
    }
    all_to_all_conformance(backend, world);
}

/// What rank `from` sends rank `to` in the all-to-all cases: `rows(from, to)` rows of `cols`
/// values that name both ends (zero rows for some pairs, the rank itself included).
fn block(from: usize, to: usize, cols: i64, kind: Kind, big: bool) -> Tensor {
    let rows = if big {
        40_000 + 7 * from as i64
    } else {
        ((from * 3 + to * 5) % 4) as i64
    };
    (Tensor::arange(rows * cols, (Kind::Double, tch::Device::Cpu)).view([rows, cols])
        + (1000 * from + 10 * to) as f64)
        .to_kind(kind)
}

fn all_to_all_conformance(backend: &'static str, world: usize) {
    // f32 / i64 / bf16, rows varied (zero included), a block larger than the ring's inline
    // limit, receive counts unknown and known.
    for (cols, kind, big, known) in [
        (3, Kind::Float, false, false),
        (1, Kind::Int64, false, true),
        (2, Kind::BFloat16, false, false),
        (5, Kind::Float, true, true),
    ] {
        let out = on_ranks(backend, world, move |g| {
            let (r, w) = (g.rank(), g.world_size());
            let send: Vec<Tensor> = (0..w).map(|to| block(r, to, cols, kind, big)).collect();
            let rows: Vec<i64> = (0..w)
                .map(|from| block(from, r, cols, kind, big).size()[0])
                .collect();
            let before = g.traffic();
            let got = g
                .all_to_all(&send, known.then_some(rows.as_slice()))
                .unwrap();
            let moved = g
                .traffic()
                .zip(before)
                .map(|(a, b)| a.received - b.received);
            (got, moved)
        });
        for (r, (got, moved)) in out.iter().enumerate() {
            assert_eq!(got.len(), world);
            let mut incoming = 0;
            for (from, t) in got.iter().enumerate() {
                let want = block(from, r, cols, kind, big);
                assert!(
                    t.kind() == kind && t.equal(&want),
                    "{backend} W={world} {kind:?}: rank {r}'s block from {from} is {:?}, want {:?}",
                    t.size(),
                    want.size()
                );
                if from != r {
                    incoming += 16 + want.numel() * kind.elt_size_in_bytes();
                }
            }
            // The ring counts its bytes: exactly what is addressed here plus a header per peer.
            if let Some(moved) = moved {
                assert_eq!(
                    *moved, incoming as u64,
                    "{backend} W={world}: rank {r}'s traffic"
                );
            }
        }
    }
    // A mismatch names the rank: the wrong number of tensors.
    let out = on_ranks(backend, world, |g| {
        g.all_to_all(&[Tensor::zeros([1], (Kind::Float, tch::Device::Cpu))], None)
            .err()
            .map(|e| e.to_string())
    });
    for (r, e) in out.iter().enumerate() {
        let e = e.as_deref().unwrap_or("");
        assert!(
            e.contains(&format!("rank {r}")) && e.contains("one tensor"),
            "{e}"
        );
    }
}

#[test]
fn conformance_inprocess() {
    conformance("inprocess", 3);
}

#[test]
fn conformance_ring_2_and_3_ranks() {
    conformance("ring", 2);
    conformance("ring", 3);
}

/// A 2-rank ring formed through a store under `prefix` while `visit` connects to rank 0's ring
/// port first (rank 1 arrives 300 ms late); the ring's all-reduce works. Returns how long the
/// ring took to form and whatever `visit` keeps open meanwhile.
fn ring_with_a_visitor<T>(
    prefix: &'static str,
    visit: impl FnOnce(&str) -> std::io::Result<T>,
) -> Result<(Duration, T), Box<dyn std::error::Error>> {
    let server = Store::connect("127.0.0.1", 0, true, 2, TIMEOUT, prefix, 0)?;
    let port = server.port();
    let start = Instant::now();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            std::thread::spawn(move || {
                let store =
                    Store::connect("127.0.0.1", port, false, 2, TIMEOUT, prefix, rank).unwrap();
                if rank == 1 {
                    // Let the visitor knock first.
                    std::thread::sleep(Duration::from_millis(300));
                }
                let g = RingGroup::connect(&store, rank, 2, "127.0.0.1", TIMEOUT).unwrap();
                let mut t = Tensor::from_slice(&[1.0f32]);
                g.all_reduce(&mut t, ReduceOp::Sum).unwrap();
                t.double_value(&[0])
            })
        })
        .collect();
    let addr = String::from_utf8(server.get("ring/addr/0")?)?;
    let kept = visit(&addr)?;
    for r in ranks {
        assert_eq!(r.join().unwrap(), 2.0);
    }
    Ok((start.elapsed(), kept))
}

#[test]
fn a_stranger_is_refused_by_the_ring() -> TestResult {
    // A connection without the job's nonce is dropped, and the real ring still forms.
    ring_with_a_visitor("stranger", |addr| {
        use std::io::Write;
        let mut intruder = std::net::TcpStream::connect(addr)?;
        intruder.write_all(b"UMTR0000000000000000\x01\x00\x00\x00")?;
        Ok(intruder)
    })?;
    Ok(())
}

#[test]
fn python_tcpstore_reads_what_umtune_wrote() -> TestResult {
    let server = Store::connect("127.0.0.1", 0, true, 2, TIMEOUT, "umtune", 0)?;
    // It serves on the interface its host names (loopback), not on every interface.
    let listening = std::fs::read_to_string("/proc/net/tcp")?;
    let loopback = format!("0100007F:{:04X}", server.port());
    assert!(
        listening
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&loopback)),
        "no listener at 127.0.0.1:{}:\n{listening}",
        server.port()
    );
    server.set("from-rust", b"hello from a umtune rank")?;
    let script = format!(
        "import datetime, torch.distributed as d\n\
         s = d.PrefixStore('umtune', d.TCPStore('127.0.0.1', {}, is_master=False, timeout=datetime.timedelta(seconds=30)))\n\
         print(s.get('from-rust').decode())\n\
         s.set('from-python', 'hello from torch.distributed')\n",
        server.port()
    );
    let out = Command::new(python()).args(["-c", &script]).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello from a umtune rank"
    );
    assert_eq!(server.get("from-python")?, b"hello from torch.distributed");
    Ok(())
}

#[test]
fn launcher_two_and_three_ranks_match_one_process() -> TestResult {
    let out = common::fresh_dir("dp");
    for world in [2usize, 3] {
        let one = Command::new(umtune_bin())
            .args(parity_args(
                &out,
                &format!("w1-b{}", 4 * world),
                4 * world,
                20,
                &[],
            ))
            .output()?;
        check(&one, "one process");
        let many = Command::new(launcher_bin())
            .args(["--nproc-per-node", &world.to_string(), "--"])
            .arg(umtune_bin())
            .args(parity_args(&out, &format!("w{world}-b4"), 4, 20, &[]))
            .output()?;
        check(&many, "umtune-launch");
        let stdout = String::from_utf8_lossy(&many.stdout);
        assert!(
            stdout.contains("[rank 0] | w"),
            "rank-prefixed results table:\n{stdout}"
        );
        let stderr = String::from_utf8_lossy(&many.stderr);
        assert!(
            stderr.contains(&format!("rank{{rank={}}}", world - 1)),
            "log lines carry the rank"
        );
        assert_same_run(
            &out.join(format!("w1-b{}", 4 * world)),
            &out.join(format!("w{world}-b4")),
            PARITY_TOL,
        );
        // Host reads per plain step with UM and the memory (what a GPU would sync on): 2 in one
        // process (the loss, signal and norms; the write's drop counts), 4 on several ranks (the
        // write's row counts, and the read's row counts of the query gather).
        for (run, reads) in [
            (format!("w1-b{}", 4 * world), 2),
            (format!("w{world}-b4"), 4),
        ] {
            let lines = common::training_lines(&out.join(&run))?;
            assert!(!lines.is_empty(), "{run}: no training lines");
            for l in lines {
                assert_eq!(l["host_reads_unlogged_max"], reads, "{run}: {l}");
            }
        }
        // Only rank 0 wrote a run directory.
        let dirs = std::fs::read_dir(&out)?.count();
        assert_eq!(dirs, 2 * if world == 2 { 1 } else { 2 });
    }
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

/// At equal weights and memory — a one-process checkpoint of step 3: 36 entries, so reads with
/// k = 16 select; `W_o` trained, so the read carries gradient — one optimizer step's synchronized
/// gradients on 2 and 3 ranks equal one process's at the same global batch (12) within float
/// summation order, for every trainable tensor: LoRA, UM's estimators and head, the memory's
/// projections and gate, the classifier. AdamW as users run it (lr 0.01, eps 1e-8).
#[test]
fn step_gradients_on_two_and_three_ranks_match_one_process() -> TestResult {
    let out = common::fresh_dir("grads");
    let sets = ["checkpoint.every=3", "checkpoint.keep=5"];
    check(
        &Command::new(umtune_bin())
            .args(train_args(&out, "base", 12, 4, &sets))
            .output()?,
        "one process",
    );
    let resumed = |world: usize| -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
        let name = format!("w{world}");
        copy_dir(&out.join("base"), &out.join(&name))?;
        let grads = out.join(format!("grads-{name}"));
        let mut args = train_args(&out, &name, 12 / world, 4, &sets);
        args.push("--resume".into());
        args.push(
            out.join(&name)
                .join("checkpoints/step_000003")
                .display()
                .to_string(),
        );
        let mut cmd = Command::new(launcher_bin());
        cmd.args(["--nproc-per-node", &world.to_string(), "--"])
            .arg(umtune_bin());
        let run = cmd
            .args(args)
            .env("UMTUNE_TEST_DUMP_GRADIENTS", &grads)
            .output()?;
        check(&run, &name);
        Ok(grads)
    };
    let one = resumed(1)?;
    for world in [2, 3] {
        assert_same_gradients(&one, &resumed(world)?, 4);
    }
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

/// NER reads the memory once per token (B x T queries through the two-stage read): 2 ranks at
/// batch 4 train the same weights and memory as one process at batch 8.
#[test]
fn ner_with_the_memory_on_two_ranks_matches_one_process() -> TestResult {
    let out = common::fresh_dir("ner-dp");
    let ner = [
        "data.dataset=conll2003",
        "data.task=ner",
        "memory.enabled=true",
    ];
    let one = Command::new(umtune_bin())
        .args(parity_args(&out, "w1-b8", 8, 8, &ner))
        .output()?;
    check(&one, "one process");
    let two = Command::new(launcher_bin())
        .args(["--nproc-per-node", "2", "--"])
        .arg(umtune_bin())
        .args(parity_args(&out, "w2-b4", 4, 8, &ner))
        .output()?;
    check(&two, "umtune-launch");
    assert_same_run(&out.join("w1-b8"), &out.join("w2-b4"), PARITY_TOL);
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn torchrun_two_ranks_match_one_process() -> TestResult {
    let mut torchrun = Command::new(venv_bin("torchrun"));
    torchrun.args(["--standalone", "--no-python", "--nproc-per-node", "2"]);
    two_ranks_match_one_process("torchrun", torchrun)
}

/// A 2-rank umtune-launch job that trains until stopped (stderr piped), its workers tagged with
/// `UMTUNE_TEST_TAG=tag`.
fn long_job(out: &Path, name: &str, tag: &str) -> std::io::Result<std::process::Child> {
    Command::new(launcher_bin())
        .args(["--nproc-per-node", "2", "--grace-s", "3", "--"])
        .arg(umtune_bin())
        .args(train_args(out, name, 4, 100000, &["data.train_limit=400"]))
        .env("UMTUNE_TEST_TAG", tag)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
}

/// umtune processes carrying `UMTUNE_TEST_TAG=tag` in their environment (other tests' workers
/// run at the same time).
fn umtune_processes(tag: &str) -> Vec<u32> {
    let me = umtune_bin().canonicalize().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == me)
                && env_of(*pid, "UMTUNE_TEST_TAG").as_deref() == Some(tag)
        })
        .collect()
}

fn env_of(pid: u32, key: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{key}=");
    env.split(|&b| b == 0).find_map(|kv| {
        kv.strip_prefix(prefix.as_bytes())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

#[test]
fn a_killed_worker_stops_the_job_naming_its_rank() -> TestResult {
    let out = common::fresh_dir("kill");
    let tag = format!("kill-{}", std::process::id());
    let mut launch = long_job(&out, "killed", &tag)?;
    let launcher = launch.id();
    // Wait for both workers to be training (a metrics file exists), then kill rank 1.
    let start = Instant::now();
    let victim = loop {
        let workers: Vec<u32> = umtune_processes(&tag)
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .is_ok_and(|s| s.split_whitespace().nth(3) == Some(&launcher.to_string()))
            })
            .collect();
        if out.join("killed/metrics.jsonl").exists() && workers.len() == 2 {
            break workers
                .into_iter()
                .find(|&p| env_of(p, "RANK").as_deref() == Some("1"))
                .expect("a rank 1 worker");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "workers never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()?;
    let killed_at = Instant::now();
    let status = launch.wait()?;
    let took = killed_at.elapsed();
    let mut stderr = String::new();
    use std::io::Read;
    launch.stderr.take().unwrap().read_to_string(&mut stderr)?;
    assert!(!status.success());
    assert!(
        took < Duration::from_secs(10),
        "the launcher took {took:?} to give up"
    );
    assert!(
        stderr.contains("rank 1 failed with signal 9 (SIGKILL)"),
        "the launcher names the rank and the signal:\n{stderr}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let left = umtune_processes(&tag);
    assert!(left.is_empty(), "umtune workers left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn a_rank_that_never_arrives_fails_the_others_within_the_timeout() -> TestResult {
    let out = common::fresh_dir("absent");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let start = Instant::now();
    let run = Command::new(umtune_bin())
        .args(train_args(&out, "absent", 4, 5, &["dist.timeout_s=3"]))
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .output()?;
    let took = start.elapsed();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("rank 1 did not join the job within 3 s"),
        "names the missing rank:\n{stderr}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

/// A signal that reaches one rank before another (the launcher forwards it worker by worker) still
/// stops every rank with the same signal, hence the same step and exit status (CI once saw rank 1
/// stop on SIGTERM with status 143 and rank 0 on "a signal" with 128).
#[test]
fn ranks_agree_on_the_stop_signal_when_it_reaches_them_at_different_times() {
    use umtune::train::trainer::{step_consensus, Consensus};
    for (seen, agreed) in [
        ([0, 0, 0], 0),
        ([0, 15, 0], 15),
        ([0, 15, 10], 15),
        ([2, 15, 0], 2),
    ] {
        // With the step's losses (1, 2, 4 on ranks 0-2: mean 7/3, as one all-reduce's mean).
        let got = on_ranks("ring", 3, move |g| {
            let loss = tch::Tensor::from(f64::from(1u32 << g.rank()));
            let t = step_consensus(g, &loss, seen[g.rank()]).expect("agreeing");
            let c = Consensus::of(&umtune::host::f64s(&t).expect("read"));
            (c.signal, c.loss)
        });
        assert_eq!(got, vec![(agreed, 7.0 / 3.0); 3], "signals seen {seen:?}");
    }
}

#[test]
fn sigterm_to_the_launcher_reaches_every_rank_and_the_run_is_saved() -> TestResult {
    let out = common::fresh_dir("sigterm");
    let mut launch = long_job(&out, "stopped", "sigterm")?;
    let start = Instant::now();
    while !out.join("stopped/metrics.jsonl").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    Command::new("kill")
        .args(["-TERM", &launch.id().to_string()])
        .status()?;
    let status = launch.wait()?;
    let mut stderr = String::new();
    use std::io::Read;
    launch.stderr.take().unwrap().read_to_string(&mut stderr)?;
    assert!(!status.success());
    assert!(stderr.contains("forwarding SIGTERM"), "{stderr}");
    // Both ranks stopped at the same step (the stop is agreed), rank 0 saved and recorded it.
    assert!(stderr.contains("failed with exit status 143"), "{stderr}");
    assert_eq!(
        status.code(),
        Some(143),
        "the launcher exits with the workers' status (128 + SIGTERM)"
    );
    assert!(
        !stderr.contains("by a signal"),
        "every rank names SIGTERM:\n{stderr}"
    );
    let record = common::read_json(out.join("stopped/run.json"))?;
    assert_eq!(record["state"], "interrupted");
    assert!(record["weights_step"].as_u64().unwrap() >= 1);
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn two_launchers_as_two_nodes_match_one_process() -> TestResult {
    // umtune-launch's multi-node path on loopback: node 0 serves the store on a fixed port, node 1
    // only spawns its worker, which joins node 0's store.
    let out = common::fresh_dir("nodes");
    let one = Command::new(umtune_bin())
        .args(parity_args(&out, "w1", 8, 20, &[]))
        .output()?;
    check(&one, "one process");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let node = |rank: usize| {
        Command::new(launcher_bin())
            .args([
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
            ])
            .args([
                "--master-port",
                &port.to_string(),
                "--node-rank",
                &rank.to_string(),
            ])
            .arg("--")
            .arg(umtune_bin())
            .args(parity_args(&out, "nodes", 4, 20, &[]))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
    };
    let (first, second) = (node(0)?, node(1)?);
    let (first, second) = (first.wait_with_output()?, second.wait_with_output()?);
    check(&first, "node 0");
    check(&second, "node 1");
    assert!(String::from_utf8_lossy(&second.stderr).contains("[rank 1]"));
    assert_same_run(&out.join("w1"), &out.join("nodes"), PARITY_TOL);
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn memory_build_on_two_ranks_writes_shards_equal_to_one_process() -> TestResult {
    let out = common::fresh_dir("membuild");
    std::fs::create_dir_all(&out)?;
    // The tiny model's config, its `--set`s (the train ones, without the run's own).
    let args = train_args(&out, "unused", 4, 1, &["memory.capacity=64"]);
    let config = &args[1];
    let sets: Vec<&String> = args[2..]
        .chunks(2)
        .filter(|kv| !kv[1].starts_with("run."))
        .flatten()
        .collect();
    let build = |out_name: &str| {
        let mut a = vec![
            "memory".to_string(),
            "build".into(),
            config.clone(),
            "--out".into(),
            out.join(out_name).display().to_string(),
        ];
        a.extend(sets.iter().map(|s| s.to_string()));
        a
    };
    let one = Command::new(umtune_bin()).args(build("one")).output()?;
    check(&one, "memory build, one process");
    let two = Command::new(launcher_bin())
        .args(["--nproc-per-node", "2", "--"])
        .arg(umtune_bin())
        .args(build("two"))
        .output()?;
    check(&two, "memory build, two ranks");
    // One report line (rank 0), 96 entries of which the ring keeps the last 64.
    let stdout = String::from_utf8_lossy(&two.stdout);
    assert_eq!(stdout.matches("\"entries\":64").count(), 1, "{stdout}");
    let index = umtune::memory::files::read_index(&out.join("two.index.json"))?;
    assert_eq!((index.world_size, index.written), (2, 96));
    let (a, b) = (
        whole_ring(&out.join("one.index.json")),
        whole_ring(&out.join("two.index.json")),
    );
    for (name, t) in &a {
        let d = relative_diff(t, &b[name]);
        assert!(d < 1e-5, "{name}: max |diff| / scale {d:e}");
    }
    assert!(
        a["memory/ids"].equal(&b["memory/ids"]),
        "same entries in the same slots"
    );
    // A run trained from the two-rank memory in one process starts from the same entries.
    let start = Command::new(umtune_bin())
        .args(train_args(
            &out,
            "from-two",
            4,
            1,
            &[
                "memory.capacity=64",
                &format!("memory.prebuilt={}", out.join("two").display()),
            ],
        ))
        .output()?;
    check(&start, "training from the two-rank memory");
    // Rebuilt from that run on two ranks (its W_k; shards in the run, digest in run.json), the
    // memory is what one process's `eval` then reads.
    let run = out.join("from-two");
    let rebuilt = Command::new(launcher_bin())
        .args(["--nproc-per-node", "2", "--"])
        .arg(umtune_bin())
        .args(["memory", "build"])
        .arg(&run)
        .output()?;
    check(&rebuilt, "memory build of a run, two ranks");
    let index = umtune::memory::files::read_index(&run.join("memory.index.json"))?;
    assert_eq!(index.world_size, 2);
    let eval = Command::new(umtune_bin()).arg("eval").arg(&run).output()?;
    check(&eval, "eval of the rebuilt run");
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn a_checkpoint_resumes_on_another_world_size() -> TestResult {
    let out = common::fresh_dir("reshard");
    // 16 steps of 2 micro-batches; checkpoints every 5 steps; the global batch is 8.
    let sets = ["train.grad_accum=2", "checkpoint.every=5"];
    let args = |name: &str, batch: usize| parity_args(&out, name, batch, 16, &sets);
    let resume = |name: &str, batch: usize| {
        let mut a = args(name, batch);
        a.extend(["--resume".into(), "auto".into()]);
        a
    };
    let two = |a: Vec<String>| {
        let mut c = Command::new(launcher_bin());
        c.args(["--nproc-per-node", "2", "--"])
            .arg(umtune_bin())
            .args(a);
        c
    };
    check(
        &Command::new(umtune_bin()).args(args("whole", 8)).output()?,
        "one process",
    );
    // 2 ranks -> 1: aborted mid-accumulation of step 7, resumed by one process (which keeps the
    // checkpoint's global batch of 8 whatever train.batch_size says).
    let died = two(args("two-one", 4))
        .env("UMTUNE_TEST_ABORT_AT", "7:1")
        .output()?;
    assert!(!died.status.success());
    let index = umtune::memory::files::read_index(
        &out.join("two-one/checkpoints/step_000005/memory.index.json"),
    )?;
    assert_eq!(index.world_size, 2, "one memory shard per rank");
    check(
        &Command::new(umtune_bin())
            .args(resume("two-one", 4))
            .output()?,
        "resumed by one process",
    );
    assert_same_run(&out.join("whole"), &out.join("two-one"), PARITY_TOL);
    // 1 -> 2 ranks.
    let died = Command::new(umtune_bin())
        .args(args("one-two", 8))
        .env("UMTUNE_TEST_ABORT_AT", "7:1")
        .output()?;
    assert!(!died.status.success());
    check(&two(resume("one-two", 8)).output()?, "resumed by two ranks");
    assert_same_run(&out.join("whole"), &out.join("one-two"), PARITY_TOL);
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

#[test]
fn a_silent_connection_does_not_stall_the_ring_rendezvous() -> TestResult {
    // A client that connects to rank 0's ring port and never speaks (a port scanner, a stuck
    // health check) used to hold rank 0's handshake for the whole timeout.
    let (took, _silent) = ring_with_a_visitor("silent", |addr| std::net::TcpStream::connect(addr))?;
    assert!(
        took < Duration::from_secs(4),
        "the ring formed after {took:?} (a silent client stalled it)"
    );
    Ok(())
}

#[test]
fn store_failures_say_who_and_why_in_a_line() -> TestResult {
    let out = common::fresh_dir("storefail");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let rank1 = |addr: &str, timeout: &str| {
        Command::new(umtune_bin())
            .args(train_args(&out, "lonely", 4, 5, &[timeout]))
            .env("RANK", "1")
            .env("WORLD_SIZE", "2")
            .env("LOCAL_RANK", "1")
            .env("MASTER_ADDR", addr)
            .env("MASTER_PORT", port.to_string())
            .output()
    };
    // No rank 0: the error names it and the address, without libtorch's C++ backtraces.
    let run = rank1("127.0.0.1", "dist.timeout_s=3")?;
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains(&format!(
            "rank 0 did not answer at 127.0.0.1:{port} within 3 s"
        )),
        "{stderr}"
    );
    assert!(
        !stderr.contains("frame #") && stderr.lines().count() < 12,
        "a short error, no C++ backtrace:\n{stderr}"
    );
    // A name that does not resolve fails at once, not after the timeout.
    let start = Instant::now();
    let run = rank1("no.such.host.invalid", "dist.timeout_s=60")?;
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("MASTER_ADDR `no.such.host.invalid` does not resolve"),
        "{stderr}"
    );
    assert!(start.elapsed() < Duration::from_secs(30), "{stderr}");
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

/// `umtune-launch --nproc-per-node 2 [flags] -- sh -c script`, its output.
fn launch_sh(flags: &[&str], script: &str) -> std::io::Result<std::process::Output> {
    Command::new(launcher_bin())
        .args(["--nproc-per-node", "2"])
        .args(flags)
        .args(["--", "sh", "-c", script])
        .env_remove("OMP_NUM_THREADS")
        .output()
}

#[test]
fn the_launcher_shares_the_cores_and_keeps_the_workers_exit_status() -> TestResult {
    // OMP_NUM_THREADS: the node's cores over the workers, unless set.
    let cores = std::thread::available_parallelism()?.get();
    let run = launch_sh(&[], "echo threads=$OMP_NUM_THREADS")?;
    let stdout = String::from_utf8_lossy(&run.stdout);
    let want = format!("threads={}", (cores / 2).max(1));
    assert_eq!(stdout.matches(&want).count(), 2, "{stdout}");
    let run = Command::new(launcher_bin())
        .args(["--nproc-per-node", "2", "--", "sh", "-c"])
        .arg("echo threads=$OMP_NUM_THREADS")
        .env("OMP_NUM_THREADS", "3")
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&run.stdout)
            .matches("threads=3")
            .count(),
        2
    );
    // A configuration error (2) stays 2; a worker killed by a signal is 128 + it.
    let run = launch_sh(&[], "exit 2")?;
    assert_eq!(run.status.code(), Some(2));
    let run = launch_sh(&[], "[ $RANK = 1 ] && kill -9 $$; sleep 20")?;
    assert_eq!(run.status.code(), Some(137));
    // A worker that exits 0 while the other still runs ends the job after --exit-grace-s.
    let start = Instant::now();
    let run = launch_sh(
        &["--exit-grace-s", "1", "--grace-s", "1"],
        "[ $RANK = 1 ] && exit 0; sleep 30",
    )?;
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("rank 1 exited successfully 1 s before rank(s) 0"),
        "{stderr}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    Ok(())
}
