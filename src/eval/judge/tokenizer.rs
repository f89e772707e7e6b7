//! The judge's tokenizer, built from the GGUF metadata with the `tokenizers` crate.
//!
//! `tokenizer.ggml.model = gpt2` is byte-level BPE: `tokenizer.ggml.tokens` (id = index, in
//! GPT-2's byte-to-unicode alphabet), `tokenizer.ggml.merges` ("a b" per merge, in rank order),
//! `tokenizer.ggml.token_type` (3 = control and 4 = user-defined tokens are special strings that
//! are matched in the text before any splitting) and `tokenizer.ggml.pre`, which names the
//! pre-tokenizer family. Each family is built as the model's own Hugging Face `tokenizer.json`
//! describes it:
//!
//! | `.pre` | normaliser | split | digits |
//! |---|---|---|---|
//! | `gpt2`, `default` | none | GPT-2's regex (byte-level) | runs of digits, with a leading space |
//! | `smollm` | none | each digit alone, then GPT-2's regex | one token per digit |
//! | `qwen2` | NFC | Qwen2's regex, then byte-level without regex | one per digit |
//! | `llama-bpe` | none | Llama 3's regex, then byte-level without regex | up to three digits |
//!
//! No BOS is added; decoding keeps special tokens.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::gguf::GgufFile;
use crate::error::Result;

/// Qwen2's split: contractions, letters with one leading non-letter, single digits,
/// punctuation runs, newlines, whitespace.
pub(crate) const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's split: as Qwen2's but digits in groups of up to three.
pub(crate) const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer families the judge knows, by their `tokenizer.ggml.pre` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreFamily {
    Gpt2,
    Smollm,
    Qwen2,
    Llama3,
}

impl PreFamily {
    pub fn from_pre(pre: &str) -> Option<Self> {
        match pre {
            "gpt2" | "gpt-2" | "default" => Some(PreFamily::Gpt2),
            "smollm" => Some(PreFamily::Smollm),
            "qwen2" => Some(PreFamily::Qwen2),
            "llama-bpe" | "llama3" => Some(PreFamily::Llama3),
            _ => None,
        }
    }
}

/// The tokenizer and the ids the protocol needs.
pub struct JudgeTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub family: PreFamily,
    /// `<|endoftext|>` when the vocabulary has it (the end-of-text of GPT-2-style samples,
    /// spec 8.2), else `tokenizer.ggml.eos_token_id`.
    pub eos: u32,
}

pub(crate) fn split(regex: &str) -> Result<PreTokenizerWrapper> {
    let s = Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| crate::Error::Tokenizer(format!("judge split regex: {e}")))?;
    Ok(PreTokenizerWrapper::Split(s))
}

/// Builds the tokenizer of `file` from its metadata.
pub fn from_gguf(file: &GgufFile) -> Result<JudgeTokenizer> {
    let model = file.meta_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(file.err(format!(
            "tokenizer.ggml.model is {model:?}; the judge reads byte-level BPE (gpt2)"
        )));
    }
    let pre = file.meta_str("tokenizer.ggml.pre").unwrap_or("default");
    let family = PreFamily::from_pre(pre).ok_or_else(|| {
        file.err(format!(
            "tokenizer.ggml.pre is {pre:?}; known pre-tokenizers: gpt2, default, smollm, qwen2, llama-bpe"
        ))
    })?;
    let tokens = file.meta_strings("tokenizer.ggml.tokens")?;
    let merges_raw = file.meta_strings("tokenizer.ggml.merges")?;
    let types = match file.meta("tokenizer.ggml.token_type") {
        Some(_) => file.meta_ints("tokenizer.ggml.token_type")?,
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(file.err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    if vocab.len() != tokens.len() {
        return Err(file.err("tokenizer.ggml.tokens holds duplicate strings"));
    }
    let merges = merges_raw
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| file.err(format!("tokenizer.ggml.merges: bad merge {m:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(family == PreFamily::Llama3)
        .build()
        .map_err(|e| file.err(format!("byte-level BPE from the metadata: {e}")))?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    let pre_tok: PreTokenizerWrapper = match family {
        PreFamily::Gpt2 => ByteLevel::new(false, true, true).into(),
        PreFamily::Smollm => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        PreFamily::Qwen2 => Sequence::new(vec![
            split(QWEN2_REGEX)?,
            ByteLevel::new(false, false, false).into(),
        ])
        .into(),
        PreFamily::Llama3 => Sequence::new(vec![
            split(LLAMA3_REGEX)?,
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
    };
    if family == PreFamily::Qwen2 {
        t.with_normalizer(Some(NFC));
    }
    t.with_pre_tokenizer(Some(pre_tok));
    t.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, ty)| **ty == 3 || **ty == 4)
        .map(|(s, _)| AddedToken::from(s.to_string(), true))
        .collect();
    t.add_special_tokens(&specials);
    let eos = match t.token_to_id("<|endoftext|>") {
        Some(id) => id,
        None => file
            .meta_usize("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| file.err("no <|endoftext|> token and no tokenizer.ggml.eos_token_id"))?
            as u32,
    };
    Ok(JudgeTokenizer {
        inner: t,
        family,
        eos,
    })
}

impl JudgeTokenizer {
    /// Ids of `text`: no BOS, special-token strings matched whole.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| crate::Error::Tokenizer(format!("judge encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| crate::Error::Tokenizer(format!("judge decode: {e}")))
    }
}
