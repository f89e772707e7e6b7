//! Whole-model tests: gradients of every parameter tensor against f64 central finite
//! differences (IMDM, MDLM, softcap, causal, dropout), the forward against `dit_ref` and the
//! PyTorch fixtures, the loss value, gradient accumulation, determinism and error messages.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cpu::{log_probs, loss_and_grad, CpuDenoiser, TrainOpts};
use crate::diffusion::{Denoiser, LossBatch};
use crate::model::init::random_params;
use crate::model::{checkpoint, dit_ref, Algo, DitConfig, DitParams, NoiseType};
use crate::rng::seeded_eps;
use crate::stio::{view_to_f32, view_to_ids, StFile};
use crate::tensor::{Tensor, Tokens};
use crate::testing::grad::assert_grad;
use crate::testing::{assert_close, Tol};
use crate::Error;

/// The brief's tiny config: D=16, H=2 (hd 8), 2 blocks, cond 8, V=11, L=5, noise_dim 6.
fn tiny(algo: Algo, softcap: f64, causal: bool) -> DitConfig {
    DitConfig {
        preset: "custom".into(),
        vocab_size: 11,
        mask_index: 10,
        length: 5,
        hidden: 16,
        heads: 2,
        blocks: 2,
        cond_dim: 8,
        mlp_ratio: 4,
        dropout: 0.0,
        softcap,
        algo,
        noise_dim: 6,
        noise_type: NoiseType::Rand,
        noise_scale: 1.0,
        causal,
        time_conditioning: false,
    }
}

/// FD step 2^-17 on parameters quantised to multiples of 2^-16 (all below 32 in magnitude):
/// p ± h is then exact in f32, so the f64 central difference sees exactly ±h.
const FD_STEP: f64 = 1.0 / 131_072.0;

fn quantised_params(c: &DitConfig, seed: u64) -> DitParams {
    let mut p = random_params(c, seed);
    for (_, t) in p.named_mut() {
        t.data.iter_mut().for_each(|x| {
            *x = (*x as f64 * 65536.0).round() as f32 / 65536.0;
            assert!(x.abs() < 32.0);
        });
    }
    p
}

/// One loss batch: x0 random non-mask tokens; xt masks about half of them (at least one masked
/// and one unmasked position); eps from the reference's seeded hash; weights 1/t-like; for a
/// time-conditioned model a different sigma per sequence, spread over [0.1, 6).
struct Case {
    xt: Tokens,
    x0: Tokens,
    eps: Option<Tensor>,
    weight: Vec<f32>,
    norm: f64,
    sigma: Option<Vec<f64>>,
}

impl Case {
    fn new(c: &DitConfig, batch: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (l, v, mask) = (c.length, c.vocab_size, c.mask_index as u32);
        let rows = batch * l;
        let x0: Vec<u32> = (0..rows)
            .map(|_| loop {
                let t = rng.random_range(0..v as u32);
                if t != mask {
                    break t;
                }
            })
            .collect();
        let xt: Vec<u32> = x0
            .iter()
            .enumerate()
            .map(|(i, &t)| match i {
                0 => mask,
                1 => t,
                _ if rng.random_bool(0.5) => mask,
                _ => t,
            })
            .collect();
        let seeds: Vec<i64> = (0..batch as i64).map(|b| seed as i64 * 100 + b).collect();
        let weight = (0..rows).map(|_| rng.random_range(0.5..4.0)).collect();
        let sigma = c.time_conditioning.then(|| {
            (0..batch)
                .map(|b| 0.1 + (b as f64 + rng.random_range(0.0..1.0)) * 5.9 / batch as f64)
                .collect()
        });
        Case {
            xt: Tokens::new(batch, l, xt, v).unwrap(),
            x0: Tokens::new(batch, l, x0, v).unwrap(),
            eps: c
                .has_eps_mlp()
                .then(|| seeded_eps(&seeds, l, c.noise_dim, c.noise_type, 1.0)),
            weight,
            norm: rows as f64,
            sigma,
        }
    }
    fn batch(&self) -> LossBatch<'_> {
        LossBatch {
            xt: &self.xt,
            x0: &self.x0,
            eps: self.eps.as_ref(),
            weight: &self.weight,
            norm: self.norm,
            sigma: self.sigma.as_deref(),
        }
    }
    /// Rows `b0..b1` of the batch (same norm).
    fn slice(&self, b0: usize, b1: usize) -> Case {
        let l = self.xt.len;
        let sl = |t: &Tokens| Tokens {
            batch: b1 - b0,
            len: l,
            ids: t.ids[b0 * l..b1 * l].to_vec(),
        };
        Case {
            xt: sl(&self.xt),
            x0: sl(&self.x0),
            eps: self.eps.as_ref().map(|e| {
                let nd = e.shape[2];
                let data = e.data[b0 * l * nd..b1 * l * nd].to_vec();
                Tensor::from_vec(&[b1 - b0, l, nd], data).unwrap()
            }),
            weight: self.weight[b0 * l..b1 * l].to_vec(),
            norm: self.norm,
            sigma: self.sigma.as_ref().map(|s| s[b0..b1].to_vec()),
        }
    }
}

