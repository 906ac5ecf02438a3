//! SVG charts for the report: lines, grouped bars and stacked bars over named categories
//! (model and rank count, state size), drawn with plotters' SVG backend.

use anyhow::{anyhow, ensure, Context, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::prelude::*;
use std::ops::Range;
use std::path::Path;

const PANEL_W: u32 = 620;
const CHART_H: u32 = 400;
const LEGEND_ROW_H: u32 = 22;
const LEGEND_COLUMNS: usize = 2;
const FONT: &str = "sans-serif";
/// Fraction of a category's width that its bars take together.
const BAR_GROUP_W: f64 = 0.8;
/// Colors of the series, in order; Lazarus series come first in every chart.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// How a panel draws its series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One line with markers per series.
    Lines,
    /// The series' bars side by side in each category.
    Bars,
    /// The series' bars on top of each other in each category (linear axis only).
    Stacked,
}

/// One named series: a value per category, `None` where it was not measured.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

impl Series {
    pub fn new(name: impl Into<String>, values: Vec<Option<f64>>) -> Self {
        Series {
            name: name.into(),
            values,
        }
    }
}

/// One chart: its categories along x, its series, and how to draw them.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub y_desc: String,
    pub categories: Vec<String>,
    pub series: Vec<Series>,
    pub kind: Kind,
    /// Logarithmic y axis (values must be positive).
    pub log_y: bool,
}

/// A linear axis whose tick marks are exactly `ticks` (categories, or decades of a log axis).
struct TickAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for TickAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let f = (v - self.lo) / (self.hi - self.lo);
        limit.0 + (f * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        // Only bold lines: the ticks are the grid.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.lo..self.hi
    }
}

impl Panel {
    /// Checks the shape of the panel: categories, one value per category in every series, and
    /// a linear axis for stacked bars.
    fn check(&self) -> Result<()> {
        let n = self.categories.len();
        ensure!(n > 0, "chart `{}` has no categories", self.title);
        for s in &self.series {
            ensure!(
                s.values.len() == n,
                "series `{}` of `{}` has {} values for {n} categories",
                s.name,
                self.title,
                s.values.len()
            );
        }
        ensure!(
            !(self.kind == Kind::Stacked && self.log_y),
            "chart `{}`: stacked bars need a linear axis",
            self.title
        );
        Ok(())
    }
}

/// A number for an axis label: no trailing zeros, few digits.
fn fmt_num(v: f64) -> String {
    let a = v.abs();
    let s = if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// The value of 1, 2 or 5 times a power of ten next to `v`: above it when `up`, else below.
fn nice_125(v: f64, up: bool) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    let candidates = [0.5, 1.0, 2.0, 5.0, 10.0].map(|m| m * p);
    if !up {
        candidates
            .into_iter()
            .rev()
            .find(|&c| c <= v * (1.0 + 1e-12))
            .unwrap_or(p)
    } else {
        candidates
            .into_iter()
            .find(|&c| c >= v * (1.0 - 1e-12))
            .unwrap_or(10.0 * p)
    }
}

/// A step of 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * p)
}

/// The y axis in plotted units (log10 of the value on a log axis): range and tick positions.
struct YAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    log: bool,
}

impl YAxis {
    fn of(panel: &Panel) -> Result<YAxis> {
        let tops = bar_tops(panel);
        let vals: Vec<f64> = tops.iter().copied().filter(|v| v.is_finite()).collect();
        ensure!(!vals.is_empty(), "chart `{}` has no values", panel.title);
        let max = vals.iter().copied().fold(f64::MIN, f64::max);
        if panel.log_y {
            let min = vals.iter().copied().fold(f64::MAX, f64::min);
            ensure!(
                min > 0.0,
                "chart `{}`: a log axis needs positive values",
                panel.title
            );
            // 5% room above and below, rounded out to 1, 2 or 5 times a power of ten.
            let (lo, hi) = (
                nice_125(min / 1.05, false).log10(),
                nice_125(max * 1.05, true).log10(),
            );
            let ticks = (lo.floor() as i32..=hi.ceil() as i32)
                .flat_map(|d| [1.0, 2.0, 5.0].map(|m| d as f64 + f64::log10(m)))
                .filter(|&t| t >= lo - 1e-9 && t <= hi + 1e-9)
                .collect();
            return Ok(YAxis {
                lo,
                hi,
                ticks,
                log: true,
            });
        }
        let step = nice_step(max.max(f64::MIN_POSITIVE) / 5.0);
        let hi = (max / step).ceil().max(1.0) * step;
        let ticks = (0..=((hi / step).round() as usize))
            .map(|i| i as f64 * step)
            .collect();
        Ok(YAxis {
            lo: 0.0,
            hi,
            ticks,
            log: false,
        })
    }

