//! Generative perplexity (spec 8.2, `metrics.record_generative_perplexity`).
//!
//! The texts of one sampling batch (one call of the reference) are scored together:
//! 1. each text is encoded with the judge's tokenizer (no BOS; special-token strings such as
//!    `<|endoftext|>` become their ids) and truncated to `max_length` tokens, the diffusion
//!    model's length (also for the 100-token conditional texts, as the reference);
//! 2. the rows are right-padded with the judge's EOS to the longest row of the call;
//! 3. they are scored in judge batches of 8 (`eval.perplexity_batch_size`); rows beyond a
//!    multiple of 8 in a call are dropped, as the reference does (`keep_remainder` scores them
//!    as a last, smaller batch instead);
//! 4. rows wider than the judge's context are cut into chunks of that width, each chunk scored
//!    on its own (the reference's `torch.split` by the judge's context);
//! 5. in each chunk, token 0 is never scored; position j ≥ 1 is valid when its token is not EOS,
//!    or when it is the chunk's first EOS (`cumsum(tokens == eos) == 1`). Tokens after an EOS
//!    stay valid, EOS tokens after the first do not; a padding EOS counts when it is the first;
//! 6. Gen PPL = exp(Σ NLL over valid tokens / number of valid tokens), pooled over every row
//!    and every call (token-weighted, one exp at the end).
//!
//! Right padding never changes a scored log-probability (a causal judge sees only earlier
//! tokens), so a row is given to the judge without its padding, cut after its last valid
//! token. Sums are f64 (the reference accumulates in float32).

use crate::error::{Error, Result};
use crate::eval::lm::Judge;

/// Protocol settings of one Gen PPL measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenPplConfig {
    /// Judge tokens kept per text: the diffusion model's length L.
    pub max_length: usize,
    /// Rows per judge batch (8 in the reference).
    pub judge_batch: usize,
    /// Score the rows beyond a multiple of `judge_batch` in a call (the reference drops them).
    pub keep_remainder: bool,
}

impl GenPplConfig {
    /// The reference protocol for a model of length `max_length`.
    pub fn reference(max_length: usize) -> Self {
        GenPplConfig {
            max_length,
            judge_batch: 8,
            keep_remainder: false,
        }
    }
}

/// Encodes `text` with the judge and keeps its first `max_length` tokens.
pub fn judge_ids(judge: &dyn Judge, text: &str, max_length: usize) -> Result<Vec<u32>> {
    let mut ids = judge.encode(text)?;
    ids.truncate(max_length);
    Ok(ids)
}

/// Which positions of a chunk are scored (step 5 of the module doc); index 0 is never.
pub fn valid_positions(chunk: &[u32], eos: u32) -> Vec<bool> {
    let mut seen = 0usize;
    chunk
        .iter()
        .enumerate()
        .map(|(j, &t)| {
            if t == eos {
                seen += 1;
            }
            j > 0 && (t != eos || seen == 1)
        })
        .collect()
}

/// Pooled NLL over calls.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GenPplAccumulator {
    /// Σ −ln p over valid tokens.
    pub nll_sum: f64,
    /// Number of valid tokens.
    pub tokens: u64,
    /// Texts scored.
    pub scored: usize,
    /// Texts dropped by the multiple-of-batch rule.
    pub dropped: usize,
}

impl GenPplAccumulator {
    /// exp(mean NLL); NaN when nothing was scored.
    pub fn gen_ppl(&self) -> f64 {
        if self.tokens == 0 {
            return f64::NAN;
        }
        (self.nll_sum / self.tokens as f64).exp()
    }

    /// Scores the texts of one sampling batch (one reference call) and adds them to the pool.
    pub fn record(
        &mut self,
        judge: &dyn Judge,
        texts: &[String],
        cfg: &GenPplConfig,
    ) -> Result<()> {
        if cfg.judge_batch == 0 || cfg.max_length == 0 {
            return Err(Error::Config(format!(
                "Gen PPL: judge batch {} and max length {} must be at least 1",
                cfg.judge_batch, cfg.max_length
            )));
        }
        if texts.is_empty() {
            return Ok(());
        }
        let eos = judge.eos_id();
        let ctx = judge.context_len();
        if ctx < 2 {
            return Err(Error::Config(format!(
                "Gen PPL: the judge's context of {ctx} tokens scores nothing"
            )));
        }
        let rows: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| judge_ids(judge, t, cfg.max_length))
            .collect::<Result<_>>()?;
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        let bs = cfg.judge_batch.min(rows.len());
        let kept = if cfg.keep_remainder {
            rows.len()
        } else {
            rows.len() / bs * bs
        };
        for batch in rows[..kept].chunks(bs) {
            // (tokens given to the judge, valid flags over them)
            let mut seqs = Vec::new();
            let mut flags = Vec::new();
            for row in batch {
                let mut padded = row.clone();
                padded.resize(width, eos);
                for chunk in padded.chunks(ctx) {
                    let valid = valid_positions(chunk, eos);
                    let Some(last) = valid.iter().rposition(|&v| v) else {
                        continue;
                    };
                    seqs.push(chunk[..=last].to_vec());
                    flags.push(valid[..=last].to_vec());
                }
            }
            let lps = judge.token_log_probs(&seqs)?;
            if lps.len() != seqs.len() {
                return Err(Error::Shape(format!(
                    "Gen PPL: the judge returned {} rows of log-probs for {} sequences",
                    lps.len(),
                    seqs.len()
                )));
            }
            for ((lp, valid), seq) in lps.iter().zip(&flags).zip(&seqs) {
                if lp.len() + 1 != seq.len() {
                    return Err(Error::Shape(format!(
                        "Gen PPL: the judge returned {} log-probs for a sequence of {} tokens",
                        lp.len(),
                        seq.len()
                    )));
                }
                for (j, &v) in valid.iter().enumerate().skip(1) {
                    if v {
                        self.nll_sum -= lp[j - 1] as f64;
                        self.tokens += 1;
                    }
                }
            }
        }
        self.scored += kept;
        self.dropped += rows.len() - kept;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::toy::{BigramJudge, EOT, EOT_ID};

