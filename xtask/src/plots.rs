//! PNG figures of the collapse study (plotters, bitmap backend; text through ab_glyph with a
//! font file provisioned by the study, so no system font library is needed). One panel per
//! (data set or feature source, K); within a panel one colour per λ, the teacher's head drawn
//! solid and the student's dashed, a second seed thinner. The end-to-end runs and the
//! frozen-feature (mechanism) runs get their own figures.

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

/// A line's points.
type Points = Vec<(f64, f64)>;

/// A labelled dashed line (the student's head).
fn dashed<X, Y>(
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
        .draw_series(DashedLineSeries::new(pts, 9, 6, style))
        .map_err(err)?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 8, y)], style));
    Ok(())
}

/// A run's teacher series solid and its student series dashed, in the run's style.
fn both_heads<X, Y>(
    chart: &mut ChartContext<'_, BitMapBackend<'_>, Cartesian2d<X, Y>>,
    r: &Value,
    teacher: Points,
    student: Points,
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let label = run_label(r);
    line(chart, teacher, run_style(r), format!("{label} teacher"))?;
    dashed(chart, student, run_style(r), format!("{label} student"))
}

/// The run's λ (and seed, when not 0) for a legend.
fn run_label(r: &Value) -> String {
    let lambda = r["lambda"].as_f64().unwrap_or(0.0);
    match r["seed"].as_u64() {
        Some(s) if s != 0 => format!("λ = {lambda}, seed {s}"),
        _ => format!("λ = {lambda}"),
    }
}

/// The run's line style: its λ's colour, thinner for a second seed.
fn run_style(r: &Value) -> ShapeStyle {
    let c = lambda_color(r["lambda"].as_f64().unwrap_or(0.0));
    let width = if r["seed"].as_u64().unwrap_or(0) == 0 {
        3
    } else {
        1
    };
    c.stroke_width(width)
}

/// A per-analysis series of a run: `get` applied to every analysis, the final figures appended
/// when the last analysis is earlier.
fn analysis_series(r: &Value, get: &dyn Fn(&Value) -> Option<f64>) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> = r["series"]["analyses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| Some((a["step"].as_f64()?, get(a)?)))
        .collect();
    if let (Some(s), Some(v)) = (r["steps"].as_f64(), get(&r["final"]["collapse"]))
        && pts.last().is_none_or(|l| l.0 < s)
    {
        pts.push((s, v));
    }
    pts
}

fn xmax(rs: &[&Value]) -> f64 {
    rs.iter()
        .filter_map(|r| r["steps"].as_f64())
        .fold(1.0, f64::max)
}

/// The y range of some series, padded.
fn y_range(series: &[Vec<(f64, f64)>], floor: Option<f64>) -> std::ops::Range<f64> {
    let all = series.iter().flat_map(|p| p.iter().map(|x| x.1));
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), y| {
        (l.min(y), h.max(y))
    });
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.1).max(1e-3);
    let lo = floor.map_or(lo - pad, |f| f.min(lo));
    lo..(hi + pad)
}

/// Draw every figure into `out`; returns `(file name, caption)` pairs.
pub fn all(doc: &Value, out: &Path) -> Result<Vec<(String, String)>> {
    let runs = doc["runs"].as_array().cloned().unwrap_or_default();
    let (mech, e2e): (Vec<Value>, Vec<Value>) =
        runs.into_iter().partition(|r| r["kind"] == "mechanism");
    let mut figs = Vec::new();
    for (runs, prefix, what) in [
        (&e2e, "", "end to end"),
        (&mech, "mechanism_", "frozen features"),
    ] {
        if runs.is_empty() {
            continue;
        }
        let mut add = |name: &str, caption: String| {
            figs.push((format!("{prefix}{name}"), format!("{caption} ({what})")));
            out.join(format!("{prefix}{name}"))
        };
        for eps in ["0.025", "0.1"] {
            let tag = eps.replace('.', "");
            let path = add(
                &format!("unique_over_training_eps{tag}.png"),
                format!(
                    "Unique prototypes (greedy, ε = {eps}) over training: teacher solid, student dashed, per λ"
                ),
            );
            unique_over_training(runs, eps, &path)?;
        }
        let path = add(
            "unique_vs_eps.png",
            "Final unique prototypes as a fraction of K against ε from 0.01 to 0.5: teacher solid, student dashed".into(),
        );
        unique_vs_eps(runs, &path)?;
        let path = add(
            "grouped_mlcd.png",
            "Final MLCD π over the K prototypes (thin) against the grouped MLCD Π over the unique-prototype groups at ε = 0.025 (thick), largest mass first, λ = 0 and 0.1".into(),
        );
        grouped_mlcd(runs, &path)?;
        let path = add(
            "displacement_over_training.png",
            "Prototype displacement 1 − mean cos(μ_k(t), μ_k(0)) over training: teacher solid, student dashed".into(),
        );
        displacement_over_training(runs, &path)?;
        let path = add(
            "teacher_entropy_over_training.png",
            "Mean entropy of the teacher's training targets over training, as a fraction of ln K (1: flat targets)".into(),
        );
        entropy_over_training(runs, &path)?;
        let path = add(
            "prototype_spread_over_training.png",
            "Mean nearest-neighbour distance between the teacher's normalised prototypes over training (KoLeo-proto maximises the log of these distances)".into(),
        );
        nn_over_training(runs, &path)?;
        if prefix.is_empty() {
            let path = add(
                "knn_vs_lambda.png",
                "k-NN top-1 (k = 20) against λ; on the long-tailed set also the head and tail classes; hollow: second seed".into(),
            );
            knn_vs_lambda(runs, &path)?;
        }
    }
    Ok(figs)
}

