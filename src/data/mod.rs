//! Real text to training batches: tokenizers, corpus reading, token shards, the batch loader.
//!
//! ```text
//! scripts/fetch-corpus.sh -> data/corpus/*.jsonl (or any folder of .txt / .jsonl)
//!   -> corpus (documents with stable ids) -> tokenizer (bert | gpt2, spec 1.1)
//!   -> prepare (held-out split by document id, wrap as spec 1.2) -> shards + manifest.json
//!   -> loader (per-epoch permutation, resumable position) -> (B, L) token ids
//! ```
//!
//! - [`tokenizer`]: BERT WordPiece and GPT-2 BPE from vendored files, the reference's special
//!   ids and the quirk switch [`tokenizer::Conventions`].
//! - [`corpus`]: `.txt` / `.jsonl` folders streamed in a fixed order.
//! - [`prepare`]: the `data prepare` pipeline and the held-out rule [`prepare::SplitRule`].
//! - [`shards`]: the on-disk format, its manifest, the memory-mapped reader with checks.
//! - [`loader`]: shuffled, resumable batches.

pub mod corpus;
pub mod loader;
pub mod prepare;
pub mod shards;
pub mod tokenizer;

pub use corpus::{Corpus, Document, TxtMode};
pub use loader::{Batch, Loader, LoaderOptions, LoaderPosition};
pub use prepare::{prepare, PrepareOptions, SplitRule, TRAIN, VALID};
pub use shards::{Check, Manifest, ShardSet};
pub use tokenizer::{Conventions, SpecialIds, Tokenizer, TokenizerKind};
