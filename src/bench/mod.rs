//! Benchmarks shared by `imdm-engine bench` and `benches/`: every kernel at the DiT-small and
//! DiT-large shapes, whole forwards, sampler steps ([`sample`]), training steps ([`train`])
//! and distillation steps ([`distill`]), reported beside the PyTorch figures of
//! docs/benchmarks.md (the distillation beside the reference's cost model).

pub mod distill;
pub mod sample;
pub mod timing;
pub mod train;

use cudarc::driver::CudaSlice;
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cuda::dit::{ForwardOpts, GpuDit, Keep, Workspace};
use crate::cuda::ops::attention::{
    self, attention_bwd, attention_bwd_reference, attention_fwd, AttentionBwdWorkspace,
    AttentionShape,
};
use crate::cuda::ops::distill_kl::{distill_kl_fwd_bwd_f32, DistillKlShape, DistillMode};
use crate::cuda::ops::embedding::embedding_fwd;
use crate::cuda::ops::gelu::{gelu_fwd, GeluKind};
use crate::cuda::ops::gemm::{self, Epilogue, Gemm};
use crate::cuda::ops::ln_modulate::{ln_modulate_fwd, LnModulateOut};
use crate::cuda::ops::modulation::ModIn;
use crate::cuda::ops::residual::residual_fwd;
use crate::cuda::ops::subs::{subs_fwd_f32, SubsShape};
use crate::cuda::Gpu;
use crate::error::Result;
use crate::model::init::random_params;
use crate::model::{Algo, DitConfig, Preset};
use crate::rng::seeded_eps;
use timing::{Row, Timer};

/// The two reference data shapes (docs/benchmarks.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// OpenWebText: B = 32, L = 1024, V = 50258 (GPT-2 + mask).
    Owt,
    /// LM1B: B = 512, L = 128, V = 30522 (BERT), softcap 50.
    Lm1b,
}

impl Shape {
    /// (batch, len, vocab, mask index, softcap)
    pub fn dims(self) -> (usize, usize, usize, usize, f64) {
        match self {
            Shape::Owt => (32, 1024, 50258, 50257, 0.0),
            Shape::Lm1b => (512, 128, 30522, 103, 50.0),
        }
    }
}

fn rand_dev_bf16(gpu: &Gpu, rng: &mut ChaCha8Rng, n: usize) -> Result<CudaSlice<bf16>> {
    let v: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
        .collect();
    Ok(gpu.stream.clone_htod(&v)?)
}

fn rand_dev_f32(gpu: &Gpu, rng: &mut ChaCha8Rng, n: usize) -> Result<CudaSlice<f32>> {
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Ok(gpu.stream.clone_htod(&v)?)
}

