//! The reference's framework-independent seeded noise, `utils.robust_seeded_randn` (spec 5.8):
//! a counter hash on int64 with two's-complement wraparound and arithmetic shifts, reproduced
//! bit for bit so seeded eps (sampling, IM-ReDi couplings) matches the PyTorch code exactly.

use crate::model::NoiseType;
use crate::tensor::Tensor;

const M1: i64 = 0xd251125f;
const M2: i64 = 0xcd9e8d57;

fn mix(mut s: i64, a: i64, b: i64) -> i64 {
    s = (s ^ (s >> 15)).wrapping_mul(a);
    s = (s ^ (s >> 13)).wrapping_mul(b);
    s ^ (s >> 16)
}

fn to_unit(s: i64) -> f32 {
    // int -> f32 rounds to nearest even, so the result can be exactly 1.0 (as in the reference).
    (s & 0xFFFF_FFFF) as f32 / 4_294_967_296.0
}

/// The two uniforms (u1, u2) for batch seed `seed` at flat spatial index `i`.
pub fn seeded_uniforms(seed: i64, i: i64) -> (f32, f32) {
    let s1 = mix(seed.wrapping_mul(M1) ^ i.wrapping_mul(M2), M1, M2);
    let s2 = mix(
        seed.wrapping_mul(M2) ^ i.wrapping_add(12345).wrapping_mul(M1),
        M2,
        M1,
    );
    (to_unit(s1), to_unit(s2))
}

/// `mode='rand'`: u1 at every index of an (n) spatial block.
pub fn seeded_rand(seed: i64, n: usize) -> Vec<f32> {
    (0..n as i64).map(|i| seeded_uniforms(seed, i).0).collect()
}

