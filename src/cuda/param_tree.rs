//! [`ParamTree`]: the shape of [`DitParams`] (embedding, eps MLP, sigma map, blocks, final
//! layer) holding any per-tensor value: device buffers of the master weights, gradients,
//! moments or EMA in GPU training, frozen flags, descriptor indices. Typed access
//! (`grads.blocks[i].qkv.w`) for the backward, and one walk ([`ParamTree::items`]) in the
//! reference's registration order (`DitParams::named`) for everything done tensor by tensor
//! (upload, download, zeroing, optimizer tables). The unit tests pin the walks to `named()`.

use crate::model::params::{DitParams, Linear};
use crate::tensor::Tensor;

/// A linear layer's weight and optional bias.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearOf<T> {
    /// (out, in)
    pub w: T,
    /// (out)
    pub b: Option<T>,
}

/// One block's tensors (`DitParams::blocks[i]`).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockOf<T> {
    /// (D)
    pub norm1: T,
    /// (3D, D)
    pub qkv: LinearOf<T>,
    /// (D, D)
    pub out: LinearOf<T>,
    /// (D)
    pub norm2: T,
    /// (4D, D) + (4D)
    pub mlp1: LinearOf<T>,
    /// (D, 4D) + (D)
    pub mlp2: LinearOf<T>,
    /// (6D, cond) + (6D)
    pub adaln: Option<LinearOf<T>>,
}

/// Every parameter tensor of a DiT, as a `T`.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamTree<T> {
    /// (V, D)
    pub embedding: T,
    /// fc1 (4D, nd) + (4D), fc2 (D, 4D)
    pub eps_mlp: Option<[LinearOf<T>; 2]>,
    /// fc1 (cond, 256) + (cond), fc2 (cond, cond) + (cond)
    pub sigma_map: Option<[LinearOf<T>; 2]>,
    pub blocks: Vec<BlockOf<T>>,
    /// (D)
    pub final_norm: T,
    /// (V, D) + (V)
    pub final_linear: LinearOf<T>,
    /// (2D, cond) + (2D)
    pub final_adaln: Option<LinearOf<T>>,
}

fn lin_of<T, E>(
    l: &Linear,
    name: &str,
    f: &mut impl FnMut(&str, &Tensor) -> Result<T, E>,
) -> Result<LinearOf<T>, E> {
    Ok(LinearOf {
        w: f(&format!("{name}.weight"), &l.weight)?,
        b: match &l.bias {
            Some(b) => Some(f(&format!("{name}.bias"), b)?),
            None => None,
        },
    })
}

impl<T> LinearOf<T> {
    fn try_map<U, E>(&self, f: &mut impl FnMut(&T) -> Result<U, E>) -> Result<LinearOf<U>, E> {
        Ok(LinearOf {
            w: f(&self.w)?,
            b: match &self.b {
                Some(b) => Some(f(b)?),
                None => None,
            },
        })
    }

    fn push<'a>(&'a self, out: &mut Vec<&'a T>) {
        out.push(&self.w);
        if let Some(b) = &self.b {
            out.push(b);
        }
    }

    fn push_mut<'a>(&'a mut self, out: &mut Vec<&'a mut T>) {
        out.push(&mut self.w);
        if let Some(b) = &mut self.b {
            out.push(b);
        }
    }
}

fn pair_map<T, U, E>(
    p: &Option<[LinearOf<T>; 2]>,
    f: &mut impl FnMut(&T) -> Result<U, E>,
) -> Result<Option<[LinearOf<U>; 2]>, E> {
    Ok(match p {
        Some([a, b]) => Some([a.try_map(f)?, b.try_map(f)?]),
        None => None,
    })
}

