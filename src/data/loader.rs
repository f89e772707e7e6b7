//! Batches of token ids over one split, shuffled per epoch and resumable.
//!
//! Epoch `e` visits the split in the order of a permutation that depends only on `(seed, e)`:
//! a Fisher-Yates shuffle driven by a counter hash (splitmix64 of seed, epoch and step;
//! `j = (hash * (i + 1)) >> 64`, bias below 2^-40 for any real split). It is defined here, not
//! by a crate's RNG, so the order survives dependency updates and a checkpoint from one build
//! resumes identically in another.
//!
//! [`Loader::position`] is everything needed to continue: epoch, sequences consumed in it, and
//! what the position is valid for (seed, batch size, split size and content fingerprint).
//! [`Loader::seek`] restores it and refuses a position from other data or settings. A resumed
//! loader yields exactly the batches the uninterrupted one would have.
//!
//! Batches never straddle epochs. With `drop_last` (training) an epoch has `N / B` batches and
//! the `N mod B` sequences the permutation puts last are skipped that epoch (others next time);
//! without it (evaluation) the last batch of an epoch is smaller.

use serde::{Deserialize, Serialize};

use crate::data::shards::ShardSet;
use crate::error::{Error, Result};

/// Settings of a [`Loader`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderOptions {
    /// Sequences per batch (B).
    pub batch_size: usize,
    /// Seed of the per-epoch permutations.
    pub seed: u64,
    /// Shuffle each epoch (training); `false` reads in stored order (evaluation).
    pub shuffle: bool,
    /// Skip the last incomplete batch of each epoch.
    pub drop_last: bool,
}

impl LoaderOptions {
    /// Training: shuffled, full batches only.
    pub fn train(batch_size: usize, seed: u64) -> Self {
        LoaderOptions {
            batch_size,
            seed,
            shuffle: true,
            drop_last: true,
        }
    }

    /// Evaluation: stored order, every sequence once per epoch.
    pub fn eval(batch_size: usize) -> Self {
        LoaderOptions {
            batch_size,
            seed: 0,
            shuffle: false,
            drop_last: false,
        }
    }
}

/// Where a loader is; store it in a training checkpoint (it serialises with serde).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderPosition {
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Sequences of this epoch already returned.
    pub offset: u64,
    pub seed: u64,
    pub batch_size: usize,
    pub shuffle: bool,
    /// Sequences in the split.
    pub sequences: u64,
    /// [`ShardSet::fingerprint`] of the split.
    pub fingerprint: String,
}

/// A (B, L) batch of token ids, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// `rows * length` ids.
    pub tokens: Vec<u32>,
    pub rows: usize,
    pub length: usize,
    /// Epoch the batch belongs to.
    pub epoch: u64,
    /// Sequence index (in the split) of each row.
    pub indices: Vec<u64>,
}

/// Shuffling, resumable batch loader over a [`ShardSet`].
pub struct Loader {
    set: ShardSet,
    opts: LoaderOptions,
    fingerprint: String,
    epoch: u64,
    offset: u64,
    /// Permutation of the current epoch (empty without shuffle).
    perm: Vec<u32>,
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The permutation of `0..n` for `(seed, epoch)` (see the module doc).
pub fn epoch_permutation(n: u32, seed: u64, epoch: u64) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n).collect();
    let key = splitmix64(seed ^ splitmix64(epoch ^ 0x6A09_E667_F3BC_C908));
    for i in (1..n as usize).rev() {
        let h = splitmix64(key ^ i as u64);
        let j = ((h as u128 * (i as u128 + 1)) >> 64) as usize;
        p.swap(i, j);
    }
    p
}

impl Loader {
    /// A loader at epoch 0, offset 0.
    pub fn new(set: ShardSet, opts: LoaderOptions) -> Result<Self> {
        let n = set.len();
        let where_ = || set.dir.join(format!("{} split", set.split));
        if opts.batch_size == 0 {
            return Err(Error::Config("batch size must be at least 1".into()));
        }
        if n == 0 || (opts.drop_last && n < opts.batch_size as u64) {
            return Err(Error::data(
                where_(),
                format!(
                    "{n} sequences, fewer than one batch of {} (prepare more text or use a \
                     smaller --length / batch)",
                    opts.batch_size
                ),
            ));
        }
        if n > u32::MAX as u64 {
            return Err(Error::data(
                where_(),
                format!("{n} sequences: at most 2^32 - 1"),
            ));
        }
        let fingerprint = set.fingerprint();
        let mut l = Loader {
            set,
            opts,
            fingerprint,
            epoch: 0,
            offset: 0,
            perm: Vec::new(),
        };
        l.build_perm();
        Ok(l)
    }

    fn build_perm(&mut self) {
        self.perm = if self.opts.shuffle {
            epoch_permutation(self.set.len() as u32, self.opts.seed, self.epoch)
        } else {
            Vec::new()
        };
    }

