//! The DiT's parameters in the compute type: [`Weights`] mirrors [`DitParams`] with `Cow`
//! slices, borrowed when T is f32 (no copy per step) and converted when T is f64. The same
//! struct, all `Owned` and zeroed, is the gradient buffer of one backward; [`Weights::add_into`]
//! then accumulates it into the caller's f32 `DitParams`.

use std::borrow::Cow;

use crate::cpu::{Buf, Real};
use crate::error::{Error, Result};
use crate::model::params::{Linear, TIME_FEATURES};
use crate::model::{DitConfig, DitParams};
use crate::tensor::Tensor;

/// A linear layer `y = x W^T + b`: W (out, inp), b (out).
pub(crate) struct Lin<'a, T: Real> {
    pub w: Cow<'a, [T]>,
    pub b: Option<Cow<'a, [T]>>,
    pub out: usize,
    pub inp: usize,
}

impl<'a, T: Real> Lin<'a, T> {
    fn view(l: &'a Linear) -> Self {
        Lin {
            w: T::view(&l.weight.data),
            b: l.bias.as_ref().map(|b| T::view(&b.data)),
            out: l.out_dim(),
            inp: l.in_dim(),
        }
    }
    fn zeros_like(&self) -> Lin<'static, T> {
        Lin {
            w: zeros(self.w.len()),
            b: self.b.as_ref().map(|b| zeros(b.len())),
            out: self.out,
            inp: self.inp,
        }
    }
    fn recycle(self) {
        give(self.w);
        if let Some(b) = self.b {
            give(b);
        }
    }
    fn add_into(&self, l: &mut Linear) {
        T::add_into_f32(&mut l.weight.data, &self.w);
        if let (Some(dst), Some(src)) = (l.bias.as_mut(), self.b.as_ref()) {
            T::add_into_f32(&mut dst.data, src);
        }
    }
    /// Weight and bias as plain slices.
    pub fn wb(&self) -> (&[T], Option<&[T]>) {
        (&self.w, self.b.as_deref())
    }
    /// Mutable weight and bias (gradient buffers, which are always owned).
    pub fn wb_mut(&mut self) -> (&mut [T], Option<&mut [T]>) {
        (
            self.w.to_mut(),
            self.b.as_mut().map(|b| b.to_mut().as_mut_slice()),
        )
    }
}

fn zeros<T: Real>(n: usize) -> Cow<'static, [T]> {
    Cow::Owned(Buf::zeros(n).into_vec())
}

/// Hands an owned buffer back to the pool.
fn give<T: Real>(c: Cow<'_, [T]>) {
    if let Cow::Owned(v) = c {
        drop(Buf::from_vec(v));
    }
}

/// One block.
pub(crate) struct BlockW<'a, T: Real> {
    pub norm1: Cow<'a, [T]>,
    pub qkv: Lin<'a, T>,
    pub out: Lin<'a, T>,
    pub norm2: Cow<'a, [T]>,
    pub fc1: Lin<'a, T>,
    pub fc2: Lin<'a, T>,
    pub adaln: Option<Lin<'a, T>>,
}

/// Every parameter of the DiT.
pub(crate) struct Weights<'a, T: Real> {
    /// (V, D)
    pub embedding: Cow<'a, [T]>,
    /// (fc1 nd -> 4D, fc2 4D -> D); IMDM only
    pub eps_mlp: Option<(Lin<'a, T>, Lin<'a, T>)>,
    /// (fc1 256 -> cond, fc2 cond -> cond); absent in the AR baseline
    pub sigma_map: Option<(Lin<'a, T>, Lin<'a, T>)>,
    pub blocks: Vec<BlockW<'a, T>>,
    /// (D)
    pub final_norm: Cow<'a, [T]>,
    /// D -> V
    pub final_linear: Lin<'a, T>,
    /// cond -> 2D; absent in the AR baseline
    pub final_adaln: Option<Lin<'a, T>>,
}

