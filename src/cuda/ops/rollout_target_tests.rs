//! Tests of `rollout_target`.

use super::*;
use crate::cuda::gpu_for_tests;
use crate::cuda::ops::sample::NONE as SAMPLE_NONE;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The K steps of one rollout on the host: per step the sampler's outcomes `cat` (rows) as the
/// sample kernel leaves them (SAMPLE_NONE where an earlier step unmasked, else a token, the
/// mask or the reset category V) and log-probs (rows, ld) with NaN padding; clean positions in
/// x_t are SAMPLE_NONE from step 0.
struct Steps {
    rows: usize,
    vocab: usize,
    mask: usize,
    ld: usize,
    cats: Vec<Vec<u32>>,
    log_probs: Vec<Vec<f32>>,
}

fn steps(seed: u64, (rows, vocab, mask, ld): (usize, usize, usize, usize), k: usize) -> Steps {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut masked: Vec<bool> = (0..rows).map(|_| rng.random_bool(0.8)).collect();
    let (mut cats, mut log_probs) = (Vec::new(), Vec::new());
    for _ in 0..k {
        let cat: Vec<u32> = masked
            .iter_mut()
            .map(|m| {
                if !*m {
                    return SAMPLE_NONE;
                }
                match rng.random_range(0..4) {
                    0 => mask as u32,
                    1 => vocab as u32,
                    _ => {
                        *m = false;
                        let t = rng.random_range(0..vocab - 1);
                        (t + (t >= mask) as usize) as u32
                    }
                }
            })
            .collect();
        let lp: Vec<f32> = (0..rows * ld)
            .map(|i| {
                if i % ld < vocab {
                    rng.random_range(-20.0f32..0.0)
                } else {
                    f32::NAN
                }
            })
            .collect();
        cats.push(cat);
        log_probs.push(lp);
    }
    Steps {
        rows,
        vocab,
        mask,
        ld,
        cats,
        log_probs,
    }
}

