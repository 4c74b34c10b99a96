//! The training draws (LoRA dropout, UM feature noise, heteroscedastic samples) per example:
//! while the trainer runs a micro-batch inside [`with_streams`], each draw fills example i's rows
//! from a libtorch generator seeded with (run seed, step, micro-step, the example's position in
//! the GLOBAL batch, the draw's index in the forward pass) — through the c10d shim, since tch has
//! no Generator API. So an example gets the same dropout mask and noise whichever rank computes
//! it: W data-parallel ranks at batch b reproduce one process at batch W*b with dropout and noise
//! on. Outside [`with_streams`] (evaluation's MC sampling, tests) draws use libtorch's global
//! generator as before.
use super::{take_error, umt_fill_rows_seeded};
use std::cell::RefCell;
use std::ffi::c_char;
use tch::{Kind, Tensor};

struct Streams {
    /// One key per local example (row of the batch).
    rows: Vec<u64>,
    /// Draws made so far in this micro-batch's forward.
    draws: u64,
}

thread_local! {
    static STREAMS: RefCell<Option<Streams>> = const { RefCell::new(None) };
}

/// SplitMix64's finalizer: a well-mixed 64-bit key from `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The key of the example at `position` of the global batch of micro-step `micro` of `step`.
pub fn example_key(seed: u64, step: usize, micro: usize, position: usize) -> u64 {
    mix(mix(mix(mix(seed) ^ step as u64) ^ micro as u64) ^ position as u64)
}

/// Runs `f` (a training forward pass) with one random stream per example: `rows[i]` is the key of
/// the batch's row i (see [`example_key`]).
pub fn with_streams<T>(rows: Vec<u64>, f: impl FnOnce() -> T) -> T {
    STREAMS.with(|s| *s.borrow_mut() = Some(Streams { rows, draws: 0 }));
    let out = f();
    STREAMS.with(|s| *s.borrow_mut() = None);
    out
}

/// How many draws this micro-batch's forward has made (None outside [`with_streams`]).
pub fn draws() -> Option<u64> {
    STREAMS.with(|s| s.borrow().as_ref().map(|s| s.draws))
}

/// Sets the draw counter back to `n` (from [`draws`]), so that recomputing a block replays its
/// draws: the same dropout masks and noise as its first forward (activation checkpointing).
pub fn set_draws(n: u64) {
    STREAMS.with(|s| {
        if let Some(s) = s.borrow_mut().as_mut() {
            s.draws = n;
        }
    })
}

/// Standard normal draws of `shape`, whose dimension `batch_dim` runs over the batch's examples.
pub fn randn(shape: &[i64], batch_dim: usize, like: &Tensor) -> Tensor {
    draw(shape, batch_dim, like, true)
}

/// Uniform draws on [0, 1) of `shape` (see [`randn`]).
pub fn rand(shape: &[i64], batch_dim: usize, like: &Tensor) -> Tensor {
    draw(shape, batch_dim, like, false)
}

fn draw(shape: &[i64], batch_dim: usize, like: &Tensor, normal: bool) -> Tensor {
    let options = (Kind::Float, like.device());
    let seeds = STREAMS.with(|s| {
        let mut s = s.borrow_mut();
        let streams = s.as_mut()?;
        let n = shape.get(batch_dim).copied().unwrap_or(-1);
        if n != streams.rows.len() as i64 {
            // A draw over something other than the batch's examples: the per-example streams do
            // not apply (a bug in a caller, so say it loudly rather than silently differ).
            tracing::warn!(
                ?shape,
                batch_dim,
                examples = streams.rows.len(),
                "a training draw is not over the batch's examples; using the global generator"
            );
            return None;
        }
        streams.draws += 1;
        let draw = streams.draws;
        Some(
            streams
                .rows
                .iter()
                .map(|&r| mix(r ^ draw.wrapping_mul(0xD6E8_FEB8_6659_FD93)))
                .collect::<Vec<u64>>(),
        )
    });
    let Some(seeds) = seeds else {
        return if normal {
            Tensor::randn(shape, options)
        } else {
            Tensor::rand(shape, options)
        };
    };
    let mut t = Tensor::empty(shape, options);
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: `t` is a live tensor with `seeds.len()` rows along `batch_dim`; the shim fills it in
    // place and hands back a malloc'ed message on failure.
    let rc = unsafe {
        umt_fill_rows_seeded(
            t.as_mut_ptr(),
            batch_dim as i64,
            seeds.as_ptr(),
            seeds.len() as i64,
            i32::from(normal),
            &mut err,
        )
    };
    if rc != 0 {
        let msg = take_error(err);
        tracing::warn!("per-example draw failed ({msg}); using the global generator");
        return if normal {
            Tensor::randn(shape, options)
        } else {
            Tensor::rand(shape, options)
        };
    }
    t
}
