//! Tests of `metrics`.

use super::*;

fn toks(rows: &[&[u32]]) -> Tokens {
    let len = rows[0].len();
    Tokens {
        batch: rows.len(),
        len,
        ids: rows.iter().flat_map(|r| r.iter().copied()).collect(),
    }
}

#[test]
fn exact_match_and_distinct_count() {
    let t = toks(&[&[4, 4, 4], &[4, 4, 1], &[9, 9, 9], &[4, 4, 4], &[9, 9, 9]]);
    assert_eq!(exact_match_rate(&t, 9), 0.4); // all-mask rows do not count
    assert_eq!(exact_match_rate(&t, 100), 0.8);
    assert_eq!(distinct_sequences(&t), 3);
    let empty = Tokens {
        batch: 0,
        len: 3,
        ids: vec![],
    };
    assert_eq!(exact_match_rate(&empty, 9), 0.0);
    assert_eq!(distinct_sequences(&empty), 0);
}

#[test]
fn total_correlation_on_hand_made_groups() {
    // Group 1: two perfectly coupled bits, uniform: H(X1) = H(X2) = 1, H(X) = 1 -> TC 1.
    // Group 2: two independent uniform bits: every pair once -> TC 0.
    // Group 3: L = 3 copies of a uniform bit -> Σ H = 3, H = 1, TC 2.
    // Group 4: one sample -> 0.
    let rows: Vec<&[u32]> = vec![
        &[0, 0, 5],
        &[1, 1, 5],
        &[0, 0, 5],
        &[1, 1, 5],
        &[0, 0, 5],
        &[0, 1, 5],
        &[1, 0, 5],
        &[1, 1, 5],
        &[0, 0, 0],
        &[1, 1, 1],
        &[3, 1, 4],
    ];
    let ids = [10, 10, 10, 10, 20, 20, 20, 20, 30, 30, 40];
    let t = conditional_total_correlation(&toks(&rows), &ids).unwrap();
    assert_eq!(t.groups, 4);
    assert!(
        (t.tc_bits - (1.0 + 0.0 + 2.0 + 0.0) / 4.0).abs() < 1e-12,
        "{t:?}"
    );
    assert!(
        (t.marginal_bits - (2.0 + 2.0 + 3.0) / 4.0).abs() < 1e-12,
        "{t:?}"
    );
    assert!(
        (t.joint_bits - (1.0 + 2.0 + 1.0) / 4.0).abs() < 1e-12,
        "{t:?}"
    );
    let g = total_correlation_bits(&rows[..4]);
    assert!((g.tc_bits - 1.0).abs() < 1e-12);
    // A skewed marginal: counts {3, 1} -> H = 0.811278 bits.
    let h = entropy_from_counts([3, 1], 2.0);
    assert!((h - 0.8112781244591328).abs() < 1e-12, "{h}");
    assert!(conditional_total_correlation(&toks(&rows), &ids[1..]).is_err());
}

#[test]
fn unigram_entropy_in_nats() {
    assert_eq!(unigram_entropy(&[7, 7, 7, 7]), 0.0);
    assert!((unigram_entropy(&[1, 2, 1, 2]) - std::f64::consts::LN_2).abs() < 1e-15);
    assert!((unigram_entropy(&[0, 1, 2, 3]) - 4f64.ln()).abs() < 1e-15);
    // counts {2, 1, 1}: −(½ ln ½ + 2·¼ ln ¼) = 1.5 ln 2.
    assert!((unigram_entropy(&[5, 9, 5, 3]) - 1.5 * std::f64::consts::LN_2).abs() < 1e-15);
    let t = toks(&[&[1, 1, 1, 1], &[0, 1, 2, 3]]);
    assert!((mean_unigram_entropy(&t) - 4f64.ln() / 2.0).abs() < 1e-15);
}
