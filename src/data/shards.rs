//! Token shards on disk and their manifest.
//!
//! A prepared folder holds `manifest.json` and, per split, files `<split>-<NNNNN>.bin`. A shard
//! is a headerless array of `sequences x length` token ids, little-endian, `u16` when the
//! vocabulary fits (both reference tokenizers do) and `u32` otherwise; everything else lives in
//! the manifest ([`Manifest`]): tokenizer, V, mask index, BOS/EOS, length, dtype, and per shard
//! its sequence count, byte size and sha256. Files are written under a `.tmp` name and renamed
//! when complete; the manifest is written last, so a folder without one is an unfinished run.
//!
//! Readers ([`ShardSet::open`]) map the shards with memmap2 and check every shard against the
//! manifest: its size always, its sha256 and the range of its ids (`< vocab_size`) with
//! [`Check::Full`]. A mismatch names the file, what was expected and what was found.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Name of the manifest inside a prepared folder.
pub const MANIFEST: &str = "manifest.json";
/// `format` field of the manifest.
pub const FORMAT: &str = "imdm-token-shards";
/// `version` field of the manifest this build reads and writes.
pub const VERSION: u32 = 1;

/// Element type of the shard files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    /// The smallest type that holds ids below `vocab_size`.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

/// The tokenizer a folder was prepared with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// `bert` or `gpt2`.
    pub kind: String,
    /// `reference` or `clean` (see `data::tokenizer::Conventions`).
    pub conventions: String,
    /// sha256 of each vocabulary file.
    pub files: BTreeMap<String, String>,
}

/// How documents were wrapped into sequences (spec 1.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrapInfo {
    /// EOS appended to every document before concatenation.
    pub insert_eos: bool,
    /// Human-readable description of the scheme.
    pub scheme: String,
}

/// How documents were assigned to splits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitRuleInfo {
    pub heldout_frac: f64,
    pub heldout_prefixes: Vec<String>,
    pub rule: String,
}

/// One shard file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name inside the folder.
    pub file: String,
    pub sequences: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// One split (`train`, `valid`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitInfo {
    pub documents: u64,
    /// Input text bytes of those documents.
    pub text_bytes: u64,
    /// Tokens of the documents, per-document EOS included, before cutting.
    pub tokens: u64,
    /// Wrapped sequences of `length` tokens.
    pub sequences: u64,
    /// Tokens left over at the end that did not fill a sequence (dropped, as the reference).
    pub dropped_tokens: u64,
    pub shards: Vec<ShardInfo>,
}

/// One input file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub path: String,
    pub bytes: u64,
}

/// `manifest.json` of a prepared folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub tokenizer: TokenizerInfo,
    /// The model's vocabulary V (mask included).
    pub vocab_size: usize,
    pub mask_index: u32,
    pub bos: u32,
    pub eos: u32,
    /// Tokens per sequence (BOS and EOS included).
    pub length: usize,
    pub dtype: TokenDtype,
    pub wrap: WrapInfo,
    pub split_rule: SplitRuleInfo,
    pub splits: BTreeMap<String, SplitInfo>,
    pub sources: Vec<SourceInfo>,
    pub skipped_empty_documents: u64,
    pub created_by: String,
}

impl Manifest {
    /// Reads and checks `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::data(
                    &path,
                    "no manifest: not a prepared folder, or `data prepare` did not finish",
                )
            } else {
                Error::io(&path, e)
            }
        })?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::data(&path, format!("not a valid manifest: {e}")))?;
        if m.format != FORMAT || m.version != VERSION {
            return Err(Error::data(
                &path,
                format!(
                    "format {} version {}, expected {FORMAT} version {VERSION}",
                    m.format, m.version
                ),
            ));
        }
        if m.length < 3 || (m.mask_index as usize) >= m.vocab_size {
            return Err(Error::data(
                &path,
                format!(
                    "inconsistent: length {} (needs >= 3), mask {} with V = {}",
                    m.length, m.mask_index, m.vocab_size
                ),
            ));
        }
        if m.dtype.bytes() < TokenDtype::for_vocab(m.vocab_size).bytes() {
            return Err(Error::data(
                &path,
                format!("dtype {:?} cannot hold V = {}", m.dtype, m.vocab_size),
            ));
        }
        Ok(m)
    }

    /// Writes `dir/manifest.json` atomically (temporary name, then rename).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::data(&path, format!("could not serialise: {e}")))?;
        crate::outputs::write_bytes(&path, (text + "\n").as_bytes())
    }

    /// The split named `name`, or an error listing the ones there are.
    pub fn split(&self, name: &str, dir: &Path) -> Result<&SplitInfo> {
        self.splits.get(name).ok_or_else(|| {
            let have: Vec<&str> = self.splits.keys().map(|s| s.as_str()).collect();
            Error::data(
                dir.join(MANIFEST),
                format!("no split {name:?} (have: {})", have.join(", ")),
            )
        })
    }
}