    fn nll(j: &BigramJudge, pairs: &[(u32, u32)]) -> f64 {
        pairs.iter().map(|&(a, b)| -(j.log_prob(a, b) as f64)).sum()
    }

    #[test]
    fn first_eos_rule() {
        let e = EOT_ID;
        // Token 0 never; the first EOS yes, later EOS no, tokens after an EOS yes.
        assert_eq!(
            valid_positions(&[1, 2, e, 3, e, e, 4], e),
            vec![false, true, true, true, false, false, true]
        );
        // An EOS at position 0 is the first one: no later EOS is ever scored (OWT samples).
        assert_eq!(
            valid_positions(&[e, 5, e, 6], e),
            vec![false, true, false, true]
        );
        assert_eq!(valid_positions(&[], e), Vec::<bool>::new());
    }

    #[test]
    fn pools_over_rows_of_unequal_valid_length_and_scores_the_first_padding_eos() {
        let j = BigramJudge::new(11, 64);
        let texts = vec!["abcd".to_string(), "xy".to_string()];
        let mut acc = GenPplAccumulator::default();
        let cfg = GenPplConfig {
            max_length: 64,
            judge_batch: 8,
            keep_remainder: false,
        };
        acc.record(&j, &texts, &cfg).unwrap();
        let (a, b, c, d, x, y) = (97, 98, 99, 100, 120, 121);
        // "xy" is padded to 4 with EOS: its first padding EOS is scored, the second not.
        let want = nll(&j, &[(a, b), (b, c), (c, d), (x, y), (y, EOT_ID)]);
        assert_eq!(acc.tokens, 5);
        assert!((acc.nll_sum - want).abs() < 1e-9);
        assert!((acc.gen_ppl() - (want / 5.0).exp()).abs() < 1e-9);
        // One exp over pooled tokens, not a mean of per-row perplexities.
        let row_mean = ((nll(&j, &[(a, b), (b, c), (c, d)]) / 3.0).exp()
            + (nll(&j, &[(x, y), (y, EOT_ID)]) / 2.0).exp())
            / 2.0;
        assert!((acc.gen_ppl() - row_mean).abs() > 1e-6);
        // A second call adds to the same pool.
        acc.record(&j, &["zz".to_string()], &cfg).unwrap();
        assert_eq!(acc.tokens, 6);
        assert_eq!(acc.scored, 3);
    }

    #[test]
    fn truncation_special_strings_and_dropped_remainder() {
        let j = BigramJudge::new(5, 64);
        // max_length 3 keeps "a<eot>b" of "a<|endoftext|>bcd": the EOS is scored (first).
        let t = format!("a{EOT}bcd");
        assert_eq!(judge_ids(&j, &t, 3).unwrap(), vec![97, EOT_ID, 98]);
        let mut acc = GenPplAccumulator::default();
        let cfg = GenPplConfig {
            max_length: 3,
            judge_batch: 2,
            keep_remainder: false,
        };
        let texts = vec![t.clone(), t.clone(), t];
        acc.record(&j, &texts, &cfg).unwrap();
        // Batches of 2: the third text is dropped.
        assert_eq!((acc.scored, acc.dropped), (2, 1));
        assert_eq!(acc.tokens, 4);
        let want = 2.0 * nll(&j, &[(97, EOT_ID), (EOT_ID, 98)]);
        assert!((acc.nll_sum - want).abs() < 1e-9);
        let mut keep = GenPplAccumulator::default();
        keep.record(
            &j,
            &texts,
            &GenPplConfig {
                keep_remainder: true,
                ..cfg
            },
        )
        .unwrap();
        assert_eq!((keep.scored, keep.dropped, keep.tokens), (3, 0, 6));
    }

    #[test]
    fn rows_wider_than_the_context_are_scored_in_chunks() {
        let j = BigramJudge::new(2, 4);
        let mut acc = GenPplAccumulator::default();
        let cfg = GenPplConfig::reference(64);
        acc.record(&j, &["abcdef".to_string()], &cfg).unwrap();
        // Chunks "abcd" and "ef": the first token of each chunk is not scored.
        let want = nll(&j, &[(97, 98), (98, 99), (99, 100), (101, 102)]);
        assert_eq!(acc.tokens, 4);
        assert!((acc.nll_sum - want).abs() < 1e-9);
    }
}
