//! Scalars a forward pass records for the training diagnostics (the ranges of log-variances,
//! noise against feature scale, gate values, ...), switched on for logged steps only, so that
//! an ordinary step pays no device-to-host copy. Models and plug-ins record; the trainer reads.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tch::Tensor;

/// Scalars a forward pass records while switched on (one logged step's micro-batches): the
/// largest `*_max`, the smallest `*_min`, and the last value of anything else. Off, recording
/// costs nothing (no device-to-host copy).
#[derive(Clone, Default)]
pub struct Probe(Arc<Mutex<Option<BTreeMap<String, f64>>>>);

impl Probe {
    /// Starts recording.
    pub fn start(&self) {
        if let Ok(mut m) = self.0.lock() {
            *m = Some(BTreeMap::new());
        }
    }

    /// Stops recording and hands back what was recorded.
    pub fn take(&self) -> BTreeMap<String, f64> {
        self.0
            .lock()
            .ok()
            .and_then(|mut m| m.take())
            .unwrap_or_default()
    }

    pub fn is_on(&self) -> bool {
        self.0.lock().map(|m| m.is_some()).unwrap_or(false)
    }

    /// Records `value()` under `name` if on.
    pub fn record(&self, name: &str, value: impl FnOnce() -> f64) {
        let Ok(mut guard) = self.0.lock() else {
            return;
        };
        let Some(map) = guard.as_mut() else {
            return;
        };
        let v = value();
        let slot = map.entry(name.to_string()).or_insert(v);
        *slot = if name.ends_with("_max") {
            slot.max(v)
        } else if name.ends_with("_min") {
            slot.min(v)
        } else {
            v
        };
    }

    /// Records the max and min of `t` as `{name}_max` and `{name}_min`.
    pub fn range(&self, name: &str, t: &Tensor) {
        if self.is_on() {
            let t = t.detach();
            self.record(&format!("{name}_max"), || t.max().double_value(&[]));
            self.record(&format!("{name}_min"), || t.min().double_value(&[]));
        }
    }
}
