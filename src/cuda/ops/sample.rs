//! The fused sampler step: the only launcher of `kernels/sample.cu`, its CPU twin and the
//! comparison tests. Maths, counter layout and thread mapping: see the kernel's header.
//!
//! One launch per sampler step: every masked position of the batch draws its outcome (new
//! token, stay masked, reset) from the IMDM or MDLM posterior with the float64 exponential race
//! of `diffusion::posterior`, using the same Philox counters as `diffusion::SamplerStream`, so
//! the kernel and the CPU driver produce the same samples. Only two counters (unmasks, resets)
//! need to come back to the host, for the cache rule.
//!
//! Not on the GPU: nucleus filtering (it needs a sort of each row); the GPU driver
//! (`cuda::denoiser`) falls back to the CPU posterior when it is on.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cuda::Gpu;
use crate::diffusion::SamplerKind;
use crate::error::{Error, Result};
use crate::model::NoiseType;

const MODULE: &str = "sample";
/// Must equal SAMPLE_THREADS in the kernel.
const THREADS: u32 = 256;
/// `cat` at positions that were not masked (the kernel's SAMPLE_NONE).
pub const NONE: u32 = u32::MAX;

/// The kernel's scalar arguments, field for field the `SampleParams` struct of
/// `kernels/sample.cu` (72 bytes, asserted on both sides). Build it with [`SampleParams::new`]
/// and the `with_*` methods.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    /// B·L positions.
    pub rows: u32,
    /// L: the batch row of position `pos` is `pos / len`.
    pub len: u32,
    /// V.
    pub vocab: u32,
    pub mask_index: u32,
    /// Sampler step i (the race's counter word 2).
    pub step: u32,
    /// Step whose forward sees a reset's fresh eps (i + 1).
    pub eps_step: u32,
    /// Philox key: the sampler seed, low and high words.
    pub key_lo: u32,
    pub key_hi: u32,
    /// 0: IMDM posterior, 1: MDLM.
    pub kind: u32,
    /// 1: argmax of the log-probs (greedy noise removal).
    pub greedy: u32,
    /// 1: a reset writes fresh eps into the eps buffer.
    pub write_eps: u32,
    pub noise_dim: u32,
    /// 0: rand, 1: randn.
    pub noise_type: u32,
    pub noise_scale: f32,
    /// Row stride of the log-probs (>= V; the GPU forward pads rows to a multiple of 64).
    pub ld: u32,
    /// Explicit padding (0), so the struct has no implicit padding bytes.
    pub pad_: u32,
    /// > 0; exactly 1 skips the power.
    pub temperature: f64,
}

const _: () = assert!(std::mem::size_of::<SampleParams>() == 72);

// SAFETY: SampleParams is #[repr(C)], made of plain integers and floats (no implicit padding:
// 15 u32 and an f32 fill 64 bytes, then an 8-aligned f64), and matches the kernel's struct
// layout.
unsafe impl DeviceRepr for SampleParams {}

impl SampleParams {
    /// Step `step` of a run keyed by `seed`, for a (batch, len) grid over `vocab` tokens:
    /// T = 1, not greedy, no eps redraw.
    pub fn new(
        kind: SamplerKind,
        (batch, len, vocab, mask_index): (usize, usize, usize, usize),
        seed: u64,
        step: u32,
    ) -> Self {
        SampleParams {
            rows: (batch * len) as u32,
            len: len as u32,
            vocab: vocab as u32,
            mask_index: mask_index as u32,
            step,
            eps_step: step.wrapping_add(1),
            key_lo: seed as u32,
            key_hi: (seed >> 32) as u32,
            kind: match kind {
                SamplerKind::ImdmPosterior => 0,
                SamplerKind::MdlmPosterior => 1,
            },
            greedy: 0,
            write_eps: 0,
            noise_dim: 0,
            noise_type: 0,
            noise_scale: 1.0,
            ld: vocab as u32,
            pad_: 0,
            temperature: 1.0,
        }
    }

    /// Log-probs rows stored with stride `ld` (>= V) instead of V.
    pub fn with_ld(mut self, ld: usize) -> Self {
        self.ld = ld as u32;
        self
    }

