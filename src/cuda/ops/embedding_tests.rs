//! Tests of `embedding`.

use super::*;
use crate::cuda::gpu_for_tests;
use crate::testing::grad::{assert_close_scaled, assert_grad, f64s, fd_grad};
use crate::testing::inputs::rand_f32;
use crate::testing::Tol;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Bit-exact comparison (NaN equal to NaN) with the first mismatch in the message.
fn assert_bits_eq(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let bad = got
        .iter()
        .zip(want)
        .position(|(g, w)| g.to_bits() != w.to_bits() && !(g.is_nan() && w.is_nan()));
    if let Some(i) = bad {
        let n = got.iter().zip(want).filter(|(g, w)| g != w).count();
        panic!(
            "{name}: {n} mismatches; first at {i}: got {} want {}",
            got[i], want[i]
        );
    }
}

/// Tokens with about half the rows masked; the rest uniform over the vocabulary.
fn tokens(seed: u64, rows: usize, vocab: usize, mask: usize) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..rows)
        .map(|_| {
            if rng.random_bool(0.5) {
                mask as u32
            } else {
                rng.random_range(0..vocab as u32)
            }
        })
        .collect()
}

fn run_gpu(
    gpu: &Gpu,
    table: &[f32],
    ids: &[u32],
    eps: Option<&[f32]>,
    mask: usize,
    d: usize,
) -> Vec<f32> {
    let s = &gpu.stream;
    let dt = s.clone_htod(table).unwrap();
    let dtok = s.clone_htod(ids).unwrap();
    let de = eps.map(|e| {
        let b: Vec<bf16> = e.iter().map(|&x| bf16::from_f32(x)).collect();
        s.clone_htod(&b).unwrap()
    });
    let mut h = s.alloc_zeros::<f32>(ids.len() * d).unwrap();
    embedding_fwd(gpu, &mut h, &dt, &dtok, de.as_ref(), mask, ids.len(), d).unwrap();
    s.clone_dtoh(&h).unwrap()
}

/// eps values already rounded to bf16, so the twin sees what the kernel reads.
fn bf16_round(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect()
}

#[test]
fn gpu_matches_twin() {
    let Some(gpu) = gpu_for_tests() else { return };
    // (rows, d, V): DiT-small OWT and LM1B, then awkward widths (not % 4) and row counts.
    for &(rows, d, vocab) in &[
        (32 * 1024, 768, 50258),
        (512 * 128, 768, 30522),
        (1, 768, 50258),
        (7, 130, 1000),
        (129, 66, 17),
        (3 * 129, 6, 5),
    ] {
        let mask = vocab - 1;
        let table = rand_f32(vocab as u64, vocab * d, -0.04, 0.04);
        let ids = tokens(rows as u64, rows, vocab, mask);
        let eps = bf16_round(rand_f32(d as u64, rows * d, -1.0, 1.0));
        for with_eps in [true, false] {
            let e = with_eps.then_some(&eps[..]);
            let got = run_gpu(&gpu, &table, &ids, e, mask, d);
            let want = cpu::embedding_fwd(&table, &ids, e, mask, d);
            assert_bits_eq(
                &format!("embedding rows {rows} d {d} eps {with_eps}"),
                &got,
                &want,
            );
        }
    }
    // Large magnitude, and an arange table (row t of E holds t*d + j exactly).
    let (rows, d, vocab) = (33, 768, 300);
    let big = rand_f32(1, vocab * d, -3e4, 3e4);
    let arange: Vec<f32> = (0..vocab * d).map(|i| i as f32).collect();
    let eps = bf16_round(rand_f32(2, rows * d, -500.0, 500.0));
    let ids = tokens(3, rows, vocab, 7);
    for table in [&big, &arange] {
        let got = run_gpu(&gpu, table, &ids, Some(&eps), 7, d);
        assert_bits_eq(
            "embedding structured",
            &got,
            &cpu::embedding_fwd(table, &ids, Some(&eps), 7, d),
        );
    }
}

