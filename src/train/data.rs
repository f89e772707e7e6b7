//! Training data as a stream of clean sequences x0 (B, L) with a resumable position.
//!
//! - [`SyntheticSource`]: spec 1.3 `synthetic-align`. Sequence i is one token, uniform over
//!   the vocabulary minus the mask, repeated L times. The token is a function of (seed, i)
//!   (ChaCha8 stream i), so the stream is endless and `seek` is O(1). The reference instead
//!   draws a fixed pool of 100,000 sequences once and cycles through it; with 50,000 values the
//!   two distributions agree, and ours never repeats a sequence in a different order.
//! - [`TokenFileSource`]: a flat little-endian u16/u32 file of (N, L) ids, memory-mapped. The
//!   last `eval_size` sequences are held out for validation; the rest are visited in a fresh
//!   seeded permutation every epoch.
//!
//! - [`ShardSource`](crate::train::shard_source::ShardSource): prepared token shards
//!   (`data prepare`) through the shuffling [`Loader`](crate::data::Loader); validation reads the
//!   manifest's held-out split.
//!
//! `position()` counts sequences consumed; a run directory records it and `seek` restores it.
//! A source with a richer position (the shard loader's epoch, seed and data fingerprint) also
//! reports it through [`DataSource::loader_position`](crate::train::DataSource::loader_position); the checkpoint stores it and a resume
//! restores it, refusing other data.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::DitConfig;
use crate::tensor::Tokens;
use crate::train::config::{DataSpec, TokenDtype};
use crate::train::source::DataSource;

/// Seed of the synthetic validation set: fixed, so validation numbers of runs with different
/// training seeds compare.
pub const SYNTHETIC_VAL_SEED: u64 = 0x5EED_0000_0000_7A1D;

/// Spec 1.3's synthetic-align data (see the module doc).
#[derive(Clone, Debug)]
pub struct SyntheticSource {
    vocab: usize,
    mask: usize,
    len: usize,
    seed: u64,
    pos: u64,
}

impl SyntheticSource {
    /// Tokens uniform over `0..vocab` without `mask`, sequences of length `len`.
    pub fn new(vocab: usize, mask: usize, len: usize, seed: u64) -> Result<Self> {
        if vocab < 2 || mask >= vocab || len == 0 {
            return Err(Error::Config(format!(
                "synthetic data needs vocab >= 2, mask < vocab and length > 0 \
                 (got vocab {vocab}, mask {mask}, length {len})"
            )));
        }
        Ok(SyntheticSource {
            vocab,
            mask,
            len,
            seed,
            pos: 0,
        })
    }

    /// The token of sequence `i`.
    pub fn token(&self, i: u64) -> u32 {
        let mut r = ChaCha8Rng::seed_from_u64(self.seed);
        r.set_stream(i);
        let k = r.random_range(0..self.vocab - 1);
        (if k >= self.mask { k + 1 } else { k }) as u32
    }
}

impl DataSource for SyntheticSource {
    fn seq_len(&self) -> usize {
        self.len
    }

    fn next_batch(&mut self, batch: usize) -> Result<Tokens> {
        let mut ids = Vec::with_capacity(batch * self.len);
        for b in 0..batch as u64 {
            let tok = self.token(self.pos + b);
            ids.extend(std::iter::repeat_n(tok, self.len));
        }
        self.pos += batch as u64;
        Ok(Tokens {
            batch,
            len: self.len,
            ids,
        })
    }

    fn position(&self) -> u64 {
        self.pos
    }

    fn seek(&mut self, pos: u64) -> Result<()> {
        self.pos = pos;
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "synthetic-align (one token of {} repeated {} times, seed {})",
            self.vocab - 1,
            self.len,
            self.seed
        )
    }
}

/// A memory-mapped token file of (N, L) sequences (see the module doc).
pub struct TokenFileSource {
    path: PathBuf,
    mmap: Mmap,
    dtype: TokenDtype,
    len: usize,
    vocab: usize,
    mask: usize,
    /// Sequences used for training: 0..n_train; the rest are held out.
    n_train: usize,
    n_total: usize,
    seed: u64,
    pos: u64,
    /// (epoch, permutation of 0..n_train) of the current epoch.
    perm: Option<(u64, Vec<u32>)>,
}

