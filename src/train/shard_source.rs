//! Training on a folder prepared by `data prepare` (`--data shards:DIR`).
//!
//! [`ShardSource`] reads the `train` split through the data [`Loader`] (a fresh seeded
//! permutation every epoch, full batches only) and the first `--eval-size` sequences of the
//! `valid` split, in stored order, as the validation set. When it opens, the manifest's
//! vocabulary, mask id and sequence length must equal the model's; the error names the
//! manifest and both sides.
//!
//! Position: `position()` is the number of sequences delivered, `epoch · (N − N mod B) +
//! offset`, which the loader's (epoch, offset) determines and is determined by, because the
//! batch size B never changes within a run. The checkpoint also stores the loader's own
//! [`LoaderPosition`] (seed, batch size, split size and content fingerprint), and a resume
//! restores it, so a run resumed on re-prepared or different shards stops with a message
//! instead of silently continuing on other data.
//!
//! The loader needs B, which the trainer announces through
//! [`DataSource::set_batch_size`] before the first batch; a `seek` before that is kept and
//! applied then.

use std::path::{Path, PathBuf};

use crate::data::shards::MANIFEST;
use crate::data::{Check, Loader, LoaderOptions, LoaderPosition, Manifest, ShardSet, TRAIN, VALID};
use crate::error::{Error, Result};
use crate::model::DitConfig;
use crate::tensor::Tokens;
use crate::train::source::DataSource;

/// Prepared token shards as a training source (see the module doc).
pub struct ShardSource {
    dir: PathBuf,
    manifest: Manifest,
    seed: u64,
    vocab: usize,
    mask: u32,
    /// The train split, until the batch size is known and the loader takes it.
    set: Option<ShardSet>,
    /// Sequences to skip when the loader is created (a `seek` before `set_batch_size`).
    pending: u64,
    loader: Option<Loader>,
    /// Sequences in the train split.
    n_train: u64,
}

impl ShardSource {
    /// Opens the `train` split of `dir` for a model of `config`; `seed` decides the order.
    pub fn open(dir: &Path, config: &DitConfig, seed: u64) -> Result<Self> {
        let set = ShardSet::open(dir, TRAIN, Check::Full)?;
        set.check_model(config.vocab_size, config.mask_index as u32, config.length)?;
        if set.is_empty() {
            return Err(Error::data(
                dir.join(MANIFEST),
                "the train split holds no sequences (prepare more text or a shorter --length)",
            ));
        }
        Ok(ShardSource {
            dir: dir.to_path_buf(),
            manifest: set.manifest.clone(),
            seed,
            vocab: config.vocab_size,
            mask: config.mask_index as u32,
            n_train: set.len(),
            set: Some(set),
            pending: 0,
            loader: None,
        })
    }

    /// The folder's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The first `max` sequences of the `valid` split (all of them when it has fewer), in
    /// stored order, as one batch.
    pub fn held_out(&self, max: usize) -> Result<Tokens> {
        let set = ShardSet::open(&self.dir, VALID, Check::Full)?;
        let n = (set.len() as usize).min(max);
        if n == 0 {
            return Err(Error::data(
                self.dir.join(MANIFEST),
                "the valid split holds no sequences; prepare with --heldout-frac / \
                 --heldout-prefix, or train with --eval-size 0",
            ));
        }
        let l = set.length();
        let mut ids = vec![0u32; n * l];
        for (i, row) in ids.chunks_exact_mut(l).enumerate() {
            set.read_into(i as u64, row);
        }
        self.check_ids(VALID, &ids, l)?;
        Ok(Tokens {
            batch: n,
            len: l,
            ids,
        })
    }

    /// Ids must lie below V and differ from the mask (`--check size` shards are not scanned
    /// when opened, so each batch is).
    fn check_ids(&self, split: &str, ids: &[u32], l: usize) -> Result<()> {
        if let Some((i, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.vocab || id == self.mask)
        {
            return Err(Error::data(
                &self.dir,
                format!(
                    "{split} split: batch row {} position {} holds id {id}, but ids must lie \
                     below V = {} and differ from the mask {} (run `data info --verify`)",
                    i / l,
                    i % l,
                    self.vocab,
                    self.mask
                ),
            ));
        }
        Ok(())
    }

    /// Sequences per epoch that full batches of `b` cover.
    fn epoch_len(&self, b: usize) -> u64 {
        self.n_train / b as u64 * b as u64
    }

    fn loader(&mut self, batch: usize) -> Result<&mut Loader> {
        if self.loader.is_none() {
            let set = self
                .set
                .take()
                .expect("the set is there until the loader takes it");
            let mut l = Loader::new(set, LoaderOptions::train(batch, self.seed))?;
            if self.pending > 0 {
                let p = Self::position_at(&l, self.pending, self.epoch_len(batch));
                l.seek(&p)?;
            }
            self.loader = Some(l);
        }
        let l = self.loader.as_mut().expect("set above");
        let have = l.options().batch_size;
        if have != batch {
            return Err(Error::Config(format!(
                "shard data {}: batches of {batch} asked for, but the loader serves batches of \
                 {have} (the batch size cannot change within a run)",
                self.dir.display()
            )));
        }
        Ok(l)
    }

    /// The loader position after `pos` sequences.
    fn position_at(l: &Loader, pos: u64, epoch_len: u64) -> LoaderPosition {
        LoaderPosition {
            epoch: pos / epoch_len,
            offset: pos % epoch_len,
            ..l.position()
        }
    }
}

impl DataSource for ShardSource {
    fn seq_len(&self) -> usize {
        self.manifest.length
    }

