//! `imdm-engine forward`: the parity and debugging entry point. Input: a safetensors file with
//! `tokens` (B, L) int64 and, for IMDM, optionally `eps` (B, L, noise_dim) f32 (drawn from the
//! reference's seeded hash with seed `--seed + b` for row b when absent). Masked positions are
//! those holding the mask id. Output: `logits` (raw) and `log_probs` (after SUBS), both
//! (B, L, V) f32, plus the `tokens` and the `eps` that were used. Keep this format stable.

use clap::Args;
use std::collections::HashMap;
use std::path::PathBuf;

use crate::cli::{check_out_path, ConfigArgs, DeviceArgs};
use crate::cuda::{Backend, DeviceChoice};
use crate::error::{Error, Result};
use crate::model::{checkpoint, dit_ref};
use crate::rng::seeded_eps;
use crate::stio::{view_to_f32, view_to_ids, write_atomic, OutTensor, StFile};
use crate::tensor::Tokens;

#[derive(Args, Debug)]
pub struct ForwardArgs {
    /// Model checkpoint (.safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Input safetensors: `tokens` (B, L) int64, optional `eps` (B, L, noise_dim) f32.
    #[arg(long)]
    pub input: PathBuf,
    /// Output safetensors: `logits`, `log_probs` (B, L, V) f32, `tokens` and `eps`; written
    /// atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of eps when the input has none (row b uses seed + b).
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Configuration to assume when the checkpoint carries none, or to check it against.
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub fn run(a: ForwardArgs) -> Result<()> {
    check_out_path("--out", &a.out)?;
    let chosen = a.config.resolve()?;
    let params = checkpoint::load(&a.checkpoint, chosen.as_ref())?;
    let c = &params.config;

    let f = StFile::open(&a.input)?;
    let st = f.parse()?;
    let tv = st.tensor("tokens").map_err(|_| {
        Error::checkpoint(
            &a.input,
            "has no tensor `tokens` (expected (B, L) int64 token ids)",
        )
    })?;
    let &[batch, len] = tv.shape() else {
        return Err(Error::checkpoint(
            &a.input,
            format!("tokens: expected shape (B, L), got {:?}", tv.shape()),
        ));
    };
    let ids = view_to_ids(&a.input, "tokens", &tv)?;
    let tokens = Tokens::new(batch, len, ids, c.vocab_size)
        .map_err(|e| Error::checkpoint(&a.input, e.to_string()))?;
    let eps = if c.has_eps_mlp() {
        Some(match st.tensor("eps") {
            Ok(v) => {
                let e = view_to_f32(&a.input, "eps", &v)?;
                e.expect_shape("eps", &[batch, len, c.noise_dim])
                    .map_err(|err| Error::checkpoint(&a.input, err.to_string()))?;
                e
            }
            Err(_) => {
                let seeds: Vec<i64> = (0..batch as i64).map(|b| a.seed + b).collect();
                seeded_eps(&seeds, len, c.noise_dim, c.noise_type, c.noise_scale as f32)
            }
        })
    } else {
        None
    };

    match Backend::resolve(a.device.device)? {
        Backend::Cuda(_) if a.device.device == DeviceChoice::Cuda => {
            return Err(Error::Config(
                "--device cuda: the GPU DiT forward is not implemented yet; use --device cpu"
                    .into(),
            ))
        }
        Backend::Cuda(_) => {
            eprintln!("note: the GPU DiT forward is not implemented yet; using the CPU reference")
        }
        Backend::Cpu => {}
    }
    let logits = dit_ref::forward(&params, &tokens, eps.as_ref())?;
    let log_probs = dit_ref::subs_log_probs(&logits, &tokens, c.mask_index);
    let ids: Vec<i64> = tokens.ids.iter().map(|&t| t as i64).collect();
    let mut out = vec![
        (
            "tokens".to_string(),
            OutTensor::I64 {
                shape: vec![batch, len],
                data: &ids,
            },
        ),
        ("logits".to_string(), OutTensor::F32(&logits)),
        ("log_probs".to_string(), OutTensor::F32(&log_probs)),
    ];
    if let Some(e) = &eps {
        out.push(("eps".to_string(), OutTensor::F32(e)));
    }
    let meta = HashMap::from([
        ("format".to_string(), checkpoint::FORMAT.to_string()),
        ("checkpoint".to_string(), a.checkpoint.display().to_string()),
        ("device".to_string(), "cpu".to_string()),
    ]);
    write_atomic(&a.out, &out, meta)?;
    println!(
        "wrote {} (logits and log_probs {batch}x{len}x{})",
        a.out.display(),
        c.vocab_size
    );
    Ok(())
}
