//! The judge interface: a causal language model that scores token sequences in its own
//! vocabulary. Generative evaluation (spec 8.2-8.4) only talks to a judge through this trait,
//! so the protocol code is tested with small hand-made judges and runs unchanged on a GGUF
//! model.

use crate::error::Result;

/// A causal LM used as an evaluator. Implementations are deterministic: the same input gives
/// the same numbers, whatever the batch composition or thread count.
pub trait Judge: Send + Sync {
    /// A one-line description for reports: file, architecture, quantisation, parameter count.
    fn describe(&self) -> String;
    /// The longest sequence the judge scores (its context length).
    fn context_len(&self) -> usize;
    /// The judge's end-of-text id (also the padding id of the protocol, spec 8.2).
    fn eos_id(&self) -> u32;
    /// Encodes text with the judge's tokenizer: no BOS is added, special-token strings that the
    /// vocabulary holds (such as `<|endoftext|>`) become their ids.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Decodes ids back to text.
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// For each sequence (lengths may differ, each at most `context_len`), the natural-log
    /// probability of every token given the ones before it: entry `j - 1` is
    /// `ln p(x_j | x_0..x_{j-1})` for `j = 1..n`, so a sequence of n tokens gives n - 1 values
    /// (token 0 is never scored).
    fn token_log_probs(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>>;
    /// For each sequence, the final hidden state (after the last norm) at its last token: the
    /// feature vector MAUVE clusters.
    fn final_hidden(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>>;
}
