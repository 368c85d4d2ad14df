//! PNG plots (plotters, with an embedded DejaVu Sans so that text renders on any machine).

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::loss::LossTerms;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The embedded font is valid: registration cannot fail for it.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        what: "cannot draw plot",
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Loss terms against the step: total, mean shift, k-means and VMR, in four panels.
pub fn loss_plot(path: &Path, history: &[(usize, LossTerms)]) -> Result<()> {
    register_font();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    }
    // `.loss.<pid>.tmp.png`: plotters picks the encoder from the extension.
    let tmp = flsl_runtime::fsio::temp_path_keeping_extension(path);
    {
        let root = BitMapBackend::new(&tmp, (1000, 700)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let panels = root.split_evenly((2, 2));
        #[allow(clippy::type_complexity)] // (label, getter, colour): a table, read once
        let series: [(&str, fn(&LossTerms) -> f64, RGBColor); 4] = [
            ("total", |l| l.total, BLACK),
            ("mean shift (intra-view)", |l| l.mean_shift, BLUE),
            ("k-means (inter-view)", |l| l.kmeans, RED),
            ("VMR", |l| l.vmr, GREEN),
        ];
        for (area, (name, f, color)) in panels.iter().zip(series) {
            let pts: Vec<(f64, f64)> = history
                .iter()
                .map(|(s, l)| (*s as f64, f(l)))
                .filter(|(_, v)| v.is_finite())
                .collect();
            let (x0, x1) =
                (pts.first().map_or(0.0, |p| p.0), pts.last().map_or(1.0, |p| p.0).max(1.0));
            let (mut y0, mut y1) = pts
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
            if !y0.is_finite() {
                (y0, y1) = (0.0, 1.0);
            }
            let pad = ((y1 - y0) * 0.05).max(1e-6);
            let mut chart = ChartBuilder::on(area)
                .caption(name, ("sans-serif", 20))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(55)
                .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
                .map_err(|e| plot_err(path, e))?;
            chart
                .configure_mesh()
                .x_desc("step")
                .label_style(("sans-serif", 12))
                .draw()
                .map_err(|e| plot_err(path, e))?;
            chart.draw_series(LineSeries::new(pts, &color)).map_err(|e| plot_err(path, e))?;
        }
        root.present().map_err(|e| plot_err(path, e))?;
    }
    flsl_runtime::fsio::commit(&tmp, path).map_err(|e| Error::io("cannot write", path, e))
}
