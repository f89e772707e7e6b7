//! Analytic denoisers with known answers, for testing samplers without a network (and for
//! smoke runs of the CLI). All follow the SUBS contract of spec 4.3: the mask column is
//! −1e6 and an unmasked input position returns 0 at its own token and −1e6 elsewhere. The mask
//! token is always the last id, V − 1.
//!
//! - [`FixedMarginals`]: every masked position l has its own fixed distribution p_l,
//!   independent of context and eps. Any correct sampler's output has marginals p_l.
//! - [`AllEqual`]: the exact conditionals of the synthetic task's joint (spec 7): one token,
//!   uniform over the V − 1 real ids, repeated at every position.
//! - [`EpsToken`]: maps each row's eps to a token, so outputs depend on eps.
//! - [`Recorder`]: wraps any denoiser and keeps every call's inputs.

use crate::diffusion::Denoiser;
use crate::error::{Error, Result};
use crate::model::{Algo, DitConfig};
use crate::tensor::{Tensor, Tokens};

/// SUBS "minus infinity" (spec 4.3).
pub const NEG_INF: f32 = -1_000_000.0;

/// A tiny valid configuration: vocabulary `vocab` with the mask last, length `len`, and an eps
/// MLP of width `noise_dim` when `algo` is IMDM.
pub fn toy_config(vocab: usize, len: usize, algo: Algo, noise_dim: usize) -> DitConfig {
    let mut c = DitConfig::minimini();
    c.preset = "toy".into();
    c.vocab_size = vocab;
    c.mask_index = vocab - 1;
    c.length = len;
    c.algo = algo;
    c.noise_dim = noise_dim;
    c
}

fn check_input(cfg: &DitConfig, xt: &Tokens, eps: Option<&Tensor>) -> Result<()> {
    if xt.ids.len() != xt.batch * xt.len {
        return Err(Error::Shape("toy denoiser: token count".into()));
    }
    if let Some(e) = eps {
        e.expect_shape("toy denoiser eps", &[xt.batch, xt.len, cfg.noise_dim])?;
    }
    Ok(())
}

/// Fills `out` (B·L·V) with the SUBS rows: carry-over at unmasked positions, `masked(b, l, row)`
/// at masked ones (the row arrives filled with −1e6).
fn subs_rows(
    cfg: &DitConfig,
    xt: &Tokens,
    mut masked: impl FnMut(usize, usize, &mut [f32]),
) -> Tensor {
    let v = cfg.vocab_size;
    let mut out = Tensor::from_vec(&[xt.batch, xt.len, v], vec![NEG_INF; xt.batch * xt.len * v])
        .expect("sizes agree");
    for b in 0..xt.batch {
        for l in 0..xt.len {
            let pos = b * xt.len + l;
            let row = &mut out.data[pos * v..(pos + 1) * v];
            let x = xt.ids[pos] as usize;
            if x == cfg.mask_index {
                masked(b, l, row);
                row[cfg.mask_index] = NEG_INF;
            } else {
                row[x] = 0.0;
            }
        }
    }
    out
}

/// Context-free per-position distributions.
pub struct FixedMarginals {
    cfg: DitConfig,
    /// (L, V) log-probs with the mask column at −1e6.
    log_p: Vec<f32>,
}

impl FixedMarginals {
    /// `probs[l]` holds the V − 1 probabilities of the real tokens at position l (normalised
    /// here); `cfg.length` must equal `probs.len()`.
    pub fn new(cfg: DitConfig, probs: &[Vec<f64>]) -> Self {
        let v = cfg.vocab_size;
        assert_eq!(probs.len(), cfg.length, "one distribution per position");
        let mut log_p = Vec::with_capacity(probs.len() * v);
        for p in probs {
            assert_eq!(p.len(), v - 1, "V - 1 real tokens per position");
            let z: f64 = p.iter().sum();
            log_p.extend(p.iter().map(|&x| {
                if x > 0.0 {
                    (x / z).ln() as f32
                } else {
                    NEG_INF
                }
            }));
            log_p.push(NEG_INF);
        }
        FixedMarginals { cfg, log_p }
    }

