//! CPU reference DiT forward throughput (the path the demo and tests use without a GPU).
//! `cargo bench --bench dit_ref`. Prints ms per forward and tokens/s, median of 5 after a warm-up.

use std::time::Instant;

use imdm_engine::model::init::random_params;
use imdm_engine::model::{dit_ref, DitConfig};
use imdm_engine::rng::seeded_eps;
use imdm_engine::tensor::Tokens;

fn main() {
    println!(
        "dit_ref forward on {} CPU thread(s)",
        rayon::current_num_threads()
    );
    for (config, batch) in [(DitConfig::minimini(), 64), (DitConfig::synthetic(), 16)] {
        let p = random_params(&config, 0);
        let (l, v) = (config.length, config.vocab_size);
        let ids = (0..batch * l)
            .map(|i| {
                if i % 2 == 0 {
                    config.mask_index as u32
                } else {
                    (i % v) as u32
                }
            })
            .collect();
        let tokens = Tokens::new(batch, l, ids, v).unwrap();
        let seeds: Vec<i64> = (0..batch as i64).collect();
        let eps = seeded_eps(&seeds, l, config.noise_dim, config.noise_type, 1.0);
        let _ = dit_ref::forward(&p, &tokens, Some(&eps), None).unwrap();
        let mut ms: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(dit_ref::forward(&p, &tokens, Some(&eps), None).unwrap());
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = ms[2];
        println!(
            "{:<10} B={batch:<3} L={l:<3} V={v}: {med:8.2} ms/forward, {:10.0} tok/s",
            config.preset,
            (batch * l) as f64 / (med / 1e3)
        );
    }
}
