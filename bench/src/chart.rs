//! The suite's charts, drawn by plotters as SVG: panels of lines over x, with vertical marks.
//! Three uses: requests per 100 ms over time with the reload moments marked (figure 6,
//! [`draw`]), a server's memory by open connections (figure 13, [`draw_panels`]), and the
//! scaling curves, medians with their [min-max] over the rounds as error bars
//! ([`draw_curves`]).

use std::path::Path;

use plotters::prelude::*;

/// One server's run: its name, its buckets (unix ms, count) and its reload moments (unix ms).
pub struct Series<'a> {
    pub name: &'a str,
    pub buckets: &'a [(u64, u64)],
    pub reloads: &'a [u64],
}

/// One panel: its caption, axis names, named lines of (x, y) points, and x values to mark with a
/// vertical line (`marks_are` says what they are, in the legend).
pub struct Panel<'a> {
    pub caption: String,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    pub lines: Vec<(String, Vec<(f64, f64)>)>,
    pub marks: Vec<f64>,
    pub marks_are: &'a str,
}

/// The reload chart: a panel per server, responses per 100 ms over seconds since its first
/// bucket, with its reloads marked.
pub fn draw(
    path: &Path,
    title: &str,
    series: &[Series<'_>],
) -> Result<(), Box<dyn std::error::Error>> {
    let panels: Vec<Panel> = series
        .iter()
        .filter_map(|s| {
            let &(t0, _) = s.buckets.first()?;
            // Drop the first and last bucket: partial, as the run starts and stops inside them.
            let inner = &s.buckets[1..s.buckets.len().saturating_sub(1)];
            let seconds = |t: u64| t.saturating_sub(t0) as f64 / 1000.0;
            Some(Panel {
                caption: format!("{title}: {}", s.name),
                x_desc: "seconds",
                y_desc: "responses / 100 ms",
                lines: vec![(
                    s.name.to_string(),
                    inner.iter().map(|&(t, n)| (seconds(t), n as f64)).collect(),
                )],
                marks: s.reloads.iter().map(|&r| seconds(r)).collect(),
                marks_are: "reloads",
            })
        })
        .collect();
    draw_panels(path, &panels)
}

/// Panels one above the other, 1000 x 300 pixels each.
pub fn draw_panels(path: &Path, panels: &[Panel<'_>]) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1000, 300 * panels.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((panels.len(), 1));
    let colors = [BLUE, RED, GREEN];
    let mut color = 0;
    for (area, p) in areas.iter().zip(panels) {
        let points = p.lines.iter().flat_map(|(_, l)| l.iter());
        let x_max = points.clone().map(|pt| pt.0).fold(0.0, f64::max).max(1.0) * 1.02;
        let y_max = points.map(|pt| pt.1).fold(1.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(&p.caption, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc(p.x_desc)
            .y_desc(p.y_desc)
            .disable_x_mesh()
            .draw()?;
        for &x in &p.marks {
            chart.draw_series(LineSeries::new(vec![(x, 0.0), (x, y_max)], BLACK.mix(0.35)))?;
        }
        for (name, line) in &p.lines {
            let c = colors[color % colors.len()];
            color += 1;
            let label = if p.marks.is_empty() {
                name.clone()
            } else {
                format!("{name} (vertical lines: {})", p.marks_are)
            };
            chart
                .draw_series(LineSeries::new(line.iter().copied(), c.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// One line of a curve: its name and, at each x, the median and [min-max] over the rounds.
pub struct Curve {
    pub name: String,
    pub points: Vec<(f64, crate::report::Spread)>,
}

/// A panel of curves: caption, axis names, the curves.
pub struct CurvePanel<'a> {
    pub caption: String,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    pub curves: Vec<Curve>,
}

/// Panels one above the other, 1000 x 320 pixels each: each curve's medians joined by a line,
/// with a vertical bar from the lowest to the highest round at every point (the spread the
/// verdicts read, drawn so that a reader does not take the line for more than it is).
pub fn draw_curves(
    path: &Path,
    panels: &[CurvePanel<'_>],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1000, 320 * panels.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((panels.len(), 1));
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for (area, p) in areas.iter().zip(panels) {
        let points = p.curves.iter().flat_map(|c| c.points.iter());
        let x_min = points.clone().map(|pt| pt.0).fold(f64::INFINITY, f64::min);
        let x_max = points
            .clone()
            .map(|pt| pt.0)
            .fold(f64::NEG_INFINITY, f64::max);
        let pad = ((x_max - x_min) * 0.05).max(0.5);
        let y_max = points.map(|pt| pt.1.max).fold(0.0, f64::max).max(1e-9) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(&p.caption, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d((x_min - pad)..(x_max + pad), 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc(p.x_desc)
            .y_desc(p.y_desc)
            .draw()?;
        for (i, c) in p.curves.iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(
                    c.points.iter().map(|(x, s)| (*x, s.median)),
                    color.stroke_width(2),
                ))?
                .label(format!("{} (median, bars: min-max)", c.name))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart.draw_series(c.points.iter().map(|(x, s)| {
                ErrorBar::new_vertical(*x, s.min, s.median, s.max, color.stroke_width(1), 8)
            }))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
