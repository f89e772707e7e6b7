//! The two tokenizers of the reference settings, built offline from vendored files
//! (`assets/tokenizers/`, embedded in the binary) with the `tokenizers` crate:
//!
//! - [`TokenizerKind::Bert`]: bert-base-uncased WordPiece, 30,522 ids (the LM1B setting).
//!   BertNormalizer (clean text, Chinese characters, lowercase, accents stripped as lowercase
//!   implies), BertPreTokenizer, WordPiece (`##`, `[UNK]`, 100 chars per word), WordPiece decoder
//!   with cleanup: the pipeline of the published `tokenizer.json`, without its truncation and
//!   padding to 128.
//! - [`TokenizerKind::Gpt2`]: GPT-2 byte-level BPE, 50,257 ids (the OWT setting): ByteLevel
//!   pre-tokenizer without a prefix space, BPE from `encoder.json` + `vocab.bpe`, ByteLevel
//!   decoder.
//!
//! Special ids follow spec 1.1 (see [`SpecialIds`]); the reference quirks of spec 12.20 are
//! kept or fixed by one switch, [`Conventions`]:
//!
//! | | `reference` (default) | `clean` |
//! |---|---|---|
//! | BERT BOS / EOS in wrapped data | 101 / 101: `encode('[SEP]')[0]` is `[CLS]` | 101 / 102 (`[CLS]` / `[SEP]`) |
//! | GPT-2 id 50257 (the mask) decodes as | `[PAD]` (its `[PAD]` token has the mask's id) | `[MASK]` |
//!
//! Both settings share: GPT-2 BOS = EOS = 50256, mask appended at 50257 (V = 50258); BERT mask
//! 103 (V = 30522). [`Tokenizer::encode_with_specials`] is what the reference's `tokenizer(text)`
//! returns: `[CLS] .. [SEP]` for BERT, `50256 .. 50256` for GPT-2 (its BertProcessing).
//!
//! Checked against HF transformers 4.38.2 (`tools/reference/data_parity.py`: the reference's
//! `get_tokenizer` set-up, `encode(eos_token)[0]` for BOS/EOS): identical ids on the whole fetched
//! corpus (6.6 M tokens) for both tokenizers, and BERT's BOS = EOS = 101 confirmed.
//!
//! One deliberate difference: strings that spell a special token inside the text (`[MASK]`,
//! `<|endoftext|>`, `[PAD]`) are encoded as ordinary text, never as the special id, so a corpus
//! can never put the mask id (or a stray EOS) into the data. HF tokenizers would match them.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::AddedToken;

use crate::error::{Error, Result};

/// bert-base-uncased `vocab.txt` (Apache-2.0, google-research/bert); see assets/tokenizers.
pub const BERT_VOCAB: &str = include_str!("../../assets/tokenizers/bert-base-uncased/vocab.txt");
/// sha256 of [`BERT_VOCAB`], the published bert-base-uncased vocabulary.
pub const BERT_VOCAB_SHA256: &str =
    "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3";
/// GPT-2 `encoder.json` (= HF `vocab.json`; MIT, openai/gpt-2).
pub const GPT2_ENCODER: &str = include_str!("../../assets/tokenizers/gpt2/encoder.json");
/// sha256 of [`GPT2_ENCODER`].
pub const GPT2_ENCODER_SHA256: &str =
    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783";
/// GPT-2 `vocab.bpe` (= HF `merges.txt`).
pub const GPT2_MERGES: &str = include_str!("../../assets/tokenizers/gpt2/vocab.bpe");
/// sha256 of [`GPT2_MERGES`].
pub const GPT2_MERGES_SHA256: &str =
    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5";

/// Which tokenizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// bert-base-uncased WordPiece (LM1B setting): V = 30522, mask 103.
    Bert,
    /// GPT-2 byte-level BPE (OWT setting): V = 50258 with the appended mask 50257.
    Gpt2,
}

impl TokenizerKind {
    pub fn name(self) -> &'static str {
        match self {
            TokenizerKind::Bert => "bert",
            TokenizerKind::Gpt2 => "gpt2",
        }
    }
}

