//! Tests of `tape`.

use super::*;

#[test]
fn expected_sequence_and_check() {
    let mut c = DitConfig::minimini();
    c.blocks = 2;
    let imdm = Tape::expected(&c, true, (0.1, 7, 100));
    let mdlm = Tape::expected(&c, false, (0.0, 0, 0));
    assert_eq!(imdm.len(), 3 + 1 + 2 * 9 + 2);
    assert_eq!(mdlm.len(), imdm.len() - 3);
    assert_eq!(imdm[3], Op::Embedding { eps: true });
    assert_eq!(mdlm[0], Op::Embedding { eps: false });
    // Dropout offsets follow the forward's rule: base + 2i (+1 for the MLP branch).
    let offsets: Vec<u64> = imdm
        .iter()
        .filter_map(|o| match o {
            Op::Residual(_, d) => Some(d.offset),
            _ => None,
        })
        .collect();
    assert_eq!(offsets, vec![100, 101, 102, 103]);
    assert_eq!(*imdm.last().unwrap(), Op::Linear(LinSite::Final));

    let mut t = Tape::new();
    for op in &imdm {
        t.push(*op);
    }
    t.check(&c, true, (0.1, 7, 100)).unwrap();
    let e = t.check(&c, true, (0.1, 7, 102)).unwrap_err().to_string();
    assert!(e.contains("op 8"), "{e}");
    t.clear();
    assert!(t.check(&c, false, (0.0, 0, 0)).is_err());
    for op in mdlm.iter().take(5) {
        t.push(*op);
    }
    let e = t.check(&c, false, (0.0, 0, 0)).unwrap_err().to_string();
    assert!(e.contains("op 5") && e.contains("5 ops recorded"), "{e}");
}
