//! The library's error type: every message names the file, tensor, key or rank it is about.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config: {0}")]
    Config(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
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
    /// Bad data: names the file, and the row (0-based, header excluded) and column when known.
    #[error("{}{}{}: {msg}", path.display(), row.map(|r| format!(": row {r}")).unwrap_or_default(), column.as_ref().map(|c| format!(", column `{c}`")).unwrap_or_default())]
    Data {
        path: PathBuf,
        row: Option<usize>,
        column: Option<String>,
        msg: String,
    },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A collective operation failed on `rank`.
    #[error("rank {rank}: {msg}")]
    Collective { rank: usize, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
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
        row: Option<usize>,
        column: Option<&str>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Data {
            path: path.into(),
            row,
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
}
