//! Tests of `schedule`.

use super::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn schedule_endpoints_and_weight() {
    assert_eq!(alpha(0.0), 1.0);
    assert!((alpha(1.0) - 1e-3).abs() < 1e-15);
    for t in [1e-3, 0.1, 0.5, 1.0] {
        assert!((nelbo_weight(t) - 1.0 / t).abs() < 1e-9 / t);
    }
}

#[test]
fn antithetic_times_cover_each_stratum_once() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let n = 64;
    let ts = antithetic_times(&mut rng, n);
    for (i, &t) in ts.iter().enumerate() {
        let tt = (t - SAMPLING_EPS) / (1.0 - SAMPLING_EPS);
        assert!(
            tt >= i as f64 / n as f64 - 1e-12 && tt < (i + 1) as f64 / n as f64 + 1e-12,
            "t[{i}] = {t} is outside its stratum"
        );
    }
}
