//! The reload-under-load chart: requests per 100 ms over time, one line per server, with the
//! reload moments marked. Drawn by plotters as SVG.

use std::path::Path;

use plotters::prelude::*;

/// One server's run: its name, its buckets (unix ms, count) and its reload moments (unix ms).
pub struct Series<'a> {
    pub name: &'a str,
    pub buckets: &'a [(u64, u64)],
    pub reloads: &'a [u64],
}

pub fn draw(
    path: &Path,
    title: &str,
    series: &[Series<'_>],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1000, 300 * series.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((series.len(), 1));
    let colors = [BLUE, RED, GREEN];
    for (i, (panel, s)) in panels.iter().zip(series).enumerate() {
        let Some(&(t0, _)) = s.buckets.first() else {
            continue;
        };
        // Drop the first and last bucket: partial, as the run starts and stops inside them.
        let inner = &s.buckets[1..s.buckets.len().saturating_sub(1)];
        let points: Vec<(f64, f64)> = inner
            .iter()
            .map(|&(t, n)| ((t - t0) as f64 / 1000.0, n as f64))
            .collect();
        let x_max = points.last().map_or(1.0, |p| p.0 + 0.1);
        let y_max = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{title}: {}", s.name), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("responses / 100 ms")
            .disable_x_mesh()
            .draw()?;
        for &r in s.reloads {
            let x = r.saturating_sub(t0) as f64 / 1000.0;
            chart.draw_series(LineSeries::new(vec![(x, 0.0), (x, y_max)], BLACK.mix(0.35)))?;
        }
        chart
            .draw_series(LineSeries::new(
                points,
                colors[i % colors.len()].stroke_width(2),
            ))?
            .label(format!("{} (vertical lines: reloads)", s.name))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colors[i % colors.len()])
            });
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
