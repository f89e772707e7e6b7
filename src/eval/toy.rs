//! Small deterministic judges for tests of the evaluation protocol: a byte-level causal LM
//! whose next-token distribution depends on the previous token only (a bigram table drawn from
//! a seed), with `<|endoftext|>` as id 256. Their numbers are exact functions of the input, so
//! tests can compute the expected Gen PPL by hand.

use crate::error::{Error, Result};
use crate::eval::lm::Judge;

/// The end-of-text string and id of [`BigramJudge`].
pub const EOT: &str = "<|endoftext|>";
pub const EOT_ID: u32 = 256;
const VOCAB: usize = 257;
/// Width of [`BigramJudge::final_hidden`].
pub const FEATURES: usize = 8;

/// A byte-level bigram LM over 256 bytes and [`EOT_ID`].
pub struct BigramJudge {
    /// Row a: `ln p(b | a)` for every b.
    log_probs: Vec<f32>,
    context: usize,
    seed: u64,
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unit(z: u64) -> f64 {
    (z >> 11) as f64 / (1u64 << 53) as f64
}

impl BigramJudge {
    /// Logits in [-3, 3] from `seed`; `context` is the longest sequence it accepts.
    pub fn new(seed: u64, context: usize) -> Self {
        let mut log_probs = vec![0f32; VOCAB * VOCAB];
        for a in 0..VOCAB {
            let logits: Vec<f64> = (0..VOCAB)
                .map(|b| 6.0 * unit(mix(seed ^ mix((a * VOCAB + b) as u64))) - 3.0)
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
            for b in 0..VOCAB {
                log_probs[a * VOCAB + b] = (logits[b] - lse) as f32;
            }
        }
        BigramJudge {
            log_probs,
            context,
            seed,
        }
    }

    /// `ln p(b | a)`.
    pub fn log_prob(&self, a: u32, b: u32) -> f32 {
        self.log_probs[a as usize * VOCAB + b as usize]
    }

    /// A fixed pseudo-random embedding of token `t`.
    fn embed(&self, t: u32, k: usize) -> f32 {
        (2.0 * unit(mix(
            self.seed.rotate_left(17) ^ mix(t as u64 * 131 + k as u64)
        )) - 1.0) as f32
    }
}

impl Judge for BigramJudge {
    fn describe(&self) -> String {
        format!("bigram test judge (seed {}, bytes + {EOT})", self.seed)
    }

    fn context_len(&self) -> usize {
        self.context
    }

    fn eos_id(&self) -> u32 {
        EOT_ID
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len());
        for (i, part) in text.split(EOT).enumerate() {
            if i > 0 {
                ids.push(EOT_ID);
            }
            ids.extend(part.bytes().map(u32::from));
        }
        Ok(ids)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut out = String::new();
        let mut bytes = Vec::new();
        for &id in ids {
            match id {
                0..=255 => bytes.push(id as u8),
                EOT_ID => {
                    out.push_str(&String::from_utf8_lossy(&bytes));
                    bytes.clear();
                    out.push_str(EOT);
                }
                _ => {
                    return Err(Error::Tokenizer(format!(
                        "bigram judge: id {id} is outside its vocabulary of {VOCAB}"
                    )))
                }
            }
        }
        out.push_str(&String::from_utf8_lossy(&bytes));
        Ok(out)
    }

    fn token_log_probs(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        seqs.iter()
            .map(|s| {
                if s.len() > self.context {
                    return Err(Error::Shape(format!(
                        "bigram judge: a sequence of {} tokens exceeds its context of {}",
                        s.len(),
                        self.context
                    )));
                }
                if let Some(&t) = s.iter().find(|&&t| t as usize >= VOCAB) {
                    return Err(Error::Shape(format!(
                        "bigram judge: id {t} outside 0..{VOCAB}"
                    )));
                }
                Ok(s.windows(2).map(|w| self.log_prob(w[0], w[1])).collect())
            })
            .collect()
    }

    /// The mean embedding of the sequence's tokens followed by the last token's embedding
    /// (a causal summary, so similar texts get similar features).
    fn final_hidden(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        seqs.iter()
            .map(|s| {
                let Some(&last) = s.last() else {
                    return Err(Error::Shape(
                        "bigram judge: an empty sequence has no final \
                                             hidden state"
                            .into(),
                    ));
                };
                let half = FEATURES / 2;
                let mut f = vec![0f32; FEATURES];
                for &t in s {
                    for (k, v) in f[..half].iter_mut().enumerate() {
                        *v += self.embed(t, k) / s.len() as f32;
                    }
                }
                for (k, v) in f[half..].iter_mut().enumerate() {
                    *v = self.embed(last, half + k);
                }
                Ok(f)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_distributions_and_encoding_round_trips() {
        let j = BigramJudge::new(3, 64);
        for a in [0u32, 65, 256] {
            let s: f64 = (0..VOCAB as u32)
                .map(|b| (j.log_prob(a, b) as f64).exp())
                .sum();
            assert!((s - 1.0).abs() < 1e-5, "row {a}: {s}");
        }
        let text = "ab<|endoftext|>c";
        let ids = j.encode(text).unwrap();
        assert_eq!(ids, vec![97, 98, EOT_ID, 99]);
        assert_eq!(j.decode(&ids).unwrap(), text);
        let lp = j.token_log_probs(&[ids.clone()]).unwrap();
        assert_eq!(
            lp[0],
            vec![j.log_prob(97, 98), j.log_prob(98, 256), j.log_prob(256, 99)]
        );
        assert!(j.token_log_probs(&[vec![1; 65]]).is_err());
        assert_eq!(j.final_hidden(&[ids]).unwrap()[0].len(), FEATURES);
    }
}