/// Writes the wrapped sequences of one split into shard files (spec 1.2): documents are
/// appended (with EOS when `insert_eos`) to a running stream, which is cut into chunks of
/// `length - 2` tokens, each emitted as `[BOS] chunk [EOS]`; the remainder is dropped.
pub struct SplitWriter {
    dir: PathBuf,
    split: String,
    length: usize,
    dtype: TokenDtype,
    bos: u32,
    eos: u32,
    insert_eos: bool,
    seqs_per_shard: u64,
    pending: Vec<u32>,
    cur: Option<(BufWriter<File>, Sha256, u64, PathBuf)>,
    info: SplitInfo,
    row: Vec<u8>,
}

impl SplitWriter {
    /// A writer of `dir/<split>-NNNNN.bin` with at most `seqs_per_shard` sequences per file.
    pub fn new(
        dir: &Path,
        split: &str,
        length: usize,
        dtype: TokenDtype,
        (bos, eos): (u32, u32),
        insert_eos: bool,
        seqs_per_shard: u64,
    ) -> Result<Self> {
        if length < 3 {
            return Err(Error::Config(format!(
                "--length {length}: needs at least 3 (BOS, one token, EOS)"
            )));
        }
        Ok(SplitWriter {
            dir: dir.to_path_buf(),
            split: split.to_string(),
            length,
            dtype,
            bos,
            eos,
            insert_eos,
            seqs_per_shard: seqs_per_shard.max(1),
            pending: Vec::new(),
            cur: None,
            info: SplitInfo::default(),
            row: Vec::with_capacity(length * dtype.bytes()),
        })
    }

    /// Appends one tokenized document of `text_bytes` bytes.
    pub fn push_document(&mut self, ids: &[u32], text_bytes: u64) -> Result<()> {
        self.info.documents += 1;
        self.info.text_bytes += text_bytes;
        self.pending.extend_from_slice(ids);
        if self.insert_eos {
            self.pending.push(self.eos);
        }
        self.info.tokens += ids.len() as u64 + self.insert_eos as u64;
        let chunk = self.length - 2;
        let full = self.pending.len() / chunk * chunk;
        for start in (0..full).step_by(chunk) {
            self.emit(start, chunk)?;
        }
        self.pending.drain(..full);
        Ok(())
    }