#[test]
fn gpu_bad_ids_and_i32_ids() {
    let Some(gpu) = gpu_for_tests() else { return };
    let (d, vocab) = (64, 100);
    let table = rand_f32(5, vocab * d, -1.0, 1.0);
    let ids: Vec<u32> = vec![3, 99, 100, u32::MAX, 0];
    let got = run_gpu(&gpu, &table, &ids, None, 99, d);
    assert_bits_eq(
        "embedding bad ids",
        &got,
        &cpu::embedding_fwd(&table, &ids, None, 99, d),
    );
    assert!(
        got[2 * d..4 * d].iter().all(|x| x.is_nan()),
        "ids >= V give NaN rows"
    );
    // i32 ids: the same rows, and -1 is a NaN row.
    let s = &gpu.stream;
    let ids_i: Vec<i32> = vec![3, 99, -1, 0];
    let (dt, dtok) = (s.clone_htod(&table).unwrap(), s.clone_htod(&ids_i).unwrap());
    let mut h = s.alloc_zeros::<f32>(4 * d).unwrap();
    embedding_fwd(&gpu, &mut h, &dt, &dtok, None, 99, 4, d).unwrap();
    let got = s.clone_dtoh(&h).unwrap();
    let want = cpu::embedding_fwd(&table, &[3, 99, u32::MAX, 0], None, 99, d);
    assert_bits_eq("embedding i32 ids", &got, &want);
}

#[test]
fn gpu_rejects_bad_shapes() {
    let Some(gpu) = gpu_for_tests() else { return };
    let s = &gpu.stream;
    let table = s.alloc_zeros::<f32>(10 * 8).unwrap();
    let ids = s.alloc_zeros::<u32>(4).unwrap();
    let eps = s.alloc_zeros::<bf16>(3 * 8).unwrap();
    let mut h = s.alloc_zeros::<f32>(4 * 8).unwrap();
    let cases = [
        embedding_fwd(&gpu, &mut h, &table, &ids, None, 9, 5, 8),
        embedding_fwd(&gpu, &mut h, &table, &ids, None, 9, 4, 6),
        embedding_fwd(&gpu, &mut h, &table, &ids, Some(&eps), 9, 4, 8),
        embedding_fwd(&gpu, &mut h, &table, &ids, None, 10, 4, 8),
    ];
    for (k, r) in cases.into_iter().enumerate() {
        assert!(matches!(r, Err(Error::Shape(_))), "case {k}: {r:?}");
    }
}

#[test]
fn twin_looks_up_rows_and_adds_eps_only_at_mask_rows() {
    let (d, vocab, mask) = (3, 4, 3);
    let table: Vec<f32> = (0..vocab * d).map(|i| i as f32).collect();
    let ids = [2u32, 3, 0, 3, 7];
    let eps: Vec<f32> = (0..ids.len() * d).map(|i| 0.5 + i as f32).collect();
    let h = cpu::embedding_fwd(&table, &ids, Some(&eps), mask, d);
    assert_eq!(&h[0..3], &[6.0, 7.0, 8.0]);
    assert_eq!(&h[3..6], &[9.0 + 3.5, 10.0 + 4.5, 11.0 + 5.5]);
    assert_eq!(&h[6..9], &[0.0, 1.0, 2.0]);
    assert_eq!(&h[9..12], &[9.0 + 9.5, 10.0 + 10.5, 11.0 + 11.5]);
    assert!(
        h[12..15].iter().all(|x| x.is_nan()),
        "id 7 >= V gives a NaN row"
    );
    // MDLM: no injection anywhere.
    let h0 = cpu::embedding_fwd(&table, &ids[..4], None, mask, d);
    assert_eq!(&h0[3..6], &[9.0, 10.0, 11.0]);
}

// ---- backward ----------------------------------------------------------------------------

