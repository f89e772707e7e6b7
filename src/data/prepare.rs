//! `data prepare`: text -> tokenized, wrapped token shards with a manifest.
//!
//! Documents stream from the corpus in order, in batches tokenized in parallel, and go to the
//! `train` or `valid` writer by the held-out rule ([`SplitRule`]); each split is wrapped on its
//! own (spec 1.2: document ids + EOS, concatenated, cut into `length - 2`, `[BOS] chunk [EOS]`,
//! the last partial chunk dropped). Memory stays bounded by one batch, so corpora larger than
//! RAM work.
//!
//! One deliberate difference from the reference: its `get_dataset` runs `_group_texts` through
//! `datasets.map(batched=True, num_proc=N)` without a batch size, so each map batch (1,000
//! documents by the library's default, inside each of N worker shards) is cut on its own and
//! drops its own remainder [code + library default, not run]. Where those cuts fall depends on
//! the number of processes of the machine that prepared the data, so it cannot be reproduced in
//! general; here the stream is cut once per split, which drops less and never separates a
//! document from the one after it. `tools/reference/data_parity.py` checks everything else
//! (tokens, EOS, BOS, chunking) against transformers 4.38.2 with one global cut.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::data::corpus::{Corpus, Document, TxtMode};
use crate::data::shards::{
    Manifest, SourceInfo, SplitInfo, SplitRuleInfo, SplitWriter, TokenDtype, TokenizerInfo,
    WrapInfo, FORMAT, MANIFEST, VERSION,
};
use crate::data::tokenizer::{Conventions, Tokenizer, TokenizerKind};
use crate::error::{Error, Result};

/// Name of the training split.
pub const TRAIN: &str = "train";
/// Name of the held-out split.
pub const VALID: &str = "valid";

/// Which documents are held out: those whose id starts with one of `prefixes`, and those whose
/// hash falls below `frac`. The hash is the top 53 bits of the first 8 bytes (big-endian) of
/// `sha256("imdm-split-v1:" + id)`, divided by 2^53: a number in [0, 1) that depends on the id
/// alone, not on the order, the other documents, the machine or the tokenizer. Adding a corpus
/// never moves a document of another one between splits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SplitRule {
    pub frac: f64,
    pub prefixes: Vec<String>,
}

