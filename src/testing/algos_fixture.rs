//! Reading `tests/fixtures/algos_ref.json`, the baselines' loss and sampler-step fixtures
//! written by `tools/reference/algos_ref.py` (torch float64).

use serde_json::Value;

/// One section ("ar", "sedd", "d3pm") of the fixture file.
pub fn section(name: &str) -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/algos_ref.json");
    let text = std::fs::read_to_string(path).expect("tests/fixtures/algos_ref.json is committed");
    let all: Value = serde_json::from_str(&text).expect("fixture JSON parses");
    all[name].clone()
}

pub fn f64s(v: &Value, key: &str) -> Vec<f64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("fixture key {key} is an array"))
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

pub fn u32s(v: &Value, key: &str) -> Vec<u32> {
    f64s(v, key).into_iter().map(|x| x as u32).collect()
}

pub fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("fixture key {key} is a number"))
}

pub fn int(v: &Value, key: &str) -> usize {
    num(v, key) as usize
}

/// `|got − want| <= 1e-6·|want|` (plus 1e-12 absolute for exact zeros), element by element.
pub fn assert_rel(name: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-6 * w.abs() + 1e-12,
            "{name}[{i}]: got {g}, fixture {w}"
        );
    }
}