/// The GPU's two stages emulated in f32 in exactly the kernels' order (stage 1: each item's
/// rows in plan order; stage 2: each segment's items in order, then one add into dtable),
/// so the GPU result must match it bit for bit.
fn emulate_gpu_bwd(plan: &SegmentPlan, dtable: &mut [f32], dh: &[f32], d: usize) {
    let part: Vec<Vec<f32>> = (0..plan.n_items())
        .map(|k| {
            let mut s = vec![0f32; d];
            for q in plan.item_start[k]..plan.item_start[k + 1] {
                let r = plan.order[q as usize] as usize;
                for j in 0..d {
                    s[j] += dh[r * d + j];
                }
            }
            s
        })
        .collect();
    for (sg, &tok) in plan.seg_token.iter().enumerate() {
        let mut s = vec![0f32; d];
        for p in &part[plan.seg_item[sg] as usize..plan.seg_item[sg + 1] as usize] {
            for j in 0..d {
                s[j] += p[j];
            }
        }
        for j in 0..d {
            dtable[tok as usize * d + j] += s[j];
        }
    }
}

/// Σ |terms| per element of dtable (its initial value and every dh row added to it).
fn dtable_scale(dtable0: &[f32], dh: &[f32], ids: &[u32], d: usize) -> Vec<f64> {
    let mut sc: Vec<f64> = dtable0.iter().map(|v| v.abs() as f64).collect();
    for (r, &t) in ids.iter().enumerate() {
        for j in 0..d {
            sc[t as usize * d + j] += dh[r * d + j].abs() as f64;
        }
    }
    sc
}

#[test]
fn segment_plan_is_a_stable_counting_sort() {
    for &(rows, vocab, mask) in &[(300, 50, 49), (1000, 7, 3), (1, 10, 0), (129, 50258, 50257)] {
        let ids = tokens(rows as u64, rows, vocab, mask);
        let plan = SegmentPlan::new(&ids, vocab).unwrap();
        // order: a permutation, ids non-decreasing, rows ascending within an id.
        let mut seen = vec![false; rows];
        for w in plan.order.windows(2) {
            let (a, b) = (w[0] as usize, w[1] as usize);
            assert!(
                ids[a] < ids[b] || (ids[a] == ids[b] && a < b),
                "order {a} {b}"
            );
        }
        plan.order.iter().for_each(|&r| seen[r as usize] = true);
        assert!(seen.iter().all(|&x| x), "order is a permutation");
        // items: 1..=ITEM_ROWS rows of one id each, covering order exactly.
        assert_eq!(*plan.item_start.last().unwrap() as usize, rows);
        for k in 0..plan.n_items() {
            let (a, b) = (plan.item_start[k] as usize, plan.item_start[k + 1] as usize);
            assert!(b > a && b - a <= ITEM_ROWS, "item {k}: {a}..{b}");
            let t = ids[plan.order[a] as usize];
            assert!(plan.order[a..b].iter().all(|&r| ids[r as usize] == t));
        }
        // segments: the distinct ids ascending, each owning exactly its items.
        let mut distinct: Vec<u32> = ids.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(plan.seg_token, distinct);
        assert_eq!(*plan.seg_item.last().unwrap() as usize, plan.n_items());
        for (sg, &t) in plan.seg_token.iter().enumerate() {
            let (k0, k1) = (plan.seg_item[sg] as usize, plan.seg_item[sg + 1] as usize);
            let n: usize = (k0..k1)
                .map(|k| (plan.item_start[k + 1] - plan.item_start[k]) as usize)
                .sum();
            assert_eq!(n, ids.iter().filter(|&&x| x == t).count(), "id {t}");
            assert_eq!(k1 - k0, n.div_ceil(ITEM_ROWS), "id {t}: items");
        }
        assert!(plan.n_items() <= SegmentPlan::max_items(rows));
    }
    assert!(matches!(SegmentPlan::new(&[1, 5], 5), Err(Error::Shape(_))));
}

