//! `imdm-engine init`: a randomly initialised model written as a checkpoint.

use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

use crate::cli::{check_out, ConfigArgs};
use crate::error::{Error, Result};
use crate::model::{checkpoint, init::init_params};

#[derive(Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Seed of the initialisation (ChaCha8; same seed, same weights).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output checkpoint (.safetensors), written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: InitArgs) -> Result<()> {
    let config = a
        .config
        .resolve()?
        .ok_or_else(|| Error::Config("init needs --preset".into()))?;
    check_out("--out", &a.out, a.force, &[])?;
    crate::sizes::check_model(&config, 2)?;
    let t = Instant::now();
    let params = init_params(&config, a.seed);
    checkpoint::save(&a.out, &params)?;
    println!(
        "wrote {} ({} {:?}, {} parameters) in {:.1}s",
        a.out.display(),
        config.preset,
        config.algo,
        params.count(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
