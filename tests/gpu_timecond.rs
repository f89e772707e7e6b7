//! Time conditioning on the GPU (`DitConfig::time_conditioning`): the whole GPU DiT forward,
//! fused loss and backward with per-sequence sigmas (`Workspace::load_sigma`), against the CPU
//! backend and `dit_ref`, against the constant-conditioning path and against itself one sequence
//! at a time. Skips without a GPU unless IMDM_REQUIRE_GPU=1.
//!
//! - With sigma varying across the batch, the GPU's logits match `dit_ref::forward` and its
//!   loss and every gradient (adaLN and sigma map included) match `cpu::loss_and_grad::<f64>`,
//!   with the tolerances of tests/gpu_dit.rs and tests/gpu_train.rs.
//! - At sigma = 0 for every sequence a time-conditioned model computes what the constant path
//!   computes (the sigma map's feature at 0 is the constant one): logits, loss and every
//!   gradient, the adaLN and sigma-map ones included, which the two paths reach by different
//!   routes (per-sequence GEMMs and `TimeCond::backward` vs one broadcast row and
//!   `CondDevice::finish_grads`).
//! - Sequences are conditioned independently: a batch of 3 with different sigmas gives each
//!   sequence the logits of a batch of 1 at its sigma, and its gradients are the sum of the
//!   three single-sequence gradients; and the sigma changes the logits.
//!
//! Tolerances: both sides run the same bf16 GEMMs on the same weights; only the modulations
//! differ in f32 rounding (f64 host vs cuBLAS f32), or the GEMM shapes (batch 3 vs 1), which
//! can flip bf16 roundings of activations. Relative L2 errors of 1e-2 leave a wide margin over
//! that and are far below what a wrong row, stride or reduction gives (order 1).

use cudarc::driver::CudaSlice;

use imdm_engine::cpu::{self, TrainOpts};
use imdm_engine::cuda::cond::CondDevice;
use imdm_engine::cuda::dit::{ForwardOpts, GpuDit, Workspace};
use imdm_engine::cuda::dit_bwd::{backward, BwdScratch, ModGrads};
use imdm_engine::cuda::gpu_for_tests;
use imdm_engine::cuda::ops::subs::{subs_bwd_f32, SubsShape};
use imdm_engine::cuda::param_tree::ParamTree;
use imdm_engine::cuda::tape::Tape;
use imdm_engine::cuda::Gpu;
use imdm_engine::diffusion::denoiser::LossBatch;
use imdm_engine::model::init::random_params;
use imdm_engine::model::{dit_ref, Algo, DitConfig, DitParams};
use imdm_engine::tensor::Tokens;
use imdm_engine::testing::{compare, Tol};
use imdm_engine::Error;

/// Relative L2 error allowed for logits and for each gradient tensor between two GPU runs.
const REL_L2: f64 = 1e-2;
/// Against the f64 CPU backend (tests/gpu_train.rs): each gradient tensor, and the loss.
const CPU_GRAD_REL_L2: f64 = 5e-2;
const CPU_LOSS_REL: f64 = 1e-2;

/// A small time-conditioned MDLM: D 128, 2 blocks, cond 32, V 97, L 13 (not a multiple of the
/// kernels' row blocks).
fn config() -> DitConfig {
    let mut c = DitConfig::synthetic();
    c.vocab_size = 97;
    c.mask_index = 96;
    c.length = 13;
    c.blocks = 2;
    c.cond_dim = 32;
    c.algo = Algo::Mdlm;
    c.dropout = 0.0;
    c.time_conditioning = true;
    c
}

/// Inputs of one batch: noised ids, targets and per-row loss weights.
struct Batch {
    batch: usize,
    ids: Vec<u32>,
    x0: Vec<u32>,
    w: Vec<f32>,
}

fn batch_of(c: &DitConfig, batch: usize) -> Batch {
    let (l, v, mask) = (c.length, c.vocab_size as u32, c.mask_index as u32);
    let x0: Vec<u32> = (0..batch * l)
        .map(|i| (i as u32 * 7919 + 13) % (v - 1))
        .collect();
    let ids: Vec<u32> = x0
        .iter()
        .enumerate()
        .map(|(i, &t)| if i % 3 != 1 { mask } else { t })
        .collect();
    let w: Vec<f32> = (0..batch * l)
        .map(|i| 0.5 + (i % 5) as f32 * 0.25)
        .collect();
    Batch { batch, ids, x0, w }
}

