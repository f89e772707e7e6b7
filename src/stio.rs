//! Safetensors helpers shared by checkpoints and the `forward` entry point: a memory-mapped
//! reader that converts bf16/f16/f32 (and int64/int32 ids) with named errors, and an atomic
//! writer (an exclusive temporary file, then a rename, so a crash never leaves half a file;
//! see [`crate::outputs`]). Every file written carries a CRC-32 of its data section in the
//! metadata ([`META_CHECKSUM`]), which [`StFile::verify_checksum`] checks.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorInfo, TensorView};

use crate::error::{Error, Result};
use crate::outputs::TempFile;
use crate::tensor::Tensor;

/// Metadata key of the data-section checksum: `crc32:` and 8 hex digits of the CRC-32
/// (IEEE) of every byte after the header.
pub const META_CHECKSUM: &str = "checksum";

fn crc32_tag(bytes: &[u8]) -> String {
    format!("crc32:{:08x}", crc32fast::hash(bytes))
}

/// A memory-mapped safetensors file.
pub struct StFile {
    pub path: PathBuf,
    mmap: Mmap,
}

impl StFile {
    /// Maps `path`; fails with the path named when it is missing or unreadable.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if path.is_dir() {
            return Err(Error::checkpoint(
                &path,
                "is a directory; expected a .safetensors file",
            ));
        }
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

    /// Checks the data section against the metadata's [`META_CHECKSUM`]: `Ok(true)` when it
    /// matches, `Ok(false)` when the file carries none (written by another tool), an error
    /// naming the file when it differs (flipped bits, a partial copy).
    pub fn verify_checksum(&self) -> Result<bool> {
        let meta = self.metadata()?;
        let Some(want) = meta.get(META_CHECKSUM) else {
            return Ok(false);
        };
        let (n, _) = SafeTensors::read_metadata(&self.mmap).map_err(|e| {
            Error::checkpoint(&self.path, format!("not a valid safetensors file: {e}"))
        })?;
        let got = crc32_tag(&self.mmap[8 + n..]);
        if &got != want {
            return Err(Error::checkpoint(
                &self.path,
                format!(
                    "tensor data does not match its checksum (metadata {want}, data {got}):                      the file is corrupt; use another copy or an older checkpoint"
                ),
            ));
        }
        Ok(true)
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

/// Converts a float tensor view (F64, or anything [`view_to_f32`] reads) to f64 values, with
/// its shape.
pub fn view_to_f64(path: &Path, name: &str, v: &TensorView<'_>) -> Result<(Vec<usize>, Vec<f64>)> {
    if v.dtype() == Dtype::F64 {
        let data = v
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        return Ok((v.shape().to_vec(), data));
    }
    let t = view_to_f32(path, name, v)?;
    Ok((t.shape, t.data.iter().map(|&x| x as f64).collect()))
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

/// A tensor to write: borrowed f32 data, f64 values or i64 ids (no copies, so multi-GB models
/// stream out).
pub enum OutTensor<'a> {
    F32(&'a Tensor),
    F64 { shape: Vec<usize>, data: &'a [f64] },
    I64 { shape: Vec<usize>, data: &'a [i64] },
}

/// Writes `tensors` with `metadata` (plus [`META_CHECKSUM`]) to `path` atomically, in the
/// safetensors layout: tensors ordered by descending dtype, then by name.
pub fn write_atomic(
    path: &Path,
    tensors: &[(String, OutTensor<'_>)],
    mut metadata: HashMap<String, String>,
) -> Result<()> {
    let mut items: Vec<(&str, Dtype, Vec<usize>, &[u8])> = tensors
        .iter()
        .map(|(n, t)| match t {
            OutTensor::F32(t) => (
                n.as_str(),
                Dtype::F32,
                t.shape.clone(),
                bytemuck::cast_slice::<f32, u8>(&t.data),
            ),
            OutTensor::F64 { shape, data } => (
                n.as_str(),
                Dtype::F64,
                shape.clone(),
                bytemuck::cast_slice::<f64, u8>(data),
            ),
            OutTensor::I64 { shape, data } => (
                n.as_str(),
                Dtype::I64,
                shape.clone(),
                bytemuck::cast_slice::<i64, u8>(data),
            ),
        })
        .collect();
    items.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut infos = Vec::with_capacity(items.len());
    let mut offset = 0usize;
    let mut crc = crc32fast::Hasher::new();
    for (name, dtype, shape, bytes) in &items {
        let want = shape
            .iter()
            .try_fold(dtype.bitsize() / 8, |a, &d| a.checked_mul(d));
        if want != Some(bytes.len()) {
            return Err(Error::Shape(format!(
                "tensor {name}: shape {shape:?} does not match its {} bytes",
                bytes.len()
            )));
        }
        infos.push((
            name.to_string(),
            TensorInfo {
                dtype: *dtype,
                shape: shape.clone(),
                data_offsets: (offset, offset + bytes.len()),
            },
        ));
        offset += bytes.len();
        crc.update(bytes);
    }
    metadata.insert(
        META_CHECKSUM.to_string(),
        format!("crc32:{:08x}", crc.finalize()),
    );
    // The header is written with sorted metadata keys and tensors in file order, so the same
    // tensors and metadata always give the same bytes (a HashMap's order would not).
    let mut meta: Vec<(String, String)> = metadata.into_iter().collect();
    meta.sort();
    Metadata::new(Some(meta.iter().cloned().collect()), infos.clone())
        .map_err(|e| Error::checkpoint(path, format!("could not build the header: {e}")))?;
    let mut obj = serde_json::Map::new();
    obj.insert(
        "__metadata__".to_string(),
        serde_json::Value::Object(
            meta.into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect(),
        ),
    );
    for (name, info) in &infos {
        obj.insert(
            name.clone(),
            serde_json::to_value(info).expect("tensor info serialises"),
        );
    }
    let mut header =
        serde_json::to_vec(&serde_json::Value::Object(obj)).expect("header serialises");
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut tmp = TempFile::beside(path)?;
    let tmp_path = tmp.path().to_path_buf();
    let res = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.file());
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for (_, _, _, bytes) in &items {
            w.write_all(bytes)?;
        }
        w.flush()
    })();
    res.map_err(|e| Error::checkpoint(&tmp_path, format!("could not write: {e}")))?;
    tmp.commit()
}