fn loss64(p: &DitParams, k: &Case, opts: &TrainOpts) -> f64 {
    let mut g = DitParams::zeros(&p.config);
    loss_and_grad::<f64>(p, &k.batch(), opts, &mut g).unwrap()
}

/// Gradients of loss_and_grad::<f64> against central FD for the largest-gradient entry and
/// five seeded random entries of every parameter tensor; every tensor must get a gradient.
fn check_grads_against_fd(c: DitConfig, opts: TrainOpts, tag: &str) {
    let mut p = quantised_params(&c, 3);
    let k = Case::new(&c, 3, 7);
    let mut g = DitParams::zeros(&c);
    let loss = loss_and_grad::<f64>(&p, &k.batch(), &opts, &mut g).unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{tag}: loss {loss}");
    let grads: Vec<(String, Vec<f32>)> = g
        .named()
        .into_iter()
        .map(|(n, t)| (n, t.data.clone()))
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (ti, (name, gt)) in grads.iter().enumerate() {
        let argmax = (0..gt.len())
            .max_by(|&a, &b| gt[a].abs().total_cmp(&gt[b].abs()))
            .unwrap();
        assert!(
            gt[argmax] != 0.0,
            "{tag}: {name} received no gradient at all"
        );
        let mut idx = vec![argmax];
        idx.extend((0..5).map(|_| rng.random_range(0..gt.len())));
        let (mut got, mut want) = (vec![], vec![]);
        for &i in &idx {
            let orig = p.named_mut()[ti].1.data[i];
            let mut at = |x: f64| {
                p.named_mut()[ti].1.data[i] = x as f32;
                assert_eq!(
                    p.named()[ti].1.data[i] as f64,
                    x,
                    "perturbation must be exact"
                );
                loss64(&p, &k, &opts)
            };
            let (up, down) = (at(orig as f64 + FD_STEP), at(orig as f64 - FD_STEP));
            p.named_mut()[ti].1.data[i] = orig;
            got.push(gt[i] as f64);
            want.push((up - down) / (2.0 * FD_STEP));
        }
        assert_grad(
            &format!("{tag}: {name} entries {idx:?}"),
            &got,
            &want,
            Tol {
                abs: 1e-8,
                rel: 1e-5,
            },
        );
    }
}

#[test]
fn imdm_grads_match_fd() {
    check_grads_against_fd(tiny(Algo::Imdm, 0.0, false), TrainOpts::default(), "IMDM");
}

#[test]
fn imdm_softcap_grads_match_fd() {
    // A softcap of 2 bends the scores of these random weights (|s| of order 1-5).
    check_grads_against_fd(
        tiny(Algo::Imdm, 2.0, false),
        TrainOpts::default(),
        "IMDM softcap",
    );
}

#[test]
fn mdlm_grads_match_fd_softcap_on_and_off() {
    check_grads_against_fd(tiny(Algo::Mdlm, 0.0, false), TrainOpts::default(), "MDLM");
    check_grads_against_fd(
        tiny(Algo::Mdlm, 2.0, false),
        TrainOpts::default(),
        "MDLM softcap",
    );
}

#[test]
fn causal_grads_match_fd() {
    check_grads_against_fd(
        tiny(Algo::Mdlm, 0.0, true),
        TrainOpts::default(),
        "AR causal",
    );
}

