//! The library's error type: every message names the file, tensor, key or rank it is about.
//! Each failure kind has its own variant, so callers (and exit codes) can tell a bad config from
//! bad data, a diverged run from an interrupted one, and a bug from all of them.
use std::path::PathBuf;

/// Where in a data file: a text line (JSONL, CSV, CoNLL: 1-based, as editors count) or a record
/// (parquet: 1-based row, in its row group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    Line(usize),
    Row(usize),
}

impl std::fmt::Display for Loc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Loc::Line(n) => write!(f, "line {n}"),
            Loc::Row(n) => write!(f, "row {n}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config: {0}")]
    Config(String),
    /// The OS error is part of the message and deliberately not a `source`: printing the chain
    /// would repeat it.
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error("{}: tensor `{name}`: {msg}", path.display())]
    Tensor {
        path: PathBuf,
        name: String,
        msg: String,
    },
    #[error("model `{reference}`: {msg}")]
    ModelNotFound { reference: String, msg: String },
    #[error("tokenizer {}: {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },
    /// Bad data: names the file, and the line or row and the column when known.
    #[error("{}{}{}: {msg}", path.display(), loc.map(|l| format!(": {l}")).unwrap_or_default(), column.as_ref().map(|c| format!(", column `{c}`")).unwrap_or_default())]
    Data {
        path: PathBuf,
        loc: Option<Loc>,
        column: Option<String>,
        msg: String,
    },
    /// Training stopped because the loss kept being non-finite.
    #[error("training diverged at step {step}: {msg}")]
    Diverged { step: usize, msg: String },
    /// Training stopped by a signal after saving; `signal` is its number (exit code 128 + it).
    #[error("interrupted by {name} at step {step}: {msg}")]
    Interrupted {
        signal: i32,
        name: &'static str,
        step: usize,
        msg: String,
    },
    /// A model produced non-finite outputs where numbers are reported.
    #[error("non-finite outputs: {0}")]
    NonFinite(String),
    /// A run directory that cannot be used as asked.
    #[error("run {}: {msg}", dir.display())]
    Run { dir: PathBuf, msg: String },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A collective operation failed on `rank`.
    #[error("rank {rank}: {msg}")]
    Collective { rank: usize, msg: String },
    /// A broken invariant inside umtune (a bug): please report it.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn data(
        path: impl Into<PathBuf>,
        loc: Option<Loc>,
        column: Option<&str>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Data {
            path: path.into(),
            loc,
            column: column.map(str::to_string),
            msg: msg.into(),
        }
    }
    pub fn tensor(path: impl Into<PathBuf>, name: &str, msg: impl Into<String>) -> Self {
        Error::Tensor {
            path: path.into(),
            name: name.to_string(),
            msg: msg.into(),
        }
    }
    pub fn run(dir: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Run {
            dir: dir.into(),
            msg: msg.into(),
        }
    }

    /// The process exit code this error should end `umtune` with: 128 + the signal for an
    /// interrupted run (as a shell reports a signal), 3 for divergence, 2 for bad config or data,
    /// 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Interrupted { signal, .. } => (128 + signal) as u8,
            Error::Diverged { .. } => 3,
            Error::Config(_) | Error::Data { .. } => 2,
            _ => 1,
        }
    }
}
