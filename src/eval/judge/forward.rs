//! The llama-family forward on the CPU, returning what the judge needs at every position:
//! log-probabilities of the next token and the final (normed) hidden states.
//!
//! Per layer, on the rows of all sequences stacked (`x` is `[T, d]`, T the total token count):
//!
//! ```text
//! h  = rmsnorm(x) · w_attn_norm
//! q, k, v = h·Wqᵀ (+bq), h·Wkᵀ (+bk), h·Wvᵀ (+bv)    Wq [H·hd, d], Wk Wv [Hkv·hd, d]
//! q, k = rope(q, pos), rope(k, pos)                 pos restarts at 0 in every sequence
//! a_h = softmax(q_h k_gᵀ / √hd + causal) v_g         g = h / (H / Hkv), per sequence
//! x += a·Woᵀ
//! h  = rmsnorm(x) · w_ffn_norm
//! x += (silu(h·Wgateᵀ) ⊙ h·Wupᵀ)·Wdownᵀ
//! ```
//!
//! then `z = rmsnorm(x) · w_out_norm` and `logits = z·Wᵀ` with W the output matrix (the
//! embedding when tied). Numerics: activations, products and attention in f32 (sgemm with f32
//! accumulation); RMSNorm statistics, rotary angles and the log-softmax in f64. Weights stay
//! quantised in the mapped file and are dequantised `TILE` rows at a time for each product, so
//! memory is the file plus the activations. Sequences never mix: every output row is a
//! fixed-order computation on its own sequence, so results do not depend on how sequences are
//! batched or on the thread count.

use rayon::prelude::*;

use super::gguf::{GgufFile, LlamaConfig, RopeStyle, Weight};
use crate::cpu::gemm::{gemm, Mat};
use crate::error::Result;

/// Weight rows dequantised per product step.
const TILE: usize = 256;
/// Query rows per causal attention block (keys beyond the block's last row are skipped).
const QBLOCK: usize = 128;

struct Layer {
    attn_norm: Vec<f32>,
    q: Weight,
    k: Weight,
    v: Weight,
    o: Weight,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate: Weight,
    up: Weight,
    down: Weight,
}

/// A loaded llama-family model.
pub struct Model {
    pub file: GgufFile,
    pub cfg: LlamaConfig,
    embd: Weight,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    /// `output.weight`, or the embedding when the file has none (tied).
    output: Weight,
    pub tied: bool,
}

impl Model {
    pub fn load(file: GgufFile) -> Result<Self> {
        let cfg = file.config()?;
        let d = cfg.d_model;
        let qd = cfg.n_heads * cfg.head_dim;
        let kvd = cfg.n_kv_heads * cfg.head_dim;
        let vec =
            |name: &str, n: usize| -> Result<Vec<f32>> { file.all_f32(&file.weight(name, 1, n)?) };
        let opt_vec = |name: &str, n: usize| -> Result<Option<Vec<f32>>> {
            if file.has_tensor(name) {
                vec(name, n).map(Some)
            } else {
                Ok(None)
            }
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            layers.push(Layer {
                attn_norm: vec(&n("attn_norm.weight"), d)?,
                q: file.weight(&n("attn_q.weight"), qd, d)?,
                k: file.weight(&n("attn_k.weight"), kvd, d)?,
                v: file.weight(&n("attn_v.weight"), kvd, d)?,
                o: file.weight(&n("attn_output.weight"), d, qd)?,
                bq: opt_vec(&n("attn_q.bias"), qd)?,
                bk: opt_vec(&n("attn_k.bias"), kvd)?,
                bv: opt_vec(&n("attn_v.bias"), kvd)?,
                ffn_norm: vec(&n("ffn_norm.weight"), d)?,
                gate: file.weight(&n("ffn_gate.weight"), cfg.ffn, d)?,
                up: file.weight(&n("ffn_up.weight"), cfg.ffn, d)?,
                down: file.weight(&n("ffn_down.weight"), d, cfg.ffn)?,
            });
        }
        let embd = file.weight("token_embd.weight", cfg.vocab, d)?;
        let tied = !file.has_tensor("output.weight");
        let output = if tied {
            embd.clone()
        } else {
            file.weight("output.weight", cfg.vocab, d)?
        };
        let out_norm = vec("output_norm.weight", d)?;
        Ok(Model {
            cfg,
            embd,
            layers,
            out_norm,
            output,
            tied,
            file,
        })
    }

    /// Parameter count (every tensor's elements; the tied output counted once).
    pub fn n_params(&self) -> usize {
        self.file
            .content
            .tensor_infos
            .values()
            .map(|t| t.shape.elem_count())
            .sum()
    }

