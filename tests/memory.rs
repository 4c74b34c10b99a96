//! The external memory: FIFO ring writes, exact top-k with self-exclusion against a brute-force
//! reference, and sharded reads over simulated ranks (threads of an in-process group) that return
//! exactly the unsharded result — scores, values, ids and order — with ties and with shards
//! holding fewer than k entries.
use tch::{Device, Kind, Tensor};
use umtune::dist::{Collective, InProcessGroup, SingleProcess};
use umtune::memory::files::{save, Commit, Contents};
use umtune::memory::{Retrieved, ShardedKvMemory};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// One retrieved entry: (score, ring slot, example id, value).
type Hit = (f32, i64, i64, Vec<f32>);

const D_K: i64 = 4;
const D_V: i64 = 3;

/// Rank `rank`'s shard of a memory of `capacity` entries (D_K keys, D_V values) over `world` ranks.
fn memory_shard(capacity: usize, tau: f64, rank: usize, world: usize) -> ShardedKvMemory {
    let cfg = umtune::config::MemoryConfig {
        capacity,
        key_size: D_K,
        tau,
        ..Default::default()
    };
    ShardedKvMemory::new(&cfg, D_V, rank, world, Device::Cpu)
}

/// Entry `i`: a key from a small lattice (so that scores tie), a value that identifies it, and
/// example id `i / 2` (two entries per example).
fn entry(i: usize) -> (Vec<f32>, Vec<f32>, i64) {
    let key: Vec<f32> = (0..D_K as usize)
        .map(|j| ((i * 7 + j * 3) % 4) as f32 - 1.5)
        .collect();
    let value: Vec<f32> = (0..D_V as usize).map(|j| (i * 10 + j) as f32).collect();
    (key, value, (i / 2) as i64)
}

