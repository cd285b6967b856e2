//! Loss-curve pictures: train loss (raw and EMA-smoothed, as TensorBoard smooths), validation
//! loss, the learning rate on a secondary axis, one or several runs in one picture with a
//! legend; a log-scale loss axis when the loss spans more than 1.5 decades. Drawn with
//! `plotters` (text in an embedded DejaVu Sans, so no system font is needed), written as a
//! compressed PNG and as SVG.
//!
//! ```
//! use ds_engine::plot::{PlotOptions, RunCurves};
//!
//! let losses: Vec<f64> = (0..200).map(|i| 4.0 * (-(i as f64) / 60.0).exp() + 0.5).collect();
//! let lrs: Vec<f64> = (0..200).map(|i| 1e-3 * (i as f64 / 20.0).min(1.0)).collect();
//! let mut run = RunCurves::from_losses("demo", &losses, &lrs, 1);
//! run.val_loss.push((200.0, 0.6));
//! let opts = PlotOptions::titled("GPT, ZeRO-2, world size 2");
//! let png = ds_engine::plot::render_png(&[run.clone()], &opts).unwrap();
//! assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
//! let svg = ds_engine::plot::render_svg(&[run], &opts).unwrap();
//! assert!(svg.contains("<svg"));
//! ```

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::EngineError;

/// One run's curves, x in optimizer steps (or samples, see [`RunCurves::from_csv_monitor`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunCurves {
    /// The run's name in the legend.
    pub name: String,
    /// `(x, train loss)`, one point per step.
    pub train_loss: Vec<(f64, f64)>,
    /// `(x, validation loss)` (often one point, at the end).
    pub val_loss: Vec<(f64, f64)>,
    /// `(x, learning rate)`.
    pub lr: Vec<(f64, f64)>,
}

/// The CSV files of DeepSpeed's `csv_monitor` ([`crate::monitor::CsvMonitor`]) that
/// [`RunCurves::from_csv_monitor`] reads.
pub const CSV_TRAIN_LOSS: &str = "Train_Samples_train_loss.csv";
/// The learning-rate CSV of the monitor.
pub const CSV_LR: &str = "Train_Samples_lr.csv";
/// The validation-loss CSV of the monitor.
pub const CSV_VAL_LOSS: &str = "Eval_Samples_val_loss.csv";

impl RunCurves {
    /// The curves of one training run: `losses[i]` and `lrs[i]` (may be empty) at step
    /// `first_step + i`.
    pub fn from_losses(name: &str, losses: &[f64], lrs: &[f64], first_step: u64) -> Self {
        let at = |i: usize| (first_step + i as u64) as f64;
        RunCurves {
            name: name.to_string(),
            train_loss: losses
                .iter()
                .enumerate()
                .map(|(i, &v)| (at(i), v))
                .collect(),
            val_loss: Vec::new(),
            lr: lrs.iter().enumerate().map(|(i, &v)| (at(i), v)).collect(),
        }
    }

    /// Reads a `csv_monitor` folder (`<output_path>/<job_name>/`): its train loss, learning
    /// rate and validation loss CSVs (`step,<name>` header, one `global_samples,value` row per
    /// record). With `per_step`, x is the optimizer step: samples divided by the batch size,
    /// which is the smallest gap between consecutive train-loss rows (or the first row's
    /// samples when there is one row); otherwise x is the number of samples. The run is
    /// named after the folder.
    pub fn from_csv_monitor(dir: &Path, per_step: bool) -> Result<Self, EngineError> {
        let train = read_monitor_csv(&dir.join(CSV_TRAIN_LOSS))?.ok_or_else(|| {
            EngineError::Data(format!(
                "{} has no {CSV_TRAIN_LOSS} (not a csv_monitor folder)",
                dir.display()
            ))
        })?;
        let lr = read_monitor_csv(&dir.join(CSV_LR))?.unwrap_or_default();
        let val = read_monitor_csv(&dir.join(CSV_VAL_LOSS))?.unwrap_or_default();
        let batch = if per_step {
            let gap = train
                .windows(2)
                .map(|w| w[1].0 - w[0].0)
                .filter(|&d| d > 0.0)
                .fold(f64::INFINITY, f64::min);
            match (gap.is_finite(), train.first()) {
                (true, _) => gap,
                (false, Some(&(s, _))) if s > 0.0 => s,
                _ => 1.0,
            }
        } else {
            1.0
        };
        let scale = |v: Vec<(f64, f64)>| v.into_iter().map(|(x, y)| (x / batch, y)).collect();
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(RunCurves {
            name,
            train_loss: scale(train),
            val_loss: scale(val),
            lr: scale(lr),
        })
    }
}