#[test]
fn twin_bwd_matches_finite_differences() {
    // F = Σ G ⊙ h, h = embedding_fwd(table, ids, eps) in f64.
    let (d, vocab, mask) = (5, 6, 5);
    let ids = [2u32, 5, 0, 5, 2, 2, 5];
    let rows = ids.len();
    let g = rand_f32(1, rows * d, -1.0, 1.0);
    let table = rand_f32(2, vocab * d, -1.0, 1.0);
    let eps = rand_f32(3, rows * d, -1.0, 1.0);
    let dt0 = rand_f32(4, vocab * d, -1.0, 1.0);
    let mut dt = dt0.clone();
    cpu::embedding_bwd(&mut dt, &g, &ids, d);
    let mut de = vec![7f32; rows * d];
    cpu::embedding_eps_bwd(&mut de, &g, &ids, mask, d);
    let f = |t: &[f64], e: &[f64]| -> f64 {
        let h = cpu::embedding_fwd(t, &ids, Some(e), mask, d);
        h.iter().zip(&g).map(|(a, b)| a * *b as f64).sum()
    };
    let (t64, e64) = (f64s(&table), f64s(&eps));
    let tol = Tol {
        abs: 1e-6,
        rel: 1e-6,
    };
    let fd = fd_grad(|v| f(v, &e64), &t64, 1e-3, None);
    let delta: Vec<f64> = dt.iter().zip(&dt0).map(|(a, b)| (a - b) as f64).collect();
    assert_grad("embedding dtable", &delta, &fd, tol);
    let fd = fd_grad(|v| f(&t64, v), &e64, 1e-3, None);
    assert_grad("embedding d eps_add", &f64s(&de), &fd, tol);
    // Unused ids (1, 3, 4) keep their initial gradient exactly.
    for v in [1, 3, 4] {
        assert_eq!(&dt[v * d..(v + 1) * d], &dt0[v * d..(v + 1) * d]);
    }
}

#[test]
fn plan_emulation_matches_twin() {
    // The GPU algorithm's f32 summation order (emulated here) against the f64 twin, with a
    // dominant mask id whose rows span many items.
    // The real shape (32 x 1024 rows, D 768, V 50258: the mask id spans 256 items) is the
    // one the GPU test checks against this emulation bit for bit.
    for &(rows, d, vocab) in &[(2000, 24, 300), (32 * 1024, 768, 50258)] {
        let mask = vocab - 1;
        let ids = tokens(11, rows, vocab, mask);
        let dh = rand_f32(12, rows * d, -1.0, 1.0);
        let dt0 = rand_f32(13, vocab * d, -1.0, 1.0);
        let plan = SegmentPlan::new(&ids, vocab).unwrap();
        let mut got = dt0.clone();
        emulate_gpu_bwd(&plan, &mut got, &dh, d);
        let mut want = dt0.clone();
        cpu::embedding_bwd(&mut want, &dh, &ids, d);
        let sc = dtable_scale(&dt0, &dh, &ids, d);
        let tag = format!("rows {rows} d {d} V {vocab}");
        assert_close_scaled(
            &format!("embedding bwd emulation vs twin {tag}"),
            &got,
            &want,
            &sc,
            1e-5,
        );
    }
}

/// Runs the GPU dE backward; returns dtable read back (it starts at `dt0`).
fn run_bwd(gpu: &Gpu, dt0: &[f32], dh: &[f32], ids: &[u32], d: usize) -> Vec<f32> {
    let (s, vocab) = (&gpu.stream, dt0.len() / d);
    let mut plan = EmbeddingBwdPlan::new(gpu, ids.len() + 5, d).unwrap();
    plan.load(gpu, ids, vocab).unwrap();
    let mut dt = s.clone_htod(dt0).unwrap();
    let ddh = s.clone_htod(dh).unwrap();
    embedding_bwd(gpu, &mut dt, &mut plan, &ddh, ids.len(), d).unwrap();
    s.clone_dtoh(&dt).unwrap()
}