impl FromStr for TokenizerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bert" => Ok(TokenizerKind::Bert),
            "gpt2" => Ok(TokenizerKind::Gpt2),
            o => Err(Error::Tokenizer(format!(
                "unknown tokenizer {o:?} (expected bert or gpt2)"
            ))),
        }
    }
}

/// Keep the reference's special-token quirks (spec 12.20) or fix them; see the module doc.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Conventions {
    /// As the reference: BERT BOS = EOS = [CLS] (101); GPT-2 mask id decodes as `[PAD]`.
    #[default]
    Reference,
    /// Fixed: BERT EOS = [SEP] (102); GPT-2 mask id decodes as `[MASK]`.
    Clean,
}

/// The special ids of one tokenizer under one convention (spec 1.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialIds {
    /// The model's vocabulary V, mask included (30522 or 50258).
    pub vocab_size: usize,
    /// `tokenizer.vocab_size` of the reference: ids that text can produce (30522 or 50257).
    pub text_vocab_size: usize,
    /// The mask (absorbing state) id: 103 for BERT, 50257 (appended) for GPT-2.
    pub mask: u32,
    /// First token of every wrapped sequence.
    pub bos: u32,
    /// Appended to every document and last token of every wrapped sequence.
    pub eos: u32,
}

/// A tokenizer with the reference's special-id conventions.
pub struct Tokenizer {
    kind: TokenizerKind,
    conventions: Conventions,
    ids: SpecialIds,
    inner: tokenizers::Tokenizer,
}

fn tk_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{what}: {e}"))
}

impl Tokenizer {
    /// Builds `kind` from the embedded vocabulary files.
    pub fn new(kind: TokenizerKind, conventions: Conventions) -> Result<Self> {
        let (mut inner, ids) = match kind {
            TokenizerKind::Bert => (build_bert()?, bert_ids(conventions)),
            TokenizerKind::Gpt2 => (build_gpt2(conventions)?, gpt2_ids()),
        };
        // Special-token strings in the input are plain text (see the module doc).
        inner.set_encode_special_tokens(true);
        let t = Tokenizer {
            kind,
            conventions,
            ids,
            inner,
        };
        t.check_ids()?;
        Ok(t)
    }

    /// The tokenizer a prepared folder was made with (its manifest's kind and conventions),
    /// checked against the manifest's V and mask id.
    pub fn for_manifest(m: &crate::data::shards::Manifest) -> Result<Self> {
        let kind: TokenizerKind = m.tokenizer.kind.parse()?;
        let conventions = match m.tokenizer.conventions.as_str() {
            "reference" => Conventions::Reference,
            "clean" => Conventions::Clean,
            o => {
                return Err(Error::Tokenizer(format!(
                    "manifest conventions {o:?}: expected reference or clean"
                )))
            }
        };
        let t = Self::new(kind, conventions)?;
        if (t.vocab_size(), t.mask_index()) != (m.vocab_size, m.mask_index) {
            return Err(Error::Tokenizer(format!(
                "the manifest says V={} mask={} for {}, the tokenizer has V={} mask={}",
                m.vocab_size,
                m.mask_index,
                kind.name(),
                t.vocab_size(),
                t.mask_index()
            )));
        }
        Ok(t)
    }

    /// BERT with the reference conventions.
    pub fn bert() -> Result<Self> {
        Self::new(TokenizerKind::Bert, Conventions::Reference)
    }

    /// GPT-2 with the reference conventions.
    pub fn gpt2() -> Result<Self> {
        Self::new(TokenizerKind::Gpt2, Conventions::Reference)
    }

    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    pub fn conventions(&self) -> Conventions {
        self.conventions
    }

    /// Special ids and vocabulary sizes.
    pub fn specials(&self) -> &SpecialIds {
        &self.ids
    }

    /// The model's vocabulary V (mask included).
    pub fn vocab_size(&self) -> usize {
        self.ids.vocab_size
    }

    pub fn mask_index(&self) -> u32 {
        self.ids.mask
    }

    pub fn bos(&self) -> u32 {
        self.ids.bos
    }

    pub fn eos(&self) -> u32 {
        self.ids.eos
    }