fn tensors(range: std::ops::Range<usize>) -> (Tensor, Tensor, Tensor) {
    let n = range.len() as i64;
    let (mut k, mut v, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for i in range {
        let (a, b, c) = entry(i);
        k.extend(a);
        v.extend(b);
        ids.push(c);
    }
    (
        Tensor::from_slice(&k).view([n, D_K]),
        Tensor::from_slice(&v).view([n, D_V]),
        Tensor::from_slice(&ids),
    )
}

fn queries(n: usize, seed: usize) -> (Tensor, Tensor) {
    let q: Vec<f32> = (0..n * D_K as usize)
        .map(|j| (((j + seed) * 5) % 7) as f32 - 3.0)
        .collect();
    let ids: Vec<i64> = (0..n).map(|j| ((j + seed) % 5) as i64).collect();
    (
        Tensor::from_slice(&q).view([n as i64, D_K]),
        Tensor::from_slice(&ids),
    )
}

/// Brute force over the ring's surviving entries: (score, slot, id, value) sorted by score
/// (high first) then slot, own example excluded, first k.
fn brute_force(
    written: usize,
    capacity: usize,
    tau: f64,
    q: &[f32],
    qid: i64,
    k: usize,
) -> Vec<Hit> {
    let mut slots: Vec<Option<usize>> = vec![None; capacity];
    for i in 0..written {
        slots[i % capacity] = Some(i);
    }
    let mut found: Vec<Hit> = slots
        .iter()
        .enumerate()
        .filter_map(|(slot, e)| e.map(|i| (slot, entry(i))))
        .filter(|(_, (_, _, id))| *id != qid)
        .map(|(slot, (key, value, id))| {
            let dot: f32 = key.iter().zip(q).map(|(a, b)| a * b).sum();
            ((dot as f64 / tau) as f32, slot as i64, id, value)
        })
        .collect();
    found.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    found.truncate(k);
    found
}

fn rows(r: &Retrieved) -> Result<Vec<Vec<Hit>>, Box<dyn std::error::Error>> {
    let scores = Vec::<Vec<f32>>::try_from(&r.scores)?;
    let slots = Vec::<Vec<i64>>::try_from(&r.slots)?;
    let ids = Vec::<Vec<i64>>::try_from(&r.ids)?;
    let q = scores.len();
    let mut out = Vec::new();
    for i in 0..q {
        let mut row = Vec::new();
        for j in 0..scores[i].len() {
            if ids[i][j] >= 0 {
                let v = Vec::<f32>::try_from(r.values.get(i as i64).get(j as i64))?;
                row.push((scores[i][j], slots[i][j], ids[i][j], v));
            }
        }
        out.push(row);
    }
    Ok(out)
}

#[test]
fn ring_top_k_and_self_exclusion_match_brute_force() -> TestResult {
    let (capacity, tau, k) = (8, 0.5, 5);
    let mut mem = memory_shard(capacity, tau, 0, 1);
    // 13 entries in three writes: the ring wraps and keeps the newest 8.
    for range in [0..5, 5..6, 6..13] {
        let (k_, v, ids) = tensors(range);
        mem.write(&SingleProcess, &k_, &v, &ids)?;
    }
    assert_eq!(mem.len(), capacity);
    let (q, qids) = queries(6, 1);
    let got = rows(&mem.read(&SingleProcess, &q, &qids, k)?)?;
    let qv = Vec::<Vec<f32>>::try_from(&q)?;
    let qi = Vec::<i64>::try_from(&qids)?;
    for (i, row) in got.iter().enumerate() {
        let want = brute_force(13, capacity, tau, &qv[i], qi[i], k);
        assert_eq!(row, &want, "query {i}");
        assert!(row.iter().all(|e| e.2 != qi[i]), "own example retrieved");
    }
    // A write larger than the ring keeps its last `capacity` entries.
    let (k_, v, ids) = tensors(13..40);
    mem.write(&SingleProcess, &k_, &v, &ids)?;
    let got = rows(&mem.read(&SingleProcess, &q, &qids, k)?)?;
    for (i, row) in got.iter().enumerate() {
        assert_eq!(row, &brute_force(40, capacity, tau, &qv[i], qi[i], k));
    }
    // The read value is the softmax-weighted sum of the entries.
    let r = mem.read(&SingleProcess, &q, &qids, k)?;
    let manual = (r.scores.softmax(-1, Kind::Float).unsqueeze(-1) * &r.values).sum_dim_intlist(
        1,
        false,
        Kind::Float,
    );
    assert!(r.weighted_values().allclose(&manual, 1e-6, 1e-6, false));
    Ok(())
}

/// Each rank writes its slice of `0..written` (unequal sizes), then reads its own queries; the
/// results of every rank, in rank order.
/// `ring`: the ranks talk through the CPU TCP ring (real sockets) instead of in-process.
fn sharded_reads(
    world: usize,
    capacity: usize,
    written: usize,
    k: usize,
    ring: bool,
) -> Result<Vec<Vec<Vec<Hit>>>, String> {
    on_ranks(world, ring, move |group, rank| {
        let mut mem = memory_shard(capacity, 0.5, rank, world);
        write_pieces(group, &mut mem, world, written)?;
        read_rows(group, &mem, rank, k)
    })
}

/// Every rank's reads (`results[rank][query]`, queries of [`read_rows`]) equal the brute force over
/// the ring's surviving entries.
fn assert_brute_force(
    results: &[Vec<Vec<Hit>>],
    written: usize,
    capacity: usize,
    k: usize,
    what: &str,
) -> TestResult {
    for (rank, got) in results.iter().enumerate() {
        let (q, qids) = queries(rank + 1, rank * 3);
        let qv = Vec::<Vec<f32>>::try_from(&q)?;
        let qi = Vec::<i64>::try_from(&qids)?;
        for (i, row) in got.iter().enumerate() {
            let want = brute_force(written, capacity, 0.5, &qv[i], qi[i], k);
            assert_eq!(row, &want, "{what} rank {rank} query {i}");
        }
    }
    Ok(())
}

/// Runs `f(group, rank)` on `world` ranks (threads; in-process, or `ring`: over the CPU ring's
/// sockets); the results in rank order.
fn on_ranks<T: Send + 'static>(
    world: usize,
    ring: bool,
    f: impl Fn(&dyn Collective, usize) -> Result<T, String> + Send + Sync + 'static,
) -> Result<Vec<T>, String> {
    let groups: Vec<Box<dyn Collective>> = if ring {
        common::ring_groups(world)
    } else {
        InProcessGroup::new(world)
            .into_iter()
            .map(|g| Box::new(g) as Box<dyn Collective>)
            .collect()
    };
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = groups
        .into_iter()
        .map(|group| {
            let f = f.clone();
            std::thread::spawn(move || f(group.as_ref(), group.rank()))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().map_err(|_| "rank panicked".to_string())?)
        .collect()
}

/// Two writes of `written` entries in all; in each, rank r contributes a contiguous piece, in
/// rank order.
fn write_pieces(
    group: &dyn Collective,
    mem: &mut ShardedKvMemory,
    world: usize,
    written: usize,
) -> Result<(), String> {
    let rank = group.rank();
    let half = written / 2;
    for (lo, hi) in [(0, half), (half, written)] {
        let n = hi - lo;
        let (k_, v, ids) = tensors(lo + n * rank / world..lo + n * (rank + 1) / world);
        mem.write(group, &k_, &v, &ids).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Rank `rank`'s queries read from `mem`.
fn read_rows(
    group: &dyn Collective,
    mem: &ShardedKvMemory,
    rank: usize,
    k: usize,
) -> Result<Vec<Vec<Hit>>, String> {
    let (q, qids) = queries(rank + 1, rank * 3);
    let r = mem.read(group, &q, &qids, k).map_err(|e| e.to_string())?;
    rows(&r).map_err(|e| e.to_string())
}

#[test]
fn sharded_reads_equal_the_unsharded_memory() -> TestResult {
    // (capacity, entries written, k): wrapped ring with ties (and two entries per example id,
    // so that the exclusion removes several); a memory so small that some
    // shards holding fewer than k entries (or none: 2 entries over 3 or 4 ranks).
    for (capacity, written, k) in [(24, 40, 6), (10, 5, 8), (10, 2, 3)] {
        let single = sharded_reads(1, capacity, written, k, false)?;
        // In-process ranks, and ranks over the CPU ring's sockets.
        for (world, ring) in [
            (2, false),
            (3, false),
            (4, false),
            (2, true),
            (3, true),
            (4, true),
        ] {
            let sharded = sharded_reads(world, capacity, written, k, ring)?;
            assert_brute_force(
                &sharded,
                written,
                capacity,
                k,
                &format!("world {world} (ring {ring})"),
            )?;
        }
        // Ties exist in this data (the point of the test): some row has equal scores.
        let any_tie = single[0]
            .iter()
            .any(|row| row.windows(2).any(|w| w[0].0 == w[1].0));
        assert!(
            any_tie || written < k,
            "no tied scores in capacity {capacity}"
        );
    }
    Ok(())
}

/// The memory after `written` entries, built by `world` in-process ranks (rank r contributing
/// a contiguous piece of each of two writes), saved as shards + index at `index`.
fn save_sharded(
    world: usize,
    capacity: usize,
    written: usize,
    index: &std::path::Path,
) -> TestResult {
    let index = index.to_path_buf();
    on_ranks(world, false, move |group, _| {
        save_shard(group, capacity, written, &index, Commit::Now).map(|_| ())
    })?;
    Ok(())
}

/// One rank's part of [`save_sharded`]: builds its shard of the memory and saves it with `commit`.
fn save_shard(
    group: &dyn Collective,
    capacity: usize,
    written: usize,
    index: &std::path::Path,
    commit: Commit,
) -> Result<umtune::atomic_file::FileDigest, String> {
    let (rank, world) = (group.rank(), group.world_size());
    let mut mem = memory_shard(capacity, 0.5, rank, world);
    write_pieces(group, &mut mem, world, written)?;
    let w_k = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
    let shard = mem.shard_tensors();
    let contents = Contents {
        capacity,
        written: mem.written(),
        shard: &shard,
        w_k: Some(&w_k),
    };
    save(group, index, &contents, commit).map_err(|e| e.to_string())
}

/// A staged save returns on no rank before every rank has read the staged index's digest: rank
/// 0 publishes (renames) the index as soon as its save returns, and a rank that is late after the
/// save's barrier still reads it (the CI failure of 477d536: "memory.index.json.next: No such
/// file"). Every rank returns the same digest, and the published index is the one it names.
#[test]
fn a_staged_save_waits_for_every_rank_to_read_the_index_before_it_is_published() -> TestResult {
    let dir = tempfile::tempdir()?;
    let index = dir.path().join("memory.index.json");
    let staged = umtune::memory::files::staged_path(&index);
    let handles: Vec<_> = InProcessGroup::new(2)
        .into_iter()
        .map(|inner| {
            let (index, staged) = (index.clone(), staged.clone());
            std::thread::spawn(move || {
                let group = Instrumented {
                    late_after_barrier: Some(staged),
                    ..Instrumented::new(inner)
                };
                let digest = save_shard(&group, 10, 17, &index, Commit::Staged)?;
                if group.rank() == 0 {
                    umtune::memory::files::publish(&index, true).map_err(|e| e.to_string())?;
                }
                Ok::<_, String>(digest)
            })
        })
        .collect();
    let digests = handles
        .into_iter()
        .map(|h| h.join().map_err(|_| "rank panicked".to_string())?)
        .collect::<Result<Vec<_>, String>>()?;
    assert_eq!(digests[0], digests[1], "the ranks' digests of the index");
    assert_eq!(umtune::atomic_file::digest(&index)?, digests[0]);
    assert!(!staged.exists(), "the staged index was published");
    assert_eq!(umtune::memory::files::read_index(&index)?.shards.len(), 2);
    Ok(())
}

/// Loads the memory at `index` on `world` in-process ranks and reads with each rank's queries.
fn load_and_read(
    world: usize,
    capacity: usize,
    k: usize,
    index: &std::path::Path,
) -> Result<Vec<Vec<Vec<Hit>>>, String> {
    let index = index.to_path_buf();
    on_ranks(world, false, move |group, rank| {
        let mut mem = memory_shard(capacity, 0.5, rank, world);
        let saved = umtune::memory::files::load(&index, rank, world).map_err(|e| e.to_string())?;
        mem.restore(&saved, &index).map_err(|e| e.to_string())?;
        read_rows(group, &mem, rank, k)
    })
}

#[test]
fn memory_files_are_shards_that_load_at_any_world_size() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (capacity, written, k) = (10, 17, 4);
    for saved_at in [1, 2, 3] {
        let index = dir.path().join(format!("mem{saved_at}.index.json"));
        save_sharded(saved_at, capacity, written, &index)?;
        let listed = umtune::memory::files::read_index(&index)?;
        assert_eq!(
            (listed.shards.len(), listed.written),
            (saved_at, written as u64)
        );
        // Loaded by 1, 2 or 4 ranks, every read is the unsharded memory's (brute force over
        // the surviving entries): the slots, the ids for self-exclusion and the ring position.
        for load_at in [1, 2, 4] {
            let got = load_and_read(load_at, capacity, k, &index)?;
            assert_brute_force(
                &got,
                written,
                capacity,
                k,
                &format!("saved at {saved_at}, loaded at {load_at}"),
            )?;
        }
    }
    // Saving again replaces the generation and removes the old shards.
    let index = dir.path().join("mem2.index.json");
    save_sharded(2, capacity, written, &index)?;
    let listed = umtune::memory::files::read_index(&index)?;
    assert_eq!(listed.generation, 2);
    let names: Vec<String> = std::fs::read_dir(dir.path())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert!(
        !names.iter().any(|n| n.starts_with("mem2.g1-")),
        "{names:?}"
    );
    assert!(
        names.contains(&"mem2.g2-00002-of-00002.safetensors".to_string()),
        "{names:?}"
    );
    // Another capacity is refused naming the file; a flipped byte or a missing shard names it.
    let e = umtune::memory::files::load(&index, 0, 1)
        .and_then(|saved| memory_shard(12, 0.5, 0, 1).restore(&saved, &index))
        .err()
        .ok_or("capacity 12 accepted a memory of 10")?
        .to_string();
    assert!(
        e.contains("mem2.index.json") && e.contains("memory.capacity"),
        "{e}"
    );
    let shard = dir.path().join("mem2.g2-00002-of-00002.safetensors");
    let mut bytes = std::fs::read(&shard)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, &bytes)?;
    for (rank, world) in [(1, 2), (0, 1)] {
        let e = umtune::memory::files::load(&index, rank, world)
            .err()
            .ok_or("a corrupt shard loaded")?
            .to_string();
        assert!(
            e.contains("mem2.g2-00002-of-00002.safetensors") && e.contains("corrupt"),
            "{e}"
        );
        // Read while it is checked (what a resume does): the check's failure is the result,
        // though the restore itself went through.
        let e = umtune::memory::files::load_with(&index, rank, world, |saved| {
            memory_shard(10, 0.5, rank, world).restore(saved, &index)
        })
        .err()
        .ok_or("a corrupt shard was restored")?
        .to_string();
        assert!(
            e.contains("mem2.g2-00002-of-00002.safetensors") && e.contains("corrupt"),
            "{e}"
        );
    }
    // Rank 0 of 2 reads only its own shard: the corrupt one is not its business.
    assert!(umtune::memory::files::load(&index, 0, 2).is_ok());
    std::fs::remove_file(&shard)?;
    let e = umtune::memory::files::load(&index, 1, 2)
        .err()
        .ok_or("a missing shard loaded")?
        .to_string();
    assert!(
        e.contains("mem2.g2-00002-of-00002.safetensors") && e.contains("missing"),
        "{e}"
    );
    Ok(())
}

mod common;
use common::{build_model, train_model};

/// A tiny LLaMA task model with the memory (and optionally UM) on, LoRA dropout off.
fn memory_model(
    tag: &str,
    with_um: bool,
) -> Result<umtune::task::TaskModel, Box<dyn std::error::Error>> {
    let mut cfg = common::tiny_config(tag, umtune::config::PeftMethod::Lora)?;
    cfg.peft.dropout = 0.0;
    cfg.memory.enabled = true;
    cfg.memory.capacity = 64;
    cfg.memory.k = 4;
    cfg.uncertainty.enabled = with_um;
    Ok(build_model(&cfg, 2)?.0)
}

/// Entries the model's memory holds.
fn held(model: &umtune::task::TaskModel) -> Result<usize, Box<dyn std::error::Error>> {
    Ok(model.memory.as_ref().ok_or("no memory")?.store()?.len())
}

fn toy_batch() -> (Tensor, Tensor, Tensor, Tensor) {
    let ids = Tensor::from_slice(&[5i64, 9, 3, 7, 2, 11, 4, 4, 8, 1, 6, 0]).view([3, 4]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 0]).view([3, 4]);
    (
        ids,
        mask,
        Tensor::from_slice(&[1i64, 0, 1]),
        Tensor::from_slice(&[10i64, 11, 12]),
    )
}