    fn emit(&mut self, start: usize, chunk: usize) -> Result<()> {
        if self.cur.is_none() {
            let name = format!("{}-{:05}.bin", self.split, self.info.shards.len());
            let tmp = self.dir.join(format!("{name}.tmp"));
            let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            self.cur = Some((BufWriter::with_capacity(1 << 20, f), Sha256::new(), 0, tmp));
        }
        self.row.clear();
        let ids = std::iter::once(self.bos)
            .chain(self.pending[start..start + chunk].iter().copied())
            .chain(std::iter::once(self.eos));
        for id in ids {
            match self.dtype {
                TokenDtype::U16 => self.row.extend_from_slice(&(id as u16).to_le_bytes()),
                TokenDtype::U32 => self.row.extend_from_slice(&id.to_le_bytes()),
            }
        }
        let (w, h, n, tmp) = self.cur.as_mut().expect("open shard");
        w.write_all(&self.row).map_err(|e| Error::io(&*tmp, e))?;
        h.update(&self.row);
        *n += 1;
        self.info.sequences += 1;
        if *n >= self.seqs_per_shard {
            self.close_shard()?;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        let Some((mut w, h, n, tmp)) = self.cur.take() else {
            return Ok(());
        };
        w.flush().map_err(|e| Error::io(&tmp, e))?;
        let f = w
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        let name = format!("{}-{:05}.bin", self.split, self.info.shards.len());
        let path = self.dir.join(&name);
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        self.info.shards.push(ShardInfo {
            file: name,
            sequences: n,
            bytes: n * (self.length * self.dtype.bytes()) as u64,
            sha256: hex(&h.finalize()),
        });
        Ok(())
    }

    /// Closes the last shard, drops the remainder and returns the split's summary.
    pub fn finish(mut self) -> Result<SplitInfo> {
        self.close_shard()?;
        self.info.dropped_tokens = self.pending.len() as u64;
        Ok(self.info)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(hex(&h.finalize()))
}

/// How much [`ShardSet::open`] checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Check {
    /// Sizes against the manifest (instant).
    Size,
    /// Sizes, sha256 and every id below V (reads every byte once).
    Full,
}

/// The memory-mapped shards of one split.
pub struct ShardSet {
    pub dir: PathBuf,
    pub split: String,
    pub manifest: Manifest,
    maps: Vec<Mmap>,
    /// Cumulative sequence counts: shard `k` holds sequences `starts[k]..starts[k + 1]`.
    starts: Vec<u64>,
}

impl ShardSet {
    /// Opens split `split` of the prepared folder `dir`, checking it as `check` says.
    pub fn open(dir: &Path, split: &str, check: Check) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let info = manifest.split(split, dir)?.clone();
        let row_bytes = (manifest.length * manifest.dtype.bytes()) as u64;
        let mut maps = Vec::with_capacity(info.shards.len());
        let mut starts = vec![0u64];
        for s in &info.shards {
            let path = dir.join(&s.file);
            let f = File::open(&path).map_err(|e| {
                Error::data(
                    &path,
                    format!("shard listed in {MANIFEST} cannot be opened: {e}"),
                )
            })?;
            let size = f.metadata().map_err(|e| Error::io(&path, e))?.len();
            let want = s.sequences * row_bytes;
            if size != want || s.bytes != want {
                return Err(Error::data(
                    &path,
                    format!(
                        "size {size} bytes, but {MANIFEST} says {} sequences x {} tokens x {} \
                         bytes = {want} (truncated or from another run?)",
                        s.sequences,
                        manifest.length,
                        manifest.dtype.bytes()
                    ),
                ));
            }
            // SAFETY: read-only map of a file that writers only ever create under a temporary
            // name and rename; nothing modifies a finished shard in place.
            let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(&path, e))?;
            if check == Check::Full {
                verify_full(&path, &map, s, &manifest)?;
            }
            maps.push(map);
            starts.push(starts.last().unwrap() + s.sequences);
        }
        if *starts.last().unwrap() != info.sequences {
            return Err(Error::data(
                dir.join(MANIFEST),
                format!(
                    "split {split}: shards hold {} sequences, the split says {}",
                    starts.last().unwrap(),
                    info.sequences
                ),
            ));
        }
        Ok(ShardSet {
            dir: dir.to_path_buf(),
            split: split.to_string(),
            manifest,
            maps,
            starts,
        })
    }

    /// Number of sequences.
    pub fn len(&self) -> u64 {
        *self.starts.last().unwrap()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens per sequence.
    pub fn length(&self) -> usize {
        self.manifest.length
    }

    /// Writes sequence `i` into `out` (`length` ids). Panics if `i >= len()` or `out` has the
    /// wrong length (both are caller bugs, checked by the loader).
    pub fn read_into(&self, i: u64, out: &mut [u32]) {
        assert!(i < self.len(), "sequence {i} of {}", self.len());
        assert_eq!(out.len(), self.manifest.length);
        let k = self.starts.partition_point(|&s| s <= i) - 1;
        let local = (i - self.starts[k]) as usize;
        let b = self.manifest.dtype.bytes();
        let row = &self.maps[k][local * self.manifest.length * b..][..self.manifest.length * b];
        match self.manifest.dtype {
            TokenDtype::U16 => {
                for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                    *o = u16::from_le_bytes([c[0], c[1]]) as u32;
                }
            }
            TokenDtype::U32 => {
                for (o, c) in out.iter_mut().zip(row.chunks_exact(4)) {
                    *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
    }

    /// Sequence `i` as a new vector.
    pub fn get(&self, i: u64) -> Vec<u32> {
        let mut v = vec![0; self.manifest.length];
        self.read_into(i, &mut v);
        v
    }

    /// Checks that these shards fit a model with vocabulary `vocab_size`, mask `mask_index`
    /// and sequence length `length`; the error names the folder and both sides.
    pub fn check_model(&self, vocab_size: usize, mask_index: u32, length: usize) -> Result<()> {
        let m = &self.manifest;
        if (m.vocab_size, m.mask_index, m.length) != (vocab_size, mask_index, length) {
            return Err(Error::data(
                self.dir.join(MANIFEST),
                format!(
                    "prepared for V={} mask={} length {} ({} tokenizer), but the model has \
                     V={vocab_size} mask={mask_index} length {length}",
                    m.vocab_size, m.mask_index, m.length, m.tokenizer.kind
                ),
            ));
        }
        Ok(())
    }

    /// A fingerprint of the split's content (sha256 over its shards' sha256), for checkpoints.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for s in &self.manifest.splits[&self.split].shards {
            h.update(s.sha256.as_bytes());
        }
        hex(&h.finalize()[..8])
    }
}

