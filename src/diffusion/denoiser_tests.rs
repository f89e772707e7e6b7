//! Tests of the loss-batch contract both backends check.

use super::*;
use crate::model::Algo;

#[test]
fn loss_batches_are_checked_before_any_backend_computes() {
    let mut c = DitConfig::minimini();
    c.vocab_size = 7;
    c.mask_index = 6;
    c.algo = Algo::Mdlm;
    let xt = Tokens {
        batch: 1,
        len: 3,
        ids: vec![6, 2, 3],
    };
    let x0 = Tokens {
        batch: 1,
        len: 3,
        ids: vec![1, 2, 3],
    };
    let w = [1.0f32, 0.0, 0.0];
    let ok = LossBatch {
        xt: &xt,
        x0: &x0,
        eps: None,
        weight: &w,
        norm: 3.0,
        sigma: None,
    };
    assert_eq!(ok.check(&c).unwrap(), (1, 3));
    let bad_x0 = Tokens {
        ids: vec![1, 4, 3],
        ..x0.clone()
    };
    let e = LossBatch { x0: &bad_x0, ..ok }.check(&c).unwrap_err();
    assert!(e.to_string().contains("differs"), "{e}");
    let e = LossBatch { norm: 0.0, ..ok }.check(&c).unwrap_err();
    assert!(e.to_string().contains("norm"), "{e}");
    c.algo = Algo::Imdm;
    let e = ok.check(&c).unwrap_err();
    assert!(e.to_string().contains("eps"), "{e}");
}

#[test]
fn loss_batch_shapes_and_ids_are_checked() {
    let mut c = DitConfig::minimini();
    c.vocab_size = 7;
    c.mask_index = 6;
    c.algo = Algo::Mdlm;
    let xt = Tokens {
        batch: 1,
        len: 3,
        ids: vec![6, 9, 3],
    };
    let x0 = Tokens {
        batch: 1,
        len: 3,
        ids: vec![1, 9, 3],
    };
    let w = [1.0f32, 0.0, 0.0];
    let b = LossBatch {
        xt: &xt,
        x0: &x0,
        eps: None,
        weight: &w[..2],
        norm: 3.0,
        sigma: None,
    };
    let e = b.check(&c).unwrap_err();
    assert!(e.to_string().contains("weight: expected B·L = 3"), "{e}");
    let e = LossBatch { weight: &w, ..b }.check(&c).unwrap_err();
    assert!(e.to_string().contains("xt: id 9 at flat index 1"), "{e}");
}

#[test]
fn sigma_is_present_exactly_for_time_conditioned_models() {
    let mut c = DitConfig::minimini();
    (c.vocab_size, c.mask_index, c.algo) = (7, 6, Algo::Mdlm);
    let xt = Tokens {
        batch: 2,
        len: 2,
        ids: vec![6, 2, 6, 3],
    };
    let x0 = Tokens {
        ids: vec![1, 2, 4, 3],
        ..xt.clone()
    };
    let w = [1.0f32; 4];
    let s = [0.5, 2.0];
    let b = LossBatch {
        xt: &xt,
        x0: &x0,
        eps: None,
        weight: &w,
        norm: 4.0,
        sigma: None,
    };
    assert_eq!(b.check(&c).unwrap(), (2, 2));
    let with = LossBatch {
        sigma: Some(&s),
        ..b
    };
    let e = with.check(&c).unwrap_err().to_string();
    assert!(
        e.contains("sigma") && e.contains("time_conditioning"),
        "{e}"
    );
    c.time_conditioning = true;
    assert_eq!(with.check(&c).unwrap(), (2, 2));
    let e = b.check(&c).unwrap_err().to_string();
    assert!(e.contains("sigma") && e.contains("2 values"), "{e}");
    let e = LossBatch {
        sigma: Some(&s[..1]),
        ..b
    }
    .check(&c)
    .unwrap_err()
    .to_string();
    assert!(e.contains("expected B = 2 values, got 1"), "{e}");
    for bad in [-0.1, f64::NAN, f64::INFINITY] {
        let s = [0.5, bad];
        let e = LossBatch {
            sigma: Some(&s),
            ..b
        }
        .check(&c)
        .unwrap_err()
        .to_string();
        assert!(e.contains("sequence 1") && e.contains(">= 0"), "{bad}: {e}");
    }
}
