//! `imdm-engine info`: configuration, parameter counts (total and by group) and dtypes.

use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::cli::ConfigArgs;
use crate::error::Result;
use crate::model::checkpoint;
use crate::stio::StFile;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Checkpoint (.safetensors).
    pub checkpoint: PathBuf,
    /// Print one JSON object (`params` is the total parameter count).
    #[arg(long)]
    pub json: bool,
    /// Configuration to assume when the file carries none (converted reference checkpoints
    /// always carry one), or to check the file against.
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub fn run(a: InfoArgs) -> Result<()> {
    let chosen = a.config.resolve()?;
    let params = checkpoint::load(&a.checkpoint, chosen.as_ref())?;
    let f = StFile::open(&a.checkpoint)?;
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for (_, v) in f.parse()?.tensors() {
        *dtypes.entry(format!("{:?}", v.dtype())).or_default() += 1;
    }
    let groups = params.count_by_group();
    if a.json {
        let obj = serde_json::json!({
            "path": a.checkpoint.display().to_string(),
            "config": params.config,
            "params": params.count(),
            "groups": groups.iter().cloned().collect::<BTreeMap<_, _>>(),
            "dtypes": dtypes,
        });
        println!("{obj}");
        return Ok(());
    }
    let c = &params.config;
    println!("checkpoint  {}", a.checkpoint.display());
    println!(
        "model       {} {:?}: D={} H={} (head dim {}) blocks={} cond={} mlp={}x",
        c.preset,
        c.algo,
        c.hidden,
        c.heads,
        c.head_dim(),
        c.blocks,
        c.cond_dim,
        c.mlp_ratio
    );
    println!(
        "vocabulary  V={} mask={}  length {}  softcap {}",
        c.vocab_size,
        c.mask_index,
        c.length,
        if c.softcap_on() {
            c.softcap.to_string()
        } else {
            "off".into()
        }
    );
    if c.has_eps_mlp() {
        println!(
            "noise       {:?} x {}, dim {}",
            c.noise_type, c.noise_scale, c.noise_dim
        );
    }
    println!("parameters  {}", params.count());
    for (g, n) in groups.iter().filter(|(_, n)| *n > 0) {
        println!("  {g:<24}{n:>14}");
    }
    let dt: Vec<String> = dtypes.iter().map(|(k, v)| format!("{k} x{v}")).collect();
    println!("dtypes      {}", dt.join(", "));
    Ok(())
}
