//! PNG figures of the collapse study (plotters, bitmap backend; text through ab_glyph with a
//! font file provisioned by the study, so no system font library is needed).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;

const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (1500, 520);

/// Register the TTF file as the plots' font.
pub fn register_font(ttf: &Path) -> Result<()> {
    let bytes: &'static [u8] = Box::leak(std::fs::read(ttf)?.into_boxed_slice());
    plotters::style::register_font(FONT, FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a usable font", ttf.display()))
}

/// A labelled line (its legend entry drawn in the same style).
fn line<X, Y>(
    chart: &mut ChartContext<'_, BitMapBackend<'_>, Cartesian2d<X, Y>>,
    pts: Vec<(f64, f64)>,
    style: ShapeStyle,
    label: String,
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .draw_series(LineSeries::new(pts, style))
        .map_err(err)?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    Ok(())
}

/// The legend box of a chart.
fn legend<'a, 'b, X, Y>(
    chart: &mut ChartContext<'a, BitMapBackend<'b>, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
    font_size: u32,
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
    'b: 'a,
{
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, font_size))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

fn lambda_color(lambda: f64) -> RGBColor {
    match lambda {
        0.0 => RGBColor(214, 39, 40),
        l if l <= 0.01 => RGBColor(255, 127, 14),
        l if l <= 0.1 => RGBColor(31, 119, 180),
        _ => RGBColor(44, 160, 44),
    }
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// The panels: one per (data set, K) present, in the runs' order.
fn panels(runs: &[Value]) -> Vec<(String, i64)> {
    let mut v: Vec<(String, i64)> = Vec::new();
    for r in runs {
        let key = (
            r["dataset"].as_str().unwrap_or("").to_string(),
            r["k"].as_i64().unwrap_or(0),
        );
        if !v.contains(&key) {
            v.push(key);
        }
    }
    v
}

fn panel_runs<'a>(runs: &'a [Value], p: &(String, i64)) -> Vec<&'a Value> {
    let mut v: Vec<&Value> = runs
        .iter()
        .filter(|r| r["dataset"] == p.0.as_str() && r["k"] == p.1)
        .collect();
    v.sort_by(|a, b| {
        a["lambda"]
            .as_f64()
            .unwrap_or(0.0)
            .total_cmp(&b["lambda"].as_f64().unwrap_or(0.0))
    });
    v
}

/// Draw every figure into `out`; returns `(file name, caption)` pairs.
pub fn all(doc: &Value, out: &Path) -> Result<Vec<(String, String)>> {
    let runs = doc["runs"].as_array().cloned().unwrap_or_default();
    let mut figs = Vec::new();
    let eps = "0.025";
    let name = "unique_over_training.png";
    unique_over_training(&runs, eps, &out.join(name))?;
    figs.push((
        name.to_string(),
        format!("Unique prototypes (teacher head, greedy, ε = {eps}) over training, per KoLeo-proto weight λ"),
    ));
    let name = "prototype_spread_over_training.png";
    nn_over_training(&runs, &out.join(name))?;
    figs.push((
        name.to_string(),
        "Mean nearest-neighbour distance between the teacher's normalised prototypes over training, per λ (KoLeo-proto maximises the log of these distances)".to_string(),
    ));
    let name = "unique_vs_eps.png";
    unique_vs_eps(&runs, &out.join(name))?;
    figs.push((
        name.to_string(),
        "Final unique prototypes as a fraction of K against the threshold ε".to_string(),
    ));
    let name = "knn_vs_lambda.png";
    knn_vs_lambda(&runs, &out.join(name))?;
    figs.push((
        name.to_string(),
        "k-NN top-1 (k = 20) against λ; on the long-tailed set also the head and tail classes"
            .to_string(),
    ));
    let name = "grouped_mlcd.png";
    grouped_mlcd(&runs, &out.join(name))?;
    figs.push((
        name.to_string(),
        format!("Grouped marginal latent class distribution at ε = {eps}: mass of each unique-prototype group, largest first (log scale)"),
    ));
    Ok(figs)
}