    fn map(&self, v: f64) -> f64 {
        if self.log {
            v.log10()
        } else {
            v
        }
    }

    fn label(&self, y: f64) -> String {
        fmt_num(if self.log { 10f64.powf(y) } else { y })
    }
}

/// The highest point of each category's bars or points (the sum for stacked bars).
fn bar_tops(panel: &Panel) -> Vec<f64> {
    let values = |c: usize| {
        panel
            .series
            .iter()
            .filter_map(move |s| s.values.get(c).copied().flatten())
    };
    (0..panel.categories.len())
        .flat_map(|c| match panel.kind {
            Kind::Stacked => vec![values(c).sum::<f64>()],
            _ => values(c).collect(),
        })
        .collect()
}

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Rows the legend of `n` series takes.
fn legend_rows(n: usize) -> u32 {
    n.div_ceil(LEGEND_COLUMNS) as u32
}

fn draw_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{e}")
}

/// The legend: a colored square and the name of each series, in columns.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    series: &[Series],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let col_w = (area.dim_in_pixel().0 as i32 - 20) / LEGEND_COLUMNS as i32;
    for (i, s) in series.iter().enumerate() {
        let (row, col) = ((i / LEGEND_COLUMNS) as i32, (i % LEGEND_COLUMNS) as i32);
        let (x, y) = (20 + col * col_w, 4 + row * LEGEND_ROW_H as i32);
        area.draw(&Rectangle::new(
            [(x, y + 2), (x + 12, y + 14)],
            color(i).filled(),
        ))
        .map_err(draw_err)?;
        area.draw(&Text::new(
            s.name.clone(),
            (x + 18, y + 2),
            (FONT, 14).into_font(),
        ))
        .map_err(draw_err)?;
    }
    Ok(())
}

/// Draws one panel (chart above, legend below) into `area`.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    panel.check()?;
    let n = panel.categories.len();
    let y = YAxis::of(panel)?;
    let (chart_area, legend_area) = area.split_vertically(CHART_H);
    let x_range = TickAxis {
        lo: -0.5,
        hi: n as f64 - 0.5,
        ticks: (0..n).map(|i| i as f64).collect(),
    };
    let y_range = TickAxis {
        lo: y.lo,
        hi: y.hi,
        ticks: y.ticks.clone(),
    };
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(&panel.title, (FONT, 18))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range, y_range)
        .map_err(draw_err)?;
    let x_label = |x: &f64| {
        let i = x.round();
        let name = (i >= 0.0 && (x - i).abs() < 1e-6).then(|| panel.categories.get(i as usize));
        name.flatten().cloned().unwrap_or_default()
    };
    let y_label = |v: &f64| y.label(*v);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .y_desc(panel.y_desc.as_str())
        .label_style((FONT, 13))
        .draw()
        .map_err(draw_err)?;
    draw_series(&mut chart, panel, &y)?;
    draw_legend(&legend_area, &panel.series)
}

/// Draws the series of `panel` into its chart.
fn draw_series<DB: DrawingBackend>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<TickAxis, TickAxis>>,
    panel: &Panel,
    y: &YAxis,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let n = panel.categories.len();
    let k = panel.series.len().max(1) as f64;
    let mut stack = vec![0.0f64; n];
    for (si, s) in panel.series.iter().enumerate() {
        let c = color(si);
        let points = s
            .values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i, v)));
        match panel.kind {
            Kind::Lines => {
                let pts: Vec<(f64, f64)> = points.map(|(i, v)| (i as f64, y.map(v))).collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                    .map_err(draw_err)?;
                chart
                    .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))
                    .map_err(draw_err)?;
            }
            Kind::Bars => {
                let w = BAR_GROUP_W / k;
                let bars = points.map(|(i, v)| {
                    let x0 = i as f64 - BAR_GROUP_W / 2.0 + si as f64 * w;
                    Rectangle::new([(x0, y.lo), (x0 + w * 0.92, y.map(v))], c.filled())
                });
                chart.draw_series(bars).map_err(draw_err)?;
            }
            Kind::Stacked => {
                let half = BAR_GROUP_W / 2.0;
                let bars: Vec<_> = points
                    .map(|(i, v)| {
                        let base = stack[i];
                        stack[i] += v;
                        Rectangle::new(
                            [(i as f64 - half, base), (i as f64 + half, base + v)],
                            c.filled(),
                        )
                    })
                    .collect();
                chart.draw_series(bars).map_err(draw_err)?;
            }
        }
    }
    Ok(())
}