    fn next_batch(&mut self, batch: usize) -> Result<Tokens> {
        let b = self.loader(batch)?.next_batch();
        self.check_ids(TRAIN, &b.tokens, b.length)?;
        Ok(Tokens {
            batch: b.rows,
            len: b.length,
            ids: b.tokens,
        })
    }

    fn position(&self) -> u64 {
        match &self.loader {
            Some(l) => {
                let p = l.position();
                p.epoch * self.epoch_len(p.batch_size) + p.offset
            }
            None => self.pending,
        }
    }

    fn seek(&mut self, pos: u64) -> Result<()> {
        match &mut self.loader {
            Some(l) => {
                let b = l.options().batch_size;
                let el = self.n_train / b as u64 * b as u64;
                let p = Self::position_at(l, pos, el);
                l.seek(&p)
            }
            None => {
                self.pending = pos;
                Ok(())
            }
        }
    }

    fn describe(&self) -> String {
        let m = &self.manifest;
        let valid = m.splits.get(VALID).map_or(0, |s| s.sequences);
        format!(
            "shards {} ({} tokenizer, {} train + {valid} valid sequences of length {})",
            self.dir.display(),
            m.tokenizer.kind,
            self.n_train,
            m.length
        )
    }

    fn set_batch_size(&mut self, batch: usize) -> Result<()> {
        self.loader(batch).map(|_| ())
    }

    fn loader_position(&self) -> Option<LoaderPosition> {
        self.loader.as_ref().map(|l| l.position())
    }

    fn restore_loader(&mut self, p: &LoaderPosition) -> Result<()> {
        self.loader(p.batch_size)?.seek(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{prepare, Conventions, PrepareOptions, SplitRule, TokenizerKind, TxtMode};

    fn prepared(dir: &Path, length: usize) -> PathBuf {
        let out = dir.join("shards");
        prepare(&PrepareOptions {
            inputs: vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text")],
            out: out.clone(),
            tokenizer: TokenizerKind::Gpt2,
            conventions: Conventions::Reference,
            length,
            split: SplitRule {
                frac: 0.0,
                prefixes: vec!["austen/persuasion/".into()],
            },
            insert_eos: true,
            txt_mode: TxtMode::File,
            text_field: "text".into(),
            shard_mib: 256,
            force: false,
            progress: false,
        })
        .unwrap();
        out
    }

    fn model(length: usize) -> DitConfig {
        DitConfig {
            length,
            ..DitConfig::tiny()
        }
    }

    #[test]
    fn seek_by_count_equals_the_uninterrupted_stream_across_epochs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = prepared(tmp.path(), 32); // 56 train sequences: 7 batches of 8 per epoch
        let m = model(32);
        let mut a = ShardSource::open(&dir, &m, 3).unwrap();
        a.set_batch_size(8).unwrap();
        let want: Vec<Tokens> = (0..20).map(|_| a.next_batch(8).unwrap()).collect();
        assert_eq!(a.position(), 160);
        assert_ne!(want[0], want[7], "another permutation in epoch 1");
        for stop in [0usize, 3, 7, 13] {
            // seek before the batch size is known (the resume path), then restore the loader.
            let mut b = ShardSource::open(&dir, &m, 3).unwrap();
            b.seek(stop as u64 * 8).unwrap();
            b.set_batch_size(8).unwrap();
            assert_eq!(b.position(), stop as u64 * 8);
            let mut c = ShardSource::open(&dir, &m, 3).unwrap();
            c.set_batch_size(8).unwrap();
            c.seek(stop as u64 * 8).unwrap();
            for (i, w) in want[stop..].iter().enumerate() {
                assert_eq!(&b.next_batch(8).unwrap(), w, "resumed at {stop}, batch {i}");
                assert_eq!(&c.next_batch(8).unwrap(), w, "seeked at {stop}, batch {i}");
            }
        }
        // The full loader position round-trips and refuses another seed.
        let p = a.loader_position().unwrap();
        assert_eq!((p.epoch, p.offset, p.batch_size), (2, 48, 8));
        let mut d = ShardSource::open(&dir, &m, 3).unwrap();
        d.restore_loader(&p).unwrap();
        assert_eq!(d.position(), 160);
        let mut e = ShardSource::open(&dir, &m, 4).unwrap();
        let err = e.restore_loader(&p).unwrap_err().to_string();
        assert!(err.contains("seed 3 vs 4"), "{err}");
        // A batch size that differs from the announced one is refused.
        let err = a.next_batch(4).unwrap_err().to_string();
        assert!(
            err.contains("batches of 4") && err.contains("of 8"),
            "{err}"
        );
    }

    #[test]
    fn held_out_and_model_checks() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = prepared(tmp.path(), 32);
        let s = ShardSource::open(&dir, &model(32), 0).unwrap();
        let all = s.held_out(1000).unwrap();
        assert_eq!((all.batch, all.len), (9, 32));
        let few = s.held_out(4).unwrap();
        assert_eq!(few.ids, all.ids[..4 * 32]);
        assert!(
            s.describe().contains("56 train + 9 valid"),
            "{}",
            s.describe()
        );
        let err = ShardSource::open(&dir, &model(64), 0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("manifest.json") && err.contains("length 32") && err.contains("length 64"),
            "{err}"
        );
        let bert = DitConfig {
            vocab_size: 30522,
            mask_index: 103,
            ..model(32)
        };
        let err = ShardSource::open(&dir, &bert, 0).err().unwrap().to_string();
        assert!(err.contains("V=50258") && err.contains("V=30522"), "{err}");
        // More sequences per batch than the split holds.
        let mut s = ShardSource::open(&dir, &model(32), 0).unwrap();
        let err = s.set_batch_size(57).unwrap_err().to_string();
        assert!(err.contains("fewer than one batch"), "{err}");
    }
}
