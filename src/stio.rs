//! Safetensors helpers shared by checkpoints and the `forward` entry point: a memory-mapped
//! reader that converts bf16/f16/f32 (and int64/int32 ids) with named errors, and an atomic
//! writer (temporary name, then rename, so a crash never leaves half a file).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A memory-mapped safetensors file.
pub struct StFile {
    pub path: PathBuf,
    mmap: Mmap,
}

impl StFile {
    /// Maps `path`; fails with the path named when it is missing or unreadable.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only and lives as long as `StFile`; files we read are not
        // modified concurrently (writers use a temporary name and an atomic rename).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        Ok(StFile { path, mmap })
    }

    /// Parses the header; a truncated or corrupt file is reported with the parser's reason.
    pub fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| {
            Error::checkpoint(
                &self.path,
                format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            )
        })
    }

    /// The string metadata of the header (empty when absent).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) = SafeTensors::read_metadata(&self.mmap).map_err(|e| {
            Error::checkpoint(
                &self.path,
                format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            )
        })?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }
}

/// Converts a float tensor view (f32, bf16 or f16) to an f32 [`Tensor`].
pub fn view_to_f32(path: &Path, name: &str, v: &TensorView<'_>) -> Result<Tensor> {
    let bytes = v.data();
    let data: Vec<f32> = match v.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor {name}: dtype {other:?} is not supported (expected F32, BF16 or F16)"
                ),
            ))
        }
    };
    Tensor::from_vec(v.shape(), data)
}

/// Converts an integer tensor view (I64 or I32) to u32 ids, rejecting negative values.
pub fn view_to_ids(path: &Path, name: &str, v: &TensorView<'_>) -> Result<Vec<u32>> {
    let bytes = v.data();
    let vals: Vec<i64> = match v.dtype() {
        Dtype::I64 => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
            .collect(),
        other => {
            return Err(Error::checkpoint(
                path,
                format!("tensor {name}: dtype {other:?} is not supported (expected I64 or I32)"),
            ))
        }
    };
    vals.iter()
        .map(|&x| {
            u32::try_from(x).map_err(|_| {
                Error::checkpoint(
                    path,
                    format!("tensor {name}: id {x} is not a valid token id"),
                )
            })
        })
        .collect()
}

/// A tensor to write: borrowed f32 data or i64 ids (no copies, so multi-GB models stream out).
pub enum OutTensor<'a> {
    F32(&'a Tensor),
    I64 { shape: Vec<usize>, data: &'a [i64] },
}

/// Writes `tensors` with `metadata` to `path` atomically (via `path.tmp` and a rename).
pub fn write_atomic(
    path: &Path,
    tensors: &[(String, OutTensor<'_>)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, t)| {
            let (dtype, shape, bytes): (Dtype, Vec<usize>, &[u8]) = match t {
                OutTensor::F32(t) => (Dtype::F32, t.shape.clone(), bytemuck::cast_slice(&t.data)),
                OutTensor::I64 { shape, data } => {
                    (Dtype::I64, shape.clone(), bytemuck::cast_slice(data))
                }
            };
            TensorView::new(dtype, shape, bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Shape(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    if let Err(e) = safetensors::tensor::serialize_to_file(views, Some(metadata), &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::checkpoint(&tmp, format!("could not write: {e}")));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