/// The rule written from spec 6.1 step 2 (as `teacher_rollout` states it): per position the
/// first step whose outcome is a token, and the row of that step, else of the last step.
/// Target padding keeps `fill`.
fn transcription(s: &Steps, ldt: usize, fill: f32) -> (Vec<f32>, Vec<u32>) {
    let k = s.cats.len();
    let mut target = vec![fill; s.rows * ldt];
    let mut at = vec![NONE; s.rows];
    for pos in 0..s.rows {
        let step = (0..k).find(|&i| {
            let c = s.cats[i][pos];
            (c as usize) < s.vocab && c as usize != s.mask
        });
        let from = step.unwrap_or(k - 1);
        at[pos] = step.map_or(NONE, |i| i as u32);
        target[pos * ldt..pos * ldt + s.vocab]
            .copy_from_slice(&s.log_probs[from][pos * s.ld..pos * s.ld + s.vocab]);
    }
    (target, at)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn params(s: &Steps, ldt: usize, step: usize) -> RolloutTargetParams {
    RolloutTargetParams::new((s.rows, s.vocab, s.mask), (s.ld, ldt), step, s.cats.len())
}

#[test]
fn twin_follows_the_rollout_rule() {
    for (i, (dims, ldt, k)) in [
        ((1, 2, 0, 2), 2, 1),
        ((37, 13, 5, 13), 16, 2),
        ((64, 50, 49, 64), 50, 4),
        ((129, 7, 3, 8), 7, 3),
    ]
    .into_iter()
    .enumerate()
    {
        let s = steps(10 + i as u64, dims, k);
        let fill = -7.5f32;
        let mut target = vec![fill; s.rows * ldt];
        // `at` starts as garbage: step 0 must not read it.
        let mut at = vec![12345u32; s.rows];
        for step in 0..k {
            let p = params(&s, ldt, step);
            cpu::rollout_target(&mut target, &mut at, &s.cats[step], &s.log_probs[step], &p)
                .unwrap();
        }
        let (wt, wa) = transcription(&s, ldt, fill);
        assert_eq!(at, wa, "{dims:?} K {k}: at");
        assert_eq!(bits(&target), bits(&wt), "{dims:?} K {k}: target");
        let unmasked = at.iter().filter(|&&a| a != NONE).count();
        assert!(
            s.rows < 10 || (unmasked > 0 && unmasked < s.rows),
            "{dims:?}: the case exercises both rules ({unmasked} of {} unmasked)",
            s.rows
        );
    }
}

#[test]
fn bad_shapes_are_rejected_before_any_work() {
    let p = RolloutTargetParams::new((6, 5, 4), (8, 5), 0, 2);
    p.check(30, 6, 6, 48).unwrap();
    let bad = [
        p.check(31, 6, 6, 48),
        p.check(30, 5, 6, 48),
        p.check(30, 6, 7, 48),
        p.check(30, 6, 6, 47),
        RolloutTargetParams { ld: 4, ..p }.check(30, 6, 6, 24),
        RolloutTargetParams { ldt: 4, ..p }.check(24, 6, 6, 48),
        RolloutTargetParams { mask_index: 5, ..p }.check(30, 6, 6, 48),
        RolloutTargetParams { vocab: 1, ..p }.check(30, 6, 6, 48),
        RolloutTargetParams { last: 2, ..p }.check(30, 6, 6, 48),
    ];
    for r in bad {
        assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    }
    let mut t = vec![0f32; 29];
    let mut a = vec![0u32; 6];
    assert!(cpu::rollout_target(&mut t, &mut a, &[0; 6], &[0.0; 48], &p).is_err());
}

/// The kernel against its twin, bit for bit (target padding and `at` included), over whole
/// rollouts at awkward shapes: the OWT vocabulary with the forward's padded stride and a
/// distill_kl-friendly target stride (vector path with a 2-column tail), strides that are not
/// multiples of 4 (the scalar path), one row, rows off any block multiple.
#[test]
fn gpu_matches_twin() {
    let Some(gpu) = gpu_for_tests() else { return };
    let s = &gpu.stream;
    for (i, (dims, ldt, k)) in [
        ((64, 50258, 50257, 50304), 50260, 2),
        ((1, 13, 0, 13), 13, 1),
        ((257, 13, 5, 16), 14, 4),
        ((1000, 130, 129, 192), 132, 3),
        ((77, 7, 6, 7), 8, 2),
    ]
    .into_iter()
    .enumerate()
    {
        let st = steps(40 + i as u64, dims, k);
        let fill = -3.25f32;
        let mut target = vec![fill; st.rows * ldt];
        let mut at = vec![777u32; st.rows];
        let mut dt = s.clone_htod(&target).unwrap();
        let mut da = s.clone_htod(&at).unwrap();
        for step in 0..k {
            let p = params(&st, ldt, step);
            let dc = s.clone_htod(&st.cats[step]).unwrap();
            let dl = s.clone_htod(&st.log_probs[step]).unwrap();
            rollout_target_f32(&gpu, &mut dt, &mut da, &dc, &dl, &p).unwrap();
            cpu::rollout_target(
                &mut target,
                &mut at,
                &st.cats[step],
                &st.log_probs[step],
                &p,
            )
            .unwrap();
        }
        let (gt, ga) = (s.clone_dtoh(&dt).unwrap(), s.clone_dtoh(&da).unwrap());
        assert_eq!(ga, at, "{dims:?} ldt {ldt}: at");
        assert_eq!(bits(&gt), bits(&target), "{dims:?} ldt {ldt}: target");
        let (wt, _) = transcription(&st, ldt, fill);
        assert_eq!(bits(&gt), bits(&wt), "{dims:?}: the rule");
    }
}

/// The constants the launcher mirrors from the kernel source equal the kernel's.
#[test]
fn constants_match_the_kernel() {
    use crate::cuda::kernel_defines::{define, struct_size};
    use std::mem::size_of;
    assert_eq!(
        THREADS as u64,
        define("rollout_target.cu", "ROLLOUT_THREADS")
    );
    assert_eq!(NONE as u64, define("rollout_target.cu", "ROLLOUT_NONE"));
    assert_eq!(
        size_of::<RolloutTargetParams>(),
        struct_size("rollout_target.cu", "RolloutTargetParams")
    );
}
