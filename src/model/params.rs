//! DiT parameters as per-layer structs. The reference's state_dict names (spec 2.5) are produced
//! here and only here, in registration order, so checkpoint I/O, EMA lists and parameter counts
//! all agree by construction.

use crate::model::config::DitConfig;
use crate::tensor::Tensor;

/// `y = x W^T + b`, PyTorch layout: weight (out, in), bias (out).
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    /// (out, in)
    pub weight: Tensor,
    /// (out), absent for bias-free layers
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn zeros(out: usize, inp: usize, bias: bool) -> Self {
        Linear {
            weight: Tensor::zeros(&[out, inp]),
            bias: bias.then(|| Tensor::zeros(&[out])),
        }
    }
    pub fn out_dim(&self) -> usize {
        self.weight.shape[0]
    }
    pub fn in_dim(&self) -> usize {
        self.weight.shape[1]
    }
}

/// IMDM's `vocab_embed.imdm_mlp`: `W_b · GELU_exact(W_a eps + b_a)`.
#[derive(Clone, Debug, PartialEq)]
pub struct EpsMlp {
    /// nd -> 4D, with bias
    pub fc1: Linear,
    /// 4D -> D, no bias (zero-init)
    pub fc2: Linear,
}

/// `sigma_map.mlp`: Linear(256 -> cond) -> SiLU -> Linear(cond -> cond).
#[derive(Clone, Debug, PartialEq)]
pub struct SigmaMap {
    pub fc1: Linear,
    pub fc2: Linear,
}

/// One `DDiTBlock`.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    /// (D)
    pub norm1: Tensor,
    /// D -> 3D, no bias; output ordered (q|k|v, head, dim)
    pub attn_qkv: Linear,
    /// D -> D, no bias
    pub attn_out: Linear,
    /// (D)
    pub norm2: Tensor,
    /// D -> 4D
    pub mlp_fc1: Linear,
    /// 4D -> D
    pub mlp_fc2: Linear,
    /// cond -> 6D (shift, scale, gate) x (msa, mlp); absent in the AR baseline
    pub adaln: Option<Linear>,
}

/// `output_layer`.
#[derive(Clone, Debug, PartialEq)]
pub struct FinalLayer {
    /// (D)
    pub norm: Tensor,
    /// D -> V
    pub linear: Linear,
    /// cond -> 2D (shift, scale); absent in the AR baseline
    pub adaln: Option<Linear>,
}

/// All parameters of one DiT (f32 master copy).
#[derive(Clone, Debug, PartialEq)]
pub struct DitParams {
    pub config: DitConfig,
    /// (V, D); row mask_index is the [MASK] embedding
    pub embedding: Tensor,
    pub eps_mlp: Option<EpsMlp>,
    pub sigma_map: Option<SigmaMap>,
    pub blocks: Vec<Block>,
    pub final_layer: FinalLayer,
}

/// Width of the sinusoidal timestep feature (spec 2.2).
pub const TIME_FEATURES: usize = 256;

impl DitParams {
    /// All-zero parameters with the shapes `config` implies.
    pub fn zeros(config: &DitConfig) -> Self {
        let (d, v, c, m) = (
            config.hidden,
            config.vocab_size,
            config.cond_dim,
            config.mlp_hidden(),
        );
        let adaln = config.has_adaln();
        DitParams {
            config: config.clone(),
            embedding: Tensor::zeros(&[v, d]),
            eps_mlp: config.has_eps_mlp().then(|| EpsMlp {
                fc1: Linear::zeros(4 * d, config.noise_dim, true),
                fc2: Linear::zeros(d, 4 * d, false),
            }),
            sigma_map: adaln.then(|| SigmaMap {
                fc1: Linear::zeros(c, TIME_FEATURES, true),
                fc2: Linear::zeros(c, c, true),
            }),
            blocks: (0..config.blocks)
                .map(|_| Block {
                    norm1: Tensor::zeros(&[d]),
                    attn_qkv: Linear::zeros(3 * d, d, false),
                    attn_out: Linear::zeros(d, d, false),
                    norm2: Tensor::zeros(&[d]),
                    mlp_fc1: Linear::zeros(m, d, true),
                    mlp_fc2: Linear::zeros(d, m, true),
                    adaln: adaln.then(|| Linear::zeros(6 * d, c, true)),
                })
                .collect(),
            final_layer: FinalLayer {
                norm: Tensor::zeros(&[d]),
                linear: Linear::zeros(v, d, true),
                adaln: adaln.then(|| Linear::zeros(2 * d, c, true)),
            },
        }
    }

