//! Tests of `time_cond`: the host sigma map at any sigma and its per-sequence backward (CPU),
//! and the device modulations and conditioning backward against host f64 maths (GPU; skip
//! without a device).

use super::*;
use crate::cuda::gpu_for_tests;
use crate::model::dit_ref::cond_vector;
use crate::model::init::random_params;

/// A small time-conditioned configuration (D 64, cond 5, 2 blocks).
fn config() -> DitConfig {
    let mut c = DitConfig::minimini();
    c.cond_dim = 5;
    c.time_conditioning = true;
    c
}

const SIGMAS: [f64; 3] = [0.0, 0.37, 7.5];

#[test]
fn host_forward_matches_cond_vector_at_any_sigma() {
    let p = random_params(&config(), 3);
    let s = p.sigma_map.as_ref().unwrap();
    for sigma in SIGMAS.into_iter().chain([123.0]) {
        let host = CondHost::forward_at(&s.fc1, &s.fc2, sigma);
        let want = cond_vector(&p, sigma).unwrap();
        for (a, b) in host.c.iter().zip(&want) {
            // cond_vector runs in f32; the host map in f64.
            assert!((a - *b as f64).abs() < 1e-5, "sigma {sigma}: {a} vs {b}");
        }
    }
    // sigma = 0 is the constant path's feature exactly.
    assert_eq!(
        CondHost::forward_at(&s.fc1, &s.fc2, 0.0),
        CondHost::forward(&s.fc1, &s.fc2)
    );
    // Different sigmas give different c.
    let a = CondHost::forward_at(&s.fc1, &s.fc2, 0.37).c;
    let b = CondHost::forward_at(&s.fc1, &s.fc2, 7.5).c;
    assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-3));
}

/// The per-sequence sigma-map backward summed over rows equals central finite differences of
/// `Σ_b r_b · c(σ_b)` for every weight and bias of both layers.
#[test]
fn sigma_map_grads_match_finite_differences() {
    let cfg = config();
    let p = random_params(&cfg, 4);
    let s = p.sigma_map.as_ref().unwrap();
    let cond = cfg.cond_dim;
    let r: Vec<f64> = (0..SIGMAS.len() * cond)
        .map(|k| 0.3 * (k % 7) as f64 - 0.8)
        .collect();
    let loss = |fc1: &Linear, fc2: &Linear| -> f64 {
        SIGMAS
            .iter()
            .enumerate()
            .map(|(b, &sg)| {
                let c = CondHost::forward_at(fc1, fc2, sg).c;
                c.iter()
                    .zip(&r[b * cond..])
                    .map(|(x, y)| x * y)
                    .sum::<f64>()
            })
            .sum()
    };
    let host: Vec<CondHost> = SIGMAS
        .iter()
        .map(|&sg| CondHost::forward_at(&s.fc1, &s.fc2, sg))
        .collect();
    let r32: Vec<f32> = r.iter().map(|&x| x as f32).collect();
    let [(dw1, db1), (dw2, db2)] = sigma_map_grads(&host, &s.fc2, &r32, cond);
    let h = 1e-3f32;
    let fd = |which: usize, bias: bool, k: usize| -> f64 {
        let eval = |delta: f32| {
            let (mut f1, mut f2) = (s.fc1.clone(), s.fc2.clone());
            let l = if which == 1 { &mut f1 } else { &mut f2 };
            let t = if bias {
                l.bias.as_mut().unwrap()
            } else {
                &mut l.weight
            };
            t.data[k] += delta;
            loss(&f1, &f2)
        };
        (eval(h) - eval(-h)) / (2.0 * h as f64)
    };
    let close = |an: f64, fd: f64, what: &str| {
        assert!(
            (fd - an).abs() <= 1e-5 + 1e-3 * fd.abs(),
            "{what}: analytic {an} vs finite difference {fd}"
        );
    };
    // fc1: columns in both halves of the feature now get gradient (sin(σ f) != 0).
    for k in [0, 1, 127, 128, 200, 255, 256, 5 * 256 - 1] {
        close(dw1[k], fd(1, false, k), &format!("fc1 weight [{k}]"));
    }
    assert!(dw1[128..256].iter().any(|&x| x != 0.0));
    for (k, &g) in db1.iter().enumerate() {
        close(g, fd(1, true, k), &format!("fc1 bias [{k}]"));
    }
    for (k, &g) in dw2.iter().enumerate() {
        close(g, fd(2, false, k), &format!("fc2 weight [{k}]"));
    }
    for (k, &g) in db2.iter().enumerate() {
        close(g, fd(2, true, k), &format!("fc2 bias [{k}]"));
    }
}

