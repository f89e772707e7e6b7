//! MAUVE against the real mauve-text 0.4.0 on committed features (tests/fixtures/mauve, made by
//! tools/reference/mauve_fixture.py): the same histograms give the same frontier and MAUVE
//! within 1e-6; end to end (our PCA and k-means) the mean over seeds 42..46 is within 0.02 and
//! keeps the same number of PCA components; p = q scores 1 and disjoint sets about 0.

use std::path::Path;

use imdm_engine::eval::mauve::{mauve_from_histograms, mean_mauve, MauveConfig};
use safetensors::SafeTensors;
use serde_json::Value;

fn fixture() -> (Vec<u8>, Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mauve");
    let bytes = std::fs::read(dir.join("features.safetensors")).unwrap();
    let doc =
        serde_json::from_str(&std::fs::read_to_string(dir.join("mauve.json")).unwrap()).unwrap();
    (bytes, doc)
}

fn rows(st: &SafeTensors, name: &str) -> Vec<Vec<f32>> {
    let t = st.tensor(name).unwrap();
    let d = t.shape()[1];
    let vals: Vec<f32> = t
        .data()
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    vals.chunks(d).map(<[f32]>::to_vec).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn frontier_and_mauve_from_mauve_texts_histograms() {
    let (_, doc) = fixture();
    let cfg = MauveConfig::default();
    let mut checked = 0;
    for (name, case) in doc["cases"].as_object().unwrap() {
        for run in case["runs"].as_array().unwrap() {
            let (p, q) = (floats(&run["p_hist"]), floats(&run["q_hist"]));
            let (m, curve) = mauve_from_histograms(&p, &q, &cfg).unwrap();
            let want = run["mauve"].as_f64().unwrap();
            assert!(
                (m - want).abs() < 1e-6,
                "{name} seed {}: {m} vs {want}",
                run["seed"]
            );
            let wc = run["divergence_curve"].as_array().unwrap();
            assert_eq!(curve.len(), wc.len());
            for (i, (got, w)) in curve.iter().zip(wc).enumerate() {
                let w = floats(w);
                assert!(
                    (got.0 - w[0]).abs() < 1e-6 && (got.1 - w[1]).abs() < 1e-6,
                    "{name} point {i}: {got:?} vs {w:?}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 20);
}

#[test]
fn end_to_end_mauve_matches_mauve_text_on_the_same_features() {
    let (bytes, doc) = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let seeds: Vec<u64> = doc["seeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    let mut got = std::collections::BTreeMap::new();
    for (name, case) in doc["cases"].as_object().unwrap() {
        let (p, q) = (
            rows(&st, &format!("{name}.p")),
            rows(&st, &format!("{name}.q")),
        );
        let (m, runs) = mean_mauve(&p, &q, &MauveConfig::default(), &seeds).unwrap();
        let want = case["mean_mauve"].as_f64().unwrap();
        eprintln!("{name}: ours {m:.4}, mauve-text {want:.4}");
        assert!((m - want).abs() < 0.02, "{name}: {m} vs mauve-text {want}");
        assert_eq!(
            runs[0].buckets as u64,
            case["num_buckets"].as_u64().unwrap()
        );
        assert_eq!(
            runs[0].pca_dims as u64,
            case["pca_dims"].as_u64().unwrap(),
            "{name}"
        );
        got.insert(name.clone(), m);
    }
    assert_eq!(got["identical"], 1.0);
    assert!(got["disjoint"] < 0.01, "{}", got["disjoint"]);
    assert!(got["same"] > 0.9 && got["skewed"] < got["same"] - 0.1);
}
