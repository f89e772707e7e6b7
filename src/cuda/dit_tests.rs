//! Tests of `dit`.

use super::fold_rows;

/// The folding identity the inference forward relies on:
/// `g ∘ (x W^T + b) = x (diag(g) W)^T + g ∘ b`, and no gate leaves W unchanged.
#[test]
fn folded_gate_equals_gated_output() {
    let (out, inp) = (5, 7);
    let w: Vec<f32> = (0..out * inp)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
        .collect();
    let g: Vec<f32> = (0..out).map(|i| 0.5 - i as f32 * 0.3).collect();
    let b: Vec<f32> = (0..out).map(|i| i as f32 * 0.25 - 0.4).collect();
    let x: Vec<f32> = (0..inp).map(|i| (i as f32 * 0.7).sin()).collect();
    let wf = fold_rows(&w, Some(&g), inp);
    for r in 0..out {
        let dot =
            |m: &[f32]| -> f64 { (0..inp).map(|k| m[r * inp + k] as f64 * x[k] as f64).sum() };
        let gated = g[r] as f64 * (dot(&w) + b[r] as f64);
        let folded = dot(&wf) + (g[r] * b[r]) as f64;
        assert!(
            (gated - folded).abs() < 1e-5,
            "row {r}: {gated} vs {folded}"
        );
    }
    assert_eq!(fold_rows(&w, None, inp), w);
}