#[test]
fn a_fresh_memory_fusion_is_exactly_the_model_without_it() -> TestResult {
    let model = memory_model("mem-step0", false)?;
    let mut cfg = common::tiny_config("mem-plain", umtune::config::PeftMethod::Lora)?;
    cfg.peft.dropout = 0.0;
    let (plain, _) = build_model(&cfg, 2)?;
    common::copy_trainable(&plain, &model);
    let (ids, mask, labels, example_ids) = toy_batch();
    // Fill the memory so that reads return real entries, then compare (W_o is still zero).
    model.training.set(true);
    for _ in 0..2 {
        tch::no_grad(|| model.forward(&ids, &mask, Some(&example_ids)))?;
        model.commit_memory()?;
    }
    let filled = held(&model)?;
    assert_eq!(filled, 6, "two batches of 3 written");
    model.training.set(false);
    plain.training.set(false);
    let with = tch::no_grad(|| model.logits(&ids, &mask))?;
    let without = tch::no_grad(|| plain.logits(&ids, &mask))?;
    assert!(
        with.equal(&without),
        "zero W_o must leave the logits bitwise unchanged"
    );

    // Training: gradients reach every memory tensor (W_k through the InfoNCE term), none the
    // backbone; after a step the memory changes the output.
    common::assert_gradients_reach(&model, (&ids, &mask, &labels), Some(&example_ids), |n| {
        n.starts_with("memory.")
    })?;
    model.training.set(false);
    let moved = tch::no_grad(|| model.logits(&ids, &mask))?;
    assert!(!moved.equal(&with));
    Ok(())
}

