//! The autoregressive baseline (`algo.AR`, spec 2.4): the causal DiT without adaLN, trained
//! with the shifted next-token cross-entropy, and its two samplers.
//!
//! Loss: the model reads `x0[:, :-1]` (length L−1) and predicts `x0[:, 1:]`; the mask logit is
//! excluded from the softmax (the reference writes −1e6, which gives it probability exactly 0),
//! so `ℓ_i = logsumexp_{j ≠ mask} z_ij − z_{i, x0_{i+1}}` and the loss is `Σ_i ℓ_i / norm`
//! with norm = the B·(L−1) predicted tokens of the global batch. Its gradient on the logits is
//! `(softmax − onehot)/norm` (0 at the mask column). This is an exact NLL (no bound), the
//! number `eval ppl` reports for AR; position 0 (BOS) is never scored, as in the reference.
//!
//! Sampling (`AR.generate_samples`): x[:, 0] = BOS, then for i = 0..L−2 the log-softmax (mask
//! at −inf) of the logits at position i, plus a float64 Gumbel draw per (row, position,
//! token), argmax → x[:, i+1]. [`sample_uncached`] reruns the whole prefix every step as the
//! reference does; [`sample_cached`] decodes with the KV cache of `cpu::kv_cache` (ours, the
//! fast path). Both read the same draws, so they give the same tokens (tested).
//!
//! Draws: Gumbel `g = −ln(−ln u)` with u the sampler stream's uniform (`SamplerStream`,
//! step = the position predicted − 1, position = the row, category = the token); the
//! reference precomputes `torch.distributions.Gumbel(0, 1)` samples, so only the distribution
//! matches (deviation 14.50).

use crate::cpu::kv_cache::KvCache;
use crate::cpu::logits_loss::{logits, logits_loss_and_grad};
use crate::cpu::loss::subs_ce_in_place;
use crate::cpu::{Real, TrainOpts};
use crate::diffusion::stream::SamplerStream;
use crate::error::{Error, Result};
use crate::model::{Algo, DitParams};
use crate::tensor::Tokens;

/// Refuses a model that is not the AR baseline; `what` names the caller.
pub fn check_ar(p: &DitParams, what: &str) -> Result<()> {
    let c = &p.config;
    if c.algo != Algo::Ar || !c.causal {
        return Err(Error::Config(format!(
            "{what}: needs an ar model (the causal DiT), got {}{}",
            c.algo.name(),
            if c.causal { " (causal)" } else { "" }
        )));
    }
    Ok(())
}

/// The model's input `x0[:, :-1]` (B, L−1) and the targets `x0[:, 1:]` (B·(L−1)), row-major.
pub fn shift(x0: &Tokens) -> Result<(Tokens, Vec<u32>)> {
    if x0.len < 2 || x0.batch == 0 {
        return Err(Error::Shape(format!(
            "AR: sequences of length {} cannot be shifted (need at least 2 tokens)",
            x0.len
        )));
    }
    let l = x0.len;
    let mut input = Vec::with_capacity(x0.batch * (l - 1));
    let mut target = Vec::with_capacity(x0.batch * (l - 1));
    for row in x0.ids.chunks_exact(l) {
        input.extend_from_slice(&row[..l - 1]);
        target.extend_from_slice(&row[1..]);
    }
    Ok((
        Tokens {
            batch: x0.batch,
            len: l - 1,
            ids: input,
        },
        target,
    ))
}

/// `Σ_rows (logsumexp_{j≠mask} z − z[target]) / norm` over `logits` (rows, V), replaced in
/// place by its gradient. `targets` has one entry per row and is never the mask.
pub fn ar_ce_in_place<T: Real>(
    logits: &mut [T],
    targets: &[u32],
    norm: f64,
    mask_index: usize,
    v: usize,
) -> f64 {
    // Every row is "masked" for the fused SUBS loss: it then computes exactly this CE.
    let all_mask = vec![mask_index as u32; targets.len()];
    let ones = vec![1f32; targets.len()];
    subs_ce_in_place(logits, &all_mask, targets, &ones, norm, mask_index, v)
}

fn check_targets(targets: &[u32], mask: usize) -> Result<()> {
    if let Some(i) = targets.iter().position(|&t| t as usize == mask) {
        return Err(Error::Shape(format!(
            "AR: target at flat index {i} is the mask token {mask}; clean text never holds it"
        )));
    }
    Ok(())
}

/// The AR loss of the clean batch `x0` (B, L) divided by `norm`, and its gradient accumulated
/// into `grads`.
pub fn loss_and_grad<T: Real>(
    p: &DitParams,
    x0: &Tokens,
    norm: f64,
    opts: &TrainOpts,
    grads: &mut DitParams,
) -> Result<f64> {
    check_ar(p, "AR loss")?;
    let (input, target) = shift(x0)?;
    let (mask, v) = (p.config.mask_index, p.config.vocab_size);
    check_targets(&target, mask)?;
    logits_loss_and_grad::<T>(p, &input, None, None, opts, grads, |z| {
        Ok(ar_ce_in_place(z, &target, norm, mask, v))
    })
}