#[test]
fn gpu_bwd_matches_twin_and_emulation() {
    let Some(gpu) = gpu_for_tests() else { return };
    // (rows, d, V): DiT-small OWT (32 x 1024 rows), then awkward widths and row counts.
    for &(rows, d, vocab) in &[
        (32 * 1024, 768, 50258),
        (1, 768, 50258),
        (7, 130, 1000),
        (129, 66, 17),
        (3 * 129, 6, 5),
    ] {
        let mask = vocab - 1;
        let ids = tokens(rows as u64, rows, vocab, mask);
        let dh = rand_f32(d as u64, rows * d, -1.0, 1.0);
        let dt0 = rand_f32(vocab as u64, vocab * d, -0.5, 0.5);
        let got = run_bwd(&gpu, &dt0, &dh, &ids, d);
        let tag = format!("rows {rows} d {d} V {vocab}");
        let plan = SegmentPlan::new(&ids, vocab).unwrap();
        let mut emu = dt0.clone();
        emulate_gpu_bwd(&plan, &mut emu, &dh, d);
        assert_bits_eq(&format!("embedding bwd vs emulation {tag}"), &got, &emu);
        let mut want = dt0.clone();
        cpu::embedding_bwd(&mut want, &dh, &ids, d);
        let sc = dtable_scale(&dt0, &dh, &ids, d);
        assert_close_scaled(&format!("embedding bwd {tag}"), &got, &want, &sc, 1e-5);
        // The same call twice: bit-identical (no atomics).
        let again = run_bwd(&gpu, &dt0, &dh, &ids, d);
        assert_bits_eq(&format!("embedding bwd run-to-run {tag}"), &got, &again);
    }
}

#[test]
fn gpu_eps_bwd_matches_twin() {
    let Some(gpu) = gpu_for_tests() else { return };
    let s = &gpu.stream;
    for &(rows, d, vocab) in &[(32 * 1024, 768, 50258), (1, 768, 50258), (129, 66, 17)] {
        let mask = vocab - 1;
        let ids = tokens(rows as u64 + 3, rows, vocab, mask);
        let dh = rand_f32(d as u64 + 3, rows * d, -2.0, 2.0);
        let (ddh, dtok) = (s.clone_htod(&dh).unwrap(), s.clone_htod(&ids).unwrap());
        let mut de = s.alloc_zeros::<bf16>(rows * d).unwrap();
        embedding_eps_bwd(&gpu, &mut de, &ddh, &dtok, mask, rows, d).unwrap();
        let got: Vec<f32> = s
            .clone_dtoh(&de)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let mut want = vec![0f32; rows * d];
        cpu::embedding_eps_bwd(&mut want, &dh, &ids, mask, d);
        // One round to nearest even on both sides: bit-exact after rounding the twin.
        let want: Vec<f32> = want.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        assert_bits_eq(&format!("embedding eps bwd rows {rows} d {d}"), &got, &want);
    }
}

#[test]
fn gpu_bwd_rejects_bad_shapes() {
    let Some(gpu) = gpu_for_tests() else { return };
    let s = &gpu.stream;
    let (d, vocab) = (8, 10);
    let mut plan = EmbeddingBwdPlan::new(&gpu, 4, d).unwrap();
    assert!(matches!(
        plan.load(&gpu, &[1, 2, 3, 4, 5], vocab),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        plan.load(&gpu, &[1, 2, 10], vocab),
        Err(Error::Shape(_))
    ));
    plan.load(&gpu, &[1, 2, 3], vocab).unwrap();
    let mut dt = s.alloc_zeros::<f32>(vocab * d).unwrap();
    let dh = s.alloc_zeros::<f32>(4 * d).unwrap();
    let r = embedding_bwd(&gpu, &mut dt, &mut plan, &dh, 4, d);
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    let dh = s.alloc_zeros::<f32>(3 * d).unwrap();
    let mut small = s.alloc_zeros::<f32>((vocab - 1) * d).unwrap();
    let r = embedding_bwd(&gpu, &mut small, &mut plan, &dh, 3, d);
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    embedding_bwd(&gpu, &mut dt, &mut plan, &dh, 3, d).unwrap();
}

/// The constants the launcher mirrors from the kernel source (block sizes, params-struct sizes)
/// equal the kernel's, as `build.rs` reads them from `kernels/`.
#[test]
fn constants_match_the_kernel() {
    use crate::cuda::kernel_defines::define;
    assert_eq!(THREADS as u64, define("embedding.cu", "EMB_THREADS"));
    assert_eq!(
        BWD_THREADS as u64,
        define("embedding.cu", "EMB_BWD_THREADS")
    );
    assert_eq!(
        ITEM_ROWS as u64,
        define("embedding.cu", "EMB_BWD_ITEM_ROWS")
    );
}