/// The runs under `dirs` for `ds plot`: each folder that holds [`CSV_TRAIN_LOSS`] is one run;
/// a folder that does not (a monitor's `output_path`) contributes each of its subfolders that
/// does, in name order. Runs whose folder names collide are named by their full paths.
pub fn load_csv_runs(dirs: &[PathBuf], per_step: bool) -> Result<Vec<RunCurves>, EngineError> {
    let mut found: Vec<PathBuf> = Vec::new();
    for d in dirs {
        if d.join(CSV_TRAIN_LOSS).is_file() {
            found.push(d.clone());
            continue;
        }
        let entries = std::fs::read_dir(d)
            .map_err(|e| EngineError::Data(format!("cannot read {}: {e}", d.display())))?;
        let mut subs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join(CSV_TRAIN_LOSS).is_file())
            .collect();
        if subs.is_empty() {
            return Err(EngineError::Data(format!(
                "{} holds no {CSV_TRAIN_LOSS}, nor does any folder in it (enable csv_monitor in \
                 the config: {{\"csv_monitor\": {{\"enabled\": true, \"output_path\": ..., \
                 \"job_name\": ...}}}})",
                d.display()
            )));
        }
        subs.sort();
        found.extend(subs);
    }
    let mut runs = found
        .iter()
        .map(|d| RunCurves::from_csv_monitor(d, per_step))
        .collect::<Result<Vec<_>, _>>()?;
    for i in 0..runs.len() {
        if runs.iter().filter(|r| r.name == runs[i].name).count() > 1 {
            runs[i].name = found[i].display().to_string();
        }
    }
    Ok(runs)
}

/// The `(x, value)` rows of one monitor CSV, `None` when the file does not exist.
fn read_monitor_csv(path: &Path) -> Result<Option<Vec<(f64, f64)>>, EngineError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(EngineError::Data(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    // A run still writing its monitor may have flushed half a row: only whole lines count.
    let text = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || EngineError::Data(format!("{}:{}: not `step,value`", path.display(), i + 1));
        let (x, y) = line.split_once(',').ok_or_else(bad)?;
        let x: f64 = x.trim().parse().map_err(|_| bad())?;
        let y: f64 = y.trim().parse().map_err(|_| bad())?;
        rows.push((x, y));
    }
    Ok(Some(rows))
}

/// What the picture shows besides the curves.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotOptions {
    /// The title.
    pub title: String,
    /// The x-axis label (`step` or `samples`).
    pub x_label: String,
    /// The EMA weight of the smoothed train loss in [0, 1) (TensorBoard's smoothing slider);
    /// `None` picks one from the run's length ([`default_smoothing`]).
    pub smoothing: Option<f64>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl PlotOptions {
    /// The defaults (steps on x, smoothing from the length, 960 x 600) with this title.
    pub fn titled(title: &str) -> Self {
        PlotOptions {
            title: title.to_string(),
            x_label: "step".into(),
            smoothing: None,
            width: 960,
            height: 600,
        }
    }
}

impl Default for PlotOptions {
    fn default() -> Self {
        PlotOptions::titled("training loss")
    }
}

/// The EMA weight for a curve of `n` points: TensorBoard's default 0.6 up to 625 points,
/// then a window of about `n / 250` points (a few pixel columns of the picture: the noise
/// goes, a fast early drop is not smeared out), 0.99 at most.
pub fn default_smoothing(n: usize) -> f64 {
    (1.0 - 250.0 / n.max(1) as f64).clamp(0.6, 0.99)
}

/// TensorBoard's smoothing: an exponential moving average with weight `w` on the previous
/// value, debiased for its zero start (`last = w * last + (1 - w) * v`, then
/// `last / (1 - w^k)` after `k` finite values). Non-finite values pass through unsmoothed
/// and do not enter the average.
pub fn ema_smooth(values: &[f64], w: f64) -> Vec<f64> {
    let w = w.clamp(0.0, 0.999_999);
    let (mut last, mut k) = (0.0, 0i32);
    values
        .iter()
        .map(|&v| {
            if !v.is_finite() {
                return v;
            }
            last = last * w + (1.0 - w) * v;
            k += 1;
            let debias = 1.0 - w.powi(k);
            if debias > 0.0 {
                last / debias
            } else {
                v
            }
        })
        .collect()
}