#[test]
fn uncertainty_and_memory_train_together() -> TestResult {
    let model = memory_model("mem-um", true)?;
    let names: Vec<String> = model
        .named_trainable()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    // The gate sees [h ; r ; log p]: 3d inputs when UM estimates at the memory's block.
    let w_g = model.trained_vars()["memory.w_g.weight"].size();
    assert_eq!(w_g[1], 3 * w_g[0], "{w_g:?}");
    assert!(names.iter().any(|n| n.starts_with("uncertainty.")));
    let (ids, mask, labels, example_ids) = toy_batch();
    model.training.set(true);
    let f = model.forward(&ids, &mask, Some(&example_ids))?;
    assert!(f.samples.is_some() && f.regularizer.is_some());
    let loss = model.loss(&f, &labels);
    assert!(loss.double_value(&[]).is_finite());
    // Every trainable tensor of LoRA, the head, UM and the memory gets a gradient.
    common::assert_gradients_reach(&model, (&ids, &mask, &labels), Some(&example_ids), |_| true)
}

#[test]
fn the_memory_is_saved_with_the_run_and_restored_by_eval() -> TestResult {
    use umtune::data::dataset::load_data;
    use umtune::train::eval::evaluate;
    use umtune::train::restore::load_run;
    let mut cfg = common::tiny_config("mem-run", umtune::config::PeftMethod::Lora)?;
    cfg.memory.enabled = true;
    cfg.memory.capacity = 20; // 4 steps x 8 examples wrap the ring
    let (summary, trained) = train_model(&cfg)?;
    assert_eq!(held(&trained)?, 20);
    let run = load_run(&summary.run_dir, &[])?;
    assert_eq!(held(&run.model)?, 20);
    let data = load_data(&run.config, run.model.tokenizer()?)?;
    let again = evaluate(&run.model, &data.validation, 16, &run.label_names)?;
    assert!(
        (again.loss - summary.validation.loss).abs() < 1e-9,
        "{} vs {}",
        again.loss,
        summary.validation.loss
    );
    // Without the memory's index the run cannot be restored silently wrong.
    std::fs::remove_file(summary.run_dir.join("memory.index.json"))?;
    let e = load_run(&summary.run_dir, &[])
        .err()
        .ok_or("expected an error")?
        .to_string();
    assert!(e.contains("memory.index.json"), "{e}");
    Ok(())
}

