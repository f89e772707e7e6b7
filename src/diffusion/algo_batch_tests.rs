//! The baselines' batches: AR is unnoised with position 0 unscored, SEDD masks where MDLM does
//! for the same stream and times, D3PM's times lie on the T-step grid, σ = −ln α(t).

use super::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn cfg(algo: Algo) -> DitConfig {
    let mut c = DitConfig::minimini();
    (c.vocab_size, c.mask_index, c.length) = (11, 10, 6);
    c.set_algo(algo);
    c
}

fn x0() -> Tokens {
    Tokens {
        batch: 4,
        len: 6,
        ids: (0..24).map(|i| (i * 3 % 10) as u32).collect(),
    }
}

#[test]
fn baseline_batches_follow_their_algorithm() {
    let t = [0.1, 0.4, 0.7, 0.95];
    let o = D3pmOptions::default();
    let rng = || ChaCha8Rng::seed_from_u64(3);
    let ar = algo_batch(&mut rng(), &mut rng(), &x0(), &t, &cfg(Algo::Ar), &o, 20.0).unwrap();
    assert_eq!(ar.noised.xt, x0());
    assert_eq!(ar.scored(), scored_tokens(&cfg(Algo::Ar), 4));
    assert!(ar
        .noised
        .weight
        .chunks(6)
        .all(|r| r[0] == 0.0 && r[1..].iter().all(|&w| w == 1.0)));
    let mdlm = algo_batch(
        &mut rng(),
        &mut rng(),
        &x0(),
        &t,
        &cfg(Algo::Mdlm),
        &o,
        24.0,
    )
    .unwrap();
    let sedd = algo_batch(
        &mut rng(),
        &mut rng(),
        &x0(),
        &t,
        &cfg(Algo::Sedd),
        &o,
        24.0,
    )
    .unwrap();
    assert_eq!(
        sedd.noised.xt, mdlm.noised.xt,
        "same stream, same times: same masks"
    );
    assert!(sedd.scored() > 4);
    let s = sedd.sigma.as_ref().unwrap();
    for (b, &tb) in t.iter().enumerate() {
        assert!((s[b] + alpha(tb).ln()).abs() < 1e-15);
    }
    let d3 = algo_batch(
        &mut rng(),
        &mut rng(),
        &x0(),
        &t,
        &cfg(Algo::D3pm),
        &o,
        24.0,
    )
    .unwrap();
    for (&td, &tb) in d3.noised.t.iter().zip(&t) {
        assert_eq!(td, discretize(tb, o.steps));
    }
    assert!(mdlm.sigma.is_none() && ar.sigma.is_none());
}