/// Every forward kernel at one model width and data shape.
fn kernels_at(
    gpu: &Gpu,
    t: &mut Timer,
    tag: &str,
    d: usize,
    heads: usize,
    shape: Shape,
) -> Result<Vec<Row>> {
    let (b, l, v, mask, softcap) = shape.dims();
    let rows = b * l;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let s = &gpu.stream;
    let mut out = Vec::new();
    let sh = |x: &str| format!("{tag} {x}");

    let h = rand_dev_f32(gpu, &mut rng, rows * d)?;
    let w = rand_dev_f32(gpu, &mut rng, d)?;
    // One (shift, scale) row broadcast over all rows (constant conditioning).
    let modulation = rand_dev_f32(gpu, &mut rng, 2 * d)?;
    let mut ln = LnModulateOut::new(gpu, rows, d)?;
    let ms = t.time(gpu, || {
        let m = Some(ModIn::broadcast(&modulation, 0));
        ln_modulate_fwd(gpu, &mut ln, &h, &w, m, rows, d, rows)
    })?;
    out.push(Row::memory(
        "ln_modulate_fwd",
        sh(&format!("{rows}x{d}")),
        ms,
        rows as f64 * d as f64 * 6.0,
    ));

    let table = rand_dev_f32(gpu, &mut rng, v * d)?;
    let ids: Vec<u32> = (0..rows)
        .map(|i| {
            if i % 2 == 0 {
                mask as u32
            } else {
                (i * 7919 % v) as u32
            }
        })
        .collect();
    let tokens = s.clone_htod(&ids)?;
    let eps_add = rand_dev_bf16(gpu, &mut rng, rows * d)?;
    let mut hh = s.alloc_zeros::<f32>(rows * d)?;
    let ms = t.time(gpu, || {
        embedding_fwd(gpu, &mut hh, &table, &tokens, Some(&eps_add), mask, rows, d)
    })?;
    out.push(Row::memory(
        "embedding_fwd (+eps)",
        sh(&format!("{rows}x{d}")),
        ms,
        rows as f64 * d as f64 * 10.0,
    ));

    let n4 = 4 * d;
    let x4 = rand_dev_bf16(gpu, &mut rng, rows * n4)?;
    let mut y4 = s.alloc_zeros::<bf16>(rows * n4)?;
    let ms = t.time(gpu, || {
        gelu_fwd(gpu, GeluKind::Exact, &mut y4, None, &x4, None, rows, n4)
    })?;
    out.push(Row::memory(
        "gelu_exact_fwd",
        sh(&format!("{rows}x{n4}")),
        ms,
        rows as f64 * n4 as f64 * 4.0,
    ));

    let branch = rand_dev_bf16(gpu, &mut rng, rows * d)?;
    let gate = rand_dev_f32(gpu, &mut rng, d)?;
    for p in [0.0f32, 0.1] {
        let ms = t.time(gpu, || {
            let g = Some(ModIn::broadcast(&gate, 0));
            residual_fwd(gpu, &mut hh, &branch, g, rows, d, rows, p, 1, 0)
        })?;
        out.push(Row::memory(
            &format!("residual_fwd p={p}"),
            sh(&format!("{rows}x{d}")),
            ms,
            rows as f64 * d as f64 * 10.0,
        ));
    }

    let qkv = rand_dev_bf16(gpu, &mut rng, rows * 3 * d)?;
    let mut o = s.alloc_zeros::<bf16>(rows * d)?;
    let mut lse = s.alloc_zeros::<f32>(b * heads * l)?;
    let ash = AttentionShape {
        batch: b,
        len: l,
        heads,
        head_dim: d / heads,
        causal: false,
        softcap: softcap as f32,
    };
    let ms = t.time(gpu, || attention_fwd(gpu, &mut o, &mut lse, &qkv, &ash))?;
    let att_shape = sh(&format!("B{b} L{l} H{heads} hd{} cap{softcap}", d / heads));
    out.push(Row::compute(
        "attention_fwd",
        att_shape.clone(),
        ms,
        attention::flops(&ash),
    ));
    // Backward rows: FLOPs = 2.5x the forward's (FlashAttention's convention, see bwd_flops).
    let dout = rand_dev_bf16(gpu, &mut rng, rows * d)?;
    let mut dqkv = s.alloc_zeros::<bf16>(rows * 3 * d)?;
    let mut aws = AttentionBwdWorkspace::new(gpu, &ash)?;
    type Bwd = fn(
        &Gpu,
        &mut CudaSlice<bf16>,
        &mut AttentionBwdWorkspace,
        &CudaSlice<f32>,
        &CudaSlice<bf16>,
        &CudaSlice<bf16>,
        &CudaSlice<bf16>,
        &AttentionShape,
    ) -> Result<()>;
    let bwds: [(&str, Bwd); 2] = [
        ("attention_bwd (tensor cores)", attention_bwd),
        ("attention_bwd_reference (SIMT)", attention_bwd_reference),
    ];
    for (name, f) in bwds {
        let ms = t.time(gpu, || {
            f(gpu, &mut dqkv, &mut aws, &lse, &o, &qkv, &dout, &ash)
        })?;
        out.push(Row::compute(
            name,
            att_shape.clone(),
            ms,
            attention::bwd_flops(&ash),
        ));
    }
    drop((aws, dqkv, dout));

    let g = Gemm::new(gpu)?;
    let a = rand_dev_bf16(gpu, &mut rng, rows * n4)?;
    let wt = rand_dev_bf16(gpu, &mut rng, v.max(n4) * d)?;
    for (name, n, k) in [
        ("gemm qkv", 3 * d, d),
        ("gemm attn_out", d, d),
        ("gemm mlp1", n4, d),
        ("gemm mlp2", d, n4),
    ] {
        let mut c = s.alloc_zeros::<bf16>(rows * n)?;
        let av = a.slice(0..rows * k);
        let wv = wt.slice(0..n * k);
        let (av, wv) = (s.clone_dtod(&av)?, s.clone_dtod(&wv)?);
        let ms = t.time(gpu, || {
            g.matmul(
                gpu,
                &mut c,
                &av,
                false,
                &wv,
                true,
                (rows, n, k),
                0.0,
                Epilogue::None,
            )
        })?;
        out.push(Row::compute(
            name,
            sh(&format!("{rows}x{n}x{k}")),
            ms,
            gemm::flops(rows, n, k),
        ));
    }
    let mut logits = s.alloc_zeros::<f32>(rows * v)?;
    let (av, wv) = (
        s.clone_dtod(&a.slice(0..rows * d))?,
        s.clone_dtod(&wt.slice(0..v * d))?,
    );
    let ms = t.time(gpu, || {
        g.matmul(
            gpu,
            &mut logits,
            &av,
            false,
            &wv,
            true,
            (rows, v, d),
            0.0,
            Epilogue::None,
        )
    })?;
    out.push(Row::compute(
        "gemm logits (f32 out)",
        sh(&format!("{rows}x{v}x{d}")),
        ms,
        gemm::flops(rows, v, d),
    ));
    drop(logits);
    // The forward's layout: rows padded to a multiple of 64 (16-byte aligned for cuBLASLt).
    let ld = v.next_multiple_of(64);
    let mut logits = s.alloc_zeros::<f32>(rows * ld)?;
    let ms = t.time(gpu, || {
        g.matmul_ld(
            gpu,
            &mut logits,
            &av,
            false,
            &wv,
            true,
            (rows, v, d),
            ld,
            0.0,
            Epilogue::None,
        )
    })?;
    out.push(Row::compute(
        "gemm logits (f32 out, ld 64-padded)",
        sh(&format!("{rows}x{v}x{d} ld {ld}")),
        ms,
        gemm::flops(rows, v, d),
    ));
    drop((av, wv, a, wt));

    let mut lp = s.alloc_zeros::<f32>(rows * ld)?;
    let mut lse_rows = s.alloc_zeros::<f32>(rows)?;
    let shape = SubsShape {
        rows,
        vocab: v,
        ld,
        mask_index: mask,
    };
    let ms = t.time(gpu, || {
        subs_fwd_f32(gpu, &mut lp, &mut lse_rows, &logits, &tokens, shape)
    })?;
    out.push(Row::memory(
        "subs_fwd_f32",
        sh(&format!("{rows}x{v} ld {ld}")),
        ms,
        rows as f64 * v as f64 * 8.0,
    ));

    // The distillation loss (kl-bwd) with the SUBS log-probs as the teacher. It rewrites its
    // logits with the gradient, so every repeat after the first reads the previous gradient's
    // bytes as logits: the same traffic. Bytes: per masked row z and lt once (4V + 4V) and the
    // 2 ld-byte gradient; per unmasked row the 2 ld-byte zeros. The teacher's second read (pass
    // C, mostly L2) is not counted.
    let masked = ids.iter().filter(|&&t| t as usize == mask).count();
    let mut kl_loss = s.alloc_zeros::<f32>(rows)?;
    let kl_shape = DistillKlShape {
        rows,
        vocab: v,
        ld,
        ldt: ld,
        mask_index: mask,
    };
    let ms = t.time(gpu, || {
        distill_kl_fwd_bwd_f32(
            gpu,
            &mut logits,
            &mut kl_loss,
            &lp,
            &tokens,
            kl_shape,
            DistillMode::KlBwd,
            1.0 / masked.max(1) as f32,
        )
    })?;
    out.push(Row::memory(
        "distill_kl_fwd_bwd_f32 kl-bwd",
        sh(&format!("{rows}x{v} ld {ld}, {masked} masked")),
        ms,
        masked as f64 * 8.0 * v as f64 + rows as f64 * 2.0 * ld as f64,
    ));
    Ok(out)
}