/// Sequence `b` of a batch as a batch of one.
fn one_of(bt: &Batch, b: usize, l: usize) -> Batch {
    let r = b * l..(b + 1) * l;
    Batch {
        batch: 1,
        ids: bt.ids[r.clone()].to_vec(),
        x0: bt.x0[r.clone()].to_vec(),
        w: bt.w[r].to_vec(),
    }
}

/// What one forward + fused loss + backward gives.
struct Run {
    logits: Vec<f32>,
    loss: f64,
    grads: DitParams,
}

/// The forward (sigmas loaded when given), the loss with normaliser `norm` and the backward
/// with nothing frozen; constant-path modulation gradients are finished by `CondDevice`.
fn run(gpu: &Gpu, p: &DitParams, bt: &Batch, sigma: Option<&[f64]>, norm: f64) -> Run {
    let c = &p.config;
    let (batch, len) = (bt.batch, c.length);
    let rows = batch * len;
    let s = &gpu.stream;
    let model = GpuDit::upload(gpu, p).unwrap();
    let mut ws = Workspace::training(gpu, c, batch, len).unwrap();
    let mut sc = BwdScratch::new(gpu, c, batch, len).unwrap();
    ws.load_inputs(gpu, &bt.ids, None).unwrap();
    if let Some(sg) = sigma {
        ws.load_sigma(sg).unwrap();
    }
    sc.load_tokens(gpu, &bt.ids, c.vocab_size).unwrap();
    let opts = ForwardOpts {
        dropout: 0.0,
        seed: 0,
        offset: 0,
        subs: false,
    };
    let mut tape = Tape::new();
    model
        .forward_recorded(gpu, &mut ws, opts, Some(&mut tape))
        .unwrap();
    let logits = ws.logits_host(gpu).unwrap();
    let x0: CudaSlice<u32> = s.clone_htod(&bt.x0).unwrap();
    let w = s.clone_htod(&bt.w).unwrap();
    let mut loss = s.alloc_zeros::<f32>(rows).unwrap();
    let shape = SubsShape {
        rows,
        vocab: c.vocab_size,
        ld: ws.logits_ld,
        mask_index: c.mask_index,
    };
    subs_bwd_f32(
        gpu,
        &mut ws.logits,
        &mut loss,
        &ws.tokens,
        &x0,
        &w,
        shape,
        norm as f32,
    )
    .unwrap();
    let loss: f64 = s.clone_dtoh(&loss).unwrap().iter().map(|&x| x as f64).sum();
    let mut grads =
        ParamTree::from_params(p, |_, t| Ok::<_, Error>(s.alloc_zeros::<f32>(t.numel())?)).unwrap();
    let frozen = ParamTree::from_params(p, |_, _| Ok::<_, Error>(false)).unwrap();
    let mut dmods = ModGrads::new(gpu, c).unwrap();
    assert_eq!(dmods.is_some(), !c.time_conditioning);
    backward(
        gpu,
        &model,
        &ws,
        &tape,
        opts,
        &mut sc,
        &mut grads,
        dmods.as_mut(),
        &frozen,
    )
    .unwrap();
    if let Some(dm) = dmods {
        let master =
            ParamTree::from_params(p, |_, t| Ok::<_, Error>(s.clone_htod(&t.data)?)).unwrap();
        let sm = p.sigma_map.as_ref().unwrap();
        let mut cd = CondDevice::new(gpu, c, &sm.fc1, &sm.fc2).unwrap().unwrap();
        cd.finish_grads(gpu, &master, &dm, &mut grads, &frozen)
            .unwrap();
    }
    let mut host = DitParams::zeros(c);
    for (src, (_, t)) in grads.items().into_iter().zip(host.named_mut()) {
        t.data = s.clone_dtoh(src).unwrap();
    }
    Run {
        logits,
        loss,
        grads: host,
    }
}

