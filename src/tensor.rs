//! Host tensors: contiguous row-major f32 with a shape. Device buffers live in `cuda::device`.

use crate::error::{Error, Result};

/// A contiguous, row-major f32 tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// Zeros of `shape`.
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    /// Wraps `data`, checking that it has `shape`'s element count.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Shape(format!(
                "shape {:?} needs {} elements, got {}",
                shape,
                n,
                data.len()
            )));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Fails with a message naming `what` unless the shape is `want`.
    pub fn expect_shape(&self, what: &str, want: &[usize]) -> Result<()> {
        if self.shape != want {
            return Err(Error::Shape(format!(
                "{what}: expected shape {want:?}, got {:?}",
                self.shape
            )));
        }
        Ok(())
    }
}

/// Integer token ids (B, L) with their shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Tokens {
    pub batch: usize,
    pub len: usize,
    /// (B, L) row-major.
    pub ids: Vec<u32>,
}

impl Tokens {
    /// Checks `ids` against (batch, len) and `vocab`.
    pub fn new(batch: usize, len: usize, ids: Vec<u32>, vocab: usize) -> Result<Self> {
        if ids.len() != batch * len {
            return Err(Error::Shape(format!(
                "tokens: expected {batch}x{len} = {} ids, got {}",
                batch * len,
                ids.len()
            )));
        }
        if let Some((i, &t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
            return Err(Error::Shape(format!(
                "tokens: id {t} at flat index {i} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(Tokens { batch, len, ids })
    }
}