#[test]
fn memory_build_prebuilds_from_a_run_or_a_config() -> TestResult {
    use umtune::data::dataset::load_data;
    use umtune::heads::classification::last_token;
    use umtune::models::RecordHook;
    use umtune::train::memory_build::{build, BuildRequest};
    use umtune::train::restore::load_run;
    let mut cfg = common::tiny_config("mem-build", umtune::config::PeftMethod::Lora)?;
    cfg.peft.dropout = 0.0;
    cfg.memory.enabled = true;
    cfg.memory.capacity = 100;
    let (summary, _) = train_model(&cfg)?;
    let request = |split| BuildRequest {
        source: &summary.run_dir,
        data: None,
        split,
        out: None,
        overrides: &[],
    };
    let report = build(&request("train"))?;
    assert_eq!((report.examples, report.entries), (64, 64));
    assert_eq!(report.out, summary.run_dir.join("memory.index.json"));
    // The run now holds exactly the 64 training examples, in corpus order, with their own ids
    // (so self-exclusion keeps working), each value the last real token's hidden state at the
    // memory layer (the last block) and each key a unit vector.
    let run = load_run(&summary.run_dir, &[])?;
    assert_eq!(held(&run.model)?, 64);
    let fusion = run.model.memory.as_ref().ok_or("no memory")?;
    let saved: std::collections::HashMap<String, Tensor> = fusion.tensors()?.into_iter().collect();
    let ids = Vec::<i64>::try_from(&saved["ids"])?;
    assert_eq!(ids[..64], (0..64).collect::<Vec<i64>>()[..]);
    assert!(ids[64..].iter().all(|&i| i == -1));
    let norms = saved["keys"]
        .narrow(0, 0, 64)
        .norm_scalaropt_dim(2.0, [-1], false);
    assert!(common::max_abs_diff(&norms, &norms.ones_like()) < 1e-5);
    let data = load_data(&run.config, run.model.tokenizer()?)?;
    let items: Vec<_> = data.train[..4].iter().collect();
    let batch = umtune::data::batching::collate(&items, 0, Device::Cpu);
    let mut record = RecordHook::default();
    let _g = tch::no_grad_guard();
    let _ = run.model.backbone.forward(
        &batch.input_ids,
        Some(&batch.attention_mask),
        None,
        &mut record,
    );
    let h = record.hidden.last().ok_or("no blocks")?;
    let want = last_token(&h.to_kind(Kind::Float), &batch.attention_mask);
    let d = common::max_abs_diff(&saved["values"].narrow(0, 0, 4), &want);
    assert!(d < 1e-4, "values differ from the hidden states by {d}");
    // Another split keeps its evaluation ids; another dataset gets ids no example of the run has.
    build(&request("validation"))?;
    let stored_ids = || -> Result<Vec<i64>, Box<dyn std::error::Error>> {
        let run = load_run(&summary.run_dir, &[])?;
        let tensors = run.model.memory.as_ref().ok_or("no memory")?.tensors()?;
        let ids = tensors.iter().find(|(n, _)| n == "ids").ok_or("ids")?;
        Ok(Vec::<i64>::try_from(&ids.1)?)
    };
    assert_eq!(stored_ids()?[0], 1 << 40);
    let foreign = build(&BuildRequest {
        data: Some("reuters-r8"),
        overrides: &["data.train_limit=10".into()],
        ..request("train")
    })?;
    assert_eq!(
        (foreign.dataset.as_str(), foreign.entries),
        ("reuters-r8", 10)
    );
    assert_eq!(stored_ids()?[..2], [3 << 40, (3 << 40) + 1]);

    // From a config: --out is required; a run that starts from the file holds its entries and
    // the W_k they were made with.
    let dir = common::fresh_dir("mem-build");
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.toml");
    std::fs::write(&config, cfg.to_toml()?)?;
    let from_config = BuildRequest {
        source: &config,
        out: None,
        ..request("train")
    };
    let e = build(&from_config)
        .err()
        .ok_or("no --out accepted")?
        .to_string();
    assert!(e.contains("--out"), "{e}");
    let file = dir.join("prebuilt");
    let report = build(&BuildRequest {
        out: Some(&file),
        ..from_config
    })?;
    assert_eq!(report.entries, 64);
    assert_eq!(report.out, dir.join("prebuilt.index.json"));
    let mut start = cfg.clone();
    start.memory.prebuilt = file.display().to_string();
    let (model, _) = build_model(&start, 2)?;
    assert_eq!(held(&model)?, 64);
    // The file (one shard, this was one process) holds the entries and W_k.
    let shard = dir.join("prebuilt.g1-00001-of-00001.safetensors");
    let mut file_tensors: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&shard)?.into_iter().collect();
    file_tensors.insert("written".into(), Tensor::from_slice(&[64i64]));
    let model_tensors: std::collections::HashMap<String, Tensor> = model
        .memory
        .as_ref()
        .ok_or("m")?
        .tensors()?
        .into_iter()
        .collect();
    for name in ["w_k", "keys", "values", "ids"] {
        assert!(file_tensors[name].equal(&model_tensors[name]), "{name}");
    }
    // A single whole-ring file (what umtune saved before shards) still loads...
    let whole = dir.join("whole.safetensors");
    let all: Vec<(&str, &Tensor)> = ["keys", "values", "ids", "written", "w_k"]
        .iter()
        .map(|n| (*n, &file_tensors[*n]))
        .collect();
    Tensor::write_safetensors(&all, &whole)?;
    start.memory.prebuilt = whole.display().to_string();
    assert_eq!(held(&build_model(&start, 2)?.0)?, 64);
    // ... and one without W_k (not made by memory build) is refused by name.
    let partial = dir.join("partial.safetensors");
    let keep: Vec<(&str, &Tensor)> = ["keys", "values", "ids", "written"]
        .iter()
        .map(|n| (*n, &file_tensors[*n]))
        .collect();
    Tensor::write_safetensors(&keep, &partial)?;
    start.memory.prebuilt = partial.display().to_string();
    let e = match build_model(&start, 2) {
        Ok(_) => return Err("a prebuilt memory without w_k loaded".into()),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("partial.safetensors") && e.contains("w_k"),
        "{e}"
    );
    // No memory configured: nothing to build.
    let mut plain = cfg.clone();
    plain.memory.enabled = false;
    std::fs::write(&config, plain.to_toml()?)?;
    let e = build(&BuildRequest {
        out: Some(&file),
        ..from_config
    })
    .err()
    .ok_or("built without a memory")?
    .to_string();
    assert!(e.contains("memory.enabled"), "{e}");
    Ok(())
}

