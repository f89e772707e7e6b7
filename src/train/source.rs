//! The one interface of training data: a resumable stream of clean sequences x0 (B, L). The
//! sources implement it in [`crate::train::data`] (synthetic, token files) and
//! [`crate::train::shard_source`] (prepared shards).

use crate::data::LoaderPosition;
use crate::error::{Error, Result};
use crate::tensor::Tokens;

/// A resumable stream of clean sequences.
pub trait DataSource {
    /// Sequence length L.
    fn seq_len(&self) -> usize;
    /// The next `batch` sequences as (B, L) ids.
    fn next_batch(&mut self, batch: usize) -> Result<Tokens>;
    /// Sequences consumed so far.
    fn position(&self) -> u64;
    /// Continue as if `pos` sequences had been consumed.
    fn seek(&mut self, pos: u64) -> Result<()>;
    /// One line for logs: what the source is.
    fn describe(&self) -> String;
    /// Announces the batch size every later `next_batch` will ask for (the trainer calls it
    /// once, before the first batch), so a source with fixed batches can check it early.
    fn set_batch_size(&mut self, _batch: usize) -> Result<()> {
        Ok(())
    }
    /// The loader's full position, for sources that read prepared shards; `None` otherwise.
    fn loader_position(&self) -> Option<LoaderPosition> {
        None
    }
    /// Restores [`DataSource::loader_position`] (after `seek`); refuses a position taken on
    /// other data or with other settings.
    fn restore_loader(&mut self, p: &LoaderPosition) -> Result<()> {
        Err(Error::Config(format!(
            "the checkpoint records a shard-loader position (data {}), but this data source \
             ({}) has none",
            p.fingerprint,
            self.describe()
        )))
    }
}