/// Every kernel at the DiT-small shapes (OWT and LM1B) and the DiT-large OWT shape.
pub fn kernels(gpu: &Gpu) -> Result<Vec<Row>> {
    let mut t = Timer::new(gpu)?;
    let mut rows = kernels_at(gpu, &mut t, "small owt", 768, 12, Shape::Owt)?;
    rows.extend(kernels_at(gpu, &mut t, "small lm1b", 768, 12, Shape::Lm1b)?);
    rows.extend(kernels_at(gpu, &mut t, "large owt", 1536, 16, Shape::Owt)?);
    Ok(rows)
}

/// One forward benchmark's result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ForwardResult {
    pub preset: String,
    pub shape: String,
    pub algo: String,
    pub batch: usize,
    pub len: usize,
    pub vocab: usize,
    /// ms to f32 logits, and with the SUBS log-softmax
    pub ms_logits: f64,
    pub ms_subs: f64,
    /// GEMM + attention FLOPs of one forward, and the rate to logits
    pub tflop: f64,
    pub tflops: f64,
    /// GPU memory the model and workspace take (GiB)
    pub memory_gib: f64,
}

/// Times the DiT forward of `preset` (random weights) at a reference shape.
pub fn forward(gpu: &Gpu, preset: Preset, shape: Shape, algo: Algo) -> Result<ForwardResult> {
    let (b, l, v, mask, softcap) = shape.dims();
    let mut c = DitConfig::preset(preset);
    c.vocab_size = v;
    c.mask_index = mask;
    c.softcap = softcap;
    c.length = l;
    c.algo = algo;
    let (free0, _) = cudarc::driver::result::mem_get_info()?;
    let model = GpuDit::upload_inference(gpu, &random_params(&c, 0))?;
    let mut ws = Workspace::new(gpu, &c, b, l, Keep::None)?;
    let (free1, _) = cudarc::driver::result::mem_get_info()?;
    let ids: Vec<u32> = (0..b * l)
        .map(|i| {
            if i % 3 == 0 {
                mask as u32
            } else {
                (i * 7919 % v) as u32
            }
        })
        .collect();
    let seeds: Vec<i64> = (0..b as i64).collect();
    let eps = c
        .has_eps_mlp()
        .then(|| seeded_eps(&seeds, l, c.noise_dim, c.noise_type, 1.0));
    ws.load_inputs(gpu, &ids, eps.as_ref())?;
    let mut t = Timer::new(gpu)?;
    t.repeats = 10;
    let no_subs = ForwardOpts {
        subs: false,
        ..ForwardOpts::eval()
    };
    let ms_logits = t.time(gpu, || model.forward(gpu, &mut ws, no_subs))?;
    let ms_subs = t.time(gpu, || model.forward(gpu, &mut ws, ForwardOpts::eval()))?;
    let rows = (b * l) as f64;
    let (d, hd) = (c.hidden as f64, c.mlp_hidden() as f64);
    let per_block =
        2.0 * rows * (3.0 * d * d + d * d + 2.0 * d * hd) + 4.0 * b as f64 * (l * l) as f64 * d;
    let mut flop = c.blocks as f64 * per_block + 2.0 * rows * d * v as f64;
    if c.has_eps_mlp() {
        flop += 2.0 * rows * (c.noise_dim as f64 * 4.0 * d + 4.0 * d * d);
    }
    Ok(ForwardResult {
        preset: c.preset.clone(),
        shape: format!("{shape:?}").to_lowercase(),
        algo: format!("{algo:?}").to_lowercase(),
        batch: b,
        len: l,
        vocab: v,
        ms_logits,
        ms_subs,
        tflop: flop / 1e12,
        tflops: flop / (ms_logits * 1e-3) / 1e12,
        memory_gib: (free0.saturating_sub(free1)) as f64 / (1u64 << 30) as f64,
    })
}
