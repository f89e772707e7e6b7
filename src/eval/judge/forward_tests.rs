use super::forward::{rmsnorm, RopeTable};
use super::gguf::{LlamaConfig, RopeStyle};

fn cfg(style: RopeStyle) -> LlamaConfig {
    LlamaConfig {
        arch: "llama".into(),
        vocab: 10,
        d_model: 16,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 8,
        ffn: 32,
        rms_eps: 1e-6,
        rope_base: 10000.0,
        rope_dim: 8,
        rope_style: style,
        rope_linear_scale: 1.0,
        context_len: 64,
    }
}

fn seeded(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 % 101) as f32 - 50.0) / 25.0)
        .collect()
}

#[test]
fn rope_rotates_the_right_pairs() {
    for (style, pairs) in [
        (RopeStyle::Interleaved, [(0, 1), (2, 3), (4, 5), (6, 7)]),
        (RopeStyle::Halves, [(0, 4), (1, 5), (2, 6), (3, 7)]),
    ] {
        let rope = RopeTable::new(&cfg(style), 5);
        let x0 = seeded(5 * 8);
        let mut x = x0.clone();
        rope.apply(&mut x, 1, 8);
        // Position 0 is the identity.
        assert_eq!(&x[..8], &x0[..8]);
        for p in 1..5 {
            let (a, b) = (&x0[p * 8..][..8], &x[p * 8..][..8]);
            for (i, &(u, v)) in pairs.iter().enumerate() {
                // Each pair keeps its length and turns by p·base^(-2i/8).
                let n0 = a[u].hypot(a[v]);
                let n1 = b[u].hypot(b[v]);
                assert!((n0 - n1).abs() < 1e-5, "{style:?} p {p} pair {i}");
                let want = p as f64 * 10000f64.powf(-2.0 * i as f64 / 8.0);
                let turn = (b[v] as f64).atan2(b[u] as f64) - (a[v] as f64).atan2(a[u] as f64);
                let d = (turn - want).rem_euclid(std::f64::consts::TAU);
                assert!(
                    d.min(std::f64::consts::TAU - d) < 1e-4,
                    "{style:?} p {p} pair {i}"
                );
            }
        }
    }
}

#[test]
fn rmsnorm_gives_unit_rms_times_the_weight() {
    let x = seeded(3 * 16);
    let w: Vec<f32> = (0..16).map(|i| 0.5 + i as f32 / 16.0).collect();
    let y = rmsnorm(&x, &w, 0.0);
    for r in 0..3 {
        let rms = (y[r * 16..][..16]
            .iter()
            .zip(&w)
            .map(|(v, g)| ((v / g) as f64).powi(2))
            .sum::<f64>()
            / 16.0)
            .sqrt();
        assert!((rms - 1.0).abs() < 1e-5, "row {r}: rms {rms}");
    }
}
