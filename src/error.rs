//! The crate's one error type. Every variant carries enough context (a path, a tensor name, the
//! expected and actual value) for a user to fix the problem without reading the source.

use std::path::{Path, PathBuf};

/// Errors of the whole engine. The library never panics, prints or exits on user error; the
/// binary prints the message once and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A checkpoint is unusable: missing or unexpected tensors, wrong shapes, a corrupt file.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },

    /// A configuration value is invalid or two configurations disagree.
    #[error("configuration: {0}")]
    Config(String),

    /// A tensor has the wrong shape or dtype for an operation.
    #[error("shape: {0}")]
    Shape(String),

    /// A CUDA driver call failed.
    #[error("CUDA: {0}")]
    Cuda(String),

    /// The binary was built without nvcc, so it carries no kernels.
    #[error(
        "built without CUDA kernels (nvcc was not found at build time); \
         run scripts/setup-cuda.sh and rebuild"
    )]
    NoKernels,

    /// `--device cuda` was requested but no usable CUDA device exists.
    #[error("no CUDA device: {0}")]
    NoDevice(String),

    /// Training produced a NaN or an infinity; the run stopped before applying it, and the
    /// last checkpoint written is the last good one.
    #[error("step {step}: {what}; training stopped (the last good checkpoint is kept)")]
    NonFinite { step: u64, what: String },
    /// Text data or token shards are unusable: a corpus file that does not parse, a shard that
    /// does not match its manifest (size, checksum, vocabulary), a missing manifest.
    #[error("data {path}: {msg}")]
    Data { path: PathBuf, msg: String },

    /// A tokenizer could not be built, or could not encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A judge language model (a GGUF file) is missing, unreadable or of an unsupported kind.
    #[error("judge {path}: {msg}")]
    Judge { path: PathBuf, msg: String },
}

/// Result with the crate's error.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A checkpoint error on `path`.
    pub fn checkpoint(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
}

impl Error {
    /// A data error on `path` (a corpus file, a shard, a manifest).
    pub fn data(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Data {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Cuda(e.to_string())
    }
}
