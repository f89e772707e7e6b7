//! Tests of `param_tree`.

use super::*;
use crate::model::{Algo, DitConfig};

/// `from_params` visits `named()` in order with its names and tensors; `items`,
/// `items_mut` and `map` all walk that same order, for IMDM, MDLM and the AR baseline.
#[test]
fn walks_follow_named_order() {
    for (algo, causal) in [(Algo::Imdm, false), (Algo::Mdlm, false), (Algo::Mdlm, true)] {
        let mut c = DitConfig::minimini();
        c.algo = algo;
        c.causal = causal;
        c.blocks = 3;
        let p = DitParams::zeros(&c);
        let named = p.named();
        let mut k = 0usize;
        let tree = ParamTree::from_params(&p, |name, t| {
            assert_eq!(name, named[k].0, "name {k}");
            assert!(std::ptr::eq(t, named[k].1), "tensor {k} ({name})");
            k += 1;
            Ok::<usize, ()>(k - 1)
        })
        .unwrap();
        assert_eq!(k, named.len());
        let order: Vec<usize> = tree.items().into_iter().copied().collect();
        assert_eq!(order, (0..k).collect::<Vec<_>>());
        let mut t2 = tree.map(|&i| 10 * i);
        assert_eq!(
            t2.items().into_iter().copied().collect::<Vec<_>>(),
            (0..k).map(|i| 10 * i).collect::<Vec<_>>()
        );
        for (j, x) in t2.items_mut().into_iter().enumerate() {
            assert_eq!(*x, 10 * j);
            *x = j;
        }
        assert_eq!(t2, tree);
        if causal {
            assert!(tree.sigma_map.is_none() && tree.blocks[0].adaln.is_none());
        }
    }
}
