//! `imdm-engine sample` end to end on the CPU: the JSONL shape, reproducibility, prefix and
//! infill positions, every sampler option, and errors that name the bad flag.

mod common;

use common::cli::{fails, ok};

use std::path::{Path, PathBuf};

/// minimini: V = 50001, mask 50000, IMDM.
const V: u64 = 50001;
const MASK: u64 = 50000;

struct Fixture {
    dir: tempfile::TempDir,
    model: PathBuf,
}

impl Fixture {
    fn new(algo: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.safetensors");
        ok(&[
            "init",
            "--preset",
            "minimini",
            "--algo",
            algo,
            "--length",
            "10",
            "--out",
            model.to_str().unwrap(),
        ]);
        Fixture { dir, model }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `sample` with the common flags (8 steps, 5 samples in batches of 2, L = 10, CPU) and
    /// `extra`; returns the output path.
    fn sample(&self, out: &str, extra: &[&str]) -> PathBuf {
        let out = self.path(out);
        let args = merged(self.args(&out), extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let stdout = ok(&args);
        assert!(stdout.contains("wrote"), "{stdout}");
        out
    }

    fn args(&self, out: &Path) -> Vec<String> {
        [
            "sample",
            "--checkpoint",
            self.model.to_str().unwrap(),
            "--steps",
            "8",
            "--num-samples",
            "5",
            "--batch",
            "2",
            "--seed",
            "3",
            "--length",
            "10",
            "--device",
            "cpu",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// `base` with the flags of `extra`: a flag already in `base` gets the new value, others are
/// appended (value-less flags such as `--fix-eps` included).
fn merged(mut base: Vec<String>, extra: &[&str]) -> Vec<String> {
    let mut i = 0;
    while i < extra.len() {
        let has_value = extra.get(i + 1).is_some_and(|v| !v.starts_with("--"));
        match base.iter().position(|s| s == extra[i]) {
            Some(j) if has_value => base[j + 1] = extra[i + 1].to_string(),
            _ if has_value => base.extend([extra[i].to_string(), extra[i + 1].to_string()]),
            _ => base.push(extra[i].to_string()),
        }
        i += 1 + has_value as usize;
    }
    base
}

/// Parses the JSONL and checks its shape: ids 0..n in order, L tokens each, no mask left,
/// nfe in 1..=steps, seed = --seed + id. Returns the token rows.
fn read(path: &Path, n: usize, len: usize, steps: u64) -> Vec<Vec<u64>> {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), n, "{text}");
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let obj = v.as_object().unwrap();
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            assert_eq!(keys.len(), 4, "{line}");
            for k in ["id", "tokens", "nfe", "seed"] {
                assert!(obj.contains_key(k), "{line} lacks {k}");
            }
            assert_eq!(v["id"].as_u64(), Some(i as u64));
            assert_eq!(v["seed"].as_u64(), Some(3 + i as u64));
            let nfe = v["nfe"].as_u64().unwrap();
            assert!((1..=steps).contains(&nfe), "nfe {nfe}");
            let toks: Vec<u64> = v["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap())
                .collect();
            assert_eq!(toks.len(), len);
            assert!(toks.iter().all(|&t| t < V && t != MASK), "{toks:?}");
            toks
        })
        .collect()
}

#[test]
fn jsonl_shape_and_reproducibility() {
    let f = Fixture::new("imdm");
    let a = f.sample("a.jsonl", &[]);
    let rows = read(&a, 5, 10, 8);
    // Same flags, same file; another seed, other samples; no temporary file left behind.
    let b = f.sample("b.jsonl", &[]);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let args = merged(f.args(&f.path("c.jsonl")), &["--seed", "4"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&args);
    let text = std::fs::read_to_string(f.path("c.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_ne!(first["tokens"].as_array().unwrap().len(), 0);
    let other: Vec<u64> = first["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_ne!(other, rows[0], "seed 4 repeats seed 3");
    // Distinct samples within a run.
    assert_ne!(rows[0], rows[1]);
    let names: Vec<String> = std::fs::read_dir(f.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn prefix_and_template_positions_are_kept() {
    let f = Fixture::new("imdm");
    let out = f.sample("p.jsonl", &["--prefix", "10 20,30"]);
    for row in read(&out, 5, 10, 8) {
        assert_eq!(&row[..3], &[10, 20, 30]);
    }
    let t = f.path("t.json");
    std::fs::write(
        &t,
        "[[1, null, 3, null, null, null, null, null, null, 9],\n \
          [null, null, null, null, 42, 43, null, null, null, null]]",
    )
    .unwrap();
    let out = f.sample("t.jsonl", &["--template", t.to_str().unwrap()]);
    for (k, row) in read(&out, 5, 10, 8).iter().enumerate() {
        if k % 2 == 0 {
            assert_eq!((row[0], row[2], row[9]), (1, 3, 9), "sample {k}");
        } else {
            assert_eq!((row[4], row[5]), (42, 43), "sample {k}");
        }
    }
}

#[test]
fn every_sampler_option_runs() {
    for algo in ["imdm", "mdlm"] {
        let f = Fixture::new(algo);
        for (i, extra) in [
            &["--sampler", "mdlm"][..],
            &["--sampler", "imdm", "--fix-eps"],
            &["--noise-removal", "greedy"],
            &["--temperature", "0.7"],
            &["--nucleus", "0.9"],
            &["--device", "auto"],
        ]
        .iter()
        .enumerate()
        {
            let out = f.sample(&format!("o{i}.jsonl"), extra);
            read(&out, 5, 10, 8);
        }
    }
}

#[test]
fn bad_flags_are_named() {
    let f = Fixture::new("imdm");
    let out = f.path("x.jsonl");
    let base = f.args(&out);
    let with = |flag: &str, value: &str| -> String {
        let args = merged(base.clone(), &[flag, value]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(&args)
    };
    for (flag, value, want) in [
        ("--steps", "0", "--steps"),
        ("--batch", "0", "--batch"),
        ("--temperature", "0", "--temperature"),
        ("--nucleus", "1.5", "--nucleus"),
        ("--prefix", "1 50000", "mask token"),
        ("--prefix", "1 99999", "outside the vocabulary"),
        (
            "--prefix",
            "1 2 3 4 5 6 7 8 9 10 11",
            "more than the sequence length",
        ),
        ("--sampler", "ddim", "ddim"),
        (
            "--checkpoint",
            "/no/such/model.safetensors",
            "/no/such/model.safetensors",
        ),
        ("--out", "/no/such/dir/x.jsonl", "/no/such/dir"),
        ("--template", "/no/such/t.json", "/no/such/t.json"),
    ] {
        let e = with(flag, value);
        assert!(e.contains(want), "{flag} {value}: {e}");
    }
    let t = f.path("bad.json");
    std::fs::write(&t, "[[1, 2]]").unwrap();
    let e = with("--template", t.to_str().unwrap());
    assert!(e.contains("row 0 has 2 entries"), "{e}");
    std::fs::write(&t, "not json").unwrap();
    let e = with("--template", t.to_str().unwrap());
    assert!(e.contains("JSON"), "{e}");
    // --prefix and --template together.
    let mut args = base.clone();
    args.extend(["--prefix", "1", "--template", t.to_str().unwrap()].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let e = fails(&args);
    assert!(e.contains("--prefix") && e.contains("--template"), "{e}");
    assert!(!out.exists(), "a failed run wrote {}", out.display());
}