    /// `y [t, w.rows] = x [t, w.cols] · wᵀ (+ bias)`.
    fn linear(&self, w: &Weight, x: &[f32], t: usize, bias: Option<&[f32]>) -> Result<Vec<f32>> {
        let (n_out, k) = (w.rows, w.cols);
        debug_assert_eq!(x.len(), t * k);
        let mut y = vec![0f32; t * n_out];
        let mut r0 = 0;
        while r0 < n_out {
            let r1 = (r0 + TILE).min(n_out);
            let tile = self.file.rows_f32(w, r0, r1)?;
            gemm(
                (t, r1 - r0, k),
                1.0,
                Mat::n(x, k),
                Mat::t(&tile, k),
                0.0,
                &mut y[r0..],
                n_out,
            );
            r0 = r1;
        }
        if let Some(b) = bias {
            y.par_chunks_mut(n_out).for_each(|row| {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += *bb;
                }
            });
        }
        Ok(y)
    }

    /// The final normed hidden states `[T, d]` of the sequences stacked in order.
    pub fn hidden(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let d = cfg.d_model;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
        let t: usize = seqs.iter().map(|s| s.len()).sum();
        let mut starts = Vec::with_capacity(seqs.len());
        let mut acc = 0;
        for s in seqs {
            starts.push(acc);
            acc += s.len();
        }
        let max_len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let rope = RopeTable::new(cfg, max_len);
        // The embedding rows, one dequantisation per token.
        let mut x = vec![0f32; t * d];
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        x.par_chunks_mut(d)
            .zip(ids.par_iter())
            .try_for_each(|(row, &id)| -> Result<()> {
                let r = self
                    .file
                    .rows_f32(&self.embd, id as usize, id as usize + 1)?;
                row.copy_from_slice(&r);
                Ok(())
            })?;
        for layer in &self.layers {
            let h = rmsnorm(&x, &layer.attn_norm, cfg.rms_eps);
            let mut q = self.linear(&layer.q, &h, t, layer.bq.as_deref())?;
            let mut k = self.linear(&layer.k, &h, t, layer.bk.as_deref())?;
            let v = self.linear(&layer.v, &h, t, layer.bv.as_deref())?;
            for (s, &st) in seqs.iter().zip(&starts) {
                rope.apply(&mut q[st * nh * hd..(st + s.len()) * nh * hd], nh, hd);
                rope.apply(&mut k[st * nkv * hd..(st + s.len()) * nkv * hd], nkv, hd);
            }
            let a = attention(&q, &k, &v, seqs, &starts, cfg);
            let o = self.linear(&layer.o, &a, t, None)?;
            add_into(&mut x, &o);
            let h = rmsnorm(&x, &layer.ffn_norm, cfg.rms_eps);
            let mut g = self.linear(&layer.gate, &h, t, None)?;
            let u = self.linear(&layer.up, &h, t, None)?;
            g.par_iter_mut().zip(u.par_iter()).for_each(|(g, u)| {
                let s = *g / (1.0 + (-*g).exp());
                *g = s * *u;
            });
            let dn = self.linear(&layer.down, &g, t, None)?;
            add_into(&mut x, &dn);
        }
        Ok(rmsnorm(&x, &self.out_norm, cfg.rms_eps))
    }

    /// `ln p(targets[i] | row i)` for each row of `z [T, d]` whose target is `Some`, by an
    /// online log-sum-exp over `TILE` output rows at a time (the logits are never stored whole).
    pub fn log_softmax_at(&self, z: &[f32], targets: &[Option<u32>]) -> Result<Vec<f64>> {
        let d = self.cfg.d_model;
        let t = targets.len();
        debug_assert_eq!(z.len(), t * d);
        let vocab = self.output.rows;
        // Per row: running max, running sum of exp(l - max), the target's logit.
        let mut state = vec![(f64::NEG_INFINITY, 0f64, f64::NAN); t];
        let mut logits = vec![0f32; t * TILE];
        let mut r0 = 0;
        while r0 < vocab {
            let r1 = (r0 + TILE).min(vocab);
            let w = r1 - r0;
            let tile = self.file.rows_f32(&self.output, r0, r1)?;
            gemm(
                (t, w, d),
                1.0,
                Mat::n(z, d),
                Mat::t(&tile, d),
                0.0,
                &mut logits,
                TILE,
            );
            state
                .par_iter_mut()
                .zip(logits.par_chunks(TILE))
                .zip(targets.par_iter())
                .for_each(|((st, row), tgt)| {
                    if tgt.is_none() {
                        return;
                    }
                    let row = &row[..w];
                    let m_tile = row.iter().fold(f64::NEG_INFINITY, |m, &l| m.max(l as f64));
                    let m = st.0.max(m_tile);
                    let mut s = st.1 * (st.0 - m).exp();
                    for &l in row {
                        s += (l as f64 - m).exp();
                    }
                    st.0 = m;
                    st.1 = s;
                    if let Some(id) = *tgt {
                        let id = id as usize;
                        if (r0..r1).contains(&id) {
                            st.2 = row[id - r0] as f64;
                        }
                    }
                });
            r0 = r1;
        }
        Ok(state
            .into_iter()
            .zip(targets)
            .filter(|(_, t)| t.is_some())
            .map(|((m, s, l), _)| l - (m + s.ln()))
            .collect())
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    x.par_iter_mut()
        .zip(y.par_iter())
        .for_each(|(a, b)| *a += *b);
}