    /// (name, tensor) in the reference's registration order (spec 2.5), parameters only.
    pub fn named(&self) -> Vec<(String, &Tensor)> {
        fn lin<'a>(out: &mut Vec<(String, &'a Tensor)>, name: &str, l: &'a Linear) {
            out.push((format!("{name}.weight"), &l.weight));
            if let Some(b) = &l.bias {
                out.push((format!("{name}.bias"), b));
            }
        }
        let mut out = Vec::new();
        out.push(("vocab_embed.embedding".into(), &self.embedding));
        if let Some(e) = &self.eps_mlp {
            lin(&mut out, "vocab_embed.imdm_mlp.0", &e.fc1);
            lin(&mut out, "vocab_embed.imdm_mlp.2", &e.fc2);
        }
        if let Some(s) = &self.sigma_map {
            lin(&mut out, "sigma_map.mlp.0", &s.fc1);
            lin(&mut out, "sigma_map.mlp.2", &s.fc2);
        }
        for (i, b) in self.blocks.iter().enumerate() {
            out.push((format!("blocks.{i}.norm1.weight"), &b.norm1));
            lin(&mut out, &format!("blocks.{i}.attn_qkv"), &b.attn_qkv);
            lin(&mut out, &format!("blocks.{i}.attn_out"), &b.attn_out);
            out.push((format!("blocks.{i}.norm2.weight"), &b.norm2));
            lin(&mut out, &format!("blocks.{i}.mlp.0"), &b.mlp_fc1);
            lin(&mut out, &format!("blocks.{i}.mlp.2"), &b.mlp_fc2);
            if let Some(a) = &b.adaln {
                lin(&mut out, &format!("blocks.{i}.adaLN_modulation"), a);
            }
        }
        let f = &self.final_layer;
        out.push(("output_layer.norm_final.weight".into(), &f.norm));
        lin(&mut out, "output_layer.linear", &f.linear);
        if let Some(a) = &f.adaln {
            lin(&mut out, "output_layer.adaLN_modulation", a);
        }
        out
    }

    /// Mutable twin of [`DitParams::named`], same order.
    pub fn named_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        // Names come from `named`; the order of the mutable walk below mirrors it exactly,
        // which the unit test `named_mut_matches_named` pins down.
        let names: Vec<String> = self.named().into_iter().map(|(n, _)| n).collect();
        fn lin<'a>(ts: &mut Vec<&'a mut Tensor>, l: &'a mut Linear) {
            ts.push(&mut l.weight);
            if let Some(b) = &mut l.bias {
                ts.push(b);
            }
        }
        let mut ts2: Vec<&mut Tensor> = vec![&mut self.embedding];
        if let Some(e) = &mut self.eps_mlp {
            lin(&mut ts2, &mut e.fc1);
            lin(&mut ts2, &mut e.fc2);
        }
        if let Some(s) = &mut self.sigma_map {
            lin(&mut ts2, &mut s.fc1);
            lin(&mut ts2, &mut s.fc2);
        }
        for b in &mut self.blocks {
            ts2.push(&mut b.norm1);
            lin(&mut ts2, &mut b.attn_qkv);
            lin(&mut ts2, &mut b.attn_out);
            ts2.push(&mut b.norm2);
            lin(&mut ts2, &mut b.mlp_fc1);
            lin(&mut ts2, &mut b.mlp_fc2);
            if let Some(a) = &mut b.adaln {
                lin(&mut ts2, a);
            }
        }
        let f = &mut self.final_layer;
        ts2.push(&mut f.norm);
        lin(&mut ts2, &mut f.linear);
        if let Some(a) = &mut f.adaln {
            lin(&mut ts2, a);
        }
        names.into_iter().zip(ts2).collect()
    }

    /// Total number of parameters (buffers such as `rotary_emb.inv_freq` excluded).
    pub fn count(&self) -> usize {
        self.named().iter().map(|(_, t)| t.numel()).sum()
    }

    /// Parameter counts by group: embedding, eps MLP, sigma map, blocks, output layer.
    pub fn count_by_group(&self) -> Vec<(&'static str, usize)> {
        let mut groups = vec![
            ("vocab_embed.embedding", 0),
            ("vocab_embed.imdm_mlp", 0),
            ("sigma_map", 0),
            ("blocks", 0),
            ("output_layer", 0),
        ];
        for (name, t) in self.named() {
            let g = if name == "vocab_embed.embedding" {
                0
            } else if name.starts_with("vocab_embed.imdm_mlp") {
                1
            } else if name.starts_with("sigma_map") {
                2
            } else if name.starts_with("blocks") {
                3
            } else {
                4
            };
            groups[g].1 += t.numel();
        }
        groups
    }
}