fn unique_over_training(runs: &[Value], eps: &str, path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ps = panels(runs);
    let areas = root.split_evenly((1, ps.len().max(1)));
    for (p, area) in ps.iter().zip(areas.iter()) {
        let rs = panel_runs(runs, p);
        let xmax = rs
            .iter()
            .filter_map(|r| r["steps"].as_f64())
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{} K = {}", p.0, p.1), (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, 0f64..(p.1 as f64 * 1.05))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("unique prototypes")
            .label_style((FONT, 14))
            .draw()
            .map_err(err)?;
        for r in rs {
            let lambda = r["lambda"].as_f64().unwrap_or(0.0);
            let mut pts: Vec<(f64, f64)> = r["series"]["analyses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| Some((a["step"].as_f64()?, a["unique_greedy"][eps].as_f64()?)))
                .collect();
            if let (Some(s), Some(u)) = (
                r["steps"].as_f64(),
                r["final"]["collapse"]["unique_greedy"][eps].as_f64(),
            ) && pts.last().is_none_or(|l| l.0 < s)
            {
                pts.push((s, u));
            }
            let c = lambda_color(lambda);
            line(&mut chart, pts, c.stroke_width(3), format!("λ = {lambda}"))?;
        }
        legend(&mut chart, SeriesLabelPosition::LowerLeft, 16)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn nn_over_training(runs: &[Value], path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ps = panels(runs);
    let areas = root.split_evenly((1, ps.len().max(1)));
    for (p, area) in ps.iter().zip(areas.iter()) {
        let rs = panel_runs(runs, p);
        let series: Vec<(f64, Vec<(f64, f64)>)> = rs
            .iter()
            .map(|r| {
                let pts = r["series"]["analyses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| Some((a["step"].as_f64()?, a["nn_mean"].as_f64()?)))
                    .collect();
                (r["lambda"].as_f64().unwrap_or(0.0), pts)
            })
            .collect();
        let all = series.iter().flat_map(|(_, p)| p.iter().map(|x| x.1));
        let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), y| {
            (l.min(y), h.max(y))
        });
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
        let pad = ((hi - lo) * 0.1).max(1e-3);
        let xmax = rs
            .iter()
            .filter_map(|r| r["steps"].as_f64())
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{} K = {}", p.0, p.1), (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..xmax, (lo - pad)..(hi + pad))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("mean NN distance")
            .y_label_formatter(&|v| format!("{v:.3}"))
            .label_style((FONT, 14))
            .draw()
            .map_err(err)?;
        for (lambda, pts) in series {
            let c = lambda_color(lambda);
            line(&mut chart, pts, c.stroke_width(3), format!("λ = {lambda}"))?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft, 16)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn unique_vs_eps(runs: &[Value], path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ps = panels(runs);
    let areas = root.split_evenly((1, ps.len().max(1)));
    for (p, area) in ps.iter().zip(areas.iter()) {
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{} K = {}", p.0, p.1), (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0.008f64..0.12f64).log_scale(), 0f64..1.05f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("ε")
            .y_desc("unique / K")
            .x_label_formatter(&|v| format!("{v:.3}"))
            .label_style((FONT, 14))
            .draw()
            .map_err(err)?;
        for r in panel_runs(runs, p) {
            let lambda = r["lambda"].as_f64().unwrap_or(0.0);
            let k = p.1 as f64;
            let mut pts: Vec<(f64, f64)> = r["final"]["collapse"]["unique_greedy"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(e, u)| Some((e.parse::<f64>().ok()?, u.as_f64()? / k)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let c = lambda_color(lambda);
            line(
                &mut chart,
                pts.clone(),
                c.stroke_width(3),
                format!("λ = {lambda}"),
            )?;
            chart
                .draw_series(pts.into_iter().map(|pt| Circle::new(pt, 4, c.filled())))
                .map_err(err)?;
        }
        legend(&mut chart, SeriesLabelPosition::LowerLeft, 16)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn knn_vs_lambda(runs: &[Value], path: &Path) -> Result<()> {
    // λ on a categorical axis: 0, 0.01, 0.1, 1.
    let lambdas = [0.0, 0.01, 0.1, 1.0];
    let pos = |l: f64| {
        lambdas
            .iter()
            .position(|&x| (x - l).abs() < 1e-12)
            .map(|i| i as f64)
    };
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("k-NN top-1 (k = 20) against λ", (FONT, 22))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.3f64..3.3f64, 0f64..100f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("λ (KoLeo-proto weight)")
        .y_desc("top-1 %")
        .x_labels(4)
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            if (x - x.round()).abs() < 1e-6 && i < lambdas.len() {
                format!("{}", lambdas[i])
            } else {
                String::new()
            }
        })
        .label_style((FONT, 14))
        .draw()
        .map_err(err)?;
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(148, 103, 189),
        RGBColor(214, 39, 40),
        RGBColor(140, 86, 75),
    ];
    let mut series: Vec<(String, &str)> = Vec::new();
    for p in panels(runs) {
        series.push((format!("{} K={}", p.0, p.1), "top1"));
        if p.0 == "lt100" {
            series.push((format!("{} K={} head", p.0, p.1), "head_top1"));
            series.push((format!("{} K={} tail", p.0, p.1), "tail_top1"));
        }
    }
    for (i, (label, field)) in series.iter().enumerate() {
        let mut parts = label.split_whitespace();
        let (ds, k) = (
            parts.next().unwrap_or(""),
            parts
                .next()
                .and_then(|x| x.strip_prefix("K="))
                .and_then(|x| x.parse::<i64>().ok())
                .unwrap_or(0),
        );
        let mut pts: Vec<(f64, f64)> = runs
            .iter()
            .filter(|r| r["dataset"] == ds && r["k"] == k)
            .filter_map(|r| {
                Some((
                    pos(r["lambda"].as_f64()?)?,
                    r["final"]["knn"][*field].as_f64()?,
                ))
            })
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let c = palette[i % palette.len()];
        let style = if *field == "top1" {
            c.stroke_width(3)
        } else {
            c.stroke_width(1)
        };
        line(&mut chart, pts.clone(), style, label.clone())?;
        chart
            .draw_series(pts.into_iter().map(|pt| Circle::new(pt, 4, c.filled())))
            .map_err(err)?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight, 15)?;
    root.present().map_err(err)?;
    Ok(())
}

fn grouped_mlcd(runs: &[Value], path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ps = panels(runs);
    let areas = root.split_evenly((1, ps.len().max(1)));
    for (p, area) in ps.iter().zip(areas.iter()) {
        let rs: Vec<&Value> = panel_runs(runs, p)
            .into_iter()
            .filter(|r| {
                let l = r["lambda"].as_f64().unwrap_or(-1.0);
                l == 0.0 || (l - 0.1).abs() < 1e-12
            })
            .collect();
        let xmax = p.1 as f64;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{} K = {}", p.0, p.1), (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((1f64..xmax).log_scale(), (1e-7f64..1f64).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("group rank")
            .y_desc("probability mass")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .label_style((FONT, 14))
            .draw()
            .map_err(err)?;
        for r in rs {
            let lambda = r["lambda"].as_f64().unwrap_or(0.0);
            let pts: Vec<(f64, f64)> = r["final"]["grouped_mass_sorted"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
                .filter_map(|(i, m)| Some(((i + 1) as f64, m.as_f64()?)))
                .filter(|&(_, m)| m > 0.0)
                .collect();
            let groups = r["final"]["grouped_mass_sorted"]
                .as_array()
                .map_or(0, Vec::len);
            let c = lambda_color(lambda);
            line(
                &mut chart,
                pts,
                c.stroke_width(3),
                format!("λ = {lambda} ({groups} groups)"),
            )?;
        }
        legend(&mut chart, SeriesLabelPosition::LowerLeft, 16)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
