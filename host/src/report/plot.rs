//! Plots of a run: `loss.png` (training loss per step, validation loss where
//! it was measured) and `lr.png` (learning rate per step), drawn from the run
//! folder's `metrics.jsonl` with plotters into an RGB buffer, encoded as PNG
//! and written atomically. Text uses the embedded font ([`crate::font`]), so no
//! system font is needed. A run started from an earlier stage's checkpoint is
//! drawn with that stage's steps before it ([`stages`]).

use anyhow::{bail, Context};
use plotters::prelude::*;
use super::metrics::{finite_points, read_metrics, MetricsError, MetricsRecord, METRICS_FILE};
use std::path::{Path, PathBuf};

/// Plot size in pixels.
pub const PLOT_WIDTH: u32 = 1000;
pub const PLOT_HEIGHT: u32 = 600;

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Line,
    /// Dots joined by a thin line (sparse measurements: validation loss).
    Dots,
}

/// One curve of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    pub mark: Mark,
    pub points: Vec<(f64, f64)>,
}

/// Distinct colours for series (matplotlib's tab10).
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Axis labels and title of a chart.
#[derive(Debug, Clone)]
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// Tick labels of the y axis in scientific notation (learning rates).
    pub y_scientific: bool,
}

/// A range around `lo..hi` with a margin, never empty.
fn padded(lo: f64, hi: f64, margin: f64) -> std::ops::Range<f64> {
    if hi > lo {
        let m = (hi - lo) * margin;
        lo - m..hi + m
    } else {
        let m = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        lo - m..hi + m
    }
}

/// Draw `series` (a legend when there is more than one or any is labelled)
/// and return the PNG bytes. Series without points are left out; an error
/// when none has any.
pub fn render_png(chart: &Chart, series: &[Series], (width, height): (u32, u32)) -> anyhow::Result<Vec<u8>> {
    let drawn: Vec<&Series> = series.iter().filter(|s| !s.points.is_empty()).collect();
    if drawn.is_empty() {
        bail!("{}: nothing to plot (no finite values)", chart.title);
    }
    let all = drawn.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    crate::font::register_plot_font();
    let mut buf = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let font = crate::font::PLOT_FONT;
        let mut ctx = ChartBuilder::on(&root)
            .caption(chart.title, (font, 24))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(if chart.y_scientific { 90 } else { 70 })
            .build_cartesian_2d(padded(x0, x1, 0.02), padded(y0, y1, 0.05))
            .map_err(plot_error)?;
        let x_fmt = |v: &f64| format!("{v:.0}");
        let y_fmt = |v: &f64| if chart.y_scientific { format!("{v:.1e}") } else { format!("{v:.3}") };
        ctx.configure_mesh()
            .x_desc(chart.x_label)
            .y_desc(chart.y_label)
            .axis_desc_style((font, 18))
            .label_style((font, 14))
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(plot_error)?;
        for s in &drawn {
            let color = s.color;
            let width = if s.mark == Mark::Dots { 1 } else { 2 };
            let ann = ctx
                .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(width)))
                .map_err(plot_error)?;
            ann.label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            if s.mark == Mark::Dots {
                ctx.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(plot_error)?;
            }
        }
        if drawn.len() > 1 {
            ctx.configure_series_labels()
                .label_font((font, 16))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(plot_error)?;
        }
        root.present().map_err(plot_error)?;
    }
    let img = image::RgbImage::from_raw(width, height, buf).context("plot buffer size")?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok(png)
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e}")
}

/// Render and write `path` atomically.
pub fn write_png(path: &Path, chart: &Chart, series: &[Series], size: (u32, u32)) -> anyhow::Result<()> {
    let png = render_png(chart, series, size)?;
    crate::files::write_atomic(path, &png).with_context(|| format!("writing {}", path.display()))
}

