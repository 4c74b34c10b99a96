//! The rank-0 progress bar (indicatif): step, loss, learning rate, tokens/s and ETA on one line.
//! Drawn only when stderr is a terminal; in a pipe, a file or a batch job the structured log
//! lines are the record and the bar stays silent.
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar of `total` steps, shown if `show` and stderr is a terminal.
    pub fn new(total: usize, show: bool) -> Self {
        let bar = (show && std::io::stderr().is_terminal()).then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Progress { bar }
    }

    /// Whether the bar is on screen (then per-step log lines would only fight with it).
    pub fn is_visible(&self) -> bool {
        self.bar.is_some()
    }

    pub fn step(&self, step: usize, loss: f64, lr: f64, tokens_per_s: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step as u64);
            bar.set_message(format!(
                "loss {loss:.4}  lr {lr:.2e}  {tokens_per_s:.0} tok/s"
            ));
        }
    }

    /// Runs `f` (which logs) with the bar cleared, then redraws it.
    pub fn suspend<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
