//! The engine's error type: every failure a caller can cause (bad shapes, bad configs, bad
//! weight files, an op without a launcher for the requested device) comes back as a value.

use std::path::PathBuf;

/// Errors returned by tensors, ops, the tape, the parameter store and the model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Operand shapes do not fit the op; the message names the op and both shapes.
    #[error("shape error in {op}: {msg}")]
    Shape {
        /// Op or function that refused the shapes.
        op: &'static str,
        /// What was expected and what was given.
        msg: String,
    },
    /// The op exists on the CPU but has no launcher for the requested device yet.
    #[error(
        "op `{op}` has no launcher for device {device} yet (only the CPU backend is available)"
    )]
    NoLauncher {
        /// Name of the op.
        op: &'static str,
        /// The device that was asked for, e.g. `cuda:0`.
        device: String,
    },
    /// The model configuration is invalid; the message names the key.
    #[error("config error: {0}")]
    Config(String),
    /// A weights file does not match the parameter store.
    #[error("weights error in {path}: {msg}")]
    Weights {
        /// File being read or written.
        path: PathBuf,
        /// What did not match.
        msg: String,
    },
    /// An input (token ids, lengths, dtype) is out of range.
    #[error("invalid input: {0}")]
    Input(String),
    /// Reading or writing a file failed.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Result alias used throughout the engine.
pub type Result<T> = std::result::Result<T, EngineError>;

pub(crate) fn shape_err<T>(op: &'static str, msg: impl Into<String>) -> Result<T> {
    Err(EngineError::Shape {
        op,
        msg: msg.into(),
    })
}