/// The run's name for titles: its folder's name.
pub fn run_name(run_dir: &Path) -> String {
    let abs = std::fs::canonicalize(run_dir).unwrap_or_else(|_| run_dir.to_owned());
    abs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| run_dir.display().to_string())
}

/// One stage of a chained run: a run folder and the steps of it that the
/// next stage started from.
#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    /// Steps before this stage's first (the earlier stages' steps).
    pub offset: usize,
    pub records: Vec<MetricsRecord>,
}

/// The checkpoint a run started from with `--init-from` (its `summary.json`'s
/// `init_from`), when there is one.
fn init_from(run_dir: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(run_dir.join("summary.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("init_from")?.as_str().map(PathBuf::from)
}

/// The step a checkpoint was saved at: its `state.json`'s `step`.
fn checkpoint_step(checkpoint: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(checkpoint.join("state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("step")?.as_u64().map(|s| s as usize)
}

/// The stages that led to `run_dir`, oldest first, ending with `run_dir`
/// itself: a run started `--init-from RUN/checkpoints/step-N` continues
/// `RUN`'s first N steps (and so on, up to 8 stages back). An earlier run
/// whose folder or metrics are gone ends the chain quietly.
pub fn stages(run_dir: &Path) -> Result<Vec<Stage>, MetricsError> {
    let last = Stage { name: run_name(run_dir), offset: 0, records: read_metrics(&run_dir.join(METRICS_FILE))? };
    let mut chain = vec![last];
    let mut dir = run_dir.to_owned();
    let mut seen = vec![std::fs::canonicalize(run_dir).unwrap_or_else(|_| run_dir.to_owned())];
    while chain.len() < 8 {
        let Some(checkpoint) = init_from(&dir) else { break };
        let Some(prev) = checkpoint.parent().and_then(Path::parent).map(Path::to_owned) else { break };
        let canonical = std::fs::canonicalize(&prev).unwrap_or_else(|_| prev.clone());
        if seen.contains(&canonical) {
            break;
        }
        let Ok(mut records) = read_metrics(&prev.join(METRICS_FILE)) else { break };
        if let Some(step) = checkpoint_step(&checkpoint) {
            records.retain(|r| r.step <= step);
        }
        if records.is_empty() {
            break;
        }
        seen.push(canonical);
        chain.push(Stage { name: run_name(&prev), offset: 0, records });
        dir = prev;
    }
    chain.reverse();
    let mut offset = 0;
    for stage in &mut chain {
        stage.offset = offset;
        offset += stage.records.iter().map(|r| r.step).max().unwrap_or(0);
    }
    Ok(chain)
}

/// `field` of every record of every stage, at the step counted from the
/// first stage's first.
fn stage_points(stage: &Stage, field: impl Fn(&MetricsRecord) -> Option<f64>) -> Vec<(f64, f64)> {
    finite_points(&stage.records, field).into_iter().map(|(x, y)| (x + stage.offset as f64, y)).collect()
}

/// The loss series of `stages`: training (lines) and validation (dots) per
/// stage, labelled with the stage's name when there are several.
fn loss_series(stages: &[Stage]) -> Vec<Series> {
    let chained = stages.len() > 1;
    let label = |stage: &Stage, what: &str| if chained { format!("{}: {what}", stage.name) } else { what.to_owned() };
    stages
        .iter()
        .enumerate()
        .flat_map(|(i, stage)| {
            [
                Series { label: label(stage, "training"), color: PALETTE[(2 * i) % PALETTE.len()], mark: Mark::Line, points: stage_points(stage, |r| r.loss) },
                Series {
                    label: label(stage, "validation"),
                    color: PALETTE[(2 * i + 1) % PALETTE.len()],
                    mark: Mark::Dots,
                    points: stage_points(stage, |r| r.val_loss),
                },
            ]
        })
        .collect()
}

/// Write `loss.png` and `lr.png` into `run_dir` from its `metrics.jsonl`;
/// returns the files written. A run started from an earlier run's checkpoint
/// (`--init-from`) is drawn after the stages before it ([`stages`]), each
/// stage in its own colours, steps counted from the first stage's first. A
/// run without a single finite loss (every step skipped) gets no `loss.png`
/// (a warning says so); a run without records is an error.
pub fn write_run_plots(run_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let stages = stages(run_dir)?;
    let name = stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(" -> ");
    let records = &stages.last().expect("stages ends with the run itself").records;
    let mut written = Vec::new();

    let series = loss_series(&stages);
    if series.iter().all(|s| s.points.is_empty()) {
        tracing::warn!("{}: no finite training or validation loss in {} records: no loss.png", run_dir.display(), records.len());
    } else {
        let path = run_dir.join("loss.png");
        let title = format!("{name}: loss");
        let chart = Chart { title: &title, x_label: "step", y_label: "loss", y_scientific: false };
        write_png(&path, &chart, &series, (PLOT_WIDTH, PLOT_HEIGHT))?;
        written.push(path);
    }

    let lr: Vec<Series> = stages
        .iter()
        .enumerate()
        .map(|(i, stage)| Series {
            label: if stages.len() > 1 { stage.name.clone() } else { "lr".into() },
            color: PALETTE[(2 * i + 2) % PALETTE.len()],
            mark: Mark::Line,
            points: stage_points(stage, |r| r.lr),
        })
        .collect();
    if lr.iter().all(|s| s.points.is_empty()) {
        tracing::warn!("{}: no learning rate in {} records: no lr.png", run_dir.display(), records.len());
    } else {
        let path = run_dir.join("lr.png");
        let title = format!("{name}: learning rate");
        let chart = Chart { title: &title, x_label: "step", y_label: "learning rate", y_scientific: true };
        write_png(&path, &chart, &lr, (PLOT_WIDTH, PLOT_HEIGHT))?;
        written.push(path);
    }
    if written.is_empty() {
        bail!("{}: no finite loss or learning rate in {} records of {METRICS_FILE}: nothing to plot", run_dir.display(), records.len());
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: usize, loss: Option<f64>, lr: f64, val: Option<f64>) -> String {
        let mut v = serde_json::json!({
            "step": step, "epoch": 0, "loss": loss, "lr": lr, "grad_norm": 1.0, "tokens": 100,
            "supervised_tokens": 40, "tokens_per_second": 1000.0, "elapsed_seconds": step as f64 * 0.5,
        });
        if let Some(val) = val {
            v["val_loss"] = val.into();
        }
        v.to_string()
    }

    fn decode(path: &Path) -> image::DynamicImage {
        image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn writes_loss_and_lr_plots() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("my-run");
        std::fs::create_dir(&run).unwrap();
        let mut text = String::new();
        for step in 1..=20 {
            let loss = if step == 7 { None } else { Some(3.0 / step as f64) };
            let val = (step % 5 == 0).then(|| 2.5 / step as f64);
            text += &line(step, loss, 1e-4 * step as f64 / 20.0, val);
            text += "\n";
        }
        std::fs::write(run.join(METRICS_FILE), text).unwrap();
        let written = write_run_plots(&run).unwrap();
        assert_eq!(written, vec![run.join("loss.png"), run.join("lr.png")]);
        for p in &written {
            let img = decode(p);
            assert_eq!((img.width(), img.height()), (PLOT_WIDTH, PLOT_HEIGHT));
            // Not a blank canvas: the curve and text are drawn.
            let rgb = img.to_rgb8();
            assert!(rgb.pixels().filter(|p| p.0 != [255, 255, 255]).count() > 1000);
        }
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn a_chained_run_draws_the_stages_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let write_run = |name: &str, steps: usize, loss0: f64| {
            let run = dir.path().join(name);
            std::fs::create_dir_all(run.join("checkpoints/step-00000004")).unwrap();
            let text: String = (1..=steps).map(|s| line(s, Some(loss0 / s as f64), 1e-3, (s % 2 == 0).then_some(loss0)) + "\n").collect();
            std::fs::write(run.join(METRICS_FILE), text).unwrap();
            std::fs::write(run.join("checkpoints/step-00000004/state.json"), r#"{"step": 4}"#).unwrap();
            run
        };
        let s1 = write_run("stage1", 6, 6.0);
        let s2 = write_run("stage2", 3, 3.0);
        let from = s1.join("checkpoints/step-00000004");
        std::fs::write(s2.join("summary.json"), serde_json::json!({"init_from": from}).to_string()).unwrap();
        // A stage that points at itself does not loop.
        std::fs::write(s1.join("summary.json"), serde_json::json!({"init_from": s2.join("checkpoints/x")}).to_string()).unwrap();

        let chain = stages(&s2).unwrap();
        let names: Vec<_> = chain.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["stage1", "stage2"]);
        // Stage 1 up to the checkpoint stage 2 started from (step 4), stage 2 after it.
        assert_eq!(chain[0].records.len(), 4);
        assert_eq!((chain[0].offset, chain[1].offset), (0, 4));
        let series = loss_series(&chain);
        assert_eq!(series.iter().map(|s| s.label.as_str()).collect::<Vec<_>>(), ["stage1: training", "stage1: validation", "stage2: training", "stage2: validation"]);
        assert_eq!(series[2].points.first(), Some(&(5.0, 3.0)));
        assert_eq!(series[3].points, vec![(6.0, 3.0)]);
        assert_eq!(write_run_plots(&s2).unwrap().len(), 2);

        // Without its earlier run, a stage plots alone.
        std::fs::remove_dir_all(&s1).unwrap();
        assert_eq!(stages(&s2).unwrap().len(), 1);
        assert_eq!(loss_series(&stages(&s2).unwrap())[0].label, "training");
    }

    #[test]
    fn nan_null_and_cut_off_lines() {
        let dir = tempfile::tempdir().unwrap();
        // serde_json writes NaN as null; a skipped step has loss null; the last line was cut off.
        let text = format!("{}\n{}\n\n{}\n{{\"step\": 4, \"lo", line(1, Some(2.0), 1e-3, None), line(2, None, 1e-3, None), line(3, Some(1.5), 1e-3, Some(1.7)));
        std::fs::write(dir.path().join(METRICS_FILE), text).unwrap();
        let records = read_metrics(&dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(finite_points(&records, |r| r.loss), vec![(1.0, 2.0), (3.0, 1.5)]);
        assert_eq!(write_run_plots(dir.path()).unwrap().len(), 2);

        // A single point still plots (a degenerate range is widened).
        std::fs::write(dir.path().join(METRICS_FILE), line(1, Some(2.0), 1e-3, None) + "\n").unwrap();
        assert_eq!(write_run_plots(dir.path()).unwrap().len(), 2);
    }

    #[test]
    fn every_step_skipped_gives_lr_only() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{}\n{}\n", line(1, None, 1e-3, None), line(2, None, 1e-3, None));
        std::fs::write(dir.path().join(METRICS_FILE), text).unwrap();
        assert_eq!(write_run_plots(dir.path()).unwrap(), vec![dir.path().join("lr.png")]);
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", write_run_plots(dir.path()).unwrap_err());
        assert!(e.contains("metrics.jsonl") && e.contains("cannot read"), "{e}");
        // The OS's words once, not again as the error's source.
        assert_eq!(e.matches("No such file").count(), 1, "{e}");

        std::fs::write(dir.path().join(METRICS_FILE), "\n\n").unwrap();
        let e = write_run_plots(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no metrics records"), "{e}");

        std::fs::write(dir.path().join(METRICS_FILE), format!("{}\nnot json\n{}\n", line(1, Some(1.0), 1e-3, None), line(2, Some(1.0), 1e-3, None))).unwrap();
        let e = write_run_plots(dir.path()).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl:2:"), "{e}");
    }
}