/// Matplotlib's "tab10" colours, one per run.
const COLORS: [RGBColor; 10] = [
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
const LR_COLOR: RGBColor = RGBColor(110, 110, 110);
/// The font family name the embedded DejaVu Sans is registered under.
const FONT: &str = "sans-serif";

fn register_fonts() -> Result<(), EngineError> {
    static ONCE: Once = Once::new();
    let mut r = Ok(());
    ONCE.call_once(|| {
        r = register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .and_then(|()| register_font(FONT, FontStyle::Bold, dejavu::sans::bold()))
            .map_err(|_| EngineError::Data("plot: the embedded font does not load".into()));
    });
    r
}

fn plot_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Data(format!("plot: {e}"))
}

fn finite(points: &[(f64, f64)]) -> impl Iterator<Item = (f64, f64)> + '_ {
    points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
}

/// `(lo, hi)` of `vals`, widened when empty or flat.
fn span(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= 1e-12 * hi.abs().max(1.0) {
        let d = (hi.abs() * 0.05).max(1e-6);
        return (lo - d, hi + d);
    }
    (lo, hi)
}

/// Whether the loss axis is logarithmic: all losses positive and spanning more than 1.5
/// decades.
pub fn wants_log_scale(runs: &[RunCurves]) -> bool {
    let ys = || {
        runs.iter()
            .flat_map(|r| finite(&r.train_loss).chain(finite(&r.val_loss)))
            .map(|p| p.1)
    };
    let (lo, hi) = span(ys());
    ys().next().is_some() && lo > 0.0 && (hi / lo).log10() > 1.5
}

/// The PNG of `runs` (compressed, 8-bit RGB).
pub fn render_png(runs: &[RunCurves], opts: &PlotOptions) -> Result<Vec<u8>, EngineError> {
    let (w, h) = (opts.width.max(200), opts.height.max(150));
    let mut rgb = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw(&root, runs, opts)?;
        root.present().map_err(plot_err)?;
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::High);
        let mut wr = enc.write_header().map_err(plot_err)?;
        wr.write_image_data(&rgb).map_err(plot_err)?;
        wr.finish().map_err(plot_err)?;
    }
    Ok(out)
}

/// The SVG of `runs` (text as `<text>` in the `sans-serif` family).
pub fn render_svg(runs: &[RunCurves], opts: &PlotOptions) -> Result<String, EngineError> {
    let (w, h) = (opts.width.max(200), opts.height.max(150));
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (w, h)).into_drawing_area();
        draw(&root, runs, opts)?;
        root.present().map_err(plot_err)?;
    }
    Ok(s)
}

/// Writes the PNG to `png_path` and the SVG beside it (same name, `.svg`); returns the SVG's
/// path.
pub fn write_pictures(
    png_path: &Path,
    runs: &[RunCurves],
    opts: &PlotOptions,
) -> Result<PathBuf, EngineError> {
    let write = |p: &Path, bytes: &[u8]| {
        std::fs::write(p, bytes)
            .map_err(|e| EngineError::Data(format!("cannot write {}: {e}", p.display())))
    };
    write(png_path, &render_png(runs, opts)?)?;
    let svg_path = png_path.with_extension("svg");
    write(&svg_path, render_svg(runs, opts)?.as_bytes())?;
    Ok(svg_path)
}

/// Writes the loss curve of `losses` (step `first_step + i` for `losses[i]`) to `path` as PNG,
/// and an SVG beside it, with no learning rate or validation loss and a plain title.
pub fn write_loss_curve(path: &Path, losses: &[f64], first_step: u64) -> Result<(), EngineError> {
    let run = RunCurves::from_losses("train", losses, &[], first_step);
    write_pictures(path, &[run], &PlotOptions::default()).map(|_| ())
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    runs: &[RunCurves],
    opts: &PlotOptions,
) -> Result<(), EngineError> {
    register_fonts()?;
    root.fill(&WHITE).map_err(plot_err)?;
    let (x0, x1) = span(
        runs.iter()
            .flat_map(|r| {
                finite(&r.train_loss)
                    .chain(finite(&r.val_loss))
                    .chain(finite(&r.lr))
            })
            .map(|p| p.0),
    );
    let (ylo, yhi) = span(
        runs.iter()
            .flat_map(|r| finite(&r.train_loss).chain(finite(&r.val_loss)))
            .map(|p| p.1),
    );
    // Headroom above the curves for the legend (upper right), so that it covers none of
    // them: its rows at about 21 px each over a plot area of about `height - 150` px.
    let rows: usize = runs
        .iter()
        .map(|r| {
            1 + usize::from(runs.len() == 1)
                + usize::from(finite(&r.val_loss).next().is_some())
                + usize::from(finite(&r.lr).next().is_some())
        })
        .sum();
    let plot_h = (f64::from(opts.height.max(150)) - 150.0).max(100.0);
    let room = ((rows as f64 * 21.0 + 24.0) / plot_h).clamp(0.08, 0.6);
    let grow = room / (1.0 - room);
    if wants_log_scale(runs) {
        let (lo, hi) = (ylo / 1.1, yhi * 1.1);
        let hi = hi * (hi / lo).powf(grow);
        draw_with(root, runs, opts, (x0, x1), (lo..hi).log_scale(), None, room)
    } else {
        let pad = (yhi - ylo) * 0.04;
        let lo = if ylo >= 0.0 {
            (ylo - pad).max(0.0)
        } else {
            ylo - pad
        };
        let hi = yhi + pad;
        let hi = hi + (hi - lo) * grow;
        draw_with(root, runs, opts, (x0, x1), lo..hi, Some(hi - lo), room)
    }
}

