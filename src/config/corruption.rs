//! The robustness protocol's settings (`data.train_corruption`, `data.eval_corruption`, `eval
//! --corrupt`); `data::corrupt` applies them to examples.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Corruption {
    /// Fraction of each example's words removed (replaced by the marker for NER).
    pub drop: f64,
    /// Fraction of each example's words replaced by the marker.
    pub mask: f64,
    /// Fraction of labels (NER: of word tags) flipped to another class.
    pub label_noise: f64,
    pub seed: u64,
}

impl Default for Corruption {
    fn default() -> Self {
        Corruption {
            drop: 0.0,
            mask: 0.0,
            label_noise: 0.0,
            seed: 1234,
        }
    }
}

impl Corruption {
    pub fn is_none(&self) -> bool {
        self.drop == 0.0 && self.mask == 0.0 && self.label_noise == 0.0
    }

    /// Parses `drop=0.3,mask=0.1,label_noise=0.2,seed=7` (any subset, `key=value` by commas).
    pub fn parse(text: &str) -> Result<Self> {
        let mut c = Corruption::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || {
                Error::Config(format!(
                    "corruption `{part}`: write key=value with key drop, mask, label_noise or seed (e.g. drop=0.3)"
                ))
            };
            let (key, value) = part.split_once('=').ok_or_else(bad)?;
            match key.trim() {
                "drop" => c.drop = value.trim().parse().map_err(|_| bad())?,
                "mask" => c.mask = value.trim().parse().map_err(|_| bad())?,
                "label_noise" => c.label_noise = value.trim().parse().map_err(|_| bad())?,
                "seed" => c.seed = value.trim().parse().map_err(|_| bad())?,
                _ => return Err(bad()),
            }
        }
        c.validate("corruption")?;
        Ok(c)
    }

    /// Every fraction within [0, 1]; `what` names the setting in the message.
    pub fn validate(&self, what: &str) -> Result<()> {
        for (key, v) in [
            ("drop", self.drop),
            ("mask", self.mask),
            ("label_noise", self.label_noise),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::Config(format!(
                    "{what}.{key} = {v} is out of range: use a fraction from 0 to 1"
                )));
            }
        }
        Ok(())
    }
}
