//! Tests of `toy`.

use super::*;

#[test]
fn toys_follow_the_subs_contract() {
    let cfg = toy_config(4, 3, Algo::Mdlm, 2);
    let xt = Tokens::new(2, 3, vec![3, 1, 3, 3, 3, 3], 4).unwrap();
    let mut fm = FixedMarginals::new(
        cfg.clone(),
        &[
            vec![1.0, 1.0, 2.0],
            vec![1.0, 0.0, 0.0],
            vec![0.0, 3.0, 1.0],
        ],
    );
    let out = fm.log_probs(&xt, None).unwrap();
    let row = |o: &Tensor, pos: usize| o.data[pos * 4..pos * 4 + 4].to_vec();
    assert_eq!(row(&out, 1), vec![NEG_INF, 0.0, NEG_INF, NEG_INF]);
    let p0: Vec<f64> = row(&out, 0).iter().map(|&x| (x as f64).exp()).collect();
    assert!((p0[2] - 0.5).abs() < 1e-7 && p0[3] == 0.0, "{p0:?}");
    assert!((fm.probs(2)[1] - 0.75).abs() < 1e-7);

    let out = AllEqual::new(cfg.clone()).log_probs(&xt, None).unwrap();
    // Row 0 sees token 1: its masked positions are certain of it.
    assert_eq!(row(&out, 0), vec![NEG_INF, 0.0, NEG_INF, NEG_INF]);
    assert_eq!(row(&out, 2), vec![NEG_INF, 0.0, NEG_INF, NEG_INF]);
    // Row 1 is all-mask: uniform over the 3 real tokens.
    let third = -(3.0f32).ln();
    assert_eq!(row(&out, 4), vec![third, third, third, NEG_INF]);

    let cfg = toy_config(5, 3, Algo::Imdm, 2);
    let xt = Tokens::new(2, 3, vec![4; 6], 5).unwrap();
    let mut eps = Tensor::zeros(&[2, 3, 2]);
    eps.data[0] = -1.0; // row 0 -> token 0
    eps.data[6] = 0.99; // row 1 -> token 3
    let mut rec = Recorder::new(EpsToken::new(cfg));
    let out = rec.log_probs(&xt, Some(&eps)).unwrap();
    assert_eq!(out.data[0], 0.0);
    assert_eq!(out.data[3 * 5 + 3], 0.0);
    assert_eq!(rec.calls.len(), 1);
    assert_eq!(rec.calls[0].eps.as_deref(), Some(&eps.data[..]));
    assert!(rec.log_probs(&xt, None).is_err());
}
