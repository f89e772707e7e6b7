//! Training curves of run directories as a PNG: the training loss (`kind: "train"` entries of
//! `metrics.jsonl`) and the validation NELBO (`kind: "val"`), both in nats per token, against
//! the optimizer step. Several runs share one plot (series named by run).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::plot::{line_plot_png, LinePlot, Scale, Series};
use crate::train::run::METRICS_FILE;

/// Name of the plot `train` writes into its run directory.
pub const CURVES_FILE: &str = "curves.png";

/// (x, y) points of one curve.
pub type Points = Vec<(f64, f64)>;

/// The (step, loss) and (step, val_nelbo) points of one run's `metrics.jsonl`.
pub fn read_curves(run: &Path) -> Result<(Points, Points)> {
    let path = run.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            Error::Config(format!("{} line {}: not JSON ({e})", path.display(), i + 1))
        })?;
        let step = v.get("step").and_then(|s| s.as_f64());
        let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
        match (v.get("kind").and_then(|k| k.as_str()), step) {
            (Some("train"), Some(s)) => train.extend(num("loss").map(|y| (s, y))),
            (Some("val"), Some(s)) => val.extend(num("val_nelbo").map(|y| (s, y))),
            _ => {}
        }
    }
    Ok((train, val))
}

/// Plots the runs in `runs` into `out` (see the module doc); `log_y` uses a log10 y axis.
/// Returns the number of points drawn. A single run's series are named "train loss" and
/// "validation NELBO"; with several runs, each name is prefixed by the run's folder name.
pub fn plot_runs(runs: &[PathBuf], out: &Path, log_y: bool) -> Result<usize> {
    let mut series = Vec::new();
    for run in runs {
        let (train, val) = read_curves(run)?;
        let prefix = if runs.len() > 1 {
            let name = run
                .file_name()
                .map_or_else(|| run.display().to_string(), |n| n.to_string_lossy().into());
            format!("{name}: ")
        } else {
            String::new()
        };
        series.push(Series {
            name: format!("{prefix}train loss"),
            points: train,
        });
        series.push(Series {
            name: format!("{prefix}validation NELBO"),
            points: val,
        });
    }
    let n = series.iter().map(|s| s.points.len()).sum();
    if n == 0 {
        return Err(Error::Config(format!(
            "no training or validation entries in the {METRICS_FILE} of {}",
            runs.iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    line_plot_png(
        out,
        &LinePlot {
            title: "training loss and validation NELBO",
            x_label: "optimizer step",
            y_label: "nats per token",
            x_scale: Scale::Linear,
            y_scale: if log_y { Scale::Log } else { Scale::Linear },
            series: &series,
        },
    )?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_train_and_val_entries_and_plots() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::write(
            run.join(METRICS_FILE),
            "{\"kind\":\"train\",\"step\":1,\"loss\":10.5}\n\
             {\"kind\":\"train\",\"step\":2,\"loss\":9.0}\n\
             {\"kind\":\"val\",\"step\":2,\"val_nelbo\":9.5,\"val_ppl\":13000}\n\n",
        )
        .unwrap();
        let (t, v) = read_curves(&run).unwrap();
        assert_eq!(t, [(1.0, 10.5), (2.0, 9.0)]);
        assert_eq!(v, [(2.0, 9.5)]);
        let out = dir.path().join("c.png");
        assert_eq!(
            plot_runs(&[run.clone(), run.clone()], &out, true).unwrap(),
            6
        );
        assert_eq!(&std::fs::read(&out).unwrap()[..4], b"\x89PNG");
        std::fs::write(run.join(METRICS_FILE), "").unwrap();
        let e = plot_runs(&[run], &out, false).unwrap_err().to_string();
        assert!(e.contains("no training or validation entries"), "{e}");
    }
}