/// Writes `panels` side by side, with a legend under each, as one SVG file at `path`.
pub fn write_svg(path: &Path, panels: &[Panel]) -> Result<()> {
    ensure!(!panels.is_empty(), "nothing to plot in {}", path.display());
    let rows = panels
        .iter()
        .map(|p| legend_rows(p.series.len()))
        .max()
        .unwrap_or(0);
    let size = (
        PANEL_W * panels.len() as u32,
        CHART_H + rows * LEGEND_ROW_H + 12,
    );
    {
        let root = SVGBackend::new(path, size).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let areas = root.split_evenly((1, panels.len()));
        for (area, panel) in areas.iter().zip(panels) {
            draw_panel(area, panel).with_context(|| format!("drawing `{}`", panel.title))?;
        }
        root.present()
            .map_err(draw_err)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading back {}", path.display()))?
        .len();
    ensure!(len > 0, "{} was written empty", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panel(kind: Kind, log_y: bool) -> Panel {
        Panel {
            title: "Stall by state size".into(),
            y_desc: "ms".into(),
            categories: vec!["64 MiB".into(), "256 MiB".into(), "1024 MiB".into()],
            series: vec![
                Series::new("Lazarus stall", vec![Some(10.0), Some(35.0), Some(101.0)]),
                Series::new(
                    "DCP async_save blocking",
                    vec![Some(70.0), None, Some(900.0)],
                ),
            ],
            kind,
            log_y,
        }
    }

    #[test]
    fn every_kind_writes_an_svg_with_the_series_names() {
        let dir = tempfile::tempdir().unwrap();
        for (i, (kind, log)) in [
            (Kind::Lines, true),
            (Kind::Bars, true),
            (Kind::Bars, false),
            (Kind::Stacked, false),
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.path().join(format!("p{i}.svg"));
            write_svg(&path, &[panel(kind, log), panel(kind, log)]).unwrap();
            let svg = std::fs::read_to_string(&path).unwrap();
            assert!(svg.starts_with("<svg"), "{kind:?}: {:.80}", svg);
            assert!(svg.trim_end().ends_with("</svg>"));
            for name in [
                "Lazarus stall",
                "DCP async_save blocking",
                "Stall by state size",
                "256 MiB",
            ] {
                assert!(svg.contains(name), "{kind:?} lacks `{name}`");
            }
            assert!(svg.contains("<rect") || svg.contains("<polyline"));
        }
    }

    #[test]
    fn bad_panels_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.svg");
        let mut p = panel(Kind::Lines, true);
        p.series[0].values.pop();
        let e = write_svg(&path, &[p]).unwrap_err();
        assert!(
            format!("{e:#}").contains("has 2 values for 3 categories"),
            "{e:#}"
        );
        let mut p = panel(Kind::Lines, true);
        p.series[0].values[0] = Some(0.0);
        assert!(format!("{:#}", write_svg(&path, &[p]).unwrap_err()).contains("positive"));
        let mut p = panel(Kind::Bars, false);
        p.series.iter_mut().for_each(|s| s.values = vec![None; 3]);
        assert!(format!("{:#}", write_svg(&path, &[p]).unwrap_err()).contains("no values"));
        assert!(write_svg(&path, &[panel(Kind::Stacked, true)]).is_err());
        assert!(write_svg(&path, &[]).is_err());
    }

    #[test]
    fn axis_labels_are_short() {
        assert_eq!(fmt_num(1000.0), "1000");
        assert_eq!(fmt_num(2.5), "2.5");
        assert_eq!(fmt_num(2.0), "2");
        assert_eq!(fmt_num(0.25), "0.25");
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(13.0), 20.0);
        assert_eq!(nice_step(100.0), 100.0);
    }

    #[test]
    fn log_axis_ends_on_1_2_5_values() {
        let y = YAxis::of(&panel(Kind::Lines, true)).unwrap();
        assert_eq!((y.label(y.lo), y.label(y.hi)), ("5".into(), "1000".into()));
        assert_eq!(y.label(2.0), "100");
        let labels: Vec<String> = y.ticks.iter().map(|&t| y.label(t)).collect();
        assert_eq!(labels, ["5", "10", "20", "50", "100", "200", "500", "1000"]);
        assert_eq!(nice_125(0.9, true), 1.0);
        assert_eq!(nice_125(3.0, false), 2.0);
        assert_eq!(nice_125(7.0, true), 10.0);
        let y = YAxis::of(&panel(Kind::Stacked, false)).unwrap();
        assert_eq!(y.lo, 0.0);
        assert!(y.hi >= 1001.0, "{}", y.hi);
    }
}