/// `mode='randn'`: Box-Muller on clamped (u1, u2), in f32 like the reference.
pub fn seeded_randn(seed: i64, n: usize) -> Vec<f32> {
    (0..n as i64)
        .map(|i| {
            let (u1, u2) = seeded_uniforms(seed, i);
            let (u1, u2) = (u1.clamp(1e-8, 1.0), u2.clamp(1e-8, 1.0));
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect()
}

/// IMDM's seeded eps, `rand_fn_reproducible(L, nd, seed)` (spec 3.4): (B, L, nd) with row b
/// drawn from `seeds[b]`; `rand` gives `(2u - 1)·scale`, `randn` gives `N(0,1)·scale`.
pub fn seeded_eps(
    seeds: &[i64],
    len: usize,
    noise_dim: usize,
    kind: NoiseType,
    scale: f32,
) -> Tensor {
    let n = len * noise_dim;
    let mut data = Vec::with_capacity(seeds.len() * n);
    for &s in seeds {
        match kind {
            NoiseType::Rand => {
                data.extend(seeded_rand(s, n).iter().map(|u| (2.0 * u - 1.0) * scale))
            }
            NoiseType::Randn => data.extend(seeded_randn(s, n).iter().map(|z| z * scale)),
        }
    }
    Tensor::from_vec(&[seeds.len(), len, noise_dim], data).expect("sizes agree")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's test vectors (5.8), computed with numpy int64 arithmetic.
    #[test]
    fn matches_spec_test_vectors() {
        let cases: [(i64, [f32; 5], f32); 3] = [
            (
                0,
                [0.0, 0.650519729, 0.301039487, 0.954301357, 0.857616246],
                0.18131873,
            ),
            (
                1,
                [
                    0.288678706,
                    0.960707903,
                    0.829199493,
                    0.155886129,
                    0.30332914,
                ],
                0.90555352,
            ),
            (
                42,
                [
                    0.0968268588,
                    0.990193367,
                    0.0267591476,
                    0.480195105,
                    0.497965395,
                ],
                0.882802248,
            ),
        ];
        for (seed, u1s, u2_0) in cases {
            for (&i, &want) in [0i64, 1, 2, 767, 768].iter().zip(&u1s) {
                let got = seeded_uniforms(seed, i).0;
                // The vectors are printed to 9 significant digits; an f32 ulp near 1 is 6e-8.
                assert!(
                    (got - want).abs() <= 1e-8 + 2e-8 * want,
                    "seed {seed} i {i}: {got} vs {want}"
                );
            }
            let got = seeded_uniforms(seed, 0).1;
            assert!(
                (got - u2_0).abs() <= 1e-7,
                "u2 seed {seed}: {got} vs {u2_0}"
            );
        }
    }

    #[test]
    fn randn_is_roughly_standard_normal() {
        let v = seeded_randn(3, 20000);
        let m = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f32>() / v.len() as f32;
        // 20000 draws: the mean's standard error is 0.007, the variance's about 0.01.
        assert!(
            m.abs() < 0.035 && (var - 1.0).abs() < 0.05,
            "mean {m} var {var}"
        );
    }
}

// ---- Philox4x32-10: the counter-based stream the kernels share bit for bit ------------------

/// Philox4x32-10 (Salmon et al., SC'11), exactly Random123's `philox4x32_10`: ten rounds of
/// two 32x32->64 multiplies with the key bumped by the Weyl constants between rounds. The
/// `__device__` twin is `philox4x32_10` in `kernels/common.cuh`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    const M0: u32 = 0xD251_1F53;
    const M1: u32 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let p0 = M0 as u64 * c[0] as u64;
        let p1 = M1 as u64 * c[2] as u64;
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The 32-bit Philox word of the dropout stream for flat element `index` of the call `offset`
/// under `seed`. The rule (shared with `kernels/residual.cu`): key = (seed low 32, seed high
/// 32); counter = (index/4 low 32, index/4 high 32, offset low 32, offset high 32); the word is
/// output word `index % 4`, so one Philox call serves four consecutive elements.
pub fn dropout_word(seed: u64, offset: u64, index: u64) -> u32 {
    let q = index / 4;
    let out = philox4x32_10(
        [
            q as u32,
            (q >> 32) as u32,
            offset as u32,
            (offset >> 32) as u32,
        ],
        [seed as u32, (seed >> 32) as u32],
    );
    out[(index % 4) as usize]
}

/// Dropout decision for one element: keep iff `(x >> 8) · 2^-24 >= p` with x = [`dropout_word`].
/// The uniform has 24 bits, so its f32 value and the comparison are exact on CPU and GPU alike;
/// P(keep) = 1 - p up to 2^-24. `p = 0` keeps everything (the kernel then skips the RNG).
pub fn dropout_keep(seed: u64, offset: u64, index: u64, p: f32) -> bool {
    let u = (dropout_word(seed, offset, index) >> 8) as f32 * (1.0 / 16_777_216.0);
    u >= p
}

#[cfg(test)]
mod philox_tests {
    use super::*;

    /// Random123's known-answer vectors for philox4x32_10 (kat_vectors).
    #[test]
    fn philox_matches_random123_known_answers() {
        let cases: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            (
                [0; 4],
                [0; 2],
                [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (ctr, key, want) in cases {
            let got = philox4x32_10(ctr, key);
            assert_eq!(
                got, want,
                "counter {ctr:08x?} key {key:08x?}: got {got:08x?}"
            );
        }
    }

    #[test]
    fn dropout_word_follows_the_counter_rule() {
        let (seed, offset) = (0x0123_4567_89ab_cdef_u64, 0xfedc_ba98_7654_3210_u64);
        let key = [0x89ab_cdef, 0x0123_4567];
        for index in [0u64, 1, 2, 3, 4, 7, 1 << 34 | 5] {
            let q = index / 4;
            let out = philox4x32_10([q as u32, (q >> 32) as u32, 0x7654_3210, 0xfedc_ba98], key);
            assert_eq!(dropout_word(seed, offset, index), out[(index % 4) as usize]);
        }
    }

    #[test]
    fn dropout_keep_rate_is_binomial_per_word() {
        // 2^20 draws per p, split by word position (index % 4) to catch word-indexing bugs:
        // each quarter must be within 5 sigma of a Binomial(n/4, 1-p).
        let n = 1u64 << 20;
        for (p, offset) in [(0.1f32, 7u64), (0.5, 8), (0.9, 9)] {
            let mut kept = [0u64; 4];
            for i in 0..n {
                kept[(i % 4) as usize] += dropout_keep(42, offset, i, p) as u64;
            }
            let m = (n / 4) as f64;
            let sigma = (m * p as f64 * (1.0 - p as f64)).sqrt();
            for (w, &k) in kept.iter().enumerate() {
                let dev = (k as f64 - m * (1.0 - p as f64)).abs();
                assert!(
                    dev <= 5.0 * sigma,
                    "p {p} word {w}: kept {k} of {m}, {dev:.0} off"
                );
            }
        }
        assert!(
            (0..1000).all(|i| dropout_keep(1, 2, i, 0.0)),
            "p = 0 keeps all"
        );
    }

    #[test]
    fn dropout_streams_differ_by_seed_and_offset() {
        let mask = |seed, offset| -> Vec<bool> {
            (0..4096)
                .map(|i| dropout_keep(seed, offset, i, 0.5))
                .collect()
        };
        assert_eq!(mask(3, 4), mask(3, 4));
        for (a, b) in [
            ((3, 4), (3, 5)),
            ((3, 4), (4, 4)),
            ((3, 4), (3, 4 | 1 << 32)),
        ] {
            let same = mask(a.0, a.1)
                .iter()
                .zip(mask(b.0, b.1))
                .filter(|(x, y)| **x == *y)
                .count();
            // Independent halves agree on about 2048 of 4096 elements (sigma 32).
            assert!((1800..2300).contains(&same), "{a:?} vs {b:?}: {same} agree");
        }
    }
}