/// Writes `n` random entries of `d_v`-wide values per rank (rank r: ids `1000 r ..`, and ids
/// shared with the queries so that some are excluded), then reads `b_r = r + 1 + extra`
/// queries per rank with both the two-stage read and the gathering one: the same result, and
/// the bytes the ring counted equal the module's formula.
fn traffic_case(world: usize, k: usize, d_v: i64, extra: usize) -> TestResult {
    let cfg = umtune::config::MemoryConfig {
        capacity: 64,
        key_size: D_K,
        tau: 0.5,
        ..Default::default()
    };
    let out = on_ranks(world, true, move |group, rank| {
        let e = |x: tch::TchError| x.to_string();
        let mut mem = ShardedKvMemory::new(&cfg, d_v, rank, world, Device::Cpu);
        tch::manual_seed(rank as i64);
        for _ in 0..3 {
            let n = 7 + rank as i64;
            let keys = Tensor::randn([n, D_K], (Kind::Float, Device::Cpu));
            let values = Tensor::randn([n, d_v], (Kind::Float, Device::Cpu));
            let ids = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(5) + 10 * rank as i64;
            mem.write(group, &keys, &values, &ids)
                .map_err(|x| x.to_string())?;
        }
        let b = (rank + 1 + extra) as i64;
        let q = Tensor::randn([b, D_K], (Kind::Float, Device::Cpu));
        let qids = Tensor::arange(b, (Kind::Int64, Device::Cpu)).remainder(3) + 10 * rank as i64;
        let before = group
            .traffic()
            .ok_or_else(|| "the ring counts its bytes".to_string())?;
        let new = mem.read(group, &q, &qids, k).map_err(|x| x.to_string())?;
        let after = group
            .traffic()
            .ok_or_else(|| "the ring counts its bytes".to_string())?;
        let old = mem
            .read_gathering(group, &q, &qids, k)
            .map_err(|x| x.to_string())?;
        let gathered = group
            .traffic()
            .ok_or_else(|| "the ring counts its bytes".to_string())?;
        let slots = Vec::<i64>::try_from(new.slots.reshape([-1])).map_err(e)?;
        let same = [
            (&new.scores, &old.scores),
            (&new.keys, &old.keys),
            (&new.values, &old.values),
            (&new.ids, &old.ids),
            (&new.slots, &old.slots),
        ]
        .iter()
        .all(|(a, b)| a.equal(b));
        Ok((
            b,
            slots,
            after.received - before.received,
            gathered.received - after.received,
            same,
        ))
    })?;
    let w = world as u64;
    let (k, d_k, d_v) = (k as u64, D_K as u64, d_v as u64);
    // Winners of rank o's queries held by rank r (valid slots only).
    let held = |o: usize, r: usize| -> u64 {
        out[o]
            .1
            .iter()
            .filter(|&&s| s != i64::MAX && s as u64 % w == r as u64)
            .count() as u64
    };
    for (r, (b, _, moved, gathering, same)) in out.iter().enumerate() {
        assert!(
            same,
            "W={world}: rank {r}'s two-stage read differs from the gathering one"
        );
        let b = *b as u64;
        let others = (0..world).filter(|&s| s != r);
        let queries: u64 = others
            .clone()
            .map(|s| 24 + out[s].0 as u64 * (4 * d_k + 8))
            .sum();
        let candidates = (w - 1) * (16 + 8 * b * k);
        let requests: u64 = others.clone().map(|o| 16 + 8 * held(o, r)).sum();
        let rows: u64 = others.map(|s| 16 + 4 * (d_k + d_v + 2) * held(r, s)).sum();
        let want = queries + candidates + requests + rows;
        assert_eq!(
            *moved, want,
            "W={world} k={k} d_v={d_v}: rank {r} received {moved} bytes, the formula says {want}"
        );
        eprintln!(
            "W={world} k={k} d_v={d_v} rank {r}: two-stage {moved} B, gathering {gathering} B"
        );
    }
    Ok(())
}

