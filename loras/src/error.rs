//! The one error type of the LoRA crate: each variant names the file and, where it applies, the tensor or key.

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not a valid adapter file: {reason}")]
    Corrupt { file: String, reason: String },
    #[error("{file}: `{key}`: {rule}")]
    Config {
        file: String,
        key: String,
        rule: String,
    },
    #[error("{file}: tensor `{tensor}` is missing")]
    MissingTensor { file: String, tensor: String },
    #[error("{file}: tensor `{tensor}` has shape {got:?}, the base model needs {want:?}")]
    Shape {
        file: String,
        tensor: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("{file}: tensor `{tensor}`: {reason}")]
    Tensor {
        file: String,
        tensor: String,
        reason: String,
    },
}
