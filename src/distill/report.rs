//! The synthetic experiment's outputs: `synthetic.json` in the shape, the
//! exact-match plot and the table the demo prints.

use std::path::Path;

use crate::distill::redi::StepMetrics;
use crate::distill::synthetic::SyntheticReport;
use crate::error::{Error, Result};
use crate::plot::{line_plot_png, LinePlot, Scale, Series};

/// `synthetic.json` in the shape plus `exact_match.png`.
pub fn write_outputs(report: &SyntheticReport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut json = serde_json::Map::new();
    for (model, row) in &report.results {
        json.insert(
            model.clone(),
            serde_json::to_value(row).expect("plain data"),
        );
    }
    let c = &report.config;
    json.insert(
        "config".into(),
        serde_json::json!({"vocab": c.vocab, "length": c.length, "rounds": c.rounds,
                           "coupling": c.coupling,
                           "experiment": c, "seconds": report.seconds,
                           "final_loss": report.final_loss}),
    );
    json.insert(
        "greedy_1step".into(),
        serde_json::to_value(&report.greedy_1step).expect("plain data"),
    );
    let path = dir.join("synthetic.json");
    let text = serde_json::to_string_pretty(&json).expect("plain data");
    crate::outputs::write_bytes(&path, text.as_bytes())?;
    // Exact-match is plotted on a log axis; a zero rate is drawn at 1/(2·samples), the
    // resolution of the estimate, so MDM's floor stays visible.
    // Baselines, the first round and every few rounds up to the last: all rounds would crowd
    // the legend.
    let k = c.rounds;
    let shown: Vec<String> = model_order(report)
        .into_iter()
        .filter(|m| match m.strip_prefix("imdm_redi_r") {
            Some(r) => {
                let r: usize = r.parse().unwrap_or(0);
                r == 1 || r == k || r % (k.div_ceil(4)).max(1) == 0
            }
            None => true,
        })
        .collect();
    let series: Vec<Series> = shown
        .iter()
        .map(|m| {
            let row = &report.results[m];
            let mut points: Vec<(f64, f64)> = row
                .iter()
                .map(|(n, s)| {
                    let floor = 0.5 / s.samples.max(1) as f64;
                    (n.parse::<f64>().unwrap_or(0.0), s.exact_match.max(floor))
                })
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series {
                name: m.clone(),
                points,
            }
        })
        .collect();
    let title = format!(
        "synthetic task: V = {}, L = {} (zero plotted at 1/(2·samples))",
        c.vocab, c.length
    );
    line_plot_png(
        dir.join("exact_match.png"),
        &LinePlot {
            title: &title,
            x_label: "sampling steps",
            y_label: "exact-match rate",
            x_scale: Scale::Log,
            y_scale: Scale::Log,
            series: &series,
        },
    )
}

/// The table the demo prints: one row per model, exact-match (distinct) per step count.
pub fn table(report: &SyntheticReport) -> String {
    let steps = &report.config.eval_steps;
    let mut s = format!("{:<16}", "model");
    for n in steps {
        let head = format!("{n} step{}", if *n == 1 { "" } else { "s" });
        s += &format!("{head:>16}");
    }
    s += &format!("{:>16}\n", "1 step greedy");
    let floor = (report.config.vocab as f64).powi(-(report.config.length as i32 - 1));
    let cell = |x: &StepMetrics| format!("{:.3} ({})", x.exact_match, x.distinct);
    for m in model_order(report) {
        let row = &report.results[&m];
        s += &format!("{m:<16}");
        for n in steps {
            let c = row.get(&n.to_string()).map(cell).unwrap_or_default();
            s += &format!("{c:>16}");
        }
        let g = report.greedy_1step.get(&m).map(cell).unwrap_or_default();
        s += &format!("{g:>16}\n");
    }
    s += &format!(
        "cells: exact-match rate (distinct sequences among {} samples) with the reference \
         sampler (ancestral noise removal); last column: 1 step with greedy noise removal \
         (argmax, so distinct sequences can only come from eps). MDM floor at 1 step: \
         V^-(L-1) = {floor:.1e}\n",
        report.config.eval.samples
    );
    s
}

/// Baselines first, then the rounds in numeric order (`imdm_redi` repeats the last round).
pub(crate) fn model_order(report: &SyntheticReport) -> Vec<String> {
    let mut v: Vec<String> = [
        "mdlm",
        "imdm",
        "mdm_redi",
        "mdlm_sdtt",
        "imdm_sdtt",
        "imdm_sdtt_redi",
    ]
    .iter()
    .map(|s| s.to_string())
    .filter(|m| report.results.contains_key(m))
    .collect();
    v.extend((1..=report.config.rounds).map(|k| format!("imdm_redi_r{k}")));
    v.retain(|m| report.results.contains_key(m));
    v
}