#[test]
fn sharded_read_traffic_matches_the_formula() -> TestResult {
    for (world, k, d_v, extra) in [(2, 3, 3, 0), (3, 5, 17, 2), (4, 4, 40, 1), (4, 9, 8, 0)] {
        traffic_case(world, k, d_v, extra)?;
    }
    Ok(())
}

/// Forwards to an in-process rank, counting the collectives called on it; with
/// `late_after_barrier`, rank 1 waits after each barrier (up to a second) until that file is gone:
/// the slowest a rank can be between a barrier and its next step, made deterministic.
struct Instrumented {
    inner: InProcessGroup,
    gathers: std::sync::atomic::AtomicUsize,
    all_to_alls: std::sync::atomic::AtomicUsize,
    late_after_barrier: Option<std::path::PathBuf>,
}

impl Instrumented {
    fn new(inner: InProcessGroup) -> Self {
        Instrumented {
            inner,
            gathers: Default::default(),
            all_to_alls: Default::default(),
            late_after_barrier: None,
        }
    }
}

impl Collective for Instrumented {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_gather_same(&self, t: &Tensor) -> umtune::error::Result<Tensor> {
        self.gathers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.all_gather_same(t)
    }
    fn all_gather(&self, t: &Tensor) -> umtune::error::Result<Vec<Tensor>> {
        self.gathers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.all_gather(t)
    }
    fn all_to_all(
        &self,
        send: &[Tensor],
        recv_rows: Option<&[i64]>,
    ) -> umtune::error::Result<Vec<Tensor>> {
        self.all_to_alls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.all_to_all(send, recv_rows)
    }
    fn barrier(&self) -> umtune::error::Result<()> {
        self.inner.barrier()?;
        if let (1, Some(file)) = (self.rank(), &self.late_after_barrier) {
            let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
            while file.exists() && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        Ok(())
    }
}

#[test]
fn a_sharded_read_is_one_gather_and_three_all_to_alls_and_a_write_one_of_each() -> TestResult {
    let handles: Vec<_> = InProcessGroup::new(3)
        .into_iter()
        .map(|inner| {
            std::thread::spawn(move || {
                let g = Instrumented::new(inner);
                let rank = g.rank();
                let mut mem = memory_shard(24, 0.5, rank, 3);
                let (k_, v, ids) = tensors(rank * 5..rank * 5 + 5);
                mem.write(&g, &k_, &v, &ids).unwrap();
                let wrote = (
                    g.gathers.swap(0, std::sync::atomic::Ordering::Relaxed),
                    g.all_to_alls.swap(0, std::sync::atomic::Ordering::Relaxed),
                );
                let (q, qids) = queries(rank + 2, rank);
                mem.read(&g, &q, &qids, 4).unwrap();
                let read = (g.gathers.into_inner(), g.all_to_alls.into_inner());
                (wrote, read)
            })
        })
        .collect();
    for h in handles {
        let (wrote, read) = h.join().map_err(|_| "rank panicked")?;
        assert_eq!(wrote, (1, 1), "a write: (gathers, all-to-alls)");
        assert_eq!(read, (1, 3), "a read: (gathers, all-to-alls)");
    }
    Ok(())
}

/// `memory.key_dtype = "bf16"`: the bank's keys take half the bytes, a read returns the keys as
/// stored (bf16-rounded, as f32), and a sharded read (3 ranks over the ring) equals the
/// one-process read — entries and order exactly, scores to f32 rounding — on irregular keys.
#[test]
fn bf16_keys_halve_the_keys_and_read_alike_at_any_world_size() -> TestResult {
    use umtune::config::{KeyDtype, MemoryConfig};
    let cfg = |key_dtype| MemoryConfig {
        capacity: 24,
        key_size: D_K,
        tau: 0.5,
        key_dtype,
        ..Default::default()
    };
    let bytes = |k| ShardedKvMemory::new(&cfg(k), D_V, 0, 1, Device::Cpu).bytes();
    assert_eq!(
        bytes(KeyDtype::F32) - bytes(KeyDtype::Bf16),
        24 * D_K as usize * 2
    );
    let reads = |world: usize| {
        on_ranks(world, world > 1, move |group, rank| {
            let mut mem = ShardedKvMemory::new(&cfg(KeyDtype::Bf16), D_V, rank, world, Device::Cpu);
            // Deterministic, irregular values (threads share libtorch's global generator).
            let wave = |n: i64, d: i64, f: f64| {
                (Tensor::arange(n * d, (Kind::Float, Device::Cpu)) * f)
                    .sin()
                    .view([n, d])
            };
            let (keys, values) = (wave(30, D_K, 0.37), wave(30, D_V, 0.91));
            let ids = Tensor::arange(30, (Kind::Int64, Device::Cpu)).remainder(11);
            for (lo, n) in [(0, 18), (18, 12)] {
                let (a, b) = (
                    lo + n * rank as i64 / world as i64,
                    lo + n * (rank as i64 + 1) / world as i64,
                );
                let piece = |t: &Tensor| t.narrow(0, a, b - a);
                mem.write(group, &piece(&keys), &piece(&values), &piece(&ids))
                    .map_err(|e| e.to_string())?;
            }
            // Every rank reads all queries (rank r's share of them, as its own).
            let q = wave(6, D_K, 1.13);
            let qids = Tensor::arange(6, (Kind::Int64, Device::Cpu));
            let (a, b) = (
                6 * rank as i64 / world as i64,
                6 * (rank as i64 + 1) / world as i64,
            );
            let r = mem
                .read(group, &q.narrow(0, a, b - a), &qids.narrow(0, a, b - a), 5)
                .map_err(|e| e.to_string())?;
            let rounded = r.keys.to_kind(Kind::BFloat16).to_kind(Kind::Float);
            if !r.keys.equal(&rounded) {
                return Err("keys come back as stored".into());
            }
            rows(&r).map_err(|e| e.to_string())
        })
        .map(|per_rank| per_rank.into_iter().flatten().collect::<Vec<_>>())
    };
    let one = reads(1)?;
    assert_eq!(one.len(), 6);
    let three = reads(3)?;
    // Entries and order exactly; scores up to f32 summation order, since the sharded read
    // rescores its winners with its own queries (a d_k-term dot product computed in another
    // shape: at most ~d_k u of |q| |k|, u = 2^-24; |q| |k| / tau < 8 here).
    let strip = |rows: &[Vec<Hit>]| -> Vec<Vec<(i64, i64, Vec<f32>)>> {
        rows.iter()
            .map(|r| r.iter().map(|h| (h.1, h.2, h.3.clone())).collect())
            .collect()
    };
    assert_eq!(strip(&three), strip(&one));
    for (a, b) in three.iter().flatten().zip(one.iter().flatten()) {
        assert!(
            (a.0 - b.0).abs() <= 8.0 * D_K as f32 * f32::EPSILON,
            "{} vs {}",
            a.0,
            b.0
        );
    }
    Ok(())
}

/// A commit writes every micro-batch's entries but those of padding (negative example ids) and
/// those with a non-finite key (here a W_k set to NaN between the two micro-batches), counting
/// what to drop for both micro-batches in one host read.
#[test]
fn a_commit_drops_padding_and_non_finite_entries_with_one_read() -> TestResult {
    let model = memory_model("mem-drop", false)?;
    let (ids, mask, _, _) = toy_batch();
    model.training.set(true);
    tch::no_grad(|| model.forward(&ids, &mask, Some(&Tensor::from_slice(&[10i64, -1, 12]))))?;
    let mut w_k = model.trained_vars()["memory.w_k.weight"].shallow_clone();
    tch::no_grad(|| {
        let _ = w_k.fill_(f64::NAN);
    });
    tch::no_grad(|| model.forward(&ids, &mask, Some(&Tensor::from_slice(&[13i64, 14, 15]))))?;
    let reads = umtune::host::reads();
    model.commit_memory()?;
    assert_eq!(
        umtune::host::reads() - reads,
        1,
        "one read for both micro-batches"
    );
    assert_eq!(held(&model)?, 2);
    let memory = model.memory.as_ref().ok_or("no memory")?;
    let tensors = memory.store()?.shard_tensors();
    let ids = &tensors.iter().find(|(n, _)| n == "ids").ok_or("ids")?.1;
    assert_eq!(Vec::<i64>::try_from(ids.narrow(0, 0, 2))?, [10, 12]);
    Ok(())
}