/// ‖a − b‖ / ‖b‖ (‖a − b‖ when b is 0).
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut d2, mut w2) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        d2 += (x as f64 - y as f64).powi(2);
        w2 += (y as f64).powi(2);
    }
    if w2 > 0.0 {
        (d2 / w2).sqrt()
    } else {
        d2.sqrt()
    }
}

/// Every gradient tensor of `got` within `tol` (relative L2) of `want`; returns the report.
fn grads_close(tag: &str, got: &DitParams, want: &DitParams, tol: f64) -> Vec<String> {
    let mut report = Vec::new();
    for ((name, g), (_, w)) in got.named().into_iter().zip(want.named()) {
        assert!(
            g.data.iter().all(|x| x.is_finite()),
            "{tag} {name}: non-finite gradient"
        );
        let rel = rel_l2(&g.data, &w.data);
        report.push(format!("{name}: {rel:.2e}"));
        assert!(
            rel <= tol,
            "{tag} {name}: relative L2 error {rel:.3e} > {tol:e}; so far: {report:?}"
        );
    }
    report
}

#[test]
fn forward_and_gradients_match_the_cpu_backend() {
    let Some(gpu) = gpu_for_tests() else { return };
    let c = config();
    let p = random_params(&c, 10);
    let (l, v) = (c.length, c.vocab_size);
    let bt = batch_of(&c, 3);
    let sigma = [0.05, 1.5, 20.0];
    let norm = (3 * l) as f64;
    let got = run(&gpu, &p, &bt, Some(&sigma), norm);
    // Logits against dit_ref (tests/gpu_dit.rs's bound: 3% of the logit scale).
    let xt = Tokens::new(3, l, bt.ids.clone(), v).unwrap();
    let want = dit_ref::forward(&p, &xt, None, Some(&sigma)).unwrap();
    let scale = want.data.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    let tol = Tol {
        abs: 0.03 * scale,
        rel: 1.6e-2,
    };
    let (max_abs, _, worst, ratio) = compare(&got.logits, &want.data, tol);
    assert!(
        ratio <= 1.0,
        "logits vs dit_ref: max abs err {max_abs:.3e} (scale {scale:.2}); worst [{worst}] got {} \
         want {}",
        got.logits[worst],
        want.data[worst]
    );
    // Loss and gradients against the CPU backend in f64.
    let x0 = Tokens::new(3, l, bt.x0.clone(), v).unwrap();
    let batch = LossBatch {
        xt: &xt,
        x0: &x0,
        eps: None,
        weight: &bt.w,
        norm,
        sigma: Some(&sigma),
    };
    let mut grads = DitParams::zeros(&c);
    let opts = TrainOpts { dropout: None };
    let loss = cpu::loss_and_grad::<f64>(&p, &batch, &opts, &mut grads).unwrap();
    assert!(
        (got.loss - loss).abs() <= CPU_LOSS_REL * loss.abs(),
        "loss {} vs CPU {loss}",
        got.loss
    );
    let report = grads_close("GPU vs CPU", &got.grads, &grads, CPU_GRAD_REL_L2);
    eprintln!(
        "time-conditioned GPU vs CPU: loss {} (CPU {loss}); gradients {report:?}",
        got.loss
    );
}

#[test]
fn sigma_zero_equals_constant_conditioning() {
    let Some(gpu) = gpu_for_tests() else { return };
    let c = config();
    let p = random_params(&c, 11);
    let mut p0 = p.clone();
    p0.config.time_conditioning = false;
    let bt = batch_of(&c, 3);
    let norm = (3 * c.length) as f64;
    let tc = run(&gpu, &p, &bt, Some(&[0.0; 3]), norm);
    let k = run(&gpu, &p0, &bt, None, norm);
    let rl = rel_l2(&tc.logits, &k.logits);
    assert!(rl <= REL_L2, "logits: relative L2 {rl:.3e}");
    assert!(
        (tc.loss - k.loss).abs() <= 1e-3 * k.loss.abs(),
        "loss {} vs constant {}",
        tc.loss,
        k.loss
    );
    let report = grads_close("sigma 0 vs constant", &tc.grads, &k.grads, REL_L2);
    // The conditioning path really carries gradient (the comparison is not of zeros).
    let sm = tc.grads.sigma_map.as_ref().unwrap();
    assert!(sm.fc2.weight.data.iter().any(|&x| x != 0.0));
    eprintln!("sigma 0 vs constant: logits {rl:.2e}; gradients {report:?}");
}

