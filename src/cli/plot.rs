//! `imdm-engine plot`: training loss and validation NELBO against the step, from run
//! directories' `metrics.jsonl`, as a PNG.

use std::path::PathBuf;

use clap::Args;

use crate::cli::check_out_path;
use crate::error::{Error, Result};
use crate::train::curves::{plot_runs, CURVES_FILE};

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run directories (written by `train`); several are drawn on one plot.
    #[arg(required = true, num_args = 1..)]
    pub runs: Vec<PathBuf>,
    /// Output PNG [default: RUN/curves.png for one run; required for several].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Logarithmic y axis.
    #[arg(long)]
    pub log_y: bool,
}

pub fn run(a: PlotArgs) -> Result<()> {
    let out = match (&a.out, a.runs.as_slice()) {
        (Some(o), _) => o.clone(),
        (None, [one]) => one.join(CURVES_FILE),
        (None, _) => {
            return Err(Error::Config(
                "several runs: name the PNG with --out".into(),
            ))
        }
    };
    check_out_path("--out", &out)?;
    let n = plot_runs(&a.runs, &out, a.log_y)?;
    println!("wrote {} ({n} points)", out.display());
    Ok(())
}
