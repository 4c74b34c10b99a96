//! Scalars a forward pass records for the training diagnostics (the ranges of log-variances,
//! noise against feature scale, gate values, ...), switched on for logged steps only. They stay
//! on the device as they are recorded and are read together, with one device-to-host copy
//! ([`crate::host`]), when the trainer takes them; off, recording costs nothing. Models and
//! plug-ins record; the trainer reads.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tch::{Kind, Tensor};

/// Scalars a forward pass records while switched on (one logged step's micro-batches): the
/// largest `*_max`, the smallest `*_min`, and the last value of anything else.
#[derive(Clone, Default)]
pub struct Probe(Arc<Mutex<Option<BTreeMap<String, Tensor>>>>);

impl Probe {
    /// Starts recording.
    pub fn start(&self) {
        if let Ok(mut m) = self.0.lock() {
            *m = Some(BTreeMap::new());
        }
    }

    /// Stops recording and hands back what was recorded, read in one copy.
    pub fn take(&self) -> BTreeMap<String, f64> {
        let recorded = self
            .0
            .lock()
            .ok()
            .and_then(|mut m| m.take())
            .unwrap_or_default();
        if recorded.is_empty() {
            return BTreeMap::new();
        }
        let values: Vec<&Tensor> = recorded.values().collect();
        // Every value is on the model's device: stacked there, then read in one copy.
        match Tensor::f_stack(&values, 0)
            .map_err(crate::Error::from)
            .and_then(|all| crate::host::f64s(&all))
        {
            Ok(v) => recorded.into_keys().zip(v).collect(),
            Err(e) => {
                tracing::warn!("reading the probes: {e}");
                BTreeMap::new()
            }
        }
    }

    pub fn is_on(&self) -> bool {
        self.0.lock().map(|m| m.is_some()).unwrap_or(false)
    }

    /// Records `value()` (a one-element tensor, detached) under `name` if on.
    pub fn record(&self, name: &str, value: impl FnOnce() -> Tensor) {
        let Ok(mut guard) = self.0.lock() else {
            return;
        };
        let Some(map) = guard.as_mut() else {
            return;
        };
        let v = value().detach().to_kind(Kind::Double).reshape([]);
        let merged = match map.remove(name) {
            Some(old) if name.ends_with("_max") => old.maximum(&v),
            Some(old) if name.ends_with("_min") => old.minimum(&v),
            _ => v,
        };
        map.insert(name.to_string(), merged);
    }

    /// Records the max and min of `t` as `{name}_max` and `{name}_min`.
    pub fn range(&self, name: &str, t: &Tensor) {
        if self.is_on() {
            let t = t.detach();
            self.record(&format!("{name}_max"), || t.max());
            self.record(&format!("{name}_min"), || t.min());
        }
    }
}