    pub fn with_temperature(mut self, t: f64) -> Self {
        self.temperature = t;
        self
    }

    pub fn with_greedy(mut self, greedy: bool) -> Self {
        self.greedy = greedy as u32;
        self
    }

    /// Resets redraw the `noise_dim` eps columns for step `eps_step` (pass `None` under
    /// `fix_eps` and at the last step). `noise_dim` is also needed without a redraw when an eps
    /// buffer is passed: give it with `write = false`.
    pub fn with_eps(mut self, noise_dim: usize, kind: NoiseType, scale: f32, write: bool) -> Self {
        self.noise_dim = noise_dim as u32;
        self.noise_type = match kind {
            NoiseType::Rand => 0,
            NoiseType::Randn => 1,
        };
        self.noise_scale = scale;
        self.write_eps = write as u32;
        self
    }

    pub fn sampler_kind(&self) -> SamplerKind {
        if self.kind == 0 {
            SamplerKind::ImdmPosterior
        } else {
            SamplerKind::MdlmPosterior
        }
    }

    pub fn noise_kind(&self) -> NoiseType {
        if self.noise_type == 0 {
            NoiseType::Rand
        } else {
            NoiseType::Randn
        }
    }

    pub fn seed(&self) -> u64 {
        self.key_lo as u64 | (self.key_hi as u64) << 32
    }

    /// Host-side checks shared by the launcher and the twin: sizes against the buffer lengths
    /// (`eps_len` is `None` without an eps buffer).
    pub fn check(
        &self,
        x_len: usize,
        cat_len: usize,
        eps_len: Option<usize>,
        counters_len: usize,
        log_probs_len: usize,
        alphas_len: usize,
    ) -> Result<()> {
        let bad = |m: String| Err(Error::Shape(format!("sample: {m}")));
        let (rows, len, v) = (self.rows as usize, self.len as usize, self.vocab as usize);
        if v < 2 || v == u32::MAX as usize || self.mask_index >= self.vocab {
            return bad(format!(
                "vocab {v} must be in 2..2^32-1 and mask_index {} below it",
                self.mask_index
            ));
        }
        if len == 0 || rows % len != 0 || rows > i32::MAX as usize {
            return bad(format!(
                "rows {rows} must be a multiple of len {len} (> 0) and at most 2^31-1"
            ));
        }
        if self.kind > 1 || self.noise_type > 1 || self.greedy > 1 || self.write_eps > 1 {
            return bad(format!("flag out of range in {self:?}"));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!(
                "temperature {} must be positive and finite",
                self.temperature
            ));
        }
        if x_len != rows || cat_len != rows {
            return bad(format!(
                "x has {x_len} and cat {cat_len} elements, expected rows {rows}"
            ));
        }
        let ld = self.ld as usize;
        if ld < v {
            return bad(format!("row stride ld {ld} is below the vocabulary {v}"));
        }
        if log_probs_len != rows * ld {
            return bad(format!(
                "log_probs has {log_probs_len} elements, expected rows {rows} x ld {ld}"
            ));
        }
        if alphas_len != 2 * (rows / len) || counters_len != 2 {
            return bad(format!(
                "alphas has {alphas_len} elements (expected 2 per batch row: {}) and counters \
                 {counters_len} (expected 2)",
                2 * (rows / len)
            ));
        }
        match eps_len {
            Some(n) if n != rows * self.noise_dim as usize => {
                return bad(format!(
                    "eps has {n} elements, expected rows {rows} x noise_dim {}",
                    self.noise_dim
                ))
            }
            None if self.write_eps == 1 => return bad("write_eps needs an eps buffer".into()),
            _ => {}
        }
        if self.write_eps == 1 && (self.kind != 0 || self.noise_dim == 0) {
            return bad("write_eps needs the IMDM posterior and noise_dim > 0".into());
        }
        Ok(())
    }
}

