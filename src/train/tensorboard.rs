//! TensorBoard event files (`RUN/tb/events.out.tfevents.*`), written as the run goes: every number
//! `metrics.jsonl` gets becomes a scalar, and the run's pictures become image summaries.
//!
//! Written by hand on `prost` (the protobuf messages, derived here: the three of TensorFlow's
//! `event.proto` / `summary.proto` that scalars and images need) and `crc32c` (the record
//! checksums). The crates that write TensorBoard files are unmaintained since 2022
//! (tensorboard-rs: protobuf 2 and a 14 MB tree) or write scalars only (syntaxdot-summary); the
//! format itself is small and fixed: TFRecord framing — u64 length, masked CRC32C of the length,
//! the bytes, masked CRC32C of the bytes, little-endian — around serialized `Event`s, the first
//! of which names the file version. `tests/tensorboard.rs` reads the files back with
//! TensorBoard's own `EventAccumulator`.
//!
//! Tags: a training line's numbers under `train/` (`train/loss`, `train/grad_norms/lora`,
//! `train/probe/um.noise_to_feature`), an evaluation's under its split (`validation/accuracy`,
//! `test/calibration/ece`, `validation/calibrated/ece` after the temperature); the values are
//! TensorBoard's f32 `simple_value`.
use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The directory of a run's event files.
pub const TB_DIR: &str = "tb";

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
    #[prost(message, optional, tag = "7")]
    session_log: Option<SessionLog>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
    #[prost(message, optional, tag = "4")]
    image: Option<Image>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Image {
    #[prost(int32, tag = "1")]
    height: i32,
    #[prost(int32, tag = "2")]
    width: i32,
    /// 3: RGB, 4: RGBA.
    #[prost(int32, tag = "3")]
    colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    encoded_image_string: Vec<u8>,
}

/// `SessionLog.START` at a step tells TensorBoard that what an earlier writer logged at and after
/// it is orphaned (a resumed run logs those steps again).
#[derive(Clone, PartialEq, prost::Message)]
struct SessionLog {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SESSION_START: i32 = 1;

/// TFRecord's checksum: CRC32C rotated right by 15 bits plus a constant.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// An open event file; each event is flushed as it is written, so TensorBoard follows the run.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file under `dir` (created), named as TensorBoard expects
    /// (`events.out.tfevents.SECONDS.N.HOST`, N the number of event files before it, so that
    /// TensorBoard, which reads them in name order, reads a resumed run's after the first's even
    /// within one second); a resumed run (`resumed_at`) marks the step from which the earlier
    /// files' events are replaced.
    pub fn create(dir: &Path, resumed_at: Option<usize>) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map_or_else(|| "localhost".into(), |h| h.trim().replace('/', "_"));
        let earlier = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("tfevents"))
            .count();
        let secs = now().floor() as u64;
        let path = dir.join(format!("events.out.tfevents.{secs}.{earlier:04}.{host}"));
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { file, path };
        w.event(Event {
            wall_time: now(),
            file_version: Some("brain.Event:2".into()),
            ..Default::default()
        })?;
        if let Some(step) = resumed_at {
            w.event(Event {
                wall_time: now(),
                step: step as i64 + 1,
                session_log: Some(SessionLog {
                    status: SESSION_START,
                }),
                ..Default::default()
            })?;
        }
        Ok(w)
    }

    fn event(&mut self, event: Event) -> Result<()> {
        let data = prost::Message::encode_to_vec(&event);
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc(&len).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.file
            .write_all(&record)
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    fn summary(&mut self, step: i64, value: Vec<Value>) -> Result<()> {
        if value.is_empty() {
            return Ok(());
        }
        self.event(Event {
            wall_time: now(),
            step,
            summary: Some(Summary { value }),
            ..Default::default()
        })
    }

    /// The numbers of one `metrics.jsonl` line as scalars at its step (see the module's tags).
    pub fn metrics_line(&mut self, line: &serde_json::Value) -> Result<()> {
        let Some(step) = line["step"].as_i64() else {
            return Ok(());
        };
        let mut values = Vec::new();
        match line["split"].as_str() {
            Some(split) => flatten(split, &line["eval"], &mut values),
            None => {
                if let Some(map) = line.as_object() {
                    for (k, v) in map.iter().filter(|(k, _)| *k != "step") {
                        flatten(&format!("train/{k}"), v, &mut values);
                    }
                }
            }
        }
        let values = values
            .into_iter()
            .map(|(tag, v)| Value {
                tag,
                simple_value: Some(v as f32),
                image: None,
            })
            .collect();
        self.summary(step, values)
    }

    /// A PNG file as an image summary at `step`; its size is read from the PNG header.
    pub fn image(&mut self, tag: &str, step: usize, png: &Path) -> Result<()> {
        let bytes = std::fs::read(png).map_err(|e| Error::io(png, e))?;
        let (width, height, colorspace) = png_header(&bytes)
            .ok_or_else(|| Error::format(png, "not a PNG file (bad header)".to_string()))?;
        let image = Image {
            height,
            width,
            colorspace,
            encoded_image_string: bytes,
        };
        self.summary(
            step as i64,
            vec![Value {
                tag: tag.into(),
                simple_value: None,
                image: Some(image),
            }],
        )
    }
}

/// Every number under `v` as (`prefix/path`, value); strings, booleans and nulls are skipped.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, f64)>) {
    match v {
        serde_json::Value::Number(n) => out.extend(n.as_f64().map(|x| (prefix.to_string(), x))),
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                flatten(&format!("{prefix}/{k}"), v, out);
            }
        }
        _ => {}
    }
}

/// (width, height, colorspace) from a PNG's IHDR chunk (colour type 2: RGB, 6: RGBA).
fn png_header(bytes: &[u8]) -> Option<(i32, i32, i32)> {
    const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    if bytes.len() < 26 || bytes[..8] != SIGNATURE || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let be =
        |at: usize| i32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let colorspace = match bytes[25] {
        6 => 4,
        4 => 2,
        0 => 1,
        _ => 3,
    };
    Some((be(16), be(20), colorspace))
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
