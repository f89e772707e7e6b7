//! Sample metrics computed from token ids alone:
//! - [`exact_match_rate`] and [`distinct_sequences`] for the synthetic task (spec 7: a sample is
//!   correct when all L tokens are equal);
//! - [`conditional_total_correlation`]: ReDi's factorisation error given the noise, from
//!   duplicated sampling (spec 5.9, `metrics.TC`): rows are grouped by noise id, and each group
//!   gets `Σ_j H(X_j) − H(X)` in bits from plain frequency counts; the result is the mean
//!   over groups;
//! - [`unigram_entropy`] per sample in nats and its batch mean (spec 8.3,
//!   `metrics.record_entropy`).
//!
//! Differences from the reference: entropies are f64 (the reference's unigram entropy is f32);
//! a TC group with a single sample scores 0 (the reference's code meant to return 0 there but
//! returns a bare float where a tuple is unpacked, which raises); groups are visited in noise-id
//! order, so the mean is bit-reproducible.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;

use crate::error::{Error, Result};
use crate::tensor::Tokens;

fn rows(tokens: &Tokens) -> impl Iterator<Item = &[u32]> {
    tokens.ids.chunks(tokens.len.max(1)).take(tokens.batch)
}

/// Fraction of rows whose L tokens are all equal and not the mask (0 for an empty batch).
pub fn exact_match_rate(tokens: &Tokens, mask_index: u32) -> f64 {
    if tokens.batch == 0 {
        return 0.0;
    }
    let hits = rows(tokens)
        .filter(|r| {
            r.first()
                .is_some_and(|&a| a != mask_index && r.iter().all(|&x| x == a))
        })
        .count();
    hits as f64 / tokens.batch as f64
}

/// Number of distinct rows.
pub fn distinct_sequences(tokens: &Tokens) -> usize {
    rows(tokens).collect::<HashSet<_>>().len()
}

/// Entropy of an empirical distribution given by its counts, in units of ln(`base`).
pub fn entropy_from_counts(counts: impl IntoIterator<Item = usize>, base: f64) -> f64 {
    let counts: Vec<usize> = counts.into_iter().filter(|&c| c > 0).collect();
    let total: usize = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let ln_base = base.ln();
    counts
        .iter()
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln() / ln_base
        })
        .sum()
}

fn counts_of<T: Hash + Eq>(items: impl IntoIterator<Item = T>) -> Vec<usize> {
    let mut m: HashMap<T, usize> = HashMap::new();
    for it in items {
        *m.entry(it).or_default() += 1;
    }
    let mut c: Vec<usize> = m.into_values().collect();
    c.sort_unstable(); // summation order independent of hashing
    c
}

/// Total correlation of one group, by frequency counting, in bits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupTc {
    /// `Σ_j H(X_j) − H(X)`.
    pub tc_bits: f64,
    /// `Σ_j H(X_j)`.
    pub marginal_bits: f64,
    /// `H(X)` of whole rows.
    pub joint_bits: f64,
}

/// [`GroupTc`] of a set of equally long rows; 0 for fewer than two rows.
pub fn total_correlation_bits(group: &[&[u32]]) -> GroupTc {
    if group.len() < 2 {
        return GroupTc {
            tc_bits: 0.0,
            marginal_bits: 0.0,
            joint_bits: 0.0,
        };
    }
    let joint_bits = entropy_from_counts(counts_of(group.iter().copied()), 2.0);
    let len = group[0].len();
    let marginal_bits: f64 = (0..len)
        .map(|j| entropy_from_counts(counts_of(group.iter().map(|r| r[j])), 2.0))
        .sum();
    GroupTc {
        tc_bits: marginal_bits - joint_bits,
        marginal_bits,
        joint_bits,
    }
}

/// Conditional total correlation from duplicated sampling, averaged over noise groups.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TotalCorrelation {
    /// Mean over groups of `Σ_j H(X_j) − H(X)`, bits.
    pub tc_bits: f64,
    /// Mean over groups of `Σ_j H(X_j)`, bits.
    pub marginal_bits: f64,
    /// Mean over groups of `H(X)`, bits.
    pub joint_bits: f64,
    /// Number of distinct noise ids.
    pub groups: usize,
}

/// Groups the rows of `tokens` by `noise_ids` (one per row: the seed or (xT, seed) id the row
/// was sampled from) and averages [`total_correlation_bits`] over the groups.
pub fn conditional_total_correlation(
    tokens: &Tokens,
    noise_ids: &[i64],
) -> Result<TotalCorrelation> {
    if noise_ids.len() != tokens.batch {
        return Err(Error::Shape(format!(
            "total correlation: {} noise ids for {} rows",
            noise_ids.len(),
            tokens.batch
        )));
    }
    let mut groups: BTreeMap<i64, Vec<&[u32]>> = BTreeMap::new();
    for (row, &id) in rows(tokens).zip(noise_ids) {
        groups.entry(id).or_default().push(row);
    }
    let n = groups.len();
    let mut acc = TotalCorrelation {
        tc_bits: 0.0,
        marginal_bits: 0.0,
        joint_bits: 0.0,
        groups: n,
    };
    if n == 0 {
        return Ok(acc);
    }
    for g in groups.values() {
        let t = total_correlation_bits(g);
        acc.tc_bits += t.tc_bits;
        acc.marginal_bits += t.marginal_bits;
        acc.joint_bits += t.joint_bits;
    }
    acc.tc_bits /= n as f64;
    acc.marginal_bits /= n as f64;
    acc.joint_bits /= n as f64;
    Ok(acc)
}

/// Entropy of the token frequencies of one sample, in nats.
pub fn unigram_entropy(row: &[u32]) -> f64 {
    entropy_from_counts(counts_of(row.iter().copied()), std::f64::consts::E)
}

/// Mean of [`unigram_entropy`] over the rows (0 for an empty batch). Conditional samples are
/// scored on their first 100 tokens in the reference: pass rows truncated accordingly.
pub fn mean_unigram_entropy(tokens: &Tokens) -> f64 {
    if tokens.batch == 0 {
        return 0.0;
    }
    rows(tokens).map(unigram_entropy).sum::<f64>() / tokens.batch as f64
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