#[test]
fn constant_models_have_no_row_conditioning() {
    let Some(gpu) = gpu_for_tests() else { return };
    let mut c = config();
    c.time_conditioning = false;
    assert!(RowCond::new(&gpu, &c, 3).unwrap().is_none());
    assert!(RowModGrads::new(&gpu, &c, 3).unwrap().is_none());
    assert!(TimeCond::new(&gpu, &random_params(&c, 1))
        .unwrap()
        .is_none());
}

/// `W x + b` in f64 for a row-major (out, in) layer.
fn affine64(l: &Linear, x: &[f64]) -> Vec<f64> {
    let inp = l.in_dim();
    l.weight
        .data
        .chunks_exact(inp)
        .enumerate()
        .map(|(o, row)| {
            let b = l.bias.as_ref().unwrap().data[o] as f64;
            b + row.iter().zip(x).map(|(&w, &v)| w as f64 * v).sum::<f64>()
        })
        .collect()
}

/// The device modulations `M = C Wᵀ + 1 bᵀ` of every layer equal the host f64 maths per
/// sequence, and the conditioning backward's adaLN and sigma-map gradients equal the host's
/// `dMᵀ 1`, `dMᵀ C` and the sigma map's backward of `dC = dM W`, added to the initial values.
#[test]
fn gpu_modulations_and_backward_match_host() {
    let Some(gpu) = gpu_for_tests() else { return };
    let cfg = config();
    let (d, cond, bsz) = (cfg.hidden, cfg.cond_dim, SIGMAS.len());
    let p = random_params(&cfg, 6);
    let tc = TimeCond::new(&gpu, &p).unwrap().unwrap();
    let mut rc = RowCond::new(&gpu, &cfg, bsz).unwrap().unwrap();
    assert!(tc.modulations(&gpu, &mut rc).is_err(), "no sigma loaded");
    rc.sigma = Some(SIGMAS.to_vec());
    tc.modulations(&gpu, &mut rc).unwrap();
    let s = p.sigma_map.as_ref().unwrap();
    let host: Vec<CondHost> = SIGMAS
        .iter()
        .map(|&sg| CondHost::forward_at(&s.fc1, &s.fc2, sg))
        .collect();
    // c rounded to f32 as uploaded.
    let c32: Vec<Vec<f64>> = host
        .iter()
        .map(|h| h.c_f32().iter().map(|&x| x as f64).collect())
        .collect();
    let layers: Vec<(&Linear, &CudaSlice<f32>, usize)> = p
        .blocks
        .iter()
        .zip(&rc.blocks)
        .map(|(b, m)| (b.adaln.as_ref().unwrap(), m, 6))
        .chain([(p.final_layer.adaln.as_ref().unwrap(), &rc.final_layer, 2)])
        .collect();
    for (i, (l, m, n)) in layers.iter().enumerate() {
        let got = gpu.stream.clone_dtoh(*m).unwrap();
        assert_eq!(got.len(), bsz * n * d);
        for (b, cb) in c32.iter().enumerate() {
            let want = affine64(l, cb);
            for (k, &w) in want.iter().enumerate() {
                let g = got[b * n * d + k] as f64;
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "layer {i} row {b} [{k}]: {g} vs {w}"
                );
            }
        }
    }

    // Backward from random per-sequence sums dM, onto non-zero initial gradients.
    let mut g = RowModGrads::new(&gpu, &cfg, bsz).unwrap().unwrap();
    let mut rng = 1u64;
    let mut next = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((rng >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
    };
    let dms: Vec<Vec<f32>> = layers
        .iter()
        .map(|(_, _, n)| (0..bsz * n * d).map(|_| next()).collect())
        .collect();
    for (k, dm) in dms.iter().enumerate() {
        let dst = if k < cfg.blocks {
            &mut g.blocks[k]
        } else {
            &mut g.final_layer
        };
        gpu.stream.memcpy_htod(dm, dst).unwrap();
    }
    let init = |name: &str, t: &crate::tensor::Tensor| -> Result<Vec<f32>> {
        let _ = name;
        Ok((0..t.numel()).map(|i| 0.01 * (i % 5) as f32).collect())
    };
    let init_tree = ParamTree::from_params(&p, init).unwrap();
    let mut grads = init_tree
        .try_map(|v| Ok::<_, Error>(gpu.stream.clone_htod(v)?))
        .unwrap();
    let frozen = ParamTree::from_params(&p, |_, _| Ok::<_, Error>(false)).unwrap();
    tc.backward(&gpu, &rc, &mut g, &mut grads, &frozen).unwrap();

    let close = |what: &str, got: &[f32], want: &[f64]| {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (k, (&a, &b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{what} [{k}]: {a} vs {b}"
            );
        }
    };
    let mut dc = vec![0f64; bsz * cond];
    for (k, ((l, _, n), dm)) in layers.iter().zip(&dms).enumerate() {
        let nd = n * d;
        let (gw, gb, iw, ib) = if k < cfg.blocks {
            let (gl, il) = (
                grads.blocks[k].adaln.as_ref().unwrap(),
                init_tree.blocks[k].adaln.as_ref().unwrap(),
            );
            (&gl.w, gl.b.as_ref().unwrap(), &il.w, il.b.as_ref().unwrap())
        } else {
            let (gl, il) = (
                grads.final_adaln.as_ref().unwrap(),
                init_tree.final_adaln.as_ref().unwrap(),
            );
            (&gl.w, gl.b.as_ref().unwrap(), &il.w, il.b.as_ref().unwrap())
        };
        let mut want_b: Vec<f64> = ib.iter().map(|&x| x as f64).collect();
        let mut want_w: Vec<f64> = iw.iter().map(|&x| x as f64).collect();
        for b in 0..bsz {
            for o in 0..nd {
                let gmo = dm[b * nd + o] as f64;
                want_b[o] += gmo;
                for j in 0..cond {
                    want_w[o * cond + j] += gmo * c32[b][j];
                    dc[b * cond + j] += gmo * l.weight.data[o * cond + j] as f64;
                }
            }
        }
        close(
            &format!("layer {k} adaLN bias"),
            &gpu.stream.clone_dtoh(gb).unwrap(),
            &want_b,
        );
        close(
            &format!("layer {k} adaLN weight"),
            &gpu.stream.clone_dtoh(gw).unwrap(),
            &want_w,
        );
    }
    let dc32: Vec<f32> = dc.iter().map(|&x| x as f32).collect();
    let sums = sigma_map_grads(&host, &s.fc2, &dc32, cond);
    let [g1, g2] = grads.sigma_map.as_ref().unwrap();
    let [i1, i2] = init_tree.sigma_map.as_ref().unwrap();
    for ((gl, il), (dw, db), name) in [(g1, i1), (g2, i2)]
        .into_iter()
        .zip(sums)
        .zip(["fc1", "fc2"])
        .map(|((a, b), c)| (a, b, c))
    {
        let add = |init: &[f32], v: &[f64]| -> Vec<f64> {
            init.iter().zip(v).map(|(&a, &b)| a as f64 + b).collect()
        };
        let got_w = gpu.stream.clone_dtoh(&gl.w).unwrap();
        close(
            &format!("sigma map {name} weight"),
            &got_w,
            &add(&il.w, &dw),
        );
        let got_b = gpu.stream.clone_dtoh(gl.b.as_ref().unwrap()).unwrap();
        close(
            &format!("sigma map {name} bias"),
            &got_b,
            &add(il.b.as_ref().unwrap(), &db),
        );
    }
}
