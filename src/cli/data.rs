//! `imdm-engine data prepare` and `imdm-engine data info`.

use clap::{Args, Subcommand};
use std::path::PathBuf;

use crate::data::prepare::{self, PrepareOptions, SplitRule};
use crate::data::shards::{Check, Manifest, ShardSet};
use crate::data::tokenizer::{Conventions, Tokenizer, TokenizerKind};
use crate::data::TxtMode;
use crate::error::{Error, Result};

#[derive(Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Tokenize text into wrapped token shards with a manifest (spec 1.2).
    ///
    /// Each document is tokenized without special tokens, EOS is appended, everything is
    /// concatenated per split and cut into sequences [BOS] + (length-2 tokens) + [EOS]; the last
    /// partial sequence is dropped. Documents are held out by id (deterministic; see
    /// --heldout-frac and --heldout-prefix).
    Prepare(PrepareArgs),
    /// Describe a prepared folder; with --verify, check every shard's sha256 and ids.
    Info(DataInfoArgs),
}

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Tokenizer: bert (LM1B setting, V=30522, mask 103) or gpt2 (OWT setting, V=50258,
    /// mask 50257).
    #[arg(long, value_enum)]
    pub tokenizer: TokenizerKind,
    /// Text: folders (searched recursively for .txt and .jsonl, e.g. data/corpus from
    /// scripts/fetch-corpus.sh) or files.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Output folder (created; refused if it already holds shards, unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Tokens per sequence, BOS and EOS included (default: 128 for bert, 1024 for gpt2).
    #[arg(long)]
    pub length: Option<usize>,
    /// Fraction of documents held out, chosen by a hash of the document id.
    #[arg(long, default_value_t = 0.05)]
    pub heldout_frac: f64,
    /// Also hold out every document whose id starts with this (repeatable), e.g.
    /// `austen/persuasion/`.
    #[arg(long)]
    pub heldout_prefix: Vec<String>,
    /// Special-token conventions: reference (BERT EOS = [CLS] 101; GPT-2 mask decodes as
    /// [PAD]) or clean (BERT EOS = [SEP] 102; mask decodes as [MASK]).
    #[arg(long, value_enum, default_value = "reference")]
    pub conventions: Conventions,
    /// Do not append EOS to each document (the reference's zero-shot evaluation setting).
    #[arg(long)]
    pub no_eos: bool,
    /// How .txt files are cut into documents.
    #[arg(long, value_enum, default_value = "file")]
    pub txt_mode: TxtMode,
    /// JSON field holding the text in .jsonl files.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Largest shard file in MiB.
    #[arg(long, default_value_t = 256)]
    pub shard_mib: u64,
    /// Replace the shards and manifest already in --out.
    #[arg(long)]
    pub force: bool,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct DataInfoArgs {
    /// A folder written by `data prepare`.
    pub dir: PathBuf,
    /// Read every shard: sha256 against the manifest, every id below V.
    #[arg(long)]
    pub verify: bool,
    /// Decode the first N sequences of --split.
    #[arg(long, default_value_t = 0)]
    pub show: usize,
    /// Split for --show.
    #[arg(long, default_value = "valid")]
    pub split: String,
    /// Print the manifest as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: DataArgs) -> Result<()> {
    match a.command {
        DataCommand::Prepare(p) => run_prepare(p),
        DataCommand::Info(i) => run_info(i),
    }
}

fn run_prepare(a: PrepareArgs) -> Result<()> {
    let length = a.length.unwrap_or(match a.tokenizer {
        TokenizerKind::Bert => 128,
        TokenizerKind::Gpt2 => 1024,
    });
    let o = PrepareOptions {
        inputs: a.input,
        out: a.out.clone(),
        tokenizer: a.tokenizer,
        conventions: a.conventions,
        length,
        split: SplitRule {
            frac: a.heldout_frac,
            prefixes: a.heldout_prefix,
        },
        insert_eos: !a.no_eos,
        txt_mode: a.txt_mode,
        text_field: a.text_field,
        shard_mib: a.shard_mib,
        force: a.force,
        progress: !a.quiet,
    };
    let m = prepare::prepare(&o)?;
    println!(
        "{}: {} V={} mask={} BOS={} EOS={} length {}",
        a.out.display(),
        m.tokenizer.kind,
        m.vocab_size,
        m.mask_index,
        m.bos,
        m.eos,
        m.length
    );
    for line in prepare::summary(&m) {
        println!("  {line}");
    }
    Ok(())
}

fn run_info(a: DataInfoArgs) -> Result<()> {
    let m = Manifest::read(&a.dir)?;
    if a.json {
        let s = serde_json::to_string_pretty(&m)
            .map_err(|e| Error::data(&a.dir, format!("could not serialise: {e}")))?;
        println!("{s}");
    } else {
        println!("folder      {}", a.dir.display());
        println!(
            "tokenizer   {} ({} conventions), V={} mask={} BOS={} EOS={}",
            m.tokenizer.kind, m.tokenizer.conventions, m.vocab_size, m.mask_index, m.bos, m.eos
        );
        println!(
            "sequences   length {}, {:?} little-endian",
            m.length, m.dtype
        );
        println!(
            "held out    frac {} prefixes {:?}",
            m.split_rule.heldout_frac, m.split_rule.heldout_prefixes
        );
        println!("sources     {} files", m.sources.len());
        for line in prepare::summary(&m) {
            println!("  {line}");
        }
    }
    if a.verify {
        for split in m.splits.keys() {
            let set = ShardSet::open(&a.dir, split, Check::Full)?;
            println!(
                "verified    {split}: {} shard(s), {} sequences, sha256 and ids < V ok",
                m.splits[split].shards.len(),
                set.len()
            );
        }
    }
    if a.show > 0 {
        let set = ShardSet::open(&a.dir, &a.split, Check::Size)?;
        let kind: TokenizerKind = m.tokenizer.kind.parse()?;
        let conv = match m.tokenizer.conventions.as_str() {
            "clean" => Conventions::Clean,
            _ => Conventions::Reference,
        };
        let tok = Tokenizer::new(kind, conv)?;
        for i in 0..(a.show as u64).min(set.len()) {
            let ids = set.get(i);
            println!(
                "--- {} sequence {i}: {:?} ...",
                a.split,
                &ids[..ids.len().min(12)]
            );
            println!("{}", tok.decode(&ids, false)?);
        }
    }
    Ok(())
}
