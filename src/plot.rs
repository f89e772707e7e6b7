//! PNG line plots (training curves, exact-match versus steps) with `plotters`. The font is
//! vendored (`assets/fonts/DejaVuSans.ttf`, Bitstream Vera licence beside it) and compiled in,
//! so plots render identically on a machine without system fonts. Files are written to a
//! temporary name and renamed, never half-written.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::error::{Error, Result};

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        // The only failure is a malformed font, which the test below would catch.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// One named curve of (x, y) points.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Axis scaling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    Linear,
    /// log10; non-positive values are dropped from the plot.
    Log,
}

/// What to draw.
#[derive(Clone, Debug)]
pub struct LinePlot<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub x_scale: Scale,
    pub y_scale: Scale,
    pub series: &'a [Series],
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(format!("rendering the plot: {e}")),
    }
}

fn range(vals: impl Iterator<Item = f64>, scale: Scale) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite() && (scale == Scale::Linear || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return if scale == Scale::Log {
            (0.1, 1.0)
        } else {
            (0.0, 1.0)
        };
    }
    match scale {
        Scale::Log if hi <= lo => (lo / 2.0, hi * 2.0),
        Scale::Log => (lo / 1.2, hi * 1.2),
        _ if hi <= lo => (lo - 0.5, hi + 0.5),
        _ => {
            let pad = 0.05 * (hi - lo);
            (lo - pad, hi + pad)
        }
    }
}

/// Renders `plot` as an 900x600 PNG at `path` (atomically).
pub fn line_plot_png(path: impl AsRef<Path>, plot: &LinePlot) -> Result<()> {
    register_font();
    let path = path.as_ref();
    // The encoder picks the format from the extension, so the temporary name ends in .png;
    // it is created exclusively first and removed on any error (see `outputs`).
    let guard = crate::outputs::TempFile::beside_with_suffix(path, ".png")?;
    let tmp = guard.path().to_path_buf();
    let keep = |s: Scale, v: f64| v.is_finite() && (s == Scale::Linear || v > 0.0);
    let pts = |s: &Series| -> Vec<(f64, f64)> {
        s.points
            .iter()
            .copied()
            .filter(|&(x, y)| keep(plot.x_scale, x) && keep(plot.y_scale, y))
            .collect()
    };
    let all: Vec<(f64, f64)> = plot.series.iter().flat_map(pts).collect();
    let xr = range(all.iter().map(|p| p.0), plot.x_scale);
    let yr = range(all.iter().map(|p| p.1), plot.y_scale);
    let root = BitMapBackend::new(&tmp, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    macro_rules! draw {
        ($x:expr, $y:expr) => {{
            let mut chart = ChartBuilder::on(&root)
                .caption(plot.title, ("sans-serif", 22))
                .margin(16)
                .x_label_area_size(48)
                .y_label_area_size(72)
                .build_cartesian_2d($x, $y)
                .map_err(|e| plot_err(path, e))?;
            chart
                .configure_mesh()
                .x_desc(plot.x_label)
                .y_desc(plot.y_label)
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(|e| plot_err(path, e))?;
            for (i, s) in plot.series.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                let p = pts(s);
                chart
                    .draw_series(LineSeries::new(p.clone(), color.stroke_width(2)))
                    .map_err(|e| plot_err(path, e))?
                    .label(s.name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(p.into_iter().map(|q| Circle::new(q, 3, color.filled())))
                    .map_err(|e| plot_err(path, e))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(|e| plot_err(path, e))?;
        }};
    }
    match (plot.x_scale, plot.y_scale) {
        (Scale::Linear, Scale::Linear) => draw!(xr.0..xr.1, yr.0..yr.1),
        (Scale::Log, Scale::Linear) => draw!((xr.0..xr.1).log_scale(), yr.0..yr.1),
        (Scale::Linear, Scale::Log) => draw!(xr.0..xr.1, (yr.0..yr.1).log_scale()),
        (Scale::Log, Scale::Log) => draw!((xr.0..xr.1).log_scale(), (yr.0..yr.1).log_scale()),
    }
    root.present().map_err(|e| plot_err(path, e))?;
    drop(root);
    guard.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_with_log_axes_and_skips_non_positive_points() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curve.png");
        let series = [
            Series {
                name: "imdm".into(),
                points: vec![(1.0, 0.5), (2.0, 0.7), (4.0, 0.9)],
            },
            Series {
                name: "mdlm".into(),
                points: vec![(1.0, 0.0), (2.0, 1e-3), (4.0, 0.2)],
            },
        ];
        let plot = LinePlot {
            title: "exact match",
            x_label: "steps",
            y_label: "rate",
            x_scale: Scale::Log,
            y_scale: Scale::Log,
            series: &series,
        };
        line_plot_png(&path, &plot).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
        assert!(
            bytes.len() > 5_000,
            "suspiciously small PNG: {} bytes",
            bytes.len()
        );
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "no temporary file left");
    }
}