#[test]
fn dropout_grads_match_fd_with_a_fixed_key() {
    let mut c = tiny(Algo::Imdm, 0.0, false);
    c.dropout = 0.2;
    let p = quantised_params(&c, 3);
    let k = Case::new(&c, 3, 7);
    let on = TrainOpts {
        dropout: Some((5, 1 << 33 | 3)),
    };
    let (l_on, l_off) = (loss64(&p, &k, &on), loss64(&p, &k, &TrainOpts::default()));
    let l_other = loss64(
        &p,
        &k,
        &TrainOpts {
            dropout: Some((6, 1 << 33 | 3)),
        },
    );
    assert!(
        l_on != l_off && l_on != l_other,
        "dropout changes the loss: {l_on} {l_off} {l_other}"
    );
    assert_eq!(l_on, loss64(&p, &k, &on), "same key, same loss");
    check_grads_against_fd(c, on, "IMDM dropout 0.2");
}

/// The stream offsets advance by 2 per block from the base (the GPU rule): a leading block
/// whose gates are zero adds exactly nothing, so [identity, X] at base o must give the loss of
/// [X] alone at base o + 2, bit for bit.
#[test]
fn dropout_offsets_follow_the_gpu_rule() {
    use crate::cpu::dit::dropout_offset;
    assert_eq!(
        [0, 1, 2, 3].map(|i| dropout_offset(10, i / 2, i as u64 % 2)),
        [10, 11, 12, 13]
    );
    let mut c = tiny(Algo::Imdm, 0.0, false);
    c.dropout = 0.3;
    let mut two = random_params(&c, 21);
    let d = c.hidden;
    let a = two.blocks[0].adaln.as_mut().unwrap();
    for gate in [2, 5] {
        a.weight.data[gate * d * c.cond_dim..(gate + 1) * d * c.cond_dim].fill(0.0);
        a.bias.as_mut().unwrap().data[gate * d..(gate + 1) * d].fill(0.0);
    }
    let mut one = two.clone();
    one.blocks.remove(0);
    one.config.blocks = 1;
    let k = Case::new(&c, 3, 22);
    let at = |base: u64| TrainOpts {
        dropout: Some((9, base)),
    };
    let l2 = loss64(&two, &k, &at(40));
    assert_eq!(l2.to_bits(), loss64(&one, &k, &at(42)).to_bits(), "{l2}");
    assert_ne!(l2, loss64(&one, &k, &at(41)));
}

fn check_forward(p: &DitParams, k: &Case, tag: &str) {
    let (xt, eps, sigma) = (&k.xt, k.eps.as_ref(), k.sigma.as_deref());
    let logits = dit_ref::forward(p, xt, eps, sigma).unwrap();
    let want = dit_ref::subs_log_probs(&logits, xt, p.config.mask_index);
    let got32 = log_probs::<f32>(p, xt, eps, sigma).unwrap();
    let got64 = log_probs::<f64>(p, xt, eps, sigma).unwrap();
    assert_eq!(got32.shape, want.shape);
    assert_close(&format!("{tag} f32"), &got32.data, &want.data, Tol::F32);
    let tight = Tol {
        abs: 1e-6,
        rel: 1e-6,
    };
    assert_close(&format!("{tag} f64"), &got64.data, &want.data, tight);
}

#[test]
fn log_probs_match_dit_ref() {
    for (c, tag) in [
        (tiny(Algo::Imdm, 0.0, false), "tiny IMDM"),
        (tiny(Algo::Imdm, 2.0, false), "tiny IMDM softcap"),
        (tiny(Algo::Mdlm, 0.0, false), "tiny MDLM"),
        (tiny(Algo::Mdlm, 0.0, true), "tiny AR causal"),
    ] {
        let p = random_params(&c, 5);
        let k = Case::new(&c, 3, 9);
        check_forward(&p, &k, tag);
    }
    // Wider, with L = 1 and L = 13 (odd lengths, a head dim of 16).
    let mut c = tiny(Algo::Imdm, 0.0, false);
    (c.hidden, c.heads, c.vocab_size, c.mask_index, c.noise_dim) = (64, 4, 37, 3, 20);
    for len in [1, 13] {
        c.length = len;
        let p = random_params(&c, 6);
        let k = Case::new(&c, 2, 10);
        check_forward(&p, &k, &format!("D64 L{len}"));
    }
}