/// One panel per (data set, K); `draw` fills each.
fn panel_figure(
    runs: &[Value],
    path: &Path,
    mut draw: impl FnMut(
        &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
        &(String, i64),
        Vec<&Value>,
    ) -> Result<()>,
) -> Result<()> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ps = panels(runs);
    let areas = root.split_evenly((1, ps.len().max(1)));
    for (p, area) in ps.iter().zip(areas.iter()) {
        draw(area, p, panel_runs(runs, p))?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn unique_over_training(runs: &[Value], eps: &str, path: &Path) -> Result<()> {
    panel_figure(runs, path, |area, p, rs| {
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{} K = {}", p.0, p.1), (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax(&rs), 0f64..(p.1 as f64 * 1.05))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("unique prototypes")
            .label_style((FONT, 14))
            .draw()
            .map_err(err)?;
        for r in rs {
            let t = analysis_series(r, &|a| a["unique_greedy"][eps].as_f64());
            let s = analysis_series(r, &|a| a["student"]["unique_greedy"][eps].as_f64());
            both_heads(&mut chart, r, t, s)?;
        }
        legend(&mut chart, SeriesLabelPosition::LowerLeft, 14)
    })
}

fn displacement_over_training(runs: &[Value], path: &Path) -> Result<()> {
    panel_figure(runs, path, |area, p, rs| {
        let series: Vec<(&Value, Points, Points)> = rs
            .iter()
            .map(|r| {
                (
                    *r,
                    analysis_series(r, &|a| a["displacement_teacher"].as_f64()),
                    analysis_series(r, &|a| a["student"]["displacement"].as_f64()),
                )
            })
            .collect();
        let all: Vec<Vec<(f64, f64)>> = series
            .iter()
            .flat_map(|(_, t, s)| [t.clone(), s.clone()])
            .collect();
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{} K = {}", p.0, p.1), (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..xmax(&rs), y_range(&all, Some(0.0)))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("displacement")
            .y_label_formatter(&|v| format!("{v:.2}"))
            .label_style((FONT, 14))
            .draw()
            .map_err(err)?;
        for (r, t, s) in series {
            both_heads(&mut chart, r, t, s)?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft, 14)
    })
}

fn entropy_over_training(runs: &[Value], path: &Path) -> Result<()> {
    panel_figure(runs, path, |area, p, rs| {
        let ln_k = (p.1 as f64).ln();
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{} K = {}", p.0, p.1), (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax(&rs), 0f64..1.05f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("target entropy / ln K")
            .label_style((FONT, 14))
            .draw()
            .map_err(err)?;
        for r in rs {
            let pts: Vec<(f64, f64)> = r["series"]["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| Some((x["step"].as_f64()?, x["teacher_entropy"].as_f64()? / ln_k)))
                .collect();
            line(&mut chart, pts, run_style(r), run_label(r))?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight, 14)
    })
}

fn nn_over_training(runs: &[Value], path: &Path) -> Result<()> {
    panel_figure(runs, path, |area, p, rs| {
        let series: Vec<(&Value, Vec<(f64, f64)>)> = rs
            .iter()
            .map(|r| (*r, analysis_series(r, &|a| a["nn_mean"].as_f64())))
            .collect();
        let all: Vec<Vec<(f64, f64)>> = series.iter().map(|(_, s)| s.clone()).collect();
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{} K = {}", p.0, p.1), (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..xmax(&rs), y_range(&all, None))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("mean NN distance")
            .y_label_formatter(&|v| format!("{v:.3}"))
            .label_style((FONT, 14))
            .draw()
            .map_err(err)?;
        for (r, pts) in series {
            line(&mut chart, pts, run_style(r), run_label(r))?;
        }
        legend(&mut chart, SeriesLabelPosition::LowerLeft, 14)
    })
}

/// A head's final unique fractions by ε, sorted by ε.
fn by_eps(c: &Value, k: f64) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> = c["unique_greedy"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(e, u)| Some((e.parse::<f64>().ok()?, u.as_f64()? / k)))
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    pts
}

fn unique_vs_eps(runs: &[Value], path: &Path) -> Result<()> {
    panel_figure(runs, path, |area, p, rs| {
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{} K = {}", p.0, p.1), (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0.008f64..0.6f64).log_scale(), 0f64..1.05f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("ε")
            .y_desc("unique / K")
            .x_label_formatter(&|v| format!("{v:.3}"))
            .label_style((FONT, 14))
            .draw()
            .map_err(err)?;
        let k = p.1 as f64;
        for r in rs {
            let c = &r["final"]["collapse"];
            let t = by_eps(c, k);
            let s = by_eps(&c["student"], k);
            let style = run_style(r);
            both_heads(&mut chart, r, t.clone(), s)?;
            chart
                .draw_series(
                    t.into_iter()
                        .map(|pt| Circle::new(pt, 4, style.color.filled())),
                )
                .map_err(err)?;
        }
        legend(&mut chart, SeriesLabelPosition::LowerLeft, 14)
    })
}

fn knn_vs_lambda(runs: &[Value], path: &Path) -> Result<()> {
    // λ on a categorical axis.
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
        RGBColor(44, 160, 44),
    ];
    let mut series: Vec<(String, i64, &str, &str)> = Vec::new();
    for p in panels(runs) {
        series.push((p.0.clone(), p.1, "top1", ""));
        if p.0 == "lt100" {
            series.push((p.0.clone(), p.1, "head_top1", " head"));
            series.push((p.0.clone(), p.1, "tail_top1", " tail"));
        }
    }
    for (i, (ds, k, field, suffix)) in series.iter().enumerate() {
        let of_seed = |seed0: bool| -> Vec<(f64, f64)> {
            let mut pts: Vec<(f64, f64)> = runs
                .iter()
                .filter(|r| r["dataset"] == ds.as_str() && r["k"] == *k)
                .filter(|r| (r["seed"].as_u64().unwrap_or(0) == 0) == seed0)
                .filter_map(|r| {
                    Some((
                        pos(r["lambda"].as_f64()?)?,
                        r["final"]["knn"][*field].as_f64()?,
                    ))
                })
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            pts
        };
        let c = palette[i % palette.len()];
        let style = if *field == "top1" {
            c.stroke_width(3)
        } else {
            c.stroke_width(1)
        };
        let pts = of_seed(true);
        line(
            &mut chart,
            pts.clone(),
            style,
            format!("{ds} K={k}{suffix}"),
        )?;
        chart
            .draw_series(pts.into_iter().map(|pt| Circle::new(pt, 4, c.filled())))
            .map_err(err)?;
        chart
            .draw_series(
                of_seed(false)
                    .into_iter()
                    .map(|pt| Circle::new(pt, 6, c.stroke_width(2))),
            )
            .map_err(err)?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight, 15)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Sorted masses as (rank, mass) points, zeros left out (log axes).
fn ranked(v: &Value) -> Vec<(f64, f64)> {
    v.as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, m)| Some(((i + 1) as f64, m.as_f64()?)))
        .filter(|&(_, m)| m > 0.0)
        .collect()
}