    /// The normalised distribution of position l over V (mask entry 0), in f64.
    pub fn probs(&self, l: usize) -> Vec<f64> {
        let v = self.cfg.vocab_size;
        self.log_p[l * v..(l + 1) * v]
            .iter()
            .map(|&x| (x as f64).exp())
            .collect()
    }
}

impl Denoiser for FixedMarginals {
    fn config(&self) -> &DitConfig {
        &self.cfg
    }
    fn log_probs(&mut self, xt: &Tokens, eps: Option<&Tensor>) -> Result<Tensor> {
        check_input(&self.cfg, xt, eps)?;
        let v = self.cfg.vocab_size;
        let lp = &self.log_p;
        Ok(subs_rows(&self.cfg, xt, |_, l, row| {
            row.copy_from_slice(&lp[l * v..(l + 1) * v])
        }))
    }
}

/// Exact conditionals of "all L tokens equal, uniform over the V − 1 real ids".
pub struct AllEqual {
    cfg: DitConfig,
}

impl AllEqual {
    pub fn new(cfg: DitConfig) -> Self {
        AllEqual { cfg }
    }
}

impl Denoiser for AllEqual {
    fn config(&self) -> &DitConfig {
        &self.cfg
    }
    fn log_probs(&mut self, xt: &Tokens, eps: Option<&Tensor>) -> Result<Tensor> {
        check_input(&self.cfg, xt, eps)?;
        let mask = self.cfg.mask_index as u32;
        let uniform = -((self.cfg.vocab_size - 1) as f32).ln();
        // The clean token of each row, if one is visible (the first one wins).
        let anchor: Vec<Option<usize>> = (0..xt.batch)
            .map(|b| {
                xt.ids[b * xt.len..(b + 1) * xt.len]
                    .iter()
                    .find(|&&x| x != mask)
                    .map(|&x| x as usize)
            })
            .collect();
        Ok(subs_rows(&self.cfg, xt, |b, _, row| match anchor[b] {
            Some(a) => row[a] = 0.0,
            None => row.iter_mut().for_each(|x| *x = uniform),
        }))
    }
}

/// Every masked position of row b predicts, with certainty, the token
/// `floor((eps[b, 0, 0] + 1)/2 · (V − 1))` (clamped): an eps-driven "partition and map" that
/// makes the output a function of eps. Needs eps.
pub struct EpsToken {
    cfg: DitConfig,
}

impl EpsToken {
    pub fn new(cfg: DitConfig) -> Self {
        EpsToken { cfg }
    }
}

impl Denoiser for EpsToken {
    fn config(&self) -> &DitConfig {
        &self.cfg
    }
    fn log_probs(&mut self, xt: &Tokens, eps: Option<&Tensor>) -> Result<Tensor> {
        check_input(&self.cfg, xt, eps)?;
        let eps = eps.ok_or_else(|| Error::Shape("EpsToken needs eps".into()))?;
        let real = self.cfg.vocab_size - 1;
        let per_row = xt.len * self.cfg.noise_dim;
        Ok(subs_rows(&self.cfg, xt, |b, _, row| {
            let e = eps.data[b * per_row] as f64;
            let tok = (((e + 1.0) / 2.0 * real as f64).floor().max(0.0) as usize).min(real - 1);
            row[tok] = 0.0;
        }))
    }
}

/// One recorded denoiser call.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub xt: Vec<u32>,
    pub eps: Option<Vec<f32>>,
}

/// Wraps a denoiser and records every call's inputs.
pub struct Recorder<D> {
    pub inner: D,
    pub calls: Vec<Call>,
}

impl<D: Denoiser> Recorder<D> {
    pub fn new(inner: D) -> Self {
        Recorder {
            inner,
            calls: vec![],
        }
    }
}

impl<D: Denoiser> Denoiser for Recorder<D> {
    fn config(&self) -> &DitConfig {
        self.inner.config()
    }
    fn log_probs(&mut self, xt: &Tokens, eps: Option<&Tensor>) -> Result<Tensor> {
        self.calls.push(Call {
            xt: xt.ids.clone(),
            eps: eps.map(|e| e.data.clone()),
        });
        self.inner.log_probs(xt, eps)
    }
}

#[cfg(test)]
#[path = "toy_tests.rs"]
mod tests;
