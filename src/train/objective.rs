//! What the training loop optimises: a weighted cross-entropy `Σ w·(−log p(x0|xt,ε))/norm`
//! (a [`LossBatch`]) and its gradient, behind the small [`Objective`] trait so the loop is
//! independent of how the model is computed.
//!
//! - [`CpuDit`]: the DiT on the CPU backend (`cpu::loss_and_grad`, `cpu::log_probs`).
//! - [`LinearSoftmax`]: an analytic stand-in with exact gradients, for testing the machinery
//!   (optimizer, accumulation, checkpoints, resume) without the DiT. Position i's logits are
//!   `W·h_i + b` with `h_i = E[xt_i] + mean_j E[xt_j]` (+ `fc2·(fc1·ε_i + b1)` at masked
//!   positions when the model has an eps MLP), using the DiT's own embedding, eps MLP and
//!   output linear tensors, so its parameters are a `DitParams` and every checkpoint path is
//!   the real one. The mean-pooled context lets it learn the synthetic task (all tokens equal).

use crate::cpu::{self, TrainOpts};
use crate::diffusion::LossBatch;
use crate::error::{Error, Result};
use crate::model::DitParams;
use crate::tensor::Tensor;
use crate::train::{AdamW, Ema};

/// A differentiable loss over `DitParams`.
pub trait Objective {
    /// Short name for logs and the run configuration.
    fn name(&self) -> &'static str;
    /// Loss of `batch` and its gradient, accumulated (`+=`) into `grads`.
    fn loss_and_grad(
        &mut self,
        params: &DitParams,
        batch: &LossBatch,
        opts: &TrainOpts,
        grads: &mut DitParams,
    ) -> Result<f64>;
    /// The same loss in evaluation mode (no dropout, no gradient).
    fn eval_loss(&mut self, params: &DitParams, batch: &LossBatch) -> Result<f64>;
    /// The device-resident form of this objective, if it has one (the GPU trainer): the loop
    /// then keeps the weights, gradients, optimizer state and EMA on the device and drives
    /// [`Resident`] instead of `loss_and_grad` plus the host optimizer.
    fn resident(&mut self) -> Option<&mut dyn Resident> {
        None
    }
}

/// An objective that holds the whole training state on its device. The loop hands it the
/// host state once ([`Resident::load`]), runs every step through it, and reads the state back
/// ([`Resident::store`]) before checkpoints and at the end. The update rule is the host
/// loop's: the same clip, AdamW, EMA and non-finite checks (with the same messages).
pub trait Resident {
    /// Whether [`Resident::load`] has run.
    fn is_loaded(&self) -> bool;
    /// Uploads weights, EMA shadow, AdamW moments and step counters; frozen tensors are the
    /// ones without AdamW state.
    fn load(&mut self, params: &DitParams, ema: &Ema, opt: &AdamW) -> Result<()>;
    /// Zeroes the gradients (start of a step).
    fn zero_grads(&mut self) -> Result<()>;
    /// Loss of one micro-batch; its gradient accumulates on the device.
    fn accumulate(&mut self, batch: &LossBatch, opts: &TrainOpts) -> Result<f64>;
    /// Ends step `step` (1-based) whose micro-batch losses sum to `loss`: fails with
    /// `Error::NonFinite` naming the first bad gradient (or the loss), clips to `clip`
    /// (global norm over trainable tensors; <= 0: off), runs AdamW at `lr`, fails naming a
    /// parameter that became non-finite, updates the EMA. Returns the norm before clipping.
    fn update(&mut self, step: u64, loss: f64, lr: f64, clip: f64) -> Result<f64>;
    /// The loss of `batch` in evaluation mode on the EMA weights.
    fn eval_loss_ema(&mut self, batch: &LossBatch) -> Result<f64>;
    /// Downloads weights, EMA shadow, moments and counters into the host state.
    fn store(&mut self, params: &mut DitParams, ema: &mut Ema, opt: &mut AdamW) -> Result<()>;
}