impl<T> ParamTree<T> {
    /// The tree of `f(name, tensor)` over `p`, called in `DitParams::named` order with the
    /// reference names.
    pub fn from_params<E>(
        p: &DitParams,
        mut f: impl FnMut(&str, &Tensor) -> Result<T, E>,
    ) -> Result<Self, E> {
        let f = &mut f;
        let embedding = f("vocab_embed.embedding", &p.embedding)?;
        let eps_mlp = match &p.eps_mlp {
            Some(e) => Some([
                lin_of(&e.fc1, "vocab_embed.imdm_mlp.0", f)?,
                lin_of(&e.fc2, "vocab_embed.imdm_mlp.2", f)?,
            ]),
            None => None,
        };
        let sigma_map = match &p.sigma_map {
            Some(s) => Some([
                lin_of(&s.fc1, "sigma_map.mlp.0", f)?,
                lin_of(&s.fc2, "sigma_map.mlp.2", f)?,
            ]),
            None => None,
        };
        let mut blocks = Vec::with_capacity(p.blocks.len());
        for (i, b) in p.blocks.iter().enumerate() {
            let norm1 = f(&format!("blocks.{i}.norm1.weight"), &b.norm1)?;
            let qkv = lin_of(&b.attn_qkv, &format!("blocks.{i}.attn_qkv"), f)?;
            let out = lin_of(&b.attn_out, &format!("blocks.{i}.attn_out"), f)?;
            let norm2 = f(&format!("blocks.{i}.norm2.weight"), &b.norm2)?;
            let mlp1 = lin_of(&b.mlp_fc1, &format!("blocks.{i}.mlp.0"), f)?;
            let mlp2 = lin_of(&b.mlp_fc2, &format!("blocks.{i}.mlp.2"), f)?;
            let adaln = match &b.adaln {
                Some(a) => Some(lin_of(a, &format!("blocks.{i}.adaLN_modulation"), f)?),
                None => None,
            };
            blocks.push(BlockOf {
                norm1,
                qkv,
                out,
                norm2,
                mlp1,
                mlp2,
                adaln,
            });
        }
        let fl = &p.final_layer;
        let final_norm = f("output_layer.norm_final.weight", &fl.norm)?;
        let final_linear = lin_of(&fl.linear, "output_layer.linear", f)?;
        let final_adaln = match &fl.adaln {
            Some(a) => Some(lin_of(a, "output_layer.adaLN_modulation", f)?),
            None => None,
        };
        Ok(ParamTree {
            embedding,
            eps_mlp,
            sigma_map,
            blocks,
            final_norm,
            final_linear,
            final_adaln,
        })
    }

    /// The same tree with `f` applied to every value (in `items` order).
    pub fn try_map<U, E>(&self, mut f: impl FnMut(&T) -> Result<U, E>) -> Result<ParamTree<U>, E> {
        let f = &mut f;
        let embedding = f(&self.embedding)?;
        let eps_mlp = pair_map(&self.eps_mlp, f)?;
        let sigma_map = pair_map(&self.sigma_map, f)?;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let norm1 = f(&b.norm1)?;
            let qkv = b.qkv.try_map(f)?;
            let out = b.out.try_map(f)?;
            let norm2 = f(&b.norm2)?;
            let mlp1 = b.mlp1.try_map(f)?;
            let mlp2 = b.mlp2.try_map(f)?;
            let adaln = match &b.adaln {
                Some(a) => Some(a.try_map(f)?),
                None => None,
            };
            blocks.push(BlockOf {
                norm1,
                qkv,
                out,
                norm2,
                mlp1,
                mlp2,
                adaln,
            });
        }
        let final_norm = f(&self.final_norm)?;
        let final_linear = self.final_linear.try_map(f)?;
        let final_adaln = match &self.final_adaln {
            Some(a) => Some(a.try_map(f)?),
            None => None,
        };
        Ok(ParamTree {
            embedding,
            eps_mlp,
            sigma_map,
            blocks,
            final_norm,
            final_linear,
            final_adaln,
        })
    }

    /// Infallible [`ParamTree::try_map`].
    pub fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> ParamTree<U> {
        self.try_map(|x| Ok::<U, std::convert::Infallible>(f(x)))
            .unwrap_or_else(|e| match e {})
    }

    /// Every value in `DitParams::named` order.
    pub fn items(&self) -> Vec<&T> {
        let mut out = vec![&self.embedding];
        for l in self.eps_mlp.iter().chain(&self.sigma_map).flatten() {
            l.push(&mut out);
        }
        for b in &self.blocks {
            out.push(&b.norm1);
            b.qkv.push(&mut out);
            b.out.push(&mut out);
            out.push(&b.norm2);
            b.mlp1.push(&mut out);
            b.mlp2.push(&mut out);
            if let Some(a) = &b.adaln {
                a.push(&mut out);
            }
        }
        out.push(&self.final_norm);
        self.final_linear.push(&mut out);
        if let Some(a) = &self.final_adaln {
            a.push(&mut out);
        }
        out
    }

    /// Mutable twin of [`ParamTree::items`], same order.
    pub fn items_mut(&mut self) -> Vec<&mut T> {
        let mut out = vec![&mut self.embedding];
        for l in self
            .eps_mlp
            .iter_mut()
            .chain(self.sigma_map.iter_mut())
            .flatten()
        {
            l.push_mut(&mut out);
        }
        for b in &mut self.blocks {
            out.push(&mut b.norm1);
            b.qkv.push_mut(&mut out);
            b.out.push_mut(&mut out);
            out.push(&mut b.norm2);
            b.mlp1.push_mut(&mut out);
            b.mlp2.push_mut(&mut out);
            if let Some(a) = &mut b.adaln {
                a.push_mut(&mut out);
            }
        }
        out.push(&mut self.final_norm);
        self.final_linear.push_mut(&mut out);
        if let Some(a) = &mut self.final_adaln {
            a.push_mut(&mut out);
        }
        out
    }
}

#[cfg(test)]
#[path = "param_tree_tests.rs"]
mod tests;
