//! Learning rate over optimizer steps: linear warmup, then cosine, linear decay to 0, or constant
//! (the shapes of transformers' `get_*_schedule_with_warmup`).
use crate::config::ScheduleKind;

pub fn learning_rate(
    kind: ScheduleKind,
    base: f64,
    step: usize,
    warmup: usize,
    total: usize,
) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match kind {
        ScheduleKind::Constant => base,
        ScheduleKind::Linear => base * (1.0 - progress),
        ScheduleKind::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}
