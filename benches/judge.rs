//! Judge throughput and perplexity on real prose, for the speed note (no assertions).
//!
//! `cargo bench --bench judge [-- NAME|FILE.gguf]` (default `smollm2`; fetch it with
//! `scripts/fetch-judge.sh smollm2`). Prints, for the judge:
//! - PPL on the first 400 judge tokens of the committed held-out prose (Moby-Dick chapter 1,
//!   the 1790 State of the Union, Austen) and of the first Wikipedia leads of
//!   `data/corpus/wiki.jsonl` when `scripts/fetch-corpus.sh --only wiki` has run;
//! - tokens/s of `token_log_probs` on a batch of 8 × 1024 seeded random ids, and the wall time
//!   this implies for a 1024-sample Gen PPL at L = 1024 (spec 8.2: 1024 × 1024 tokens).

use std::path::Path;
use std::time::Instant;

use imdm_engine::eval::judge;
use imdm_engine::eval::lm::Judge;
use rand::{Rng, SeedableRng};

fn ppl(j: &dyn Judge, text: &str) -> (f64, usize) {
    let mut ids = j.encode(text).unwrap();
    ids.truncate(401);
    let lp = j.token_log_probs(&[ids]).unwrap().remove(0);
    let nll = -lp.iter().map(|&v| v as f64).sum::<f64>() / lp.len() as f64;
    (nll.exp(), lp.len())
}

fn main() {
    let spec = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| "smollm2".into());
    let j = match judge::open(&spec) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return;
        }
    };
    println!("judge: {}", j.describe());
    println!("threads: rayon {}", rayon::current_num_threads());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut texts: Vec<(String, String)> = vec![(
        "moby-dick ch. 1".into(),
        std::fs::read_to_string(root.join("tests/fixtures/text/moby-dick-loomings.txt")).unwrap(),
    )];
    let jsonl =
        std::fs::read_to_string(root.join("tests/fixtures/text/sotu-austen.jsonl")).unwrap();
    for line in jsonl.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let text = v["text"].as_str().unwrap_or("");
        if text.len() > 1500 {
            texts.push((
                v["id"].as_str().unwrap_or("?").to_string(),
                text.to_string(),
            ));
        }
    }
    if let Ok(wiki) = std::fs::read_to_string(root.join("data/corpus/wiki.jsonl")) {
        let leads: Vec<String> = wiki
            .lines()
            .take(20)
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["text"].as_str().map(str::to_string))
            .collect();
        texts.push(("wiki leads 1..20".into(), leads.join("\n\n")));
    }
    for (name, text) in &texts {
        let words: Vec<&str> = text.split_whitespace().collect();
        let (p, n) = ppl(j.as_ref(), &words.join(" "));
        let mut shuffled = words.clone();
        use rand::seq::SliceRandom;
        shuffled.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(0));
        let (ps, _) = ppl(j.as_ref(), &shuffled.join(" "));
        println!(
            "PPL {name}: {p:.2} over {n} tokens; word-shuffled {ps:.2} ({:.1}x)",
            ps / p
        );
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    // Ids below 32,000 exist in every judge vocabulary here.
    let vocab = 32_000u32;
    let batch: Vec<Vec<u32>> = (0..8)
        .map(|_| (0..1024).map(|_| rng.random_range(0..vocab)).collect())
        .collect();
    let t0 = Instant::now();
    let lp = j.token_log_probs(&batch).unwrap();
    let dt = t0.elapsed().as_secs_f64();
    assert_eq!(lp.len(), 8);
    let tps = 8.0 * 1024.0 / dt;
    println!(
        "throughput: 8 x 1024 tokens in {dt:.1} s = {tps:.0} tokens/s; a 1024-sample Gen PPL at L = 1024 \
         (1,048,576 tokens) would take {:.1} min",
        1024.0 * 1024.0 / tps / 60.0
    );
}
