//! Uncertainty: calibration metrics and post-hoc temperature scaling (METHOD.md section 1).
pub mod calibration;
pub mod metrics;

pub use calibration::fit_temperature;
pub use metrics::{calibration_scores, CalibrationScores};