/// `Σ −log p(x0_{i+1} | x0_{≤i})` over the batch (no division), in evaluation mode.
pub fn nll_sum<T: Real>(p: &DitParams, x0: &Tokens) -> Result<f64> {
    check_ar(p, "AR NLL")?;
    let (input, target) = shift(x0)?;
    let (mask, v) = (p.config.mask_index, p.config.vocab_size);
    check_targets(&target, mask)?;
    let mut z = logits::<T>(p, &input, None, None)?;
    Ok(ar_ce_in_place(&mut z, &target, 1.0, mask, v))
}

/// Tokens predicted per sequence of length `len` (position 0 is never scored).
pub fn scored_per_row(len: usize) -> usize {
    len.saturating_sub(1)
}

/// One sampling step of one row: `argmax_j (log_softmax_{j≠mask}(z)_j + g(j))` in f64, the mask
/// column never chosen. `g(j)` is the Gumbel draw of token j.
pub fn next_token<T: Real>(z: &[T], mask_index: usize, mut g: impl FnMut(usize) -> f64) -> u32 {
    let zf: Vec<f64> = z.iter().map(|x| x.as_f64()).collect();
    let m = zf
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != mask_index)
        .fold(f64::NEG_INFINITY, |m, (_, &x)| m.max(x));
    let s: f64 = zf
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != mask_index)
        .map(|(_, &x)| (x - m).exp())
        .sum();
    let lse = m + s.ln();
    // The first non-mask token wins when every score is −inf; ties go to the first index.
    let (mut best, mut best_score) = (usize::from(mask_index == 0), f64::NEG_INFINITY);
    for (j, &x) in zf.iter().enumerate() {
        if j == mask_index {
            continue;
        }
        let score = (x - lse) + g(j);
        if score > best_score {
            best = j;
            best_score = score;
        }
    }
    best as u32
}

/// The Gumbel draw of token `j` for row `row` when predicting position `step + 1`.
pub fn gumbel(stream: &SamplerStream, step: usize, row: usize, j: usize) -> f64 {
    let u = stream.race_uniform(step as u32, row as u32, j as u32);
    -(-u.ln()).ln()
}

fn check_sample(p: &DitParams, batch: usize, len: usize, bos: u32) -> Result<()> {
    check_ar(p, "AR sampler")?;
    let c = &p.config;
    if batch == 0 || len == 0 || len > c.length {
        return Err(Error::Config(format!(
            "AR sampler: batch {batch} and length {len} must be positive, the length at most the \
             model's {}",
            c.length
        )));
    }
    if bos as usize >= c.vocab_size || bos as usize == c.mask_index {
        return Err(Error::Config(format!(
            "--bos {bos}: must be a token of the vocabulary of {} other than the mask {}",
            c.vocab_size, c.mask_index
        )));
    }
    Ok(())
}

/// The reference's sampler: `batch` sequences of `len` tokens starting with `bos`, the whole
/// prefix rerun through the network at every step.
pub fn sample_uncached<T: Real>(
    p: &DitParams,
    batch: usize,
    len: usize,
    bos: u32,
    seed: u64,
) -> Result<Tokens> {
    check_sample(p, batch, len, bos)?;
    let (mask, v) = (p.config.mask_index, p.config.vocab_size);
    let stream = SamplerStream::new(seed);
    let mut x = vec![vec![bos]; batch];
    for i in 0..len - 1 {
        let prefix = Tokens {
            batch,
            len: i + 1,
            ids: x.iter().flatten().copied().collect(),
        };
        let z = logits::<T>(p, &prefix, None, None)?;
        for (b, row) in x.iter_mut().enumerate() {
            let at = (b * (i + 1) + i) * v;
            let tok = next_token(&z[at..at + v], mask, |j| gumbel(&stream, i, b, j));
            row.push(tok);
        }
    }
    Ok(Tokens {
        batch,
        len,
        ids: x.into_iter().flatten().collect(),
    })
}

/// The KV-cached sampler: the same draws and tokens as [`sample_uncached`], one position of
/// network work per step.
pub fn sample_cached<T: Real>(
    p: &DitParams,
    batch: usize,
    len: usize,
    bos: u32,
    seed: u64,
) -> Result<Tokens> {
    check_sample(p, batch, len, bos)?;
    let (mask, v) = (p.config.mask_index, p.config.vocab_size);
    let stream = SamplerStream::new(seed);
    let mut cache = KvCache::<T>::new(p, batch, len)?;
    let mut x = vec![vec![bos]; batch];
    for i in 0..len - 1 {
        let last: Vec<u32> = x.iter().map(|r| r[i]).collect();
        let z = cache.step(&last)?;
        for (b, row) in x.iter_mut().enumerate() {
            let tok = next_token(&z[b * v..(b + 1) * v], mask, |j| gumbel(&stream, i, b, j));
            row.push(tok);
        }
    }
    Ok(Tokens {
        batch,
        len,
        ids: x.into_iter().flatten().collect(),
    })
}

#[cfg(test)]
#[path = "ar_tests.rs"]
mod tests;