    /// The shards this loader reads.
    pub fn shards(&self) -> &ShardSet {
        &self.set
    }

    pub fn options(&self) -> LoaderOptions {
        self.opts
    }

    /// Batches in one epoch.
    pub fn batches_per_epoch(&self) -> u64 {
        let (n, b) = (self.set.len(), self.opts.batch_size as u64);
        if self.opts.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// Sequences per epoch that batches cover.
    fn epoch_len(&self) -> u64 {
        let (n, b) = (self.set.len(), self.opts.batch_size as u64);
        if self.opts.drop_last {
            n / b * b
        } else {
            n
        }
    }

    /// The next batch; moves to the next epoch (and its permutation) when this one is done.
    pub fn next_batch(&mut self) -> Batch {
        if self.offset >= self.epoch_len() {
            self.epoch += 1;
            self.offset = 0;
            self.build_perm();
        }
        let l = self.set.length();
        let rows = (self.opts.batch_size as u64).min(self.epoch_len() - self.offset) as usize;
        let mut tokens = vec![0u32; rows * l];
        let mut indices = Vec::with_capacity(rows);
        for (r, out) in tokens.chunks_exact_mut(l).enumerate() {
            let k = self.offset + r as u64;
            let i = if self.opts.shuffle {
                self.perm[k as usize] as u64
            } else {
                k
            };
            self.set.read_into(i, out);
            indices.push(i);
        }
        let epoch = self.epoch;
        self.offset += rows as u64;
        Batch {
            tokens,
            rows,
            length: l,
            epoch,
            indices,
        }
    }

    /// Where the loader is: the next batch is the one a loader seeked here returns next.
    pub fn position(&self) -> LoaderPosition {
        LoaderPosition {
            epoch: self.epoch,
            offset: self.offset,
            seed: self.opts.seed,
            batch_size: self.opts.batch_size,
            shuffle: self.opts.shuffle,
            sequences: self.set.len(),
            fingerprint: self.fingerprint.clone(),
        }
    }

    /// Continues from `p`; fails (saying what differs) when `p` was taken on other data or with
    /// other settings.
    pub fn seek(&mut self, p: &LoaderPosition) -> Result<()> {
        let here = self.position();
        let mut diffs = Vec::new();
        if p.fingerprint != here.fingerprint || p.sequences != here.sequences {
            diffs.push(format!(
                "data {} ({} sequences) vs {} ({} sequences)",
                p.fingerprint, p.sequences, here.fingerprint, here.sequences
            ));
        }
        if p.seed != here.seed {
            diffs.push(format!("seed {} vs {}", p.seed, here.seed));
        }
        if p.batch_size != here.batch_size {
            diffs.push(format!(
                "batch size {} vs {}",
                p.batch_size, here.batch_size
            ));
        }
        if p.shuffle != here.shuffle {
            diffs.push(format!("shuffle {} vs {}", p.shuffle, here.shuffle));
        }
        if p.offset > self.epoch_len() {
            diffs.push(format!(
                "offset {} past the epoch's {} sequences",
                p.offset,
                self.epoch_len()
            ));
        }
        if !diffs.is_empty() {
            return Err(Error::data(
                self.set.dir.join(format!("{} split", self.set.split)),
                format!(
                    "cannot resume the data position (saved vs here): {}",
                    diffs.join("; ")
                ),
            ));
        }
        self.epoch = p.epoch;
        self.offset = p.offset;
        self.build_perm();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_permutation_and_depends_on_seed_and_epoch() {
        let p = epoch_permutation(1000, 7, 0);
        let mut s = p.clone();
        s.sort();
        assert_eq!(s, (0..1000).collect::<Vec<u32>>());
        assert_eq!(p, epoch_permutation(1000, 7, 0));
        assert_ne!(p, epoch_permutation(1000, 7, 1));
        assert_ne!(p, epoch_permutation(1000, 8, 0));
        assert_eq!(epoch_permutation(1, 3, 4), vec![0]);
        assert!(epoch_permutation(0, 3, 4).is_empty());
    }

    #[test]
    fn permutation_is_pinned() {
        // The order is part of the checkpoint format: changing it breaks resumption.
        assert_eq!(epoch_permutation(8, 42, 0), PINNED);
    }

    const PINNED: [u32; 8] = [6, 1, 7, 0, 5, 4, 3, 2];

    #[test]
    fn permutation_is_roughly_uniform() {
        // Position of element 0 over many epochs: each of 4 slots about 1/4 of the time.
        let mut counts = [0u32; 4];
        for e in 0..4000 {
            let p = epoch_permutation(4, 1, e);
            counts[p.iter().position(|&x| x == 0).unwrap()] += 1;
        }
        for c in counts {
            assert!((900..1100).contains(&c), "{counts:?}");
        }
    }
}