impl TokenFileSource {
    /// Opens `path` as (N, `len`) ids of `dtype`, holding out the last `held_out` sequences.
    /// Ids must be below `vocab` and differ from `mask` (checked as batches are read).
    pub fn open(
        path: &Path,
        dtype: TokenDtype,
        len: usize,
        vocab: usize,
        mask: usize,
        held_out: usize,
        seed: u64,
    ) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map; token files are not modified while a run reads them.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let width = match dtype {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        };
        let row = width * len;
        if len == 0 || mmap.len() % row != 0 {
            return Err(Error::Config(format!(
                "token file {}: {} bytes is not a whole number of sequences of {len} {dtype:?} \
                 ids ({row} bytes each); check --length and the file's dtype",
                path.display(),
                mmap.len()
            )));
        }
        let n_total = mmap.len() / row;
        if n_total <= held_out {
            return Err(Error::Config(format!(
                "token file {}: {n_total} sequences of length {len}, but {held_out} are held out \
                 for validation (--eval-size) and at least one must remain for training",
                path.display()
            )));
        }
        Ok(TokenFileSource {
            path: path.to_path_buf(),
            mmap,
            dtype,
            len,
            vocab,
            mask,
            n_train: n_total - held_out,
            n_total,
            seed,
            pos: 0,
            perm: None,
        })
    }

    /// Sequence `i` of the file, checked against the vocabulary.
    fn sequence(&self, i: usize, out: &mut Vec<u32>) -> Result<()> {
        let start = out.len();
        match self.dtype {
            TokenDtype::U16 => {
                let b = &self.mmap[i * self.len * 2..(i + 1) * self.len * 2];
                out.extend(
                    b.chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32),
                );
            }
            TokenDtype::U32 => {
                let b = &self.mmap[i * self.len * 4..(i + 1) * self.len * 4];
                out.extend(
                    b.chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
        }
        if let Some((j, &id)) = out[start..]
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.vocab || id as usize == self.mask)
        {
            return Err(Error::Config(format!(
                "token file {}: sequence {i} position {j} holds id {id}, but ids must be below \
                 the vocabulary size {} and differ from the mask id {}",
                self.path.display(),
                self.vocab,
                self.mask
            )));
        }
        Ok(())
    }

    /// The held-out sequences (the last `held_out` of the file) as one batch.
    pub fn held_out(&self) -> Result<Tokens> {
        let n = self.n_total - self.n_train;
        let mut ids = Vec::with_capacity(n * self.len);
        for i in self.n_train..self.n_total {
            self.sequence(i, &mut ids)?;
        }
        Ok(Tokens {
            batch: n,
            len: self.len,
            ids,
        })
    }

    /// Training sequences per epoch.
    pub fn train_len(&self) -> usize {
        self.n_train
    }

    fn index(&mut self, pos: u64) -> usize {
        let (epoch, k) = (
            pos / self.n_train as u64,
            (pos % self.n_train as u64) as usize,
        );
        if self.perm.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut r = ChaCha8Rng::seed_from_u64(self.seed);
            r.set_stream(epoch);
            let mut p: Vec<u32> = (0..self.n_train as u32).collect();
            p.shuffle(&mut r);
            self.perm = Some((epoch, p));
        }
        self.perm.as_ref().expect("set above").1[k] as usize
    }
}

impl DataSource for TokenFileSource {
    fn seq_len(&self) -> usize {
        self.len
    }

    fn next_batch(&mut self, batch: usize) -> Result<Tokens> {
        let mut ids = Vec::with_capacity(batch * self.len);
        for b in 0..batch as u64 {
            let i = self.index(self.pos + b);
            self.sequence(i, &mut ids)?;
        }
        self.pos += batch as u64;
        Ok(Tokens {
            batch,
            len: self.len,
            ids,
        })
    }

    fn position(&self) -> u64 {
        self.pos
    }

    fn seek(&mut self, pos: u64) -> Result<()> {
        self.pos = pos;
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "{} ({} {:?} sequences of length {}, {} for training, {} held out)",
            self.path.display(),
            self.n_total,
            self.dtype,
            self.len,
            self.n_train,
            self.n_total - self.n_train
        )
    }
}

