//! Generative evaluation (spec 8.2-8.4, 5.9) with a deterministic test judge (a byte bigram LM,
//! `eval::toy`): special tokens kept through decoding, unconditional, duplicated and
//! conditional sampling on a tiny random DiT, `eval gen` end to end through its library entry
//! point (table, JSON, plots, --force), and the binary's argument errors. The tests marked
//! `ignore` need the tiny GGUF judge of tests/fixtures/judge/.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use imdm_engine::cli::eval::EvalCommand;
use imdm_engine::cli::eval_gen::{entropy_plot_path, run_with_judge, GenArgs};
use imdm_engine::cli::{Cli, Command as Sub};
use imdm_engine::cpu::CpuDenoiser;
use imdm_engine::data::{prepare, Conventions, PrepareOptions, SplitRule, Tokenizer};
use imdm_engine::data::{TokenizerKind, TxtMode};
use imdm_engine::diffusion::{generate, SamplerKind};
use imdm_engine::eval::gen::mauve_features;
use imdm_engine::eval::gen::{
    sample_conditional, sample_unconditional, score, text_rows, CondPlan, MauveReference,
    SamplePlan,
};
use imdm_engine::eval::gen_ppl::{GenPplAccumulator, GenPplConfig};
use imdm_engine::eval::lm::Judge;
use imdm_engine::eval::mauve::MauveConfig;
use imdm_engine::eval::toy::{BigramJudge, EOT_ID};
use imdm_engine::model::{checkpoint, init::random_params, DitConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// A tiny IMDM in the GPT-2 vocabulary (V = 50258, mask 50257).
fn tiny(length: usize) -> DitConfig {
    let mut c = DitConfig::tiny();
    c.hidden = 32;
    c.heads = 2;
    c.blocks = 1;
    c.cond_dim = 16;
    c.noise_dim = 16;
    c.vocab_size = 50258;
    c.mask_index = 50257;
    c.length = length;
    c.validate().unwrap();
    c
}

fn cpu_sampler(c: &DitConfig) -> CpuDenoiser {
    CpuDenoiser::new(random_params(c, 3)).unwrap()
}

fn plan(steps: usize, n: usize, batch: usize, duplicate: usize) -> SamplePlan {
    SamplePlan {
        steps,
        num_samples: n,
        batch,
        seed: 42,
        duplicate,
        kind: SamplerKind::ImdmPosterior,
    }
}

#[test]
fn special_tokens_stay_in_the_text_for_gpt2_and_bert() {
    let judge = BigramJudge::new(9, 256);
    let gpt2 = Tokenizer::gpt2().unwrap();
    // An OWT-style sample: BOS = EOS at 0, an EOS inside.
    let row = vec![50256, 15496, 995, 50256, 15496];
    let t = text_rows(&gpt2, &[row], None, 8).unwrap();
    assert_eq!(t.texts[0], "<|endoftext|>Hello world<|endoftext|>Hello");
    let ids = judge.encode(&t.texts[0]).unwrap();
    assert_eq!((ids[0], ids[12]), (EOT_ID, EOT_ID));
    // Only the EOS at 0 is the first one: the inner EOS is not scored, its successors are.
    let mut acc = GenPplAccumulator::default();
    acc.record(&judge, &t.texts, &GenPplConfig::reference(64))
        .unwrap();
    assert_eq!(acc.tokens as usize, ids.len() - 2);
    let bert = Tokenizer::bert().unwrap();
    let t = text_rows(&bert, &[vec![101, 7592, 2088, 999, 102]], None, 8).unwrap();
    assert_eq!(t.texts[0], "[CLS] hello world! [SEP]");
    assert_eq!(t.ids[0].len(), 5);
}

#[test]
fn unconditional_samples_are_reproducible_and_scored() {
    let c = tiny(16);
    let judge = BigramJudge::new(1, 512);
    let tok = Tokenizer::gpt2().unwrap();
    let mut den = cpu_sampler(&c);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut draw = |n: usize, steps: usize| {
        let mut f = |cfg: &_, x: &_, s: &[i64]| generate(&mut den, cfg, x, None, Some(s), &mut rng);
        sample_unconditional(&mut f, &c, &tok, &plan(steps, n, 4, 1), &mut |_, _| {}).unwrap()
    };
    let a = draw(10, 4);
    assert_eq!(a.texts.len(), 10);
    assert_eq!(a.calls, vec![0..4, 4..8, 8..10]);
    assert!(a
        .ids
        .iter()
        .all(|r| r.len() == 16 && r.iter().all(|&t| t < 50257)));
    let nfe = a.nfe.unwrap();
    assert!(nfe > 0.0 && nfe <= 4.0, "{nfe}");
    assert!(a.noise_ids.is_none());
    let b = draw(10, 4);
    assert_eq!(a.ids, b.ids);
    assert_ne!(a.ids, draw(10, 2).ids);
    let row = score(&judge, &a, &GenPplConfig::reference(16), None).unwrap();
    assert!(
        row.gen_ppl.is_finite() && row.gen_ppl > 1.0,
        "{}",
        row.gen_ppl
    );
    // Calls of 4, 4, 2 with judge batches of 8 -> min(8, n) = n: nothing dropped.
    assert_eq!(row.scored, 10);
    assert!(row.entropy > 0.0 && row.entropy <= 16f64.ln() + 1e-12);
}

#[test]
fn duplicated_sampling_tiles_seeds_and_measures_tc() {
    let c = tiny(8);
    let judge = BigramJudge::new(1, 512);
    let tok = Tokenizer::gpt2().unwrap();
    let mut den = cpu_sampler(&c);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut f = |cfg: &_, x: &_, s: &[i64]| generate(&mut den, cfg, x, None, Some(s), &mut rng);
    let t = sample_unconditional(&mut f, &c, &tok, &plan(2, 8, 4, 2), &mut |_, _| {}).unwrap();
    assert_eq!(
        t.noise_ids.as_deref(),
        Some(&[42, 43, 42, 43, 44, 45, 44, 45][..])
    );
    let row = score(&judge, &t, &GenPplConfig::reference(8), None).unwrap();
    let tc = row.tc.unwrap();
    // Two samples per group: TC in [0, L - 1] bits, and the duplicates are not all equal.
    assert!((0.0..=7.0).contains(&tc), "{tc}");
    assert!(t.ids[0] != t.ids[2] || t.ids[1] != t.ids[3]);
    assert!(plan(2, 8, 4, 3).validate().is_err());
}

#[test]
fn conditional_generation_keeps_prefixes_and_scores_mauve() {
    let c = tiny(16);
    let judge = BigramJudge::new(4, 512);
    let tok = Tokenizer::gpt2().unwrap();
    let prefixes: Vec<Vec<u32>> = (0..12u32)
        .map(|i| (0..16u32).map(|j| 100 + 37 * i + 3 * j).collect())
        .collect();
    let cond = CondPlan {
        prefixes: prefixes.clone(),
        prefix_len: 4,
        continuations: 2,
        keep: 8,
    };
    let mut den = cpu_sampler(&c);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut f = |cfg: &_, x: &_, s: &[i64]| generate(&mut den, cfg, x, None, Some(s), &mut rng);
    let t =
        sample_conditional(&mut f, &c, &tok, &plan(4, 12, 4, 1), &cond, &mut |_, _| {}).unwrap();
    assert_eq!(t.texts.len(), 24);
    // Calls of 4 prefixes x 2 continuations, prefixes repeated in blocks.
    assert_eq!(t.calls, vec![0..8, 8..16, 16..24]);
    for (r, ids) in t.ids.iter().enumerate() {
        let p = &prefixes[(r / 8) * 4 + r % 4];
        assert_eq!(ids.len(), 8);
        assert_eq!(&ids[..4], &p[..4], "row {r}");
    }
    let refs = text_rows(&tok, &prefixes, Some(8), 4).unwrap();
    let reference = MauveReference {
        features: mauve_features(&judge, &refs.texts, 100).unwrap(),
        max_text_length: 100,
        config: MauveConfig::default(),
        seeds: vec![42, 43],
    };
    let row = score(&judge, &t, &GenPplConfig::reference(16), Some(&reference)).unwrap();
    let m = row.mauve.unwrap();
    assert!((0.0..=1.0).contains(&m), "{m}");
    // The references against themselves: exactly 1.
    let same = score(
        &judge,
        &refs,
        &GenPplConfig::reference(16),
        Some(&reference),
    )
    .unwrap();
    assert_eq!(same.mauve, Some(1.0));
    let bad = CondPlan { keep: 4, ..cond };
    assert!(bad.validate(&c).is_err());
}

// ---- `eval gen` through its library entry point and the binary ----

fn prepare_text(out: &Path) {
    prepare(&PrepareOptions {
        inputs: vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text")],
        out: out.to_path_buf(),
        tokenizer: TokenizerKind::Gpt2,
        conventions: Conventions::Reference,
        length: 32,
        split: SplitRule {
            frac: 0.0,
            prefixes: vec!["austen/persuasion/".into()],
        },
        insert_eos: true,
        txt_mode: TxtMode::File,
        text_field: "text".into(),
        shard_mib: 256,
        force: true,
        progress: false,
    })
    .unwrap();
}

fn gen_args(args: &[&str]) -> GenArgs {
    let mut all = vec!["imdm-engine", "eval", "gen", "--judge", "test-bigram"];
    all.extend_from_slice(args);
    match Cli::try_parse_from(all).unwrap().command {
        Sub::Eval(e) => match e.command {
            EvalCommand::Gen(g) => g,
            _ => unreachable!(),
        },
        _ => unreachable!(),
    }
}

struct Setup {
    dir: tempfile::TempDir,
    data: String,
    model: String,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    prepare_text(&data);
    let model = dir.path().join("m.safetensors");
    checkpoint::save(&model, &random_params(&tiny(32), 5)).unwrap();
    Setup {
        data: data.display().to_string(),
        model: model.display().to_string(),
        dir,
    }
}

impl Setup {
    fn path(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }
}

#[test]
fn eval_gen_writes_table_json_and_plots_and_refuses_to_overwrite() {
    let s = setup();
    let judge = BigramJudge::new(2, 512);
    let (json, plot) = (s.path("gen.json"), s.path("gen.png"));
    let (j, p) = (json.display().to_string(), plot.display().to_string());
    let shards = format!("shards:{}", s.data);
    let args = [
        "--checkpoint",
        &s.model,
        "--steps",
        "2,4",
        "--num-samples",
        "6",
        "--batch",
        "3",
        "--text",
        &shards,
        "--json",
        &j,
        "--plot",
        &p,
        "--device",
        "cpu",
    ];
    let report = run_with_judge(&gen_args(&args), &judge).unwrap();
    // The data row first, then one row per step count.
    let sources: Vec<&str> = report.rows.iter().map(|r| r.source.as_str()).collect();
    assert_eq!(sources, ["text", "checkpoint", "checkpoint"]);
    assert_eq!(report.rows[1].steps, Some(2));
    assert_eq!(report.rows[0].samples, 6);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for row in v["rows"].as_array().unwrap() {
        for f in ["gen_ppl", "entropy", "nfe", "tc", "mauve"] {
            assert!(row.get(f).is_some(), "field {f} missing: {row}");
        }
        assert!(row["gen_ppl"].as_f64().unwrap() > 1.0);
    }
    for png in [plot.clone(), entropy_plot_path(&plot)] {
        assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    }
    // The same outputs again: refused before any work, without --force.
    let e = run_with_judge(&gen_args(&args), &judge)
        .unwrap_err()
        .to_string();
    assert!(e.contains("exists; pass --force"), "{e}");
    let mut forced = args.to_vec();
    forced.push("--force");
    run_with_judge(&gen_args(&forced), &judge).unwrap();
    // `sample` with the same seed and batch writes the same samples: scoring its file gives
    // the 4-step row exactly.
    let file = s.path("s4.jsonl").display().to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_imdm-engine"))
        .args([
            "sample",
            "--checkpoint",
            &s.model,
            "--steps",
            "4",
            "--num-samples",
            "6",
        ])
        .args([
            "--batch", "3", "--seed", "42", "--device", "cpu", "--out", &file,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = gen_args(&["--samples", &file, "--decode", "gpt2", "--batch", "3"]);
    let from_file = &run_with_judge(&a, &judge).unwrap().rows[0];
    let sampled = &report.rows[2];
    assert_eq!(sampled.steps, Some(4));
    assert_eq!(from_file.gen_ppl, sampled.gen_ppl);
    assert_eq!(from_file.entropy, sampled.entropy);
    assert_eq!(from_file.nfe, sampled.nfe);
}

#[test]
fn eval_gen_conditional_with_mauve_and_a_sample_file() {
    let s = setup();
    let judge = BigramJudge::new(2, 512);
    let args = [
        "--checkpoint",
        &s.model,
        "--steps",
        "4",
        "--num-samples",
        "6",
        "--batch",
        "2",
        "--text",
        &s.data,
        "--prefix-len",
        "8",
        "--keep",
        "16",
        "--continuations",
        "2",
        "--device",
        "cpu",
    ];
    let report = run_with_judge(&gen_args(&args), &judge).unwrap();
    assert_eq!(report.rows.len(), 2);
    assert_eq!(report.rows[1].samples, 12);
    assert!(report.rows[1].mauve.is_some());
    assert!(report.mauve_features.as_deref().unwrap().contains("bigram"));
    // A `sample`-style file with repeated seeds: scored, with TC.
    let file = s.path("s.jsonl");
    let lines: String = (0..4)
        .map(|k| {
            format!(
                "{{\"id\":{k},\"tokens\":[{},{},50256,{}],\"nfe\":3,\"seed\":{}}}\n",
                100 + k,
                200 + k % 2,
                300,
                k / 2
            )
        })
        .collect();
    std::fs::write(&file, lines).unwrap();
    let f = file.display().to_string();
    let r = run_with_judge(&gen_args(&["--samples", &f, "--decode", "gpt2"]), &judge).unwrap();
    let row = &r.rows[0];
    assert_eq!(
        (row.source.as_str(), row.samples, row.nfe),
        ("samples", 4, Some(3.0))
    );
    assert!(row.tc.is_some());
    let e = run_with_judge(&gen_args(&["--samples", &f]), &judge).unwrap_err();
    assert!(e.to_string().contains("pass --decode"), "{e}");
}

fn bin_fails(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_imdm-engine"))
        .args(["eval", "gen"])
        .args(args)
        .output()
        .unwrap();
    assert!(!o.status.success(), "{args:?} should fail");
    String::from_utf8(o.stderr).unwrap()
}

#[test]
fn eval_gen_argument_errors_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("out.json");
    std::fs::write(&existing, "{}").unwrap();
    let ex = existing.display().to_string();
    for (args, want) in [
        (vec!["--judge", "j"], "needs something to score"),
        (
            vec!["--judge", "j", "--checkpoint", "m", "--prefix-len", "50"],
            "--prefix-len needs --text",
        ),
        (
            vec!["--judge", "j", "--text", "d", "--plot", "x.txt"],
            "expected a .png",
        ),
        (
            vec!["--judge", "j", "--text", "d", "--json", &ex],
            "exists; pass --force",
        ),
        (
            vec![
                "--judge",
                "j",
                "--text",
                "d",
                "--duplicate",
                "3",
                "--batch",
                "4",
            ],
            "--duplicate 3 must divide",
        ),
        (
            vec!["--judge", "j", "--text", "d", "--steps", "1,0"],
            "--steps",
        ),
        (
            vec!["--judge", "/nonexistent/judge.gguf", "--text", "d"],
            "--judge /nonexistent/judge.gguf",
        ),
    ] {
        let e = bin_fails(&args);
        assert!(e.contains(want), "{args:?}: {e}");
    }
    assert!(!dir.path().join("out.json.tmp").exists());
}

/// The tiny random llama GGUF that the judge's parity tests commit.
const GGUF_JUDGE: &str = "tests/fixtures/judge/tiny-llama.gguf";

#[test]
fn eval_gen_runs_with_the_tiny_gguf_judge() {
    let s = setup();
    let judge = Path::new(env!("CARGO_MANIFEST_DIR")).join(GGUF_JUDGE);
    let json = s.path("g.json").display().to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_imdm-engine"))
        .args([
            "eval",
            "gen",
            "--judge",
            judge.to_str().unwrap(),
            "--checkpoint",
            &s.model,
        ])
        .args([
            "--steps",
            "8,32,128",
            "--num-samples",
            "8",
            "--batch",
            "8",
            "--device",
            "cpu",
        ])
        .args(["--text", &s.data, "--json", &json])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r["gen_ppl"].as_f64().unwrap() > 1.0));
}
