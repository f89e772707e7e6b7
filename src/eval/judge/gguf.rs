//! Reading a llama-family GGUF file: the hyper-parameters from its metadata, and the weights as
//! views into the memory-mapped file that are dequantised a few rows at a time.
//!
//! Metadata keys follow the GGUF convention `{arch}.{key}` (`llama.block_count`,
//! `qwen2.attention.head_count_kv`, ...). Tensors are named `token_embd`, `blk.N.attn_q`, ...,
//! `output_norm`, `output` (absent when the output layer is tied to the embedding). candle's
//! `gguf_file` reads the header (its shapes are reversed to row-major: `[rows, cols]` with
//! `cols` the contiguous input dimension) and its block types dequantise.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::CpuStorage;
use memmap2::Mmap;

use crate::error::{Error, Result};

/// How rotary embedding pairs the channels of a head (the convention of the architecture, as
/// in the GGUF converters: llama files store q/k permuted for adjacent pairs, qwen2 files not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Channels `(2i, 2i + 1)` rotate together (`llama`).
    Interleaved,
    /// Channels `(i, i + rot/2)` rotate together (`qwen2`, GPT-NeoX).
    Halves,
}

/// The hyper-parameters of the forward, from the GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `general.architecture`: `llama` or `qwen2`.
    pub arch: String,
    pub vocab: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub rms_eps: f64,
    /// `{arch}.rope.freq_base` (10000 when absent).
    pub rope_base: f64,
    /// Channels of a head that rotate (`{arch}.rope.dimension_count`, the head size when absent).
    pub rope_dim: usize,
    pub rope_style: RopeStyle,
    /// Positions are divided by this (`{arch}.rope.scaling.type = linear`), 1 otherwise.
    pub rope_linear_scale: f64,
    pub context_len: usize,
}

/// One weight matrix `[rows, cols]` (or vector `[cols]`, rows = 1) inside the mapped file.
#[derive(Clone, Debug)]
pub struct Weight {
    pub name: String,
    pub dtype: GgmlDType,
    pub rows: usize,
    pub cols: usize,
    /// Byte offset of the tensor in the file.
    start: usize,
    /// Bytes of one row (`cols / block_size · type_size`).
    row_bytes: usize,
}

/// The weight dtypes the judge reads: every block type that candle dequantises except the
/// activation-only Q8_1 / Q8_K. The parity fixture covers F32, F16, Q4_1, Q8_0, Q4_K and Q6_K.
const SUPPORTED: [GgmlDType; 13] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// An opened GGUF file: its header and the mapped bytes.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    map: Mmap,
}