#[test]
fn sequences_are_conditioned_independently() {
    let Some(gpu) = gpu_for_tests() else { return };
    let c = config();
    let p = random_params(&c, 12);
    let l = c.length;
    let bt = batch_of(&c, 3);
    let sigma = [0.05, 1.5, 20.0];
    let norm = (3 * l) as f64;
    let all = run(&gpu, &p, &bt, Some(&sigma), norm);
    let v = c.vocab_size;
    let mut sum = DitParams::zeros(&c);
    let mut loss = 0.0;
    for (b, &sg) in sigma.iter().enumerate() {
        let one = run(&gpu, &p, &one_of(&bt, b, l), Some(&[sg]), norm);
        let rows = &all.logits[b * l * v..(b + 1) * l * v];
        let rl = rel_l2(&one.logits, rows);
        assert!(
            rl <= REL_L2,
            "sequence {b} (sigma {sg}): logits relative L2 {rl:.3e}"
        );
        for ((_, s), (_, g)) in sum.named_mut().into_iter().zip(one.grads.named()) {
            s.data.iter_mut().zip(&g.data).for_each(|(a, b)| *a += b);
        }
        loss += one.loss;
    }
    assert!(
        (all.loss - loss).abs() <= 1e-3 * loss.abs(),
        "loss {} vs the sum over sequences {loss}",
        all.loss
    );
    let report = grads_close("batch vs per sequence", &all.grads, &sum, REL_L2);
    eprintln!("batch of 3 vs 3 batches of 1: gradients {report:?}");
    // The sigma matters: the last sequence at sigma 0.05 instead of 20 changes its logits.
    let other = run(&gpu, &p, &bt, Some(&[0.05, 1.5, 0.05]), norm);
    let tail = 2 * l * v..3 * l * v;
    let moved = rel_l2(&other.logits[tail.clone()], &all.logits[tail]);
    assert!(
        moved > 5.0 * REL_L2,
        "sigma 20 -> 0.05 moved the logits by only {moved:.3e}"
    );
    let head = 0..2 * l * v;
    let same = rel_l2(&other.logits[head.clone()], &all.logits[head]);
    assert!(
        same <= REL_L2,
        "the other sequences' logits moved by {same:.3e}"
    );
}

#[test]
fn forward_needs_sigma_and_constant_models_refuse_it() {
    let Some(gpu) = gpu_for_tests() else { return };
    let c = config();
    let p = random_params(&c, 13);
    let model = GpuDit::upload_inference(&gpu, &p).unwrap();
    // Per-sequence gates: nothing folded.
    assert!(model
        .blocks
        .iter()
        .all(|b| b.folded.is_none() && b.modulation.is_none()));
    let mut ws = Workspace::new(&gpu, &c, 2, c.length, imdm_engine::cuda::dit::Keep::None).unwrap();
    let bt = batch_of(&c, 2);
    ws.load_inputs(&gpu, &bt.ids, None).unwrap();
    let r = model.forward(&gpu, &mut ws, ForwardOpts::eval());
    assert!(matches!(r, Err(Error::Config(_))), "{:?}", r.err());
    assert!(
        ws.load_sigma(&[0.1]).is_err(),
        "one sigma for two sequences"
    );
    assert!(ws.load_sigma(&[0.1, f64::NAN]).is_err(), "a NaN sigma");
    ws.load_sigma(&[0.1, 3.0]).unwrap();
    model.forward(&gpu, &mut ws, ForwardOpts::eval()).unwrap();
    let lp = ws.log_probs_host(&gpu).unwrap();
    assert!(lp.iter().all(|x| x.is_finite() || *x == f32::NEG_INFINITY));
    let mut c0 = c.clone();
    c0.time_conditioning = false;
    let mut ws0 =
        Workspace::new(&gpu, &c0, 2, c.length, imdm_engine::cuda::dit::Keep::None).unwrap();
    assert!(matches!(ws0.load_sigma(&[0.1, 3.0]), Err(Error::Config(_))));
}