/// Name of the rotary buffer the reference's state_dict carries (hd/2 floats).
pub const INV_FREQ: &str = "rotary_emb.inv_freq";

/// The rotary inverse frequencies `1 / 10000^(2i/hd)`, i = 0..hd/2 (spec 2.2, step 3).
pub fn inv_freq(head_dim: usize) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| 1.0 / 10000f64.powf((2 * i) as f64 / head_dim as f64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Algo;

    /// The reference's parameter count of each mode (spec 2.5), as a formula in the sizes:
    /// `blk = 2D + 3D² + D² + (4D² + 4D) + (4D² + D)` per block without adaLN,
    /// `AR = 2VD + V + D + N·blk` (no sigma map, no adaLN: spec 2.4),
    /// `MDLM = SEDD = D3PM = AR + (256C + C + C² + C) + N·(6DC + 6D) + (2DC + 2D)` (time
    /// conditioning adds no parameter: the sigma map exists in every bidirectional model),
    /// `IMDM = MDLM + 4D·nd + 4D + 4D²`.
    #[test]
    fn parameter_counts_follow_the_reference_formula() {
        let formula = |c: &DitConfig| {
            let (v, d, n, k, nd) = (c.vocab_size, c.hidden, c.blocks, c.cond_dim, c.noise_dim);
            let blk = 2 * d + 3 * d * d + d * d + (4 * d * d + 4 * d) + (4 * d * d + d);
            let ar = 2 * v * d + v + d + n * blk;
            let bidir =
                ar + (256 * k + k + k * k + k) + n * (6 * d * k + 6 * d) + 2 * d * k + 2 * d;
            match c.algo {
                Algo::Ar => ar,
                Algo::Mdlm | Algo::Sedd | Algo::D3pm => bidir,
                Algo::Imdm => bidir + 4 * d * nd + 4 * d + 4 * d * d,
            }
        };
        for preset in [
            DitConfig::small(),
            DitConfig::tiny(),
            DitConfig::synthetic(),
        ] {
            for algo in [Algo::Mdlm, Algo::Imdm, Algo::Ar, Algo::Sedd, Algo::D3pm] {
                let mut c = preset.clone();
                c.set_algo(algo);
                c.validate().unwrap();
                assert_eq!(
                    DitParams::zeros(&c).count(),
                    formula(&c),
                    "{} {algo:?}",
                    c.preset
                );
            }
        }
        // The published figures (spec 2.5) and the AR baseline's at the same sizes.
        let count = |mut c: DitConfig, algo| {
            c.set_algo(algo);
            DitParams::zeros(&c).count()
        };
        assert_eq!(count(DitConfig::small(), Algo::Mdlm), 169_627_218);
        assert_eq!(count(DitConfig::small(), Algo::Sedd), 169_627_218);
        assert_eq!(count(DitConfig::small(), Algo::D3pm), 169_627_218);
        assert_eq!(count(DitConfig::small(), Algo::Ar), 162_246_482);
        assert_eq!(count(DitConfig::tiny(), Algo::Mdlm), 33_789_010);
        assert_eq!(count(DitConfig::tiny(), Algo::Ar), 32_088_402);
        assert_eq!(count(DitConfig::synthetic(), Algo::D3pm), 14_119_121);
        let mut c = DitConfig::small();
        c.noise_dim = 2048;
        assert_eq!(count(c, Algo::Imdm), 178_281_042);
    }

    #[test]
    fn named_mut_matches_named() {
        for algo in [Algo::Imdm, Algo::Mdlm] {
            let mut c = DitConfig::minimini();
            c.algo = algo;
            let mut p = DitParams::zeros(&c);
            let a: Vec<(String, Vec<usize>)> = p
                .named()
                .into_iter()
                .map(|(n, t)| (n, t.shape.clone()))
                .collect();
            let b: Vec<(String, Vec<usize>)> = p
                .named_mut()
                .into_iter()
                .map(|(n, t)| (n, t.shape.clone()))
                .collect();
            assert_eq!(a, b);
        }
    }
}