fn verify_full(path: &Path, map: &[u8], s: &ShardInfo, m: &Manifest) -> Result<()> {
    let got = hex(&Sha256::digest(map));
    if got != s.sha256 {
        return Err(Error::data(
            path,
            format!(
                "sha256 {got}, but {MANIFEST} says {} (the file was modified or corrupted)",
                s.sha256
            ),
        ));
    }
    let v = m.vocab_size as u32;
    let bad = match m.dtype {
        TokenDtype::U16 => map
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .enumerate()
            .find(|&(_, id)| id >= v),
        TokenDtype::U32 => map
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .enumerate()
            .find(|&(_, id)| id >= v),
    };
    if let Some((i, id)) = bad {
        return Err(Error::data(
            path,
            format!(
                "token {i} (sequence {}, position {}) is id {id}, outside the vocabulary \
                 (V = {v} in {MANIFEST})",
                i / m.length,
                i % m.length
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_u16(path: &Path) -> Vec<u32> {
        std::fs::read(path)
            .unwrap()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .collect()
    }

    /// Spec 1.2 on a tiny stream: documents + EOS, chunks of length-2, [BOS] chunk [EOS],
    /// remainder dropped; shards rotate after `seqs_per_shard` sequences.
    #[test]
    fn wraps_as_the_reference() {
        let dir = tempfile::tempdir().unwrap();
        let mut w =
            SplitWriter::new(dir.path(), "train", 6, TokenDtype::U16, (98, 99), true, 2).unwrap();
        w.push_document(&[1, 2, 3], 10).unwrap();
        w.push_document(&[4, 5], 10).unwrap();
        w.push_document(&[6, 7, 8, 9, 10], 10).unwrap();
        let info = w.finish().unwrap();
        // stream: 1 2 3 99 | 4 5 99 6 | 7 8 9 10 | 99 (dropped)
        assert_eq!(info.sequences, 3);
        assert_eq!(info.tokens, 13);
        assert_eq!(info.dropped_tokens, 1);
        assert_eq!(info.documents, 3);
        assert_eq!(info.shards.len(), 2);
        let a = read_u16(&dir.path().join("train-00000.bin"));
        let b = read_u16(&dir.path().join("train-00001.bin"));
        assert_eq!(a, [98, 1, 2, 3, 99, 99, 98, 4, 5, 99, 6, 99]);
        assert_eq!(b, [98, 7, 8, 9, 10, 99]);
        assert_eq!(info.shards[1].bytes, 12);
        assert_eq!(
            info.shards[1].sha256,
            sha256_file(&dir.path().join("train-00001.bin")).unwrap()
        );
        // No leftover temporary files.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn without_eos_and_with_u32() {
        let dir = tempfile::tempdir().unwrap();
        let mut w =
            SplitWriter::new(dir.path(), "valid", 4, TokenDtype::U32, (7, 8), false, 100).unwrap();
        w.push_document(&[70000, 2, 3], 1).unwrap();
        w.push_document(&[4], 1).unwrap();
        let info = w.finish().unwrap();
        assert_eq!((info.sequences, info.dropped_tokens), (2, 0));
        let raw = std::fs::read(dir.path().join("valid-00000.bin")).unwrap();
        let ids: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(ids, [7, 70000, 2, 8, 7, 3, 4, 8]);
        assert!(SplitWriter::new(dir.path(), "x", 2, TokenDtype::U16, (0, 0), true, 1).is_err());
    }

    #[test]
    fn dtype_by_vocab() {
        assert_eq!(TokenDtype::for_vocab(50258), TokenDtype::U16);
        assert_eq!(TokenDtype::for_vocab(65536), TokenDtype::U16);
        assert_eq!(TokenDtype::for_vocab(65537), TokenDtype::U32);
    }
}