/// Linear tick labels with as many decimals as ticks about `span / 8` apart need (all with
/// the same number), scientific notation for very small or large values.
fn fmt_fixed(v: f64, span: f64) -> String {
    let step = span / 8.0;
    if v != 0.0 && !(1e-4..1e5).contains(&v.abs()) || step < 1e-6 {
        return fmt_num(v);
    }
    let decimals = (-step.log10().floor()).clamp(0.0, 8.0) as usize;
    format!("{v:.decimals$}")
}

/// Tick labels: 3 significant digits, scientific notation for very small or large values.
fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        let s = format!("{v:.1e}");
        s.replace(".0e", "e")
    } else {
        let digits = (2 - a.log10().floor() as i32).clamp(0, 6) as usize;
        let s = format!("{v:.digits$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }
}

/// `(x, lowest, highest)` of `pts` (in x order) in `buckets` runs of consecutive points, x the
/// middle of each run.
fn minmax_band(pts: &[(f64, f64)], buckets: usize) -> Vec<(f64, f64, f64)> {
    let per = pts.len().div_ceil(buckets.max(1)).max(1);
    pts.chunks(per)
        .map(|c| {
            let (lo, hi) = c
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                    (a.min(p.1), b.max(p.1))
                });
            ((c[0].0 + c[c.len() - 1].0) / 2.0, lo, hi)
        })
        .collect()
}

/// Learning-rate tick labels: one notation for the whole axis (`1.5e-4`, `2.0e-4`, ... when
/// the axis tops out below 0.01).
fn fmt_lr(v: f64, top: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if top < 0.01 {
        format!("{v:.1e}")
    } else {
        fmt_fixed(v, top)
    }
}

/// A count as `12.3K`, `4.56M`, `7.8B` (3 significant digits).
pub fn fmt_count(v: f64) -> String {
    let (d, unit) = match v.abs() {
        a if a >= 1e9 => (1e9, "B"),
        a if a >= 1e6 => (1e6, "M"),
        a if a >= 1e3 => (1e3, "K"),
        _ => (1.0, ""),
    };
    format!("{}{unit}", fmt_num(v / d))
}

