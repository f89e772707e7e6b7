//! `imdm-engine forward`: the parity and debugging entry point. Input: a safetensors file with
//! `tokens` (B, L) int64 and, for IMDM, optionally `eps` (B, L, noise_dim) f32 (drawn from the
//! reference's seeded hash with seed `--seed + b` for row b when absent). Masked positions are
//! those holding the mask id. A time-conditioned model (`time_conditioning` in its config) also
//! needs `sigma` (B) f64 or f32, each sequence's sigma(t). Output: `logits` (raw) and
//! `log_probs` (after SUBS), both (B, L, V) f32, plus the `tokens`, `eps` and `sigma` that were
//! used. Keep this format stable.

use clap::Args;
use std::collections::HashMap;
use std::path::PathBuf;

use crate::cli::{check_out, ConfigArgs, DeviceArgs};
use crate::cuda::{Backend, DeviceChoice};
use crate::diffusion::check_sigma;
use crate::error::{Error, Result};
use crate::model::{checkpoint, dit_ref, DitConfig};
use crate::rng::seeded_eps;
use crate::stio::{view_to_f32, view_to_f64, view_to_ids, write_atomic, OutTensor, StFile};
use crate::tensor::{Tensor, Tokens};

#[derive(Args, Debug)]
pub struct ForwardArgs {
    /// Model checkpoint (.safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Input safetensors: `tokens` (B, L) int64, optional `eps` (B, L, noise_dim) f32, and
    /// `sigma` (B) f64 for a time-conditioned model.
    #[arg(long)]
    pub input: PathBuf,
    /// Output safetensors: `logits`, `log_probs` (B, L, V) f32, `tokens`, `eps` and `sigma`;
    /// written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
    /// Seed of eps when the input has none (row b uses seed + b).
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Configuration to assume when the checkpoint carries none, or to check it against.
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// Errors about the input file speak of `--input`, not of a checkpoint.
fn as_input(e: Error) -> Error {
    match e {
        Error::Checkpoint { path, msg } => {
            Error::Config(format!("--input {}: {msg}", path.display()))
        }
        e => e,
    }
}

pub fn run(a: ForwardArgs) -> Result<()> {
    check_out(
        "--out",
        &a.out,
        a.force,
        &[("--checkpoint", &a.checkpoint), ("--input", &a.input)],
    )?;
    let chosen = a.config.resolve()?;
    let params = checkpoint::load(&a.checkpoint, chosen.as_ref())?;
    let c = &params.config;
    let (tokens, eps, sigma) = read_input(&a, c).map_err(as_input)?;
    let (batch, len) = (tokens.batch, tokens.len);
    crate::sizes::check(
        &format!(
            "--input tokens {batch}x{len} with V {}: logits and log-probs",
            c.vocab_size
        ),
        &[batch, len, c.vocab_size, 2],
        4,
    )?;

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
    let logits = dit_ref::forward(&params, &tokens, eps.as_ref(), sigma.as_deref())?;
    let log_probs = dit_ref::subs_log_probs(&logits, &tokens, c.mask_index);
    for (name, t) in [("logits", &logits), ("log_probs", &log_probs)] {
        // SUBS log-probs are -inf off the support; anything else non-finite is a fault.
        let bad =
            |x: &f32| x.is_nan() || *x == f32::INFINITY || (name == "logits" && x.is_infinite());
        if let Some(i) = t.data.iter().position(bad) {
            let (v, row) = (c.vocab_size, i / c.vocab_size);
            return Err(Error::Config(format!(
                "--checkpoint {}: the forward gives non-finite {name} (row {}, position {}, \
                 id {}: {}); {} not written",
                a.checkpoint.display(),
                row / len,
                row % len,
                i % v,
                t.data[i],
                a.out.display()
            )));
        }
    }
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
    if let Some(s) = &sigma {
        let shape = vec![s.len()];
        out.push(("sigma".to_string(), OutTensor::F64 { shape, data: s }));
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

/// The tokens, eps and sigma of `--input`, checked against the model `c`.
fn read_input(
    a: &ForwardArgs,
    c: &DitConfig,
) -> Result<(Tokens, Option<Tensor>, Option<Vec<f64>>)> {
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
    if len > c.length {
        return Err(Error::checkpoint(
            &a.input,
            format!(
                "tokens have length {len}, more than the model's length {}",
                c.length
            ),
        ));
    }
    let ids = view_to_ids(&a.input, "tokens", &tv)?;
    let tokens = Tokens::new(batch, len, ids, c.vocab_size)
        .map_err(|e| Error::checkpoint(&a.input, e.to_string()))?;
    let eps = if c.has_eps_mlp() {
        Some(match st.tensor("eps") {
            Ok(v) => {
                let e = view_to_f32(&a.input, "eps", &v)?;
                e.expect_shape("eps", &[batch, len, c.noise_dim])
                    .map_err(|err| Error::checkpoint(&a.input, err.to_string()))?;
                if let Some(i) = e.data.iter().position(|x| !x.is_finite()) {
                    return Err(Error::checkpoint(
                        &a.input,
                        format!("eps: element {i} is {}; eps must be finite", e.data[i]),
                    ));
                }
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
    let sigma = match st.tensor("sigma") {
        Ok(v) => {
            let (shape, s) = view_to_f64(&a.input, "sigma", &v)?;
            if shape != [batch] {
                return Err(Error::checkpoint(
                    &a.input,
                    format!("sigma: expected shape [{batch}] (one per sequence), got {shape:?}"),
                ));
            }
            Some(s)
        }
        Err(_) => None,
    };
    check_sigma(c, sigma.as_deref(), batch)
        .map_err(|e| Error::checkpoint(&a.input, e.to_string()))?;
    Ok((tokens, eps, sigma))
}