    /// sha256 of the vocabulary files this tokenizer was built from, in a fixed order.
    pub fn files_sha256(&self) -> Vec<(&'static str, &'static str)> {
        match self.kind {
            TokenizerKind::Bert => vec![("vocab.txt", BERT_VOCAB_SHA256)],
            TokenizerKind::Gpt2 => vec![
                ("encoder.json", GPT2_ENCODER_SHA256),
                ("vocab.bpe", GPT2_MERGES_SHA256),
            ],
        }
    }

    /// Token ids of `text` without special tokens (wrapping step 1, spec 1.2).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| tk_err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`Tokenizer::encode`] over many texts, in parallel (rayon), order kept.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encs = self
            .inner
            .encode_batch_fast(texts.to_vec(), false)
            .map_err(|e| tk_err("encode", e))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// What the reference's `tokenizer(text)` returns: BERT `[CLS] ids [SEP]` (101 .. 102),
    /// GPT-2 `50256 ids 50256`.
    pub fn encode_with_specials(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| tk_err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`. With `skip_special` false, special ids are rendered as their tokens, as
    /// the reference's `batch_decode` does (GPT-2's mask as `[PAD]` under the reference
    /// conventions). Ids outside the vocabulary are an error naming the id.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some((i, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.ids.vocab_size)
        {
            return Err(Error::Tokenizer(format!(
                "decode: id {id} at position {i} is outside the vocabulary (V = {})",
                self.ids.vocab_size
            )));
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| tk_err("decode", e))
    }

    /// The vocabulary entry of `id` (byte-level symbols for GPT-2), or `None` past V.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of vocabulary entry `token`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn check_ids(&self) -> Result<()> {
        let n = self.inner.get_vocab_size(true);
        if n != self.ids.vocab_size {
            return Err(Error::Tokenizer(format!(
                "{}: {n} ids with special tokens, expected V = {}",
                self.kind.name(),
                self.ids.vocab_size
            )));
        }
        let n = self.inner.get_vocab_size(false);
        if n != self.ids.text_vocab_size {
            return Err(Error::Tokenizer(format!(
                "{}: vocabulary has {n} entries, expected {}",
                self.kind.name(),
                self.ids.text_vocab_size
            )));
        }
        Ok(())
    }
}

fn bert_ids(c: Conventions) -> SpecialIds {
    SpecialIds {
        vocab_size: 30522,
        text_vocab_size: 30522,
        mask: 103,
        bos: 101,
        eos: match c {
            Conventions::Reference => 101,
            Conventions::Clean => 102,
        },
    }
}

fn gpt2_ids() -> SpecialIds {
    SpecialIds {
        vocab_size: 50258,
        text_vocab_size: 50257,
        mask: 50257,
        bos: 50256,
        eos: 50256,
    }
}

fn special(s: &str) -> AddedToken {
    AddedToken::from(s.to_string(), true)
}

fn build_bert() -> Result<tokenizers::Tokenizer> {
    let vocab: Vocab = BERT_VOCAB
        .lines()
        .enumerate()
        .map(|(i, l)| (l.trim_end().to_string(), i as u32))
        .collect();
    let model = WordPiece::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .continuing_subword_prefix("##".into())
        .max_input_chars_per_word(100)
        .build()
        .map_err(|e| tk_err("bert WordPiece", e))?;
    let mut t = tokenizers::Tokenizer::new(model);
    t.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
    t.with_pre_tokenizer(Some(BertPreTokenizer));
    t.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), 102),
        ("[CLS]".into(), 101),
    )));
    t.with_decoder(Some(WordPieceDecoder::default()));
    let specials: Vec<AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .into_iter()
        .map(special)
        .collect();
    t.add_special_tokens(&specials);
    Ok(t)
}

fn build_gpt2(c: Conventions) -> Result<tokenizers::Tokenizer> {
    let map: std::collections::HashMap<String, u32> =
        serde_json::from_str(GPT2_ENCODER).map_err(|e| tk_err("gpt2 encoder.json", e))?;
    let vocab: Vocab = map.into_iter().collect();
    let merges: Vec<(String, String)> = GPT2_MERGES
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.is_empty())
        .map(|l| {
            l.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Error::Tokenizer(format!("gpt2 vocab.bpe: bad merge line {l:?}")))
        })
        .collect::<Result<_>>()?;
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| tk_err("gpt2 BPE", e))?;
    let mut t = tokenizers::Tokenizer::new(model);
    t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    t.with_post_processor(Some(BertProcessing::new(
        ("<|endoftext|>".into(), 50256),
        ("<|endoftext|>".into(), 50256),
    )));
    t.with_decoder(Some(ByteLevelDecoder::default()));
    let mask_text = match c {
        Conventions::Reference => "[PAD]",
        Conventions::Clean => "[MASK]",
    };
    // `<|endoftext|>` is in the vocabulary (50256); the mask token takes the next id, 50257.
    t.add_special_tokens(&[special("<|endoftext|>"), special(mask_text)]);
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bert_known_ids() {
        let t = Tokenizer::bert().unwrap();
        assert_eq!(
            t.encode_with_specials("Hello world!").unwrap(),
            vec![101, 7592, 2088, 999, 102]
        );
        assert_eq!(t.encode("the").unwrap(), vec![1996]);
        assert_eq!(t.token_to_id("[MASK]"), Some(103));
        assert_eq!((t.bos(), t.eos(), t.mask_index()), (101, 101, 103));
        let clean = Tokenizer::new(TokenizerKind::Bert, Conventions::Clean).unwrap();
        assert_eq!((clean.bos(), clean.eos()), (101, 102));
    }

    #[test]
    fn gpt2_known_ids() {
        let t = Tokenizer::gpt2().unwrap();
        assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
        assert_eq!(
            t.encode_with_specials("Hello world").unwrap(),
            vec![50256, 15496, 995, 50256]
        );
        assert_eq!(t.vocab_size(), 50258);
        assert_eq!((t.bos(), t.eos(), t.mask_index()), (50256, 50256, 50257));
    }

    #[test]
    fn special_strings_in_text_are_plain_text() {
        let b = Tokenizer::bert().unwrap();
        let ids = b.encode("a [MASK] b [SEP]").unwrap();
        assert!(!ids.contains(&103) && !ids.contains(&102), "{ids:?}");
        let g = Tokenizer::gpt2().unwrap();
        let ids = g.encode("x <|endoftext|> [PAD] y").unwrap();
        assert!(!ids.contains(&50256) && !ids.contains(&50257), "{ids:?}");
        assert_eq!(g.decode(&ids, false).unwrap(), "x <|endoftext|> [PAD] y");
    }

    #[test]
    fn gpt2_mask_rendering_follows_conventions() {
        let r = Tokenizer::gpt2().unwrap();
        let c = Tokenizer::new(TokenizerKind::Gpt2, Conventions::Clean).unwrap();
        let ids = [15496, 50257, 995];
        assert_eq!(r.decode(&ids, false).unwrap(), "Hello[PAD] world");
        assert_eq!(c.decode(&ids, false).unwrap(), "Hello[MASK] world");
        assert_eq!(r.decode(&ids, true).unwrap(), "Hello world");
        let err = r.decode(&[50258], false).unwrap_err().to_string();
        assert!(err.contains("50258") && err.contains("outside"), "{err}");
    }

    #[test]
    fn round_trips() {
        let g = Tokenizer::gpt2().unwrap();
        for s in [
            "Call me Ishmael. Some years ago\u{2014}never mind how long precisely",
            "  two  spaces,\ttabs\nand newlines\n\n",
            "caf\u{e9} na\u{ef}ve \u{1F600} \u{4e2d}\u{6587}",
        ] {
            let ids = g.encode(s).unwrap();
            assert_eq!(g.decode(&ids, false).unwrap(), s);
        }
        // BERT loses case and accents by design; lowercase ASCII prose survives.
        let b = Tokenizer::bert().unwrap();
        let s = "it is a truth universally acknowledged, that a single man in possession.";
        let ids = b.encode(s).unwrap();
        assert_eq!(b.decode(&ids, false).unwrap(), s);
        let ids = b.encode_with_specials("Hello world!").unwrap();
        assert_eq!(b.decode(&ids, false).unwrap(), "[CLS] hello world! [SEP]");
        assert_eq!(b.decode(&ids, true).unwrap(), "hello world!");
    }
}