/// `x · rsqrt(mean(x²) + eps) · w` per row, the statistic in f64.
pub(crate) fn rmsnorm(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let d = w.len();
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(yr, xr)| {
            let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let r = 1.0 / (ss / d as f64 + eps).sqrt();
            for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                *o = ((v as f64 * r) as f32) * g;
            }
        });
    y
}

/// cos / sin of `pos / scale · base^(-2i / rope_dim)`, computed in f64, stored in f32.
pub(crate) struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    style: RopeStyle,
}

impl RopeTable {
    pub(crate) fn new(cfg: &LlamaConfig, max_len: usize) -> Self {
        let half = cfg.rope_dim / 2;
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for p in 0..max_len {
            for i in 0..half {
                let inv = cfg.rope_base.powf(-2.0 * i as f64 / cfg.rope_dim as f64);
                let a = p as f64 / cfg.rope_linear_scale * inv;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RopeTable {
            cos,
            sin,
            half,
            style: cfg.rope_style,
        }
    }

    /// Rotates `x [n, heads·hd]` (one sequence, positions 0..n) in place.
    pub(crate) fn apply(&self, x: &mut [f32], heads: usize, hd: usize) {
        let half = self.half;
        x.par_chunks_mut(heads * hd)
            .enumerate()
            .for_each(|(p, row)| {
                let (c, s) = (&self.cos[p * half..][..half], &self.sin[p * half..][..half]);
                for head in row.chunks_mut(hd) {
                    for i in 0..half {
                        let (a, b) = match self.style {
                            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                            RopeStyle::Halves => (i, i + half),
                        };
                        let (x0, x1) = (head[a], head[b]);
                        head[a] = x0 * c[i] - x1 * s[i];
                        head[b] = x0 * s[i] + x1 * c[i];
                    }
                }
            });
    }
}

/// Causal grouped-query attention per sequence and head; returns `[T, H·hd]`.
fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seqs: &[&[u32]],
    starts: &[usize],
    cfg: &LlamaConfig,
) -> Vec<f32> {
    let (hd, nh, nkv) = (cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
    let (qw, kw) = (nh * hd, nkv * hd);
    let group = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let jobs: Vec<(usize, usize)> = (0..seqs.len())
        .flat_map(|s| (0..nh).map(move |h| (s, h)))
        .collect();
    let outs: Vec<Vec<f32>> = jobs
        .par_iter()
        .map(|&(si, h)| {
            let n = seqs[si].len();
            let st = starts[si];
            let g = h / group;
            let qh = &q[st * qw + h * hd..];
            let kh = &k[st * kw + g * hd..];
            let vh = &v[st * kw + g * hd..];
            let mut out = vec![0f32; n * hd];
            let mut scores = vec![0f32; QBLOCK.min(n.max(1)) * n];
            let mut i0 = 0;
            while i0 < n {
                let i1 = (i0 + QBLOCK).min(n);
                let (m, keys) = (i1 - i0, i1);
                gemm(
                    (m, keys, hd),
                    scale,
                    Mat::n(&qh[i0 * qw..], qw),
                    Mat::t(kh, kw),
                    0.0,
                    &mut scores,
                    keys,
                );
                for r in 0..m {
                    let row = &mut scores[r * keys..(r + 1) * keys];
                    let visible = i0 + r + 1;
                    let mx = row[..visible]
                        .iter()
                        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let mut sum = 0f64;
                    for p in row[..visible].iter_mut() {
                        *p = (*p - mx).exp();
                        sum += *p as f64;
                    }
                    let inv = (1.0 / sum) as f32;
                    for p in row[..visible].iter_mut() {
                        *p *= inv;
                    }
                    for p in row[visible..].iter_mut() {
                        *p = 0.0;
                    }
                }
                gemm(
                    (m, hd, keys),
                    1.0,
                    Mat::n(&scores, keys),
                    Mat::n(vh, kw),
                    0.0,
                    &mut out[i0 * hd..],
                    hd,
                );
                i0 = i1;
            }
            out
        })
        .collect();
    let t: usize = seqs.iter().map(|s| s.len()).sum();
    let mut a = vec![0f32; t * qw];
    for (&(si, h), out) in jobs.iter().zip(&outs) {
        let st = starts[si];
        for (r, orow) in out.chunks(hd).enumerate() {
            a[(st + r) * qw + h * hd..][..hd].copy_from_slice(orow);
        }
    }
    a
}