/// `Σ_i w_i·(−log_probs[i, x0_i]) / norm` over positions with a non-zero weight, from
/// (B, L, V) log-probabilities.
pub fn weighted_nll(log_probs: &Tensor, batch: &LossBatch) -> Result<f64> {
    let (b, l) = (batch.xt.batch, batch.xt.len);
    let n = b * l;
    if log_probs.shape.len() != 3 || log_probs.shape[0] * log_probs.shape[1] != n {
        return Err(Error::Shape(format!(
            "log-probs {:?} for a batch of {b}x{l}",
            log_probs.shape
        )));
    }
    let v = log_probs.shape[2];
    let mut sum = 0.0f64;
    for (i, &w) in batch.weight.iter().enumerate() {
        if w != 0.0 {
            let lp = log_probs.data[i * v + batch.x0.ids[i] as usize] as f64;
            sum += w as f64 * -lp;
        }
    }
    Ok(sum / batch.norm)
}

/// The DiT on the CPU backend, in f32.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuDit;

impl Objective for CpuDit {
    fn name(&self) -> &'static str {
        "cpu-dit"
    }

    fn loss_and_grad(
        &mut self,
        params: &DitParams,
        batch: &LossBatch,
        opts: &TrainOpts,
        grads: &mut DitParams,
    ) -> Result<f64> {
        cpu::loss_and_grad::<f32>(params, batch, opts, grads)
    }

    fn eval_loss(&mut self, params: &DitParams, batch: &LossBatch) -> Result<f64> {
        let lp = cpu::log_probs::<f32>(params, batch.xt, batch.eps, batch.sigma)?;
        weighted_nll(&lp, batch)
    }
}

/// The analytic test objective (see the module doc). Exact gradients, computed in f64.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinearSoftmax;

/// `y = W x` for a row-major (out, in) f32 matrix, in f64.
fn matvec(w: &Tensor, x: &[f64], out: &mut [f64]) {
    let n_in = w.shape[1];
    for (o, row) in out.iter_mut().zip(w.data.chunks_exact(n_in)) {
        *o = row.iter().zip(x).map(|(&a, &b)| a as f64 * b).sum();
    }
}

/// `x += Wᵀ y`.
fn matvec_t_acc(w: &Tensor, y: &[f64], x: &mut [f64]) {
    let n_in = w.shape[1];
    for (&yo, row) in y.iter().zip(w.data.chunks_exact(n_in)) {
        for (xi, &a) in x.iter_mut().zip(row) {
            *xi += a as f64 * yo;
        }
    }
}

/// `G += y ⊗ x` into an f32 (out, in) gradient.
fn outer_acc(g: &mut Tensor, y: &[f64], x: &[f64]) {
    let n_in = g.shape[1];
    for (&yo, row) in y.iter().zip(g.data.chunks_exact_mut(n_in)) {
        for (gi, &xi) in row.iter_mut().zip(x) {
            *gi += (yo * xi) as f32;
        }
    }
}