impl<'a, T: Real> Weights<'a, T> {
    /// Views `p` after checking that its parameters have the shapes its config implies.
    pub fn view(p: &'a DitParams) -> Result<Self> {
        check_shapes(p, &expected_shapes(&p.config), "parameters")?;
        Ok(Weights {
            embedding: T::view(&p.embedding.data),
            eps_mlp: p
                .eps_mlp
                .as_ref()
                .map(|e| (Lin::view(&e.fc1), Lin::view(&e.fc2))),
            sigma_map: p
                .sigma_map
                .as_ref()
                .map(|s| (Lin::view(&s.fc1), Lin::view(&s.fc2))),
            blocks: p
                .blocks
                .iter()
                .map(|b| BlockW {
                    norm1: T::view(&b.norm1.data),
                    qkv: Lin::view(&b.attn_qkv),
                    out: Lin::view(&b.attn_out),
                    norm2: T::view(&b.norm2.data),
                    fc1: Lin::view(&b.mlp_fc1),
                    fc2: Lin::view(&b.mlp_fc2),
                    adaln: b.adaln.as_ref().map(Lin::view),
                })
                .collect(),
            final_norm: T::view(&p.final_layer.norm.data),
            final_linear: Lin::view(&p.final_layer.linear),
            final_adaln: p.final_layer.adaln.as_ref().map(Lin::view),
        })
    }

    /// Zeroed, owned buffers of the same shapes (a gradient).
    pub fn zeros_like(&self) -> Weights<'static, T> {
        let pair = |p: &Option<(Lin<T>, Lin<T>)>| {
            p.as_ref().map(|(a, b)| (a.zeros_like(), b.zeros_like()))
        };
        Weights {
            embedding: zeros(self.embedding.len()),
            eps_mlp: pair(&self.eps_mlp),
            sigma_map: pair(&self.sigma_map),
            blocks: self
                .blocks
                .iter()
                .map(|b| BlockW {
                    norm1: zeros(b.norm1.len()),
                    qkv: b.qkv.zeros_like(),
                    out: b.out.zeros_like(),
                    norm2: zeros(b.norm2.len()),
                    fc1: b.fc1.zeros_like(),
                    fc2: b.fc2.zeros_like(),
                    adaln: b.adaln.as_ref().map(Lin::zeros_like),
                })
                .collect(),
            final_norm: zeros(self.final_norm.len()),
            final_linear: self.final_linear.zeros_like(),
            final_adaln: self.final_adaln.as_ref().map(Lin::zeros_like),
        }
    }

    /// Returns every owned buffer (gradients, f64 copies) to the pool for the next step.
    pub fn recycle(self) {
        give(self.embedding);
        for (a, b) in self.eps_mlp.into_iter().chain(self.sigma_map) {
            a.recycle();
            b.recycle();
        }
        for b in self.blocks {
            give(b.norm1);
            give(b.norm2);
            for l in [b.qkv, b.out, b.fc1, b.fc2].into_iter().chain(b.adaln) {
                l.recycle();
            }
        }
        give(self.final_norm);
        self.final_linear.recycle();
        if let Some(l) = self.final_adaln {
            l.recycle();
        }
    }

    /// `g += self` (rounded to f32); `g` must have been checked with [`check_shapes`].
    pub fn add_into(&self, g: &mut DitParams) {
        T::add_into_f32(&mut g.embedding.data, &self.embedding);
        if let (Some((a, b)), Some(e)) = (&self.eps_mlp, g.eps_mlp.as_mut()) {
            a.add_into(&mut e.fc1);
            b.add_into(&mut e.fc2);
        }
        if let (Some((a, b)), Some(s)) = (&self.sigma_map, g.sigma_map.as_mut()) {
            a.add_into(&mut s.fc1);
            b.add_into(&mut s.fc2);
        }
        for (src, dst) in self.blocks.iter().zip(g.blocks.iter_mut()) {
            T::add_into_f32(&mut dst.norm1.data, &src.norm1);
            src.qkv.add_into(&mut dst.attn_qkv);
            src.out.add_into(&mut dst.attn_out);
            T::add_into_f32(&mut dst.norm2.data, &src.norm2);
            src.fc1.add_into(&mut dst.mlp_fc1);
            src.fc2.add_into(&mut dst.mlp_fc2);
            if let (Some(a), Some(d)) = (&src.adaln, dst.adaln.as_mut()) {
                a.add_into(d);
            }
        }
        let f = &mut g.final_layer;
        T::add_into_f32(&mut f.norm.data, &self.final_norm);
        self.final_linear.add_into(&mut f.linear);
        if let (Some(a), Some(d)) = (&self.final_adaln, f.adaln.as_mut()) {
            a.add_into(d);
        }
    }
}