/// The committed PyTorch fixtures (independent float64 implementation of the spec).
#[test]
fn log_probs_match_pytorch_fixtures() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in [
        "imdm_tiny",
        "imdm_tiny_softcap",
        "mdlm_prefixed",
        "imdm_hd64_bf16",
    ] {
        let p = checkpoint::load(dir.join(format!("{name}.model.safetensors")), None).unwrap();
        let io = dir.join(format!("{name}.io.safetensors"));
        let f = StFile::open(&io).unwrap();
        let st = f.parse().unwrap();
        let tv = st.tensor("tokens").unwrap();
        let (b, l) = (tv.shape()[0], tv.shape()[1]);
        let ids = view_to_ids(&io, "tokens", &tv).unwrap();
        let xt = Tokens::new(b, l, ids, p.config.vocab_size).unwrap();
        let get = |n: &str| st.tensor(n).ok().map(|v| view_to_f32(&io, n, &v).unwrap());
        let (eps, want) = (get("eps"), get("log_probs").unwrap());
        let got32 = log_probs::<f32>(&p, &xt, eps.as_ref(), None).unwrap();
        assert_close(&format!("{name} f32"), &got32.data, &want.data, Tol::F32);
        let got64 = log_probs::<f64>(&p, &xt, eps.as_ref(), None).unwrap();
        assert_close(&format!("{name} f64"), &got64.data, &want.data, Tol::F32);
    }
}

#[test]
fn loss_equals_explicit_sum_over_dit_ref_log_probs() {
    for c in [tiny(Algo::Imdm, 2.0, false), tiny(Algo::Mdlm, 0.0, false)] {
        let p = random_params(&c, 8);
        let k = Case::new(&c, 4, 12);
        let logits = dit_ref::forward(&p, &k.xt, k.eps.as_ref(), None).unwrap();
        let lp = dit_ref::subs_log_probs(&logits, &k.xt, c.mask_index);
        let v = c.vocab_size;
        let want: f64 = (0..k.xt.ids.len())
            .filter(|&r| k.xt.ids[r] as usize == c.mask_index)
            .map(|r| k.weight[r] as f64 * -(lp.data[r * v + k.x0.ids[r] as usize] as f64))
            .sum::<f64>()
            / k.norm;
        let mut g = DitParams::zeros(&c);
        let l64 = loss_and_grad::<f64>(&p, &k.batch(), &TrainOpts::default(), &mut g).unwrap();
        let l32 = loss_and_grad::<f32>(&p, &k.batch(), &TrainOpts::default(), &mut g).unwrap();
        for (got, tol, t) in [(l64, 1e-6, "f64"), (l32, 1e-5, "f32")] {
            let rel = (got - want).abs() / want.abs();
            let name = format!("{:?} softcap {}", c.algo, c.softcap);
            assert!(
                rel < tol,
                "{name} {t}: loss {got} want {want} (rel err {rel:.2e})"
            );
        }
    }
}

fn flat(g: &DitParams) -> Vec<f64> {
    g.named()
        .iter()
        .flat_map(|(_, t)| t.data.iter().map(|&x| x as f64))
        .collect()
}

#[test]
fn two_half_batches_accumulate_to_the_full_batch() {
    let c = tiny(Algo::Imdm, 0.0, false);
    let p = random_params(&c, 13);
    let k = Case::new(&c, 4, 14);
    let opts = TrainOpts::default();
    let mut full = DitParams::zeros(&c);
    let l_full = loss_and_grad::<f64>(&p, &k.batch(), &opts, &mut full).unwrap();
    let mut acc = DitParams::zeros(&c);
    let l_a = loss_and_grad::<f64>(&p, &k.slice(0, 2).batch(), &opts, &mut acc).unwrap();
    let l_b = loss_and_grad::<f64>(&p, &k.slice(2, 4).batch(), &opts, &mut acc).unwrap();
    assert!(
        (l_a + l_b - l_full).abs() < 1e-12 * l_full,
        "{l_a} + {l_b} != {l_full}"
    );
    assert_grad(
        "accumulated grads",
        &flat(&acc),
        &flat(&full),
        Tol {
            abs: 1e-7,
            rel: 1e-6,
        },
    );
}