impl LinearSoftmax {
    fn run(p: &DitParams, batch: &LossBatch, mut grads: Option<&mut DitParams>) -> Result<f64> {
        let c = &p.config;
        let (d, v, mask) = (c.hidden, c.vocab_size, c.mask_index as u32);
        let (bsz, l) = (batch.xt.batch, batch.xt.len);
        if batch.weight.len() != bsz * l || batch.x0.ids.len() != bsz * l {
            return Err(Error::Shape(format!(
                "loss batch: {} weights and {} targets for {bsz}x{l}",
                batch.weight.len(),
                batch.x0.ids.len()
            )));
        }
        let emb = |id: u32| &p.embedding.data[id as usize * d..(id as usize + 1) * d];
        let lin = &p.final_layer.linear;
        let eps_mlp = p.eps_mlp.as_ref().zip(batch.eps);
        let (mut h, mut z, mut gh, mut gctx) =
            (vec![0.0; d], vec![0.0; v], vec![0.0; d], vec![0.0; d]);
        let mut loss = 0.0f64;
        for b in 0..bsz {
            let row = &batch.xt.ids[b * l..(b + 1) * l];
            let mut ctx = vec![0.0f64; d];
            for &id in row {
                ctx.iter_mut()
                    .zip(emb(id))
                    .for_each(|(c, &e)| *c += e as f64 / l as f64);
            }
            gctx.fill(0.0);
            for (i, &xt) in row.iter().enumerate() {
                let flat = b * l + i;
                let w = batch.weight[flat] as f64;
                if w == 0.0 {
                    continue;
                }
                let x0 = batch.x0.ids[flat] as usize;
                h.iter_mut()
                    .zip(emb(xt).iter().zip(&ctx))
                    .for_each(|(h, (&e, &c))| *h = e as f64 + c);
                // The eps branch: a = fc1·ε + b1, h += fc2·a (masked positions only).
                let mut eps_branch = None;
                if let (Some((m, eps)), true) = (eps_mlp, xt == mask) {
                    let nd = m.fc1.in_dim();
                    let e: Vec<f64> = eps.data[flat * nd..(flat + 1) * nd]
                        .iter()
                        .map(|&x| x as f64)
                        .collect();
                    let mut a = vec![0.0; m.fc1.out_dim()];
                    matvec(&m.fc1.weight, &e, &mut a);
                    if let Some(b1) = &m.fc1.bias {
                        a.iter_mut()
                            .zip(&b1.data)
                            .for_each(|(a, &b)| *a += b as f64);
                    }
                    let mut ha = vec![0.0; d];
                    matvec(&m.fc2.weight, &a, &mut ha);
                    h.iter_mut().zip(&ha).for_each(|(h, &x)| *h += x);
                    eps_branch = Some((e, a));
                }
                matvec(&lin.weight, &h, &mut z);
                if let Some(bias) = &lin.bias {
                    z.iter_mut()
                        .zip(&bias.data)
                        .for_each(|(z, &b)| *z += b as f64);
                }
                let zmax = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = zmax + z.iter().map(|&x| (x - zmax).exp()).sum::<f64>().ln();
                loss += w * (lse - z[x0]) / batch.norm;
                let Some(g) = grads.as_deref_mut() else {
                    continue;
                };
                // dL/dz = (softmax − onehot)·w/norm.
                let scale = w / batch.norm;
                z.iter_mut().for_each(|x| *x = (*x - lse).exp() * scale);
                z[x0] -= scale;
                outer_acc(&mut g.final_layer.linear.weight, &z, &h);
                if let Some(gb) = &mut g.final_layer.linear.bias {
                    gb.data
                        .iter_mut()
                        .zip(&z)
                        .for_each(|(g, &x)| *g += x as f32);
                }
                gh.fill(0.0);
                matvec_t_acc(&lin.weight, &z, &mut gh);
                let ge = &mut g.embedding.data[xt as usize * d..(xt as usize + 1) * d];
                ge.iter_mut().zip(&gh).for_each(|(g, &x)| *g += x as f32);
                gctx.iter_mut().zip(&gh).for_each(|(g, &x)| *g += x);
                if let (Some((e, a)), Some((m, gm))) = (eps_branch, eps_mlp.zip(g.eps_mlp.as_mut()))
                {
                    let (m, _) = m;
                    outer_acc(&mut gm.fc2.weight, &gh, &a);
                    let mut ga = vec![0.0; a.len()];
                    matvec_t_acc(&m.fc2.weight, &gh, &mut ga);
                    outer_acc(&mut gm.fc1.weight, &ga, &e);
                    if let Some(gb1) = &mut gm.fc1.bias {
                        gb1.data
                            .iter_mut()
                            .zip(&ga)
                            .for_each(|(g, &x)| *g += x as f32);
                    }
                }
            }
            if let Some(g) = grads.as_deref_mut() {
                for &id in row {
                    let ge = &mut g.embedding.data[id as usize * d..(id as usize + 1) * d];
                    ge.iter_mut()
                        .zip(&gctx)
                        .for_each(|(g, &x)| *g += (x / l as f64) as f32);
                }
            }
        }
        Ok(loss)
    }
}