/// (name, shape) of every parameter `DitParams::zeros(c)` holds, in `named()` order, without
/// allocating the tensors (a large model's zeros would map gigabytes just to read shapes).
pub(crate) fn expected_shapes(c: &DitConfig) -> Vec<(String, Vec<usize>)> {
    let (d, v, cd, m) = (c.hidden, c.vocab_size, c.cond_dim, c.mlp_hidden());
    let mut out = vec![("vocab_embed.embedding".to_string(), vec![v, d])];
    type Shapes = Vec<(String, Vec<usize>)>;
    fn lin(out: &mut Shapes, name: &str, o: usize, i: usize, bias: bool) {
        out.push((format!("{name}.weight"), vec![o, i]));
        if bias {
            out.push((format!("{name}.bias"), vec![o]));
        }
    }
    if c.has_eps_mlp() {
        lin(&mut out, "vocab_embed.imdm_mlp.0", 4 * d, c.noise_dim, true);
        lin(&mut out, "vocab_embed.imdm_mlp.2", d, 4 * d, false);
    }
    if c.has_adaln() {
        lin(&mut out, "sigma_map.mlp.0", cd, TIME_FEATURES, true);
        lin(&mut out, "sigma_map.mlp.2", cd, cd, true);
    }
    for i in 0..c.blocks {
        let b = format!("blocks.{i}");
        out.push((format!("{b}.norm1.weight"), vec![d]));
        lin(&mut out, &format!("{b}.attn_qkv"), 3 * d, d, false);
        lin(&mut out, &format!("{b}.attn_out"), d, d, false);
        out.push((format!("{b}.norm2.weight"), vec![d]));
        lin(&mut out, &format!("{b}.mlp.0"), m, d, true);
        lin(&mut out, &format!("{b}.mlp.2"), d, m, true);
        if c.has_adaln() {
            lin(&mut out, &format!("{b}.adaLN_modulation"), 6 * d, cd, true);
        }
    }
    out.push(("output_layer.norm_final.weight".into(), vec![d]));
    lin(&mut out, "output_layer.linear", v, d, true);
    if c.has_adaln() {
        lin(&mut out, "output_layer.adaLN_modulation", 2 * d, cd, true);
    }
    out
}

/// Fails unless `got` has exactly the tensors `want` lists (names and shapes); `what` names the
/// argument in the message.
pub(crate) fn check_shapes(
    got: &DitParams,
    want: &[(String, Vec<usize>)],
    what: &str,
) -> Result<()> {
    let g = got.named();
    for (wn, ws) in want {
        match g.iter().find(|(n, _)| n == wn) {
            None => {
                return Err(Error::Shape(format!(
                    "{what}: missing tensor {wn} (expected shape {ws:?})"
                )))
            }
            Some((_, t)) => t.expect_shape(&format!("{what}: {wn}"), ws)?,
        }
    }
    if let Some((n, _)) = g.iter().find(|(n, _)| !want.iter().any(|(wn, _)| wn == n)) {
        return Err(Error::Shape(format!(
            "{what}: unexpected tensor {n} for this configuration"
        )));
    }
    Ok(())
}

/// A tensor's data as `T` (inputs such as eps).
pub(crate) fn tensor_as<T: Real>(t: &Tensor) -> Cow<'_, [T]> {
    T::view(&t.data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Algo;

    #[test]
    fn expected_shapes_are_those_of_dit_params_zeros() {
        for (algo, causal) in [(Algo::Imdm, false), (Algo::Mdlm, false), (Algo::Mdlm, true)] {
            let mut c = DitConfig::minimini();
            (c.algo, c.causal, c.noise_dim, c.vocab_size, c.mask_index) = (algo, causal, 48, 97, 3);
            let want: Vec<(String, Vec<usize>)> = DitParams::zeros(&c)
                .named()
                .into_iter()
                .map(|(n, t)| (n, t.shape.clone()))
                .collect();
            assert_eq!(expected_shapes(&c), want, "{algo:?} causal {causal}");
        }
    }
}