fn grouped_mlcd(runs: &[Value], path: &Path) -> Result<()> {
    panel_figure(runs, path, |area, p, rs| {
        let rs: Vec<&Value> = rs
            .into_iter()
            .filter(|r| r["seed"].as_u64().unwrap_or(0) == 0)
            .collect();
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{} K = {}", p.0, p.1), (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((1f64..p.1 as f64).log_scale(), (1e-7f64..1f64).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("rank (prototype or group)")
            .y_desc("probability mass")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .label_style((FONT, 14))
            .draw()
            .map_err(err)?;
        for r in rs {
            let c = lambda_color(r["lambda"].as_f64().unwrap_or(0.0));
            let groups = r["final"]["grouped_mass_sorted"]
                .as_array()
                .map_or(0, Vec::len);
            let lambda = r["lambda"].as_f64().unwrap_or(0.0);
            line(
                &mut chart,
                ranked(&r["final"]["mlcd_mass_sorted"]),
                c.stroke_width(1),
                format!("λ = {lambda}: MLCD π (K = {})", p.1),
            )?;
            line(
                &mut chart,
                ranked(&r["final"]["grouped_mass_sorted"]),
                c.stroke_width(3),
                format!("λ = {lambda}: grouped Π ({groups} groups)"),
            )?;
        }
        legend(&mut chart, SeriesLabelPosition::LowerLeft, 14)
    })
}