#[test]
fn f32_is_deterministic_across_runs_and_thread_counts_and_close_to_f64() {
    let mut c = tiny(Algo::Imdm, 0.0, false);
    (c.hidden, c.heads, c.length, c.dropout) = (32, 2, 16, 0.1);
    let p = random_params(&c, 15);
    let k = Case::new(&c, 64, 16);
    let opts = TrainOpts {
        dropout: Some((1, 2)),
    };
    let run = || {
        let mut g = DitParams::zeros(&c);
        let l = loss_and_grad::<f32>(&p, &k.batch(), &opts, &mut g).unwrap();
        (l, g)
    };
    let (l1, g1) = run();
    let (l2, g2) = run();
    assert_eq!(l1.to_bits(), l2.to_bits(), "loss differs run to run");
    assert!(g1 == g2, "gradients differ run to run");
    // Work is split into fixed chunks and row sums run serially: one thread gives the same bits.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let (l3, g3) = pool.install(run);
    assert_eq!(
        l1.to_bits(),
        l3.to_bits(),
        "loss depends on the thread count"
    );
    assert!(g1 == g3, "gradients depend on the thread count");
    let mut g64 = DitParams::zeros(&c);
    let l64 = loss_and_grad::<f64>(&p, &k.batch(), &opts, &mut g64).unwrap();
    assert!((l1 - l64).abs() < 1e-5 * l64, "f32 loss {l1} vs f64 {l64}");
    // f32 accumulation over 1024 rows: a looser, relative-to-scale tolerance.
    let scale = flat(&g64).iter().fold(0f64, |m, x| m.max(x.abs()));
    assert_grad(
        "f32 grads vs f64",
        &flat(&g1),
        &flat(&g64),
        Tol {
            abs: 1e-4 * scale,
            rel: 1e-3,
        },
    );
}

#[test]
fn cpu_denoiser_is_log_probs_f32() {
    let c = tiny(Algo::Imdm, 0.0, false);
    let p = random_params(&c, 17);
    let k = Case::new(&c, 2, 18);
    let mut den = CpuDenoiser::new(p.clone()).unwrap();
    assert_eq!(den.config(), &c);
    let got = den.log_probs(&k.xt, k.eps.as_ref()).unwrap();
    assert_eq!(
        got,
        log_probs::<f32>(&p, &k.xt, k.eps.as_ref(), None).unwrap()
    );
}

#[test]
fn errors_name_the_tensor_and_shapes() {
    let c = tiny(Algo::Imdm, 0.0, false);
    let p = random_params(&c, 19);
    let k = Case::new(&c, 2, 20);
    let opts = TrainOpts::default();
    let err = |r: crate::Result<f64>| match r {
        Err(e @ Error::Shape(_)) => e.to_string(),
        other => panic!("expected a shape error, got {other:?}"),
    };
    let mut g = DitParams::zeros(&c);
    let mut b = k.batch();
    b.eps = None;
    let e = err(loss_and_grad::<f32>(&p, &b, &opts, &mut g));
    assert!(e.contains("eps") && e.contains("[2, 5, 6]"), "{e}");
    let bad_eps = Tensor::zeros(&[2, 5, 7]);
    b.eps = Some(&bad_eps);
    let e = err(loss_and_grad::<f32>(&p, &b, &opts, &mut g));
    assert!(e.contains("eps") && e.contains("[2, 5, 7]"), "{e}");
    let mut x0 = k.x0.clone();
    x0.ids[1] = (x0.ids[1] + 1) % 10; // position 1 is unmasked by construction
    let mut b = k.batch();
    b.x0 = &x0;
    let e = err(loss_and_grad::<f32>(&p, &b, &opts, &mut g));
    assert!(e.contains("x0") && e.contains("flat index 1"), "{e}");
    let mut g_mdlm = DitParams::zeros(&tiny(Algo::Mdlm, 0.0, false));
    let e = err(loss_and_grad::<f32>(&p, &k.batch(), &opts, &mut g_mdlm));
    assert!(e.contains("grads") && e.contains("imdm_mlp"), "{e}");
    let short = vec![1.0; 3];
    let mut b = k.batch();
    b.weight = &short;
    let e = err(loss_and_grad::<f32>(&p, &b, &opts, &mut g));
    assert!(e.contains("weight") && e.contains("10"), "{e}");
}

#[path = "dit_timecond_tests.rs"]
mod timecond;