impl SplitRule {
    /// The hash of `id` mapped to [0, 1).
    pub fn unit_hash(id: &str) -> f64 {
        let d = Sha256::new()
            .chain_update(b"imdm-split-v1:")
            .chain_update(id.as_bytes())
            .finalize();
        let h = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
        (h >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn is_heldout(&self, id: &str) -> bool {
        self.prefixes.iter().any(|p| id.starts_with(p.as_str()))
            || (self.frac > 0.0 && Self::unit_hash(id) < self.frac)
    }

    fn info(&self) -> SplitRuleInfo {
        SplitRuleInfo {
            heldout_frac: self.frac,
            heldout_prefixes: self.prefixes.clone(),
            rule: "valid if the id starts with a held-out prefix, or if \
                   (u64_be(sha256(\"imdm-split-v1:\" + id)[0..8]) >> 11) / 2^53 < heldout_frac"
                .into(),
        }
    }
}

/// Everything `prepare` needs.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub tokenizer: TokenizerKind,
    pub conventions: Conventions,
    /// Tokens per sequence, BOS and EOS included.
    pub length: usize,
    pub split: SplitRule,
    /// Append EOS to each document (the reference's training setting).
    pub insert_eos: bool,
    pub txt_mode: TxtMode,
    pub text_field: String,
    /// Largest shard file, in MiB.
    pub shard_mib: u64,
    /// Replace an existing prepared folder.
    pub force: bool,
    /// Report progress on stderr.
    pub progress: bool,
}

/// Documents per tokenizer batch, and the text size that closes a batch early.
const BATCH_DOCS: usize = 1024;
const BATCH_BYTES: usize = 8 << 20;

fn is_ours(name: &str) -> bool {
    name == MANIFEST
        || name == format!("{MANIFEST}.tmp")
        || ((name.starts_with("train-") || name.starts_with("valid-"))
            && (name.ends_with(".bin") || name.ends_with(".bin.tmp")))
}

/// Makes `out` ready: created if missing; an earlier prepared folder is refused, or with
/// `force` its manifest and shard files (and only those) are removed.
fn ready_out_dir(out: &Path, force: bool) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut ours = Vec::new();
    for entry in std::fs::read_dir(out).map_err(|e| Error::io(out, e))? {
        let entry = entry.map_err(|e| Error::io(out, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_ours(&name) {
            ours.push(entry.path());
        }
    }
    if ours.is_empty() {
        return Ok(());
    }
    if !force {
        return Err(Error::data(
            out,
            "already holds prepared shards (manifest.json or train-/valid-*.bin); \
             pass --force to replace them or choose another --out",
        ));
    }
    for p in ours {
        std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// Progress on stderr: a bar on a terminal, a line every 10 s otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    last: Instant,
    total: u64,
    done: u64,
}

impl Progress {
    fn new(total: u64, on: bool) -> Self {
        use std::io::IsTerminal;
        let tty = std::io::stderr().is_terminal();
        let bar = (on && tty).then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b
        });
        Progress {
            bar,
            plain: on && !tty,
            last: Instant::now(),
            total,
            done: 0,
        }
    }

    fn advance(&mut self, bytes: u64, msg: impl FnOnce() -> String) {
        self.done += bytes;
        if let Some(b) = &self.bar {
            b.set_position(self.done);
            b.set_message(msg());
        } else if self.plain && self.last.elapsed() >= Duration::from_secs(10) {
            self.last = Instant::now();
            eprintln!(
                "prepare: {:.1}% of {} MB read, {}",
                100.0 * self.done as f64 / self.total.max(1) as f64,
                self.total / 1_000_000,
                msg()
            );
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

struct Writers {
    train: SplitWriter,
    valid: SplitWriter,
}

/// Counters of the run so far.
#[derive(Default)]
struct Counts {
    docs: u64,
    tokens: u64,
    text_bytes: u64,
}

fn flush_batch(
    tok: &Tokenizer,
    rule: &SplitRule,
    batch: &mut Vec<Document>,
    w: &mut Writers,
    n: &mut Counts,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let texts: Vec<&str> = batch.iter().map(|d| d.text.as_str()).collect();
    let ids = tok.encode_batch(&texts)?;
    for (d, ids) in batch.iter().zip(ids) {
        n.docs += 1;
        n.tokens += ids.len() as u64;
        n.text_bytes += d.text.len() as u64;
        let writer = if rule.is_heldout(&d.id) {
            &mut w.valid
        } else {
            &mut w.train
        };
        writer.push_document(&ids, d.text.len() as u64)?;
    }
    batch.clear();
    Ok(())
}

/// Prepares `o.out` from `o.inputs`; returns the manifest it wrote.
pub fn prepare(o: &PrepareOptions) -> Result<Manifest> {
    if !(0.0..=1.0).contains(&o.split.frac) {
        return Err(Error::Config(format!(
            "--heldout-frac {}: must be in [0, 1]",
            o.split.frac
        )));
    }
    if o.length < 3 || o.length > 1 << 20 {
        return Err(Error::Config(format!(
            "--length {}: must be in [3, 1048576] (BOS, EOS and at least one token)",
            o.length
        )));
    }
    if o.shard_mib == 0 || o.shard_mib > 1 << 20 {
        return Err(Error::Config(format!(
            "--shard-mib {}: must be in [1, 1048576]",
            o.shard_mib
        )));
    }
    let res = prepare_into(o);
    if res.is_err() {
        // Nothing half-written: the shards and manifest of this attempt go (the folder held
        // none of ours before, see `ready_out_dir`).
        if let Ok(entries) = std::fs::read_dir(&o.out) {
            for e in entries.flatten() {
                if is_ours(&e.file_name().to_string_lossy()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    res
}

fn prepare_into(o: &PrepareOptions) -> Result<Manifest> {
    if !(0.0..=1.0).contains(&o.split.frac) {
        return Err(Error::Config(format!(
            "--heldout-frac {}: must be in [0, 1]",
            o.split.frac
        )));
    }
    let tok = Tokenizer::new(o.tokenizer, o.conventions)?;
    let corpus = Corpus::open(&o.inputs, o.txt_mode, &o.text_field)?;
    if let Some(input) = o
        .inputs
        .iter()
        .find(|i| crate::outputs::same_file(i, &o.out))
    {
        return Err(Error::Config(format!(
            "--out {}: is also an --input ({}); choose another folder",
            o.out.display(),
            input.display()
        )));
    }
    ready_out_dir(&o.out, o.force)?;
    let sp = tok.specials().clone();
    let dtype = TokenDtype::for_vocab(sp.vocab_size);
    let row = (o.length * dtype.bytes()) as u64;
    let per_shard = ((o.shard_mib << 20) / row.max(1)).max(1);
    let mk = |split: &str| {
        SplitWriter::new(
            &o.out,
            split,
            o.length,
            dtype,
            (sp.bos, sp.eos),
            o.insert_eos,
            per_shard,
        )
    };
    let mut w = Writers {
        train: mk(TRAIN)?,
        valid: mk(VALID)?,
    };
    let started = Instant::now();
    let mut progress = Progress::new(corpus.total_bytes(), o.progress);
    let mut batch: Vec<Document> = Vec::with_capacity(BATCH_DOCS);
    let mut batch_bytes = 0usize;
    let mut n = Counts::default();
    let skipped = corpus.for_each_document(
        |d| {
            batch_bytes += d.text.len();
            batch.push(d);
            if batch.len() >= BATCH_DOCS || batch_bytes >= BATCH_BYTES {
                let before = n.text_bytes;
                flush_batch(&tok, &o.split, &mut batch, &mut w, &mut n)?;
                batch_bytes = 0;
                progress.advance(n.text_bytes - before, || {
                    format!("{} documents, {} tokens", n.docs, n.tokens)
                });
            }
            Ok(())
        },
        |_| {},
    )?;
    flush_batch(&tok, &o.split, &mut batch, &mut w, &mut n)?;
    progress.finish();
    let mut splits = std::collections::BTreeMap::new();
    splits.insert(TRAIN.to_string(), w.train.finish()?);
    splits.insert(VALID.to_string(), w.valid.finish()?);
    for (name, s) in &splits {
        if s.sequences == 0 {
            return Err(Error::data(
                &o.out,
                format!(
                    "the {name} split would hold no sequences ({} documents in all; a split \
                     needs at least {} tokens): add text, shorten --length or change \
                     --heldout-frac / --heldout-prefix; nothing was written",
                    n.docs,
                    o.length - 2
                ),
            ));
        }
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        tokenizer: TokenizerInfo {
            kind: tok.kind().name().into(),
            conventions: match tok.conventions() {
                Conventions::Reference => "reference".into(),
                Conventions::Clean => "clean".into(),
            },
            files: tok
                .files_sha256()
                .into_iter()
                .map(|(f, h)| (f.to_string(), h.to_string()))
                .collect(),
        },
        vocab_size: sp.vocab_size,
        mask_index: sp.mask,
        bos: sp.bos,
        eos: sp.eos,
        length: o.length,
        dtype,
        wrap: WrapInfo {
            insert_eos: o.insert_eos,
            scheme: format!(
                "per split: documents{} concatenated in input order, cut into chunks of \
                 length-2 = {}, each written as [BOS={}] chunk [EOS={}]; the last partial \
                 chunk is dropped",
                if o.insert_eos { " + EOS" } else { "" },
                o.length - 2,
                sp.bos,
                sp.eos
            ),
        },
        split_rule: o.split.info(),
        splits,
        sources: corpus
            .files
            .iter()
            .map(|f| SourceInfo {
                path: f.path.display().to_string(),
                bytes: f.bytes,
            })
            .collect(),
        skipped_empty_documents: skipped,
        created_by: format!("imdm-engine {}", env!("CARGO_PKG_VERSION")),
    };
    manifest.write(&o.out)?;
    if o.progress {
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "prepare: {} documents, {} tokens in {secs:.1} s ({:.0} tokens/s)",
            n.docs,
            n.tokens,
            n.tokens as f64 / secs.max(1e-9)
        );
    }
    Ok(manifest)
}

/// One line per split: documents, tokens, sequences, shards.
pub fn summary(m: &Manifest) -> Vec<String> {
    m.splits
        .iter()
        .map(|(name, s): (&String, &SplitInfo)| {
            format!(
                "{name:<6} {:>8} docs {:>11} tokens {:>9} sequences x {} ({} dropped) in {} shard(s), {:.1} MB",
                s.documents,
                s.tokens,
                s.sequences,
                m.length,
                s.dropped_tokens,
                s.shards.len(),
                s.shards.iter().map(|x| x.bytes).sum::<u64>() as f64 / 1e6
            )
        })
        .collect()
}