fn draw_with<DB: DrawingBackend, Y>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    runs: &[RunCurves],
    opts: &PlotOptions,
    (x0, x1): (f64, f64),
    y: Y,
    linear_span: Option<f64>,
    room: f64,
) -> Result<(), EngineError>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let has_lr = runs.iter().any(|r| finite(&r.lr).next().is_some());
    let (_, lr_hi) = span(runs.iter().flat_map(|r| finite(&r.lr)).map(|p| p.1));
    let lr_hi = if lr_hi > 0.0 {
        lr_hi * 1.04 / (1.0 - room)
    } else {
        1.0
    };
    let height = root.dim_in_pixel().1 as f64;
    let font = |px: f64| (FONT, px * height / 600.0);
    let mut chart = ChartBuilder::on(root)
        .caption(&opts.title, font(22.0).into_font().style(FontStyle::Bold))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .right_y_label_area_size(if has_lr { 80 } else { 14 })
        .build_cartesian_2d(x0..x1, y)
        .map_err(plot_err)?
        .set_secondary_coord(x0..x1, 0.0..lr_hi);
    // Steps are whole numbers: a short run gets one tick per step and no fractional labels.
    let short = x1 - x0 < 8.0;
    let x_fmt = |v: &f64| {
        if (v.round() - v).abs() < 1e-9 && v.abs() < 1e7 {
            format!("{}", v.round() as i64)
        } else if short {
            String::new()
        } else {
            fmt_num(*v)
        }
    };
    let y_fmt = |v: &f64| match linear_span {
        Some(span) => fmt_fixed(*v, span),
        None => fmt_num(*v),
    };
    chart
        .configure_mesh()
        .x_desc(&opts.x_label)
        .y_desc(if linear_span.is_none() {
            "loss (log scale)"
        } else {
            "loss"
        })
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .axis_desc_style(font(17.0))
        .label_style(font(14.0))
        .bold_line_style(RGBColor(225, 225, 225))
        .light_line_style(RGBColor(244, 244, 244))
        .x_labels(if short { (x1 - x0) as usize + 1 } else { 8 })
        .y_labels(8)
        .draw()
        .map_err(plot_err)?;
    if has_lr {
        chart
            .configure_secondary_axes()
            .y_desc("learning rate")
            .y_label_formatter(&|v| fmt_lr(*v, lr_hi))
            .axis_desc_style(font(17.0))
            .label_style(font(14.0))
            .draw()
            .map_err(plot_err)?;
    }
    let many = runs.len() > 1;
    let label = |run: &RunCurves, what: &str| {
        if many {
            format!("{} {what}", run.name)
        } else {
            what.to_string()
        }
    };
    for (k, run) in runs.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        let pts: Vec<(f64, f64)> = finite(&run.train_loss).collect();
        let w = opts
            .smoothing
            .unwrap_or_else(|| default_smoothing(pts.len()));
        let smooth = ema_smooth(&pts.iter().map(|p| p.1).collect::<Vec<_>>(), w);
        // The raw loss, faint: a line, or for more points than pixels the band between
        // each pixel column's lowest and highest loss (what the line would fill, in one
        // flat colour).
        let raw_style = c.mix(0.4);
        let s = if pts.len() > 1200 {
            let band = minmax_band(&pts, 600);
            let outline: Vec<(f64, f64)> = band
                .iter()
                .map(|&(x, _, hi)| (x, hi))
                .chain(band.iter().rev().map(|&(x, lo, _)| (x, lo)))
                .collect();
            chart
                .draw_series(std::iter::once(Polygon::new(outline, c.mix(0.22).filled())))
                .map_err(plot_err)?
        } else {
            chart
                .draw_series(LineSeries::new(
                    pts.iter().copied(),
                    raw_style.stroke_width(1),
                ))
                .map_err(plot_err)?
        };
        if !many {
            s.label("train loss")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], raw_style));
        }
        let s = chart
            .draw_series(LineSeries::new(
                pts.iter().zip(&smooth).map(|(p, &v)| (p.0, v)),
                c.stroke_width(2),
            ))
            .map_err(plot_err)?;
        s.label(label(run, &format!("train loss, smoothed (EMA {w:.2})")))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        let val: Vec<(f64, f64)> = finite(&run.val_loss).collect();
        if !val.is_empty() {
            if val.len() > 1 {
                chart
                    .draw_series(DashedLineSeries::new(
                        val.iter().copied(),
                        6,
                        4,
                        c.stroke_width(2),
                    ))
                    .map_err(plot_err)?;
            }
            let s = chart
                .draw_series(val.iter().map(|&p| {
                    EmptyElement::at(p)
                        + Circle::new((0, 0), 5, c.filled())
                        + Circle::new((0, 0), 5, BLACK.stroke_width(1))
                }))
                .map_err(plot_err)?;
            let last = val[val.len() - 1].1;
            s.label(label(run, &format!("validation loss ({})", fmt_num(last))))
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, c.filled()));
        }
        let lr: Vec<(f64, f64)> = finite(&run.lr).collect();
        if !lr.is_empty() {
            let lc = if many { c } else { LR_COLOR };
            let s = chart
                .draw_secondary_series(DashedLineSeries::new(lr, 5, 4, lc.stroke_width(1)))
                .map_err(plot_err)?;
            s.label(label(run, "learning rate (right axis)"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], lc.stroke_width(1)));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(190, 190, 190))
        .label_font(font(14.0))
        .margin(10)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_matches_tensorboard() {
        // First value is returned as is (debiased); constant input stays constant.
        let s = ema_smooth(&[2.0, 2.0, 2.0], 0.6);
        assert!(s.iter().all(|v| (v - 2.0).abs() < 1e-12), "{s:?}");
        let s = ema_smooth(&[1.0, 0.0], 0.5);
        // last = 0.5, /0.5 = 1; then last = 0.25, /(1 - 0.25) = 1/3.
        assert!((s[0] - 1.0).abs() < 1e-12 && (s[1] - 1.0 / 3.0).abs() < 1e-12);
        let s = ema_smooth(&[1.0, f64::NAN, 1.0], 0.9);
        assert!(s[1].is_nan() && (s[2] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn log_scale_only_past_one_and_a_half_decades() {
        let run = |a: f64, b: f64| RunCurves::from_losses("r", &[a, b], &[], 1);
        assert!(!wants_log_scale(&[run(10.0, 1.0)]));
        assert!(wants_log_scale(&[run(100.0, 1.0)]));
        assert!(!wants_log_scale(&[run(100.0, -1.0)]));
    }

    #[test]
    fn tick_labels() {
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(2.5), "2.5");
        assert_eq!(fmt_num(0.001), "0.001");
        assert_eq!(fmt_num(1e-4), "1e-4");
        assert_eq!(fmt_num(123.0), "123");
        assert_eq!(fmt_count(1_234_567.0), "1.23M");
        assert_eq!(fmt_count(999.0), "999");
        assert_eq!(fmt_fixed(2.745, 0.04), "2.745");
        assert_eq!(fmt_fixed(2.75, 0.04), "2.750");
        assert_eq!(fmt_fixed(3.0, 3.0), "3.0");
        assert_eq!(fmt_lr(8e-4, 1.4e-3), "8.0e-4");
        assert_eq!(fmt_lr(0.0, 1.4e-3), "0");
    }

    #[test]
    fn reads_a_csv_monitor_folder_per_step() {
        let dir = std::env::temp_dir().join(format!("ds-plot-csv-{}", std::process::id()));
        let mut m = crate::monitor::CsvMonitor::new(dir.to_str().unwrap(), "job").unwrap();
        for step in 0..5u64 {
            let samples = (step + 1) * 8;
            m.write_event("Train/Samples/train_loss", 5.0 - step as f64, samples)
                .unwrap();
            m.write_event("Train/Samples/lr", 1e-3, samples).unwrap();
        }
        m.write_event("Eval/Samples/val_loss", 1.5, 40).unwrap();
        m.flush().unwrap();
        let r = RunCurves::from_csv_monitor(&dir.join("job"), true).unwrap();
        assert_eq!(r.name, "job");
        assert_eq!(r.train_loss[0], (1.0, 5.0));
        assert_eq!(r.train_loss[4], (5.0, 1.0));
        assert_eq!(r.lr.len(), 5);
        assert_eq!(r.val_loss, vec![(5.0, 1.5)]);
        let r = RunCurves::from_csv_monitor(&dir.join("job"), false).unwrap();
        assert_eq!(r.train_loss[4], (40.0, 1.0));
        assert!(RunCurves::from_csv_monitor(&dir, true).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Decodes a PNG to (width, height, RGB pixels).
    pub(crate) fn decode(png_bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let mut dec = png::Decoder::new(std::io::Cursor::new(png_bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; dec.output_buffer_size().unwrap()];
        let info = dec.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    #[test]
    fn png_is_small_sized_and_drawn_with_svg_beside() {
        let n = 6000;
        let losses: Vec<f64> = (0..n)
            .map(|i| {
                let t = i as f64;
                2.5 * (-t / 800.0).exp() + 0.9 + 0.15 * ((t * 12.9898).sin() * 43758.5453).fract()
            })
            .collect();
        let lrs: Vec<f64> = (0..n).map(|i| 1e-3 * (i as f64 / 100.0).min(1.0)).collect();
        let mut run = RunCurves::from_losses("r", &losses, &lrs, 1);
        run.val_loss.push((n as f64, 1.0));
        let dir = std::env::temp_dir().join(format!("ds-plot-png-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("loss.png");
        let svg = write_pictures(&path, &[run], &PlotOptions::titled("t")).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() < 100_000, "{} bytes", bytes.len());
        let (w, h, rgb) = decode(&bytes);
        assert_eq!((w, h), (960, 600));
        let colours: std::collections::HashSet<&[u8]> = rgb.chunks(3).collect();
        assert!(colours.len() > 50, "{} colours", colours.len());
        let svg = std::fs::read_to_string(svg).unwrap();
        assert!(
            svg.contains("<svg") && svg.contains("learning rate"),
            "{svg:.200}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