impl Objective for LinearSoftmax {
    fn name(&self) -> &'static str {
        "linear-softmax"
    }

    fn loss_and_grad(
        &mut self,
        params: &DitParams,
        batch: &LossBatch,
        _opts: &TrainOpts,
        grads: &mut DitParams,
    ) -> Result<f64> {
        Self::run(params, batch, Some(grads))
    }

    fn eval_loss(&mut self, params: &DitParams, batch: &LossBatch) -> Result<f64> {
        Self::run(params, batch, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::noising::nelbo_batch;
    use crate::model::{init::random_params, Algo, DitConfig};
    use crate::tensor::Tokens;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn cfg(algo: Algo) -> DitConfig {
        let mut c = DitConfig::minimini();
        c.vocab_size = 7;
        c.mask_index = 6;
        c.hidden = 4;
        c.heads = 2;
        c.blocks = 1;
        c.cond_dim = 2;
        c.noise_dim = 3;
        c.length = 5;
        c.algo = algo;
        c
    }

    /// The analytic gradient equals central finite differences of the loss for every entry
    /// of every tensor the objective uses.
    #[test]
    fn linear_softmax_gradient_matches_finite_differences() {
        for algo in [Algo::Imdm, Algo::Mdlm] {
            let c = cfg(algo);
            let p = random_params(&c, 3);
            let mut rng = ChaCha8Rng::seed_from_u64(1);
            let x0 = Tokens {
                batch: 3,
                len: 5,
                ids: (0..15).map(|i| (i * 5 % 6) as u32).collect(),
            };
            let nb =
                nelbo_batch(&mut rng.clone(), &mut rng, &x0, &[0.5, 0.8, 0.95], &c, 15.0).unwrap();
            assert!(nb.masked() > 3);
            let lb = nb.as_loss();
            let mut g = DitParams::zeros(&c);
            let mut obj = LinearSoftmax;
            let loss = obj
                .loss_and_grad(&p, &lb, &TrainOpts::default(), &mut g)
                .unwrap();
            assert_eq!(loss, obj.eval_loss(&p, &lb).unwrap());
            let names: Vec<String> = p.named().into_iter().map(|(n, _)| n).collect();
            let mut checked = 0;
            for (ti, name) in names.iter().enumerate() {
                let used = name == "vocab_embed.embedding"
                    || name.starts_with("output_layer.linear")
                    || name.starts_with("vocab_embed.imdm_mlp");
                let numel = p.named()[ti].1.numel();
                for k in 0..numel {
                    let h = 1e-2f32;
                    let mut pp = p.clone();
                    let orig = pp.named()[ti].1.data[k];
                    pp.named_mut()[ti].1.data[k] = orig + h;
                    let up = LinearSoftmax::run(&pp, &lb, None).unwrap();
                    pp.named_mut()[ti].1.data[k] = orig - h;
                    let dn = LinearSoftmax::run(&pp, &lb, None).unwrap();
                    // The perturbation actually applied, in f32.
                    let dh = ((orig + h) as f64) - ((orig - h) as f64);
                    let fd = (up - dn) / dh;
                    let an = g.named()[ti].1.data[k] as f64;
                    assert!(
                        (fd - an).abs() <= 1e-4 + 1e-3 * fd.abs(),
                        "{algo:?} {name}[{k}]: analytic {an} vs finite difference {fd}"
                    );
                    if !used {
                        assert_eq!(an, 0.0);
                    } else if an != 0.0 {
                        checked += 1;
                    }
                }
            }
            assert!(checked > 30, "{checked} non-zero gradient entries checked");
        }
    }

    #[test]
    fn weighted_nll_reads_the_target_column() {
        let x = Tokens {
            batch: 1,
            len: 2,
            ids: vec![2, 1],
        };
        let x0 = Tokens {
            batch: 1,
            len: 2,
            ids: vec![0, 1],
        };
        let lp = Tensor::from_vec(
            &[1, 2, 3],
            vec![-0.5, -1.0, -2.0, -3.0, f32::NEG_INFINITY, -4.0],
        )
        .unwrap();
        let lb = LossBatch {
            xt: &x,
            x0: &x0,
            eps: None,
            weight: &[2.0, 0.0],
            norm: 4.0,
            sigma: None,
        };
        assert_eq!(weighted_nll(&lp, &lb).unwrap(), 0.25);
    }
}