/// Opens the training source of `spec` for a model of `config` and the held-out set of
/// `eval_size` sequences (`None` when 0). `seed` decides the training order only.
pub fn open(
    spec: &DataSpec,
    config: &DitConfig,
    seed: u64,
    eval_size: usize,
) -> Result<(Box<dyn DataSource>, Option<Tokens>)> {
    let (v, m, l) = (config.vocab_size, config.mask_index, config.length);
    match spec {
        DataSpec::Synthetic => {
            let val = (eval_size > 0)
                .then(|| SyntheticSource::new(v, m, l, SYNTHETIC_VAL_SEED)?.next_batch(eval_size))
                .transpose()?;
            Ok((Box::new(SyntheticSource::new(v, m, l, seed)?), val))
        }
        DataSpec::Tokens { path, dtype } => {
            let src = TokenFileSource::open(path, *dtype, l, v, m, eval_size, seed)?;
            let val = (eval_size > 0).then(|| src.held_out()).transpose()?;
            Ok((Box::new(src), val))
        }
        DataSpec::Shards { dir } => {
            let src = crate::train::shard_source::ShardSource::open(dir, config, seed)?;
            let val = (eval_size > 0)
                .then(|| src.held_out(eval_size))
                .transpose()?;
            Ok((Box::new(src), val))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_rows_repeat_one_token_and_skip_the_mask() {
        let mut s = SyntheticSource::new(5, 2, 4, 7).unwrap();
        let b = s.next_batch(400).unwrap();
        let mut counts = [0usize; 5];
        for row in b.ids.chunks(4) {
            assert!(row.iter().all(|&x| x == row[0]));
            counts[row[0] as usize] += 1;
        }
        assert_eq!(counts[2], 0, "the mask never appears");
        // 400 draws over 4 values: each about 100 (sd 8.7).
        assert!(counts
            .iter()
            .enumerate()
            .all(|(i, &c)| i == 2 || (60..140).contains(&c)));
        assert_eq!(s.position(), 400);
    }

    #[test]
    fn synthetic_seek_resumes_the_stream() {
        let mut a = SyntheticSource::new(50, 49, 3, 1).unwrap();
        a.next_batch(10).unwrap();
        let want = a.next_batch(6).unwrap();
        let mut b = SyntheticSource::new(50, 49, 3, 1).unwrap();
        b.seek(10).unwrap();
        assert_eq!(b.next_batch(6).unwrap(), want);
        let mut c = SyntheticSource::new(50, 49, 3, 2).unwrap();
        c.seek(10).unwrap();
        assert_ne!(
            c.next_batch(6).unwrap(),
            want,
            "another seed, another stream"
        );
    }

    fn write_file(dir: &Path, name: &str, ids: &[u32], dtype: TokenDtype) -> PathBuf {
        let path = dir.join(name);
        let bytes: Vec<u8> = match dtype {
            TokenDtype::U16 => ids.iter().flat_map(|&x| (x as u16).to_le_bytes()).collect(),
            TokenDtype::U32 => ids.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        };
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn token_file_epochs_hold_out_and_resume() {
        let dir = tempfile::tempdir().unwrap();
        // 10 sequences of length 3; sequence i is [i, i, i+1].
        let ids: Vec<u32> = (0..10u32).flat_map(|i| [i, i, i + 1]).collect();
        for dtype in [TokenDtype::U16, TokenDtype::U32] {
            let p = write_file(dir.path(), "t.bin", &ids, dtype);
            let mut s = TokenFileSource::open(&p, dtype, 3, 20, 19, 2, 5).unwrap();
            assert_eq!(s.train_len(), 8);
            assert_eq!(s.held_out().unwrap().ids, &ids[24..]);
            // One epoch visits each training sequence once.
            let e1 = s.next_batch(8).unwrap();
            let mut firsts: Vec<u32> = e1.ids.chunks(3).map(|r| r[0]).collect();
            firsts.sort();
            assert_eq!(firsts, (0..8).collect::<Vec<_>>());
            let e2 = s.next_batch(8).unwrap();
            assert_ne!(e1, e2, "a new permutation each epoch");
            // Seek into the middle of epoch 2.
            let mut t = TokenFileSource::open(&p, dtype, 3, 20, 19, 2, 5).unwrap();
            t.seek(11).unwrap();
            assert_eq!(t.next_batch(5).unwrap().ids, &e2.ids[9..24]);
        }
    }

    #[test]
    fn token_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_file(dir.path(), "odd.bin", &[1, 2, 3, 4, 5], TokenDtype::U32);
        let e = TokenFileSource::open(&p, TokenDtype::U32, 3, 20, 19, 0, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("odd.bin") && e.contains("whole number"), "{e}");
        let p = write_file(dir.path(), "bad.bin", &[1, 2, 19, 4, 5, 6], TokenDtype::U32);
        let mut s = TokenFileSource::open(&p, TokenDtype::U32, 3, 20, 19, 0, 0).unwrap();
        let e = s.next_batch(2).unwrap_err().to_string();
        assert!(e.contains("bad.bin") && e.contains("id 19"), "{e}");
        let e = TokenFileSource::open(&p, TokenDtype::U32, 3, 20, 19, 2, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--eval-size"), "{e}");
        let e = TokenFileSource::open(&dir.path().join("none"), TokenDtype::U32, 3, 20, 19, 0, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("none"), "{e}");
    }
}
