//! Tests of `stream`.

use super::*;

#[test]
fn race_uniforms_are_uniform_and_keyed() {
    let s = SamplerStream::new(12345);
    let n = 1 << 16;
    // 16-bin histogram over (pos, cat): chi-square with 15 dof at p-value 1e-4.
    let mut bins = [0usize; 16];
    for i in 0..n {
        let u = s.race_uniform(3, i / 7, i % 7);
        assert!((0.0..1.0).contains(&u));
        bins[(u * 16.0) as usize] += 1;
    }
    let e = n as f64 / 16.0;
    let chi2: f64 = bins.iter().map(|&c| (c as f64 - e).powi(2) / e).sum();
    let p = crate::diffusion::stats::chi_square_sf(chi2, 15);
    assert!(p > 1e-4, "chi2 {chi2} p {p} bins {bins:?}");
    // Pairs share a call; the per-position closure agrees; everything else differs.
    assert_eq!(s.race_pair(1, 2, 3)[1], s.race_uniform(1, 2, 7));
    let mut f = s.race_uniforms(1, 2);
    for cat in [0usize, 1, 2, 5, 4, 9] {
        assert_eq!(f(cat), s.race_uniform(1, 2, cat as u32));
    }
    let base = s.race_uniform(1, 2, 6);
    for other in [
        s.race_uniform(1, 2, 7),
        s.race_uniform(2, 2, 6),
        s.race_uniform(1, 3, 6),
        SamplerStream::new(12346).race_uniform(1, 2, 6),
    ] {
        assert_ne!(base, other);
    }
}

#[test]
fn reset_eps_has_the_right_law_and_differs_from_race() {
    let s = SamplerStream::new(7);
    let n = 40000u32;
    let r: Vec<f32> = (0..n)
        .map(|i| s.reset_eps(0, i / 8, i % 8, NoiseType::Rand, 2.0))
        .collect();
    assert!(r.iter().all(|&x| (-2.0..2.0).contains(&x)));
    let mean = r.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    // Var of U[-2, 2) is 4/3; the mean's standard error is 0.0058.
    assert!(mean.abs() < 0.03, "rand mean {mean}");
    let g: Vec<f64> = (0..n)
        .map(|i| s.reset_eps(0, i / 8, i % 8, NoiseType::Randn, 1.0) as f64)
        .collect();
    let m = g.iter().sum::<f64>() / n as f64;
    let v = g.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n as f64;
    assert!(m.abs() < 0.03 && (v - 1.0).abs() < 0.05, "randn {m} {v}");
    // Distinct purposes never share a counter.
    let w_race = s.block(0, 0, 0, Purpose::Race);
    let w_eps = s.block(0, 0, 0, Purpose::ResetEps);
    assert_ne!(w_race, w_eps);
}