/// Launches `sample_fwd_f32`: one sampler step over the masked positions of `x` (updated in
/// place), from the SUBS `log_probs` (rows, ld) and `alphas` (B, 2) f64 (α_t, α_s per batch row).
/// Writes `cat` (rows): the winning category of each masked position (a token, `mask_index` for
/// stay, V for reset) and [`NONE`] elsewhere; adds (unmasks, resets) to `counters` (2); writes
/// a reset's fresh eps into `eps` (rows, noise_dim) bf16 when `p.write_eps`. Every length is
/// checked first.
#[allow(clippy::too_many_arguments)]
pub fn sample_fwd_f32(
    gpu: &Gpu,
    x: &mut CudaSlice<u32>,
    cat: &mut CudaSlice<u32>,
    eps: Option<&mut CudaSlice<bf16>>,
    counters: &mut CudaSlice<u32>,
    log_probs: &CudaSlice<f32>,
    alphas: &CudaSlice<f64>,
    p: &SampleParams,
) -> Result<()> {
    p.check(
        x.len(),
        cat.len(),
        eps.as_ref().map(|e| e.len()),
        counters.len(),
        log_probs.len(),
        alphas.len(),
    )?;
    if p.rows == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "sample_fwd_f32")?;
    let cfg = LaunchConfig {
        grid_dim: (p.rows, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let null: u64 = 0;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(x).arg(cat);
    match eps {
        Some(e) => b.arg(e),
        None => b.arg(&null),
    };
    b.arg(counters).arg(log_probs).arg(alphas).arg(p);
    // SAFETY: argument order and types match the kernel signature (SampleParams is the kernel's
    // struct, size asserted on both sides); x and cat hold rows elements, log_probs rows*ld,
    // alphas 2*(rows/len), counters 2 and eps rows*noise_dim (or null, never written then:
    // write_eps needs a buffer), as checked above; one block per position, so every index the
    // kernel forms is below these bounds.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// CPU twin of the kernel: a thin wrapper over `diffusion::posterior::sample_masked` (or
/// `greedy_token`) with the race uniforms and reset eps of `diffusion::SamplerStream`, exactly
/// as the CPU driver (`diffusion::sampler::generate`) uses them.
pub mod cpu {
    use rayon::prelude::*;

    use super::{SampleParams, NONE};
    use crate::diffusion::posterior::{greedy_token, sample_masked, Outcome};
    use crate::diffusion::{SamplerStream, StepAlphas, TokenFilter};
    use crate::error::Result;

    /// The kernel's semantics on host buffers; `eps` holds f32 values (the kernel then rounds
    /// them to bf16). Same arguments, same checks.
    pub fn sample_fwd(
        x: &mut [u32],
        cat: &mut [u32],
        eps: Option<&mut [f32]>,
        counters: &mut [u32],
        log_probs: &[f32],
        alphas: &[f64],
        p: &SampleParams,
    ) -> Result<()> {
        p.check(
            x.len(),
            cat.len(),
            eps.as_ref().map(|e| e.len()),
            counters.len(),
            log_probs.len(),
            alphas.len(),
        )?;
        let (len, v, nd) = (p.len as usize, p.vocab as usize, p.noise_dim as usize);
        let mask = p.mask_index;
        let stream = SamplerStream::new(p.seed());
        let filter = TokenFilter {
            nucleus_p: 1.0,
            temperature: p.temperature,
        };
        let outcomes: Vec<(usize, Outcome)> = x
            .par_iter()
            .enumerate()
            .filter(|(_, &t)| t == mask)
            .map(|(pos, _)| {
                let row = &log_probs[pos * v..(pos + 1) * v];
                let outcome = if p.greedy == 1 {
                    match greedy_token(row) {
                        tok if tok == mask => Outcome::Stay,
                        tok => Outcome::Token(tok),
                    }
                } else {
                    let b = pos / len;
                    let a = StepAlphas {
                        alpha_t: alphas[2 * b],
                        alpha_s: alphas[2 * b + 1],
                    };
                    let u = stream.race_uniforms(p.step, pos as u32);
                    sample_masked(p.sampler_kind(), a, row, mask as usize, filter, u)
                };
                (pos, outcome)
            })
            .collect();
        cat.iter_mut()
            .zip(x.iter())
            .filter(|(_, &t)| t != mask)
            .for_each(|(c, _)| *c = NONE);
        let mut eps = eps;
        for (pos, outcome) in outcomes {
            match outcome {
                Outcome::Token(t) => {
                    x[pos] = t;
                    cat[pos] = t;
                    counters[0] += 1;
                }
                Outcome::Stay => cat[pos] = mask,
                Outcome::Reset => {
                    cat[pos] = p.vocab;
                    counters[1] += 1;
                    if let (1, Some(e)) = (p.write_eps, eps.as_deref_mut()) {
                        for d in 0..nd {
                            e[pos * nd + d] = stream.reset_eps(
                                p.eps_step,
                                pos as u32,
                                d as u32,
                                p.noise_kind(),
                                p.noise_scale,
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::gpu_for_tests;
    use crate::cuda::ops::subs;
    use crate::diffusion::posterior::{
        masked_weights, probs_from_log, sample_masked, temper, Outcome,
    };
    use crate::diffusion::schedule::alpha;
    use crate::diffusion::stats::{binomial_within, chi_square_gof};
    use crate::diffusion::{SamplerStream, StepAlphas, TokenFilter};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// One step's inputs on the host: x (rows), SUBS log-probs from random logits, per-row
    /// alphas (some noise-removal rows, one α_s > 1 row when `edge`), eps (bf16-exact values).
    struct Case {
        x: Vec<u32>,
        log_probs: Vec<f32>,
        alphas: Vec<f64>,
        eps: Vec<f32>,
    }

    fn case(seed: u64, (b, l, v, mask): (usize, usize, usize, usize), nd: usize) -> Case {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let rows = b * l;
        let x: Vec<u32> = (0..rows)
            .map(|_| {
                if rng.random_bool(0.7) {
                    mask as u32
                } else {
                    let t = rng.random_range(0..v - 1);
                    (t + (t >= mask) as usize) as u32
                }
            })
            .collect();
        // Peaked and flat rows alike: logits of scale 0.5 to 8.
        let logits: Vec<f32> = (0..rows * v)
            .map(|i| rng.random_range(-1.0f32..1.0) * (0.5 + (i / v % 4) as f32 * 2.5))
            .collect();
        let (log_probs, _) = subs::cpu::subs_fwd(&logits, &x, mask, v);
        let alphas = (0..b)
            .flat_map(|r| {
                let t: f64 = rng.random_range(0.01..1.0);
                let s = t - rng.random_range(0.0..t);
                match r % 3 {
                    2 => [alpha(t), 1.0],
                    _ => [alpha(t), alpha(s)],
                }
            })
            .collect();
        let eps = (0..rows * nd)
            .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_f32())
            .collect();
        Case {
            x,
            log_probs,
            alphas,
            eps,
        }
    }

    #[test]
    fn params_layout_matches_the_kernel() {
        // The kernel's struct: 13 u32, an f32, ld and the pad, then the f64 at byte 64
        // (static_assert 72).
        assert_eq!(std::mem::offset_of!(SampleParams, noise_scale), 52);
        assert_eq!(std::mem::offset_of!(SampleParams, ld), 56);
        assert_eq!(std::mem::offset_of!(SampleParams, temperature), 64);
        let p = SampleParams::new(
            SamplerKind::MdlmPosterior,
            (2, 3, 5, 4),
            0x1234_5678_9abc,
            7,
        );
        assert_eq!(
            (p.key_lo, p.key_hi, p.seed()),
            (0x5678_9abc, 0x1234, 0x1234_5678_9abc)
        );
        assert_eq!((p.rows, p.eps_step, p.kind, p.ld), (6, 8, 1, 5));
    }

    #[test]
    fn bad_shapes_are_rejected_before_any_work() {
        let dims = (2, 3, 5, 4);
        let p = SampleParams::new(SamplerKind::ImdmPosterior, dims, 1, 0);
        let ok = |p: &SampleParams, eps: Option<usize>| p.check(6, 6, eps, 2, 30, 4);
        ok(&p, None).unwrap();
        p.with_ld(8).check(6, 6, None, 2, 48, 4).unwrap();
        let bad = [
            p.check(5, 6, None, 2, 30, 4),
            p.check(6, 6, None, 2, 29, 4),
            p.check(6, 6, None, 2, 30, 2),
            p.check(6, 6, None, 1, 30, 4),
            ok(&p.with_eps(3, NoiseType::Rand, 1.0, true), None),
            ok(&p.with_eps(3, NoiseType::Rand, 1.0, false), Some(17)),
            ok(&p.with_temperature(0.0), None),
            ok(&SampleParams { mask_index: 5, ..p }, None),
            ok(&SampleParams { len: 4, ..p }, None),
            ok(&p.with_ld(4), None),
            ok(&p.with_ld(6), None),
            ok(
                &SampleParams::new(SamplerKind::MdlmPosterior, dims, 1, 0).with_eps(
                    3,
                    NoiseType::Rand,
                    1.0,
                    true,
                ),
                Some(18),
            ),
        ];
        for r in bad {
            assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
        }
    }

    /// The twin's bookkeeping: cat, x, counters and eps follow each position's outcome, and
    /// the outcome is `sample_masked` with the stream's race uniforms.
    #[test]
    fn twin_applies_each_outcome_as_the_cpu_driver_does() {
        let dims = (3, 11, 9, 8);
        let nd = 5;
        for (kind, seed) in [
            (SamplerKind::ImdmPosterior, 1u64),
            (SamplerKind::MdlmPosterior, 2),
        ] {
            let c = case(seed, dims, nd);
            let p = SampleParams::new(kind, dims, seed + 40, 3).with_eps(
                nd,
                NoiseType::Randn,
                0.5,
                kind == SamplerKind::ImdmPosterior,
            );
            let (mut x, mut cat, mut eps, mut n) =
                (c.x.clone(), vec![0; 33], c.eps.clone(), [0; 2]);
            cpu::sample_fwd(
                &mut x,
                &mut cat,
                Some(&mut eps),
                &mut n,
                &c.log_probs,
                &c.alphas,
                &p,
            )
            .unwrap();
            let s = SamplerStream::new(seed + 40);
            let mut want_n = [0u32; 2];
            for pos in 0..33 {
                let row_eps = |e: &[f32]| e[pos * nd..(pos + 1) * nd].to_vec();
                if c.x[pos] != 8 {
                    assert_eq!((cat[pos], x[pos]), (NONE, c.x[pos]), "pos {pos}");
                    assert_eq!(row_eps(&eps), row_eps(&c.eps));
                    continue;
                }
                let a = StepAlphas {
                    alpha_t: c.alphas[2 * (pos / 11)],
                    alpha_s: c.alphas[2 * (pos / 11) + 1],
                };
                let row = &c.log_probs[pos * 9..(pos + 1) * 9];
                let want = sample_masked(
                    kind,
                    a,
                    row,
                    8,
                    TokenFilter::NONE,
                    s.race_uniforms(3, pos as u32),
                );
                match want {
                    Outcome::Token(t) => {
                        assert_eq!((cat[pos], x[pos]), (t, t));
                        want_n[0] += 1;
                    }
                    Outcome::Stay => assert_eq!((cat[pos], x[pos]), (8, 8)),
                    Outcome::Reset => {
                        assert_eq!((cat[pos], x[pos]), (9, 8));
                        want_n[1] += 1;
                        let fresh: Vec<f32> = (0..nd as u32)
                            .map(|d| s.reset_eps(4, pos as u32, d, NoiseType::Randn, 0.5))
                            .collect();
                        assert_eq!(row_eps(&eps), fresh, "pos {pos}");
                    }
                }
                if !matches!(want, Outcome::Reset) {
                    assert_eq!(row_eps(&eps), row_eps(&c.eps));
                }
            }
            assert_eq!(n, want_n, "{kind:?}");
            assert!(want_n[0] > 0, "the case exercises unmasks");
        }
    }

    /// GPU and twin on the same inputs: identical x, cat, counters and bf16 eps. The race is
    /// f64 on both sides with the same operation order and Philox counters; only exp/ln/pow
    /// may differ in the last ulp, which flips a draw with probability ~1e-16 per position, so
    /// no mismatch is allowed.
    fn check_gpu(gpu: &Gpu, c: &Case, p: &SampleParams, tag: &str) {
        let s = &gpu.stream;
        let rows = c.x.len();
        let with_eps = p.noise_dim > 0;
        let mut dx = s.clone_htod(&c.x).unwrap();
        let mut dcat = s.alloc_zeros::<u32>(rows).unwrap();
        let mut dn = s.clone_htod(&[5u32, 7]).unwrap();
        let eps16: Vec<bf16> = c.eps.iter().map(|&e| bf16::from_f32(e)).collect();
        let mut deps = s.clone_htod(&eps16).unwrap();
        // Padded rows (p.ld > V) hold NaN in the padding: a read there would poison a draw.
        let (v, ld) = (p.vocab as usize, p.ld as usize);
        let mut padded = vec![f32::NAN; rows * ld];
        for r in 0..rows {
            padded[r * ld..r * ld + v].copy_from_slice(&c.log_probs[r * v..(r + 1) * v]);
        }
        let dlp = s.clone_htod(&padded).unwrap();
        let dal = s.clone_htod(&c.alphas).unwrap();
        sample_fwd_f32(
            gpu,
            &mut dx,
            &mut dcat,
            with_eps.then_some(&mut deps),
            &mut dn,
            &dlp,
            &dal,
            p,
        )
        .unwrap();
        let (mut x, mut cat, mut eps, mut n) = (c.x.clone(), vec![0; rows], c.eps.clone(), [5, 7]);
        let eps_arg = with_eps.then_some(eps.as_mut_slice());
        cpu::sample_fwd(
            &mut x,
            &mut cat,
            eps_arg,
            &mut n,
            &c.log_probs,
            &c.alphas,
            &p.with_ld(v),
        )
        .unwrap();
        let gx = s.clone_dtoh(&dx).unwrap();
        let gcat = s.clone_dtoh(&dcat).unwrap();
        let gn = s.clone_dtoh(&dn).unwrap();
        let bad: Vec<usize> = (0..rows)
            .filter(|&i| gcat[i] != cat[i] || gx[i] != x[i])
            .collect();
        assert!(
            bad.is_empty(),
            "{tag}: {} of {rows} positions differ; first {}: gpu cat {} x {}, twin cat {} x {}",
            bad.len(),
            bad[0],
            gcat[bad[0]],
            gx[bad[0]],
            cat[bad[0]],
            x[bad[0]]
        );
        assert_eq!(gn, n, "{tag}: counters");
        let geps = s.clone_dtoh(&deps).unwrap();
        let want: Vec<bf16> = eps.iter().map(|&e| bf16::from_f32(e)).collect();
        let bad = (0..geps.len()).find(|&i| geps[i].to_bits() != want[i].to_bits());
        assert!(
            bad.is_none(),
            "{tag}: eps differs at {bad:?}: gpu {:?} twin {:?}",
            bad.map(|i| geps[i]),
            bad.map(|i| want[i])
        );
    }

    #[test]
    fn gpu_matches_twin_exactly() {
        let Some(gpu) = gpu_for_tests() else { return };
        // (B, L, V, mask): tiny, awkward, the real OWT and LM1B vocabularies.
        for (i, &dims) in [
            (2, 7, 13, 12),
            (1, 1, 2, 1),
            (5, 3, 6, 0),
            (3, 129, 1001, 500),
            (2, 64, 50258, 50257),
            (4, 32, 30522, 103),
        ]
        .iter()
        .enumerate()
        {
            let nd = [3, 1, 8, 17, 64, 32][i];
            let c = case(100 + i as u64, dims, nd);
            for kind in [SamplerKind::ImdmPosterior, SamplerKind::MdlmPosterior] {
                let imdm = kind == SamplerKind::ImdmPosterior;
                let base = SampleParams::new(kind, dims, 0xdead_beef_0000 + i as u64, 5);
                for (name, p) in [
                    ("T=1", base),
                    ("T=0.7", base.with_temperature(0.7)),
                    ("T=1.3", base.with_temperature(1.3)),
                    ("greedy", base.with_greedy(true)),
                    ("padded rows", base.with_ld(dims.2.next_multiple_of(64))),
                    ("padded greedy", base.with_ld(dims.2 + 1).with_greedy(true)),
                    ("rand eps", base.with_eps(nd, NoiseType::Rand, 1.0, imdm)),
                    ("randn eps", base.with_eps(nd, NoiseType::Randn, 0.5, imdm)),
                    ("eps kept", base.with_eps(nd, NoiseType::Rand, 1.0, false)),
                ] {
                    check_gpu(&gpu, &c, &p, &format!("{dims:?} {kind:?} {name}"));
                }
            }
        }
        // Structured inputs: every row masked with uniform log-probs (ties everywhere), and
        // a step at α_s > 1 (quirk 4: negative stay/reset weights, a forced unmask).
        let dims = (2, 50, 101, 100);
        let mut c = case(7, dims, 4);
        c.x.fill(100);
        let (lp, _) = subs::cpu::subs_fwd(&vec![0.0; 100 * 101], &c.x, 100, 101);
        c.log_probs = lp;
        c.alphas = vec![alpha(0.5), alpha(0.25), alpha(1e-6), alpha(-1e-5)];
        for kind in [SamplerKind::ImdmPosterior, SamplerKind::MdlmPosterior] {
            let p = SampleParams::new(kind, dims, 3, 0);
            check_gpu(&gpu, &c, &p, &format!("uniform rows {kind:?}"));
            check_gpu(
                &gpu,
                &c,
                &p.with_greedy(true),
                &format!("uniform greedy {kind:?}"),
            );
        }
    }

    /// One fixed row replicated at 200,000 masked positions: the GPU's category counts against
    /// the (tempered, normalised) posterior weights, and the stay / reset / unmask frequencies
    /// within binomial bounds.
    #[test]
    fn gpu_draws_follow_the_posterior() {
        let Some(gpu) = gpu_for_tests() else { return };
        let s = &gpu.stream;
        let tok = [0.1f64, 0.25, 0.15, 0.5, 0.0];
        let (v, mask) = (6usize, 5usize);
        let row: Vec<f32> = tok
            .iter()
            .map(|&q| if q > 0.0 { q.ln() as f32 } else { -1e6 })
            .chain([-1e6])
            .collect();
        let (b, l) = (200, 1000);
        let rows = b * l;
        let lp = s.clone_htod(&row.repeat(rows)).unwrap();
        let probs = probs_from_log(&row);
        for (kind, (t, sv), temp) in [
            (SamplerKind::ImdmPosterior, (0.6, 0.4), 1.0),
            (SamplerKind::ImdmPosterior, (1.0, 0.9), 1.0),
            (SamplerKind::ImdmPosterior, (0.6, 0.4), 0.5),
            (SamplerKind::ImdmPosterior, (0.3, -1.0), 1.0),
            (SamplerKind::MdlmPosterior, (0.6, 0.4), 1.0),
            (SamplerKind::MdlmPosterior, (0.6, 0.4), 2.0),
        ] {
            let a = StepAlphas {
                alpha_t: alpha(t),
                alpha_s: if sv < 0.0 { 1.0 } else { alpha(sv) },
            };
            let w: Vec<f64> = masked_weights(kind, a, &probs, mask)
                .into_iter()
                .map(|x| temper(x, temp))
                .collect();
            let mut dx = s.clone_htod(&vec![mask as u32; rows]).unwrap();
            let mut dcat = s.alloc_zeros::<u32>(rows).unwrap();
            let mut dn = s.alloc_zeros::<u32>(2).unwrap();
            let dal = s.clone_htod(&[a.alpha_t, a.alpha_s].repeat(b)).unwrap();
            let p = SampleParams::new(kind, (b, l, v, mask), 77, 2).with_temperature(temp);
            sample_fwd_f32(&gpu, &mut dx, &mut dcat, None, &mut dn, &lp, &dal, &p).unwrap();
            let cat = s.clone_dtoh(&dcat).unwrap();
            let n = s.clone_dtoh(&dn).unwrap();
            let mut counts = vec![0u64; w.len()];
            for &c in &cat {
                counts[c as usize] += 1;
            }
            let tag = format!("{kind:?} t {t} s {sv} T {temp}");
            let (stat, dof, pv) = chi_square_gof(&counts, &w);
            assert!(
                pv > 1e-4,
                "{tag}: chi2 {stat} dof {dof} p {pv} counts {counts:?}"
            );
            let z: f64 = w.iter().sum();
            let resets = counts.get(v).copied().unwrap_or(0);
            assert_eq!(
                n,
                [(rows as u64 - counts[mask] - resets) as u32, resets as u32],
                "{tag}"
            );
            assert!(
                binomial_within(counts[mask], rows as u64, w[mask] / z, 1e-4),
                "{tag} stay"
            );
            if kind == SamplerKind::ImdmPosterior {
                assert!(
                    binomial_within(resets, rows as u64, w[v] / z, 1e-4),
                    "{tag} reset"
                );
            }
            if sv < 0.0 {
                assert_eq!(
                    counts[mask] + resets,
                    0,
                    "{tag}: noise removal leaves no mask"
                );
            }
        }
    }

    /// Reset eps: only reset rows change, their values follow the stream, and distinct rows get
    /// distinct eps; without write_eps nothing changes.
    #[test]
    fn gpu_reset_eps_rows() {
        let Some(gpu) = gpu_for_tests() else { return };
        let s = &gpu.stream;
        let (b, l, v, mask, nd) = (8, 500, 7, 6, 16);
        let rows = b * l;
        let row: Vec<f32> = [0.2f64, 0.2, 0.2, 0.2, 0.1, 0.1]
            .iter()
            .map(|q| q.ln() as f32)
            .chain([-1e6])
            .collect();
        let lp = s.clone_htod(&row.repeat(rows)).unwrap();
        let dal = s.clone_htod(&[alpha(0.9), alpha(0.5)].repeat(b)).unwrap();
        for write in [true, false] {
            let mut dx = s.clone_htod(&vec![mask as u32; rows]).unwrap();
            let mut dcat = s.alloc_zeros::<u32>(rows).unwrap();
            let mut dn = s.alloc_zeros::<u32>(2).unwrap();
            let mut deps = s.clone_htod(&vec![bf16::from_f32(9.0); rows * nd]).unwrap();
            let p = SampleParams::new(SamplerKind::ImdmPosterior, (b, l, v, mask), 5, 0).with_eps(
                nd,
                NoiseType::Rand,
                1.0,
                write,
            );
            sample_fwd_f32(
                &gpu,
                &mut dx,
                &mut dcat,
                Some(&mut deps),
                &mut dn,
                &lp,
                &dal,
                &p,
            )
            .unwrap();
            let cat = s.clone_dtoh(&dcat).unwrap();
            let eps = s.clone_dtoh(&deps).unwrap();
            let n = s.clone_dtoh(&dn).unwrap();
            let st = SamplerStream::new(5);
            let mut seen = std::collections::HashSet::new();
            for pos in 0..rows {
                let e = &eps[pos * nd..(pos + 1) * nd];
                if write && cat[pos] == v as u32 {
                    for (d, x) in e.iter().enumerate() {
                        let want = st.reset_eps(1, pos as u32, d as u32, NoiseType::Rand, 1.0);
                        assert_eq!(x.to_bits(), bf16::from_f32(want).to_bits(), "pos {pos}");
                    }
                    assert!(seen.insert(e.iter().map(|x| x.to_bits()).collect::<Vec<_>>()));
                } else {
                    assert!(e.iter().all(|x| x.to_f32() == 9.0), "pos {pos} changed");
                }
            }
            assert!(n[1] > 100, "resets {}", n[1]);
        }
    }
}