impl GgufFile {
    /// Maps `path` and parses its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and the file is only read; a file changed on disk while
        // mapped is outside what the engine guards against (as with every mapped checkpoint).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut cursor = std::io::Cursor::new(&map[..]);
        let content = Content::read(&mut cursor)
            .map_err(|e| judge_err(path, format!("not a readable GGUF file: {e}")))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            map,
        })
    }

    pub fn err(&self, msg: impl Into<String>) -> Error {
        judge_err(&self.path, msg)
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_str(&self, key: &str) -> Result<&str> {
        match self.meta(key) {
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(self.err(format!("metadata {key} is {v:?}, expected a string"))),
            None => Err(self.err(format!("metadata {key} is missing"))),
        }
    }

    /// An integer metadata value of any integer type.
    pub fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        let v = match self.meta(key) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n: Option<i128> = match v {
            Value::U8(x) => Some(*x as i128),
            Value::I8(x) => Some(*x as i128),
            Value::U16(x) => Some(*x as i128),
            Value::I16(x) => Some(*x as i128),
            Value::U32(x) => Some(*x as i128),
            Value::I32(x) => Some(*x as i128),
            Value::U64(x) => Some(*x as i128),
            Value::I64(x) => Some(*x as i128),
            _ => None,
        };
        match n {
            Some(n) if n >= 0 => Ok(Some(n as usize)),
            _ => Err(self.err(format!(
                "metadata {key} is {v:?}, expected a non-negative integer"
            ))),
        }
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.err(format!("metadata {key} is {v:?}, expected a float"))),
        }
    }

    fn need_usize(&self, key: &str) -> Result<usize> {
        self.meta_usize(key)?
            .ok_or_else(|| self.err(format!("metadata {key} is missing")))
    }

    /// The forward's hyper-parameters, checked against each other.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self.meta_str("general.architecture")?.to_string();
        let rope_style = match arch.as_str() {
            "llama" => RopeStyle::Interleaved,
            "qwen2" => RopeStyle::Halves,
            other => {
                return Err(self.err(format!(
                    "architecture {other:?} is not supported (expected llama or qwen2)"
                )))
            }
        };
        let k = |s: &str| format!("{arch}.{s}");
        let d_model = self.need_usize(&k("embedding_length"))?;
        let n_heads = self.need_usize(&k("attention.head_count"))?;
        let n_kv_heads = self
            .meta_usize(&k("attention.head_count_kv"))?
            .unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || d_model % n_heads != 0 || n_heads % n_kv_heads != 0 {
            return Err(self.err(format!(
                "{d_model} channels, {n_heads} heads and {n_kv_heads} kv heads do not divide"
            )));
        }
        let head_dim = d_model / n_heads;
        let rope_dim = self
            .meta_usize(&k("rope.dimension_count"))?
            .unwrap_or(head_dim);
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(self.err(format!(
                "rope.dimension_count {rope_dim} must be even and at most the head size {head_dim}"
            )));
        }
        let rope_linear_scale = match self.meta(&k("rope.scaling.type")) {
            None => 1.0,
            Some(Value::String(s)) if s == "none" => 1.0,
            Some(Value::String(s)) if s == "linear" => self
                .meta_f64(&k("rope.scaling.factor"))?
                .filter(|f| *f > 0.0)
                .ok_or_else(|| self.err("linear rope scaling without a positive factor"))?,
            Some(v) => {
                return Err(self.err(format!(
                    "rope.scaling.type {v:?} is not supported (none or linear)"
                )))
            }
        };
        let embd = self.tensor_shape("token_embd.weight")?;
        let vocab = embd.0;
        if embd.1 != d_model {
            return Err(self.err(format!(
                "token_embd.weight has {} columns, embedding_length is {d_model}",
                embd.1
            )));
        }
        Ok(LlamaConfig {
            vocab,
            d_model,
            n_layers: self.need_usize(&k("block_count"))?,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn: self.need_usize(&k("feed_forward_length"))?,
            rms_eps: self
                .meta_f64(&k("attention.layer_norm_rms_epsilon"))?
                .ok_or_else(|| {
                    self.err(format!(
                        "metadata {} is missing",
                        k("attention.layer_norm_rms_epsilon")
                    ))
                })?,
            rope_base: self.meta_f64(&k("rope.freq_base"))?.unwrap_or(10000.0),
            rope_dim,
            rope_style,
            rope_linear_scale,
            context_len: self.need_usize(&k("context_length"))?,
            arch,
        })
    }

    /// `(rows, cols)` of a tensor of rank 1 or 2.
    fn tensor_shape(&self, name: &str) -> Result<(usize, usize)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.err(format!("tensor {name} is missing")))?;
        match *info.shape.dims() {
            [c] => Ok((1, c)),
            [r, c] => Ok((r, c)),
            ref d => Err(self.err(format!(
                "tensor {name} has shape {d:?}, expected rank 1 or 2"
            ))),
        }
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The weight `name`, checked to be `[rows, cols]` (rows = 1 for a vector) of a supported
    /// dtype and to lie inside the file.
    pub fn weight(&self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let info = &self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.err(format!("tensor {name} is missing")))?;
        let shape = self.tensor_shape(name)?;
        if shape != (rows, cols) {
            return Err(self.err(format!(
                "tensor {name} is {:?}, expected [{rows}, {cols}]",
                info.shape.dims()
            )));
        }
        let dtype = info.ggml_dtype;
        if !SUPPORTED.contains(&dtype) {
            return Err(self.err(format!(
                "tensor {name} is {dtype:?}; the judge reads {SUPPORTED:?}"
            )));
        }
        if cols % dtype.block_size() != 0 {
            return Err(self.err(format!(
                "tensor {name}: {cols} columns are not whole {dtype:?} blocks of {}",
                dtype.block_size()
            )));
        }
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        let end = start + rows * row_bytes;
        // Row slices are handed to candle's block types, which need their natural alignment
        // (f16 / f32 fields): GGUF aligns tensors to 32 bytes and every row size is even.
        if end > self.map.len() || start % 4 != 0 || row_bytes % 2 != 0 {
            return Err(self.err(format!(
                "tensor {name}: bytes {start}..{end} are outside the file ({} bytes) or misaligned",
                self.map.len()
            )));
        }
        Ok(Weight {
            name: name.to_string(),
            dtype,
            rows,
            cols,
            start,
            row_bytes,
        })
    }

    /// Rows `r0..r1` of `w` as f32, row-major `[(r1 - r0), cols]`.
    pub fn rows_f32(&self, w: &Weight, r0: usize, r1: usize) -> Result<Vec<f32>> {
        debug_assert!(r0 <= r1 && r1 <= w.rows);
        let bytes = &self.map[w.start + r0 * w.row_bytes..w.start + r1 * w.row_bytes];
        let n = (r1 - r0) * w.cols;
        let blocks = w.dtype.from_data(Cow::Borrowed(bytes));
        match blocks.dequantize(n) {
            Ok(CpuStorage::F32(v)) => Ok(v),
            Ok(_) => Err(self.err(format!(
                "tensor {}: dequantised to a non-f32 buffer",
                w.name
            ))),
            Err(e) => Err(self.err(format!("tensor {}: {e}", w.name))),
        }
    }

    /// A whole vector or small matrix as f32 (norm weights, biases).
    pub fn all_f32(&self, w: &Weight) -> Result<Vec<f32>> {
        self.rows_f32(w, 0, w.rows)
    }

    /// A string array from the metadata (tokens, merges).
    pub fn meta_strings(&self, key: &str) -> Result<Vec<&str>> {
        match self.meta(key) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    v => Err(self.err(format!("metadata {key} holds {v:?}, expected strings"))),
                })
                .collect(),
            Some(v) => Err(self.err(format!("metadata {key} is {v:?}, expected an array"))),
            None => Err(self.err(format!("metadata {key} is missing"))),
        }
    }

    /// An integer array from the metadata (token types).
    pub fn meta_ints(&self, key: &str) -> Result<Vec<i64>> {
        match self.meta(key) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(*x as i64),
                    Value::U32(x) => Ok(*x as i64),
                    Value::I8(x) => Ok(*x as i64),
                    Value::U8(x) => Ok(*x as i64),
                    Value::I64(x) => Ok(*x),
                    v => Err(self.err(format!("metadata {key} holds {v:?}, expected integers"))),
                })
                .collect(),
            Some(v) => Err(self.err(format!("metadata {key} is {v:?}, expected an array"))),
            None => Err(self.err(format!("metadata {key} is missing"))),
        }
    }

    /// Counts of tensors per dtype, for the description.
    pub fn dtype_counts(&self) -> Vec<(String, usize)> {
        let mut m: HashMap<String, usize> = HashMap::new();
        for info in self.content.tensor_infos.values() {
            *m.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }
}

pub fn judge_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Judge {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}
