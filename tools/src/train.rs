//! Train subcommands: `loss`, `align`, `train`, `eval`, `report`, `demo`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use mmkd_engine::checkpoint::{read_tensors, write_tensors, NamedTensor};
use mmkd_engine::cuda::KernelTarget;
use mmkd_engine::eval;
use mmkd_engine::loss::{
    clip_loss, distill_loss, pick_random_teacher_seeded, DistillConfig, IclScale, TeacherMode,
    TeacherNorm, TeacherTargets, REFERENCE_ICL_SCALE,
};
use mmkd_engine::trainer::{self, load_configs, StepRecord, TrainOptions};
use mmkd_engine::ClipModel;
use mmkd_loaders::Dataset;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Subcommand)]
pub enum TrainCommand {
    /// Evaluate the stage-1 or stage-2 loss on given features; prints task, fd, icl, total as
    /// JSON and optionally writes the gradients (a stable interface for parity checks).
    Loss(LossArgs),
    /// Train stage 1 (clip) or stage 2 (kd) on packed shards.
    Train(TrainArgs),
    /// Evaluate a checkpoint (or a teacher's stored features) on a labelled packed dataset:
    /// zero-shot, retrieval, linear probe.
    Eval(EvalArgs),
    /// Render a run's metrics.jsonl to RUN_DIR/report.png.
    Report(ReportArgs),
    /// The end-to-end CPU demo: synth → pack → align → stage 1 → stage 2 (and stage 1
    /// continued as the control) → eval table.
    Demo(DemoArgs),
    /// Teacher alignment: train the multi-teacher autoencoder on the raw teacher features and
    /// write a copy of the dataset whose projected targets are its 512-d latents (OUT, with the
    /// autoencoder's weights in OUT/align.safetensors); prints the per-teacher reconstruction
    /// loss as JSON.
    Align(AlignArgs),
}

#[derive(Args)]
pub struct AlignArgs {
    /// Packed dataset directory (with raw teacher features).
    #[arg(long)]
    data: PathBuf,
    /// Output: a new packed dataset with the aligned targets, plus `align.safetensors`.
    #[arg(long)]
    out: PathBuf,
    /// Use these autoencoder weights (an earlier run's `align.safetensors`) instead of
    /// training: how a held-out split gets the same projection as the training split.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Optimiser steps.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Hidden width of the shared encoders and decoders.
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    /// Learning rate (AdamW, constant).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Seed of initialisation, batches, noise and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples per step.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Weight of the cross-teacher NT-Xent term (0 = reconstruction only).
    #[arg(long, default_value_t = 1.0)]
    ntxent_weight: f64,
    /// NT-Xent temperature.
    #[arg(long, default_value_t = 0.07)]
    temperature: f64,
    /// No per-step log lines.
    #[arg(long)]
    quiet: bool,
}

fn align_cmd(a: AlignArgs) -> Result<()> {
    let report = align_dataset(&a)?;
    println!("{report}");
    Ok(())
}

/// Trains (or loads) the alignment autoencoder on `a.data` and writes the aligned dataset.
fn align_dataset(a: &AlignArgs) -> Result<serde_json::Value> {
    use mmkd_engine::align::{AlignConfig, AlignModel};
    let ds =
        Dataset::open(&a.data).with_context(|| format!("opening dataset {}", a.data.display()))?;
    if ds.num_teachers() == 0 {
        bail!(
            "{}: the manifest lists no teachers to align",
            a.data.display()
        );
    }
    let cfg = AlignConfig {
        steps: a.steps,
        hidden: a.hidden,
        lr: a.lr,
        seed: a.seed,
        batch_size: a.batch_size,
        ntxent_weight: a.ntxent_weight,
        temperature: a.temperature,
        ..AlignConfig::default()
    };
    let mut model = AlignModel::for_dataset(&ds, cfg.hidden, cfg.seed)?;
    let trained = match &a.weights {
        Some(w) => {
            model.params.load_safetensors(w).with_context(|| {
                format!(
                    "loading alignment weights {} (--hidden must match the run that wrote them)",
                    w.display()
                )
            })?;
            false
        }
        None => {
            let every = (cfg.steps / 20).max(1);
            let quiet = a.quiet;
            model.train(&ds, &cfg, &mut |s, l| {
                if !quiet && ((s + 1) % every == 0 || s + 1 == cfg.steps) {
                    eprintln!(
                        "[align] step {}/{}  reconstruction {:.6}  nt-xent {:.4}",
                        s + 1,
                        cfg.steps,
                        l.recon,
                        l.ntxent
                    );
                }
            })?;
            true
        }
    };
    if !a.quiet {
        eprintln!("[align] projecting {} samples", ds.len());
    }
    let proj = model.project(&ds, None, 1024)?;
    let note = serde_json::json!({
        "by": "mmkd align",
        "weights": a.weights.as_ref().map(|w| w.display().to_string()),
        "steps": if trained { cfg.steps } else { 0 },
        "hidden": cfg.hidden, "lr": cfg.lr, "seed": cfg.seed, "batch_size": cfg.batch_size,
        "ntxent_weight": cfg.ntxent_weight, "temperature": cfg.temperature,
        "reconstruction_mse": proj.losses,
    });
    mmkd_loaders::write_reprojected(
        &ds,
        &a.out,
        &mmkd_loaders::Projected {
            image: &proj.image,
            text: &proj.text,
        },
        note,
    )?;
    model
        .params
        .save_safetensors(&a.out.join("align.safetensors"))?;
    Ok(serde_json::json!({
        "samples": ds.len(), "steps": if trained { cfg.steps } else { 0 },
        "out": a.out.display().to_string(), "reconstruction_mse": proj.losses,
    }))
}

#[derive(Args)]
pub struct TrainArgs {
    /// Model config TOML (top-level model keys, an optional train table).
    #[arg(long)]
    config: PathBuf,
    /// clip or kd.
    #[arg(long, value_enum)]
    stage: Stage,
    /// Packed dataset directory.
    #[arg(long)]
    data: PathBuf,
    /// Run directory.
    #[arg(long)]
    out: PathBuf,
    /// Initial weights (checkpoint directory or .safetensors); stage 2 starts from stage 1's.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Override a config value: `lr=1e-4`, `train.epochs=3`, `model.embed_dim=512`.
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Where the step runs: cpu (the engine's CPU backend), cuda, cuda:N, auto (a GPU when
    /// one is usable) or emu (the CUDA kernels under CPU emulation: slow, small configs only).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Model config TOML (with the same --set overrides as training).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Checkpoint directory or .safetensors of the student.
    #[arg(long)]
    ckpt: Option<PathBuf>,
    /// Labelled packed dataset (held out).
    #[arg(long)]
    data: PathBuf,
    /// Evaluate this teacher's stored features instead of a student.
    #[arg(long)]
    teacher: Option<String>,
    #[arg(long = "set")]
    sets: Vec<String>,
}

#[derive(Args)]
pub struct ReportArgs {
    /// Run directory holding metrics.jsonl.
    run_dir: PathBuf,
}

#[derive(Args)]
pub struct DemoArgs {
    /// Working directory (default: a fresh folder under the system temp dir).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The short variant (CI): fewer samples and steps.
    #[arg(long)]
    quick: bool,
    /// Model config (default: the built-in `configs/demo.toml`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Train stage 2 on the stored projected targets instead of aligning the raw features.
    #[arg(long)]
    skip_align: bool,
    /// Config overrides for both stages, e.g. `vision.image_size=64`.
    #[arg(long = "set")]
    sets: Vec<String>,
}

/// Which training stage's loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Stage {
    /// Stage 1: the CLIP loss.
    Clip,
    /// Stage 2: multi-teacher distillation.
    Kd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum NormArg {
    L2,
    None,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Random,
    Mean,
    All,
}

#[derive(Args)]
pub struct LossArgs {
    /// clip or kd.
    #[arg(long, value_enum)]
    stage: Stage,
    /// Safetensors file with `image`, `text` [N, D] (unnormalised), `logit_scale` (the raw
    /// parameter, one element) and for kd `teacher_image`, `teacher_text` ([N, D], or [N, T, D]
    /// with `teacher_mask` [N, T]); with `--icl-scale learned`, optionally `icl_scale` (ln c).
    #[arg(long = "in")]
    input: PathBuf,
    /// λ, the weight of the feature-distillation term.
    #[arg(long, default_value_t = 50.0)]
    fd_weight: f64,
    /// A number (multiplied in directly, as the reference does) or `learned` (c = exp(icl_scale)).
    #[arg(long, default_value = "2.659260036932778")]
    icl_scale: String,
    /// Teacher target normalisation.
    #[arg(long, value_enum, default_value = "l2")]
    teacher_norm: NormArg,
    /// random (one teacher per sample; drawn with --seed when [N, T, D] is given), mean or all.
    #[arg(long, value_enum, default_value = "random")]
    teacher_mode: ModeArg,
    /// Seed of the teacher draw in random mode with several teacher slots.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the gradients (`image`, `text`, `logit_scale`, and `icl_scale` when learned) here.
    #[arg(long)]
    grads: Option<PathBuf>,
}

pub fn run(cmd: TrainCommand) -> Result<()> {
    match cmd {
        TrainCommand::Loss(a) => loss_cmd(a),
        TrainCommand::Train(a) => train_cmd(a),
        TrainCommand::Eval(a) => eval_cmd(a),
        TrainCommand::Report(a) => report(&a.run_dir).map(|p| println!("{}", p.display())),
        TrainCommand::Demo(a) => demo(a),
        TrainCommand::Align(a) => align_cmd(a),
    }
}

fn get<'a>(
    t: &'a BTreeMap<String, NamedTensor>,
    name: &str,
    file: &std::path::Path,
) -> Result<&'a NamedTensor> {
    t.get(name)
        .with_context(|| format!("{}: tensor `{name}` is missing", file.display()))
}

fn loss_cmd(a: LossArgs) -> Result<()> {
    let file = &a.input;
    let t = read_tensors(file)?;
    let (ishape, image) = get(&t, "image", file)?;
    let (tshape, text) = get(&t, "text", file)?;
    if ishape.len() != 2 || tshape != ishape {
        bail!(
            "{}: `image` and `text` must both be [N, D]; got {ishape:?} and {tshape:?}",
            file.display()
        );
    }
    let (n, d) = (ishape[0], ishape[1]);
    let (sshape, s) = get(&t, "logit_scale", file)?;
    if s.len() != 1 {
        bail!(
            "{}: `logit_scale` must hold one element; shape {sshape:?}",
            file.display()
        );
    }
    let s = s[0];
    let mut out = BTreeMap::new();
    let json = match a.stage {
        Stage::Clip => {
            let (task, g) = clip_loss(image, text, s, n, d)?;
            out.insert("image".to_string(), (vec![n, d], g.image));
            out.insert("text".to_string(), (vec![n, d], g.text));
            out.insert("logit_scale".to_string(), (vec![], vec![g.logit_scale]));
            serde_json::json!({"task": task, "fd": 0.0, "icl": 0.0, "total": task})
        }
        Stage::Kd => {
            let icl_scale = if a.icl_scale == "learned" {
                let l = match t.get("icl_scale") {
                    Some((_, v)) if v.len() == 1 => v[0] as f64,
                    Some((shape, _)) => {
                        bail!(
                            "{}: `icl_scale` must hold one element; shape {shape:?}",
                            file.display()
                        )
                    }
                    None => REFERENCE_ICL_SCALE.ln(),
                };
                IclScale::Learned(l)
            } else {
                IclScale::Const(a.icl_scale.parse::<f64>().with_context(|| {
                    format!(
                        "--icl-scale `{}`: expected a number or `learned`",
                        a.icl_scale
                    )
                })?)
            };
            let cfg = DistillConfig {
                fd_weight: a.fd_weight,
                icl_scale,
                teacher_norm: match a.teacher_norm {
                    NormArg::L2 => TeacherNorm::L2,
                    NormArg::None => TeacherNorm::None,
                },
                teacher_mode: match a.teacher_mode {
                    ModeArg::Random => TeacherMode::Random,
                    ModeArg::Mean => TeacherMode::Mean,
                    ModeArg::All => TeacherMode::All,
                },
            };
            let (tis, ti) = get(&t, "teacher_image", file)?;
            let (tts, tt) = get(&t, "teacher_text", file)?;
            if tis != tts {
                bail!(
                    "{}: `teacher_image` {tis:?} and `teacher_text` {tts:?} differ",
                    file.display()
                );
            }
            let slots = match tis.as_slice() {
                [tn, td] if *tn == n && *td == d => 1,
                [tn, k, td] if *tn == n && *td == d => *k,
                other => bail!(
                    "{}: teacher targets must be [{n}, {d}] or [{n}, T, {d}]; got {other:?}",
                    file.display()
                ),
            };
            let mask: Vec<bool> = match t.get("teacher_mask") {
                Some((ms, m)) => {
                    if ms.iter().product::<usize>() != n * slots {
                        bail!(
                            "{}: `teacher_mask` {ms:?} must be [{n}, {slots}]",
                            file.display()
                        );
                    }
                    m.iter().map(|&v| v != 0.0).collect()
                }
                None => vec![true; n * slots],
            };
            let targets = TeacherTargets {
                image: ti,
                text: tt,
                mask: &mask,
                teachers: slots,
            };
            let (parts, g) = if cfg.teacher_mode == TeacherMode::Random && slots > 1 {
                let (pi, pt) = pick_random_teacher_seeded(&targets, n, d, a.seed)?;
                let ones = vec![true; n];
                let one = TeacherTargets {
                    image: &pi,
                    text: &pt,
                    mask: &ones,
                    teachers: 1,
                };
                distill_loss(image, text, s, &one, &cfg, n, d)?
            } else {
                distill_loss(image, text, s, &targets, &cfg, n, d)?
            };
            out.insert("image".to_string(), (vec![n, d], g.image));
            out.insert("text".to_string(), (vec![n, d], g.text));
            out.insert("logit_scale".to_string(), (vec![], vec![g.logit_scale]));
            if let Some(c) = g.icl_scale {
                out.insert("icl_scale".to_string(), (vec![], vec![c]));
            }
            serde_json::json!({"task": parts.task, "fd": parts.fd, "icl": parts.icl, "total": parts.total})
        }
    };
    if let Some(p) = &a.grads {
        write_tensors(p, &out)?;
    }
    println!("{json}");
    Ok(())
}

fn engine_stage(s: Stage) -> trainer::Stage {
    match s {
        Stage::Clip => trainer::Stage::Clip,
        Stage::Kd => trainer::Stage::Kd,
    }
}

fn progress(quiet: bool) -> (indicatif::ProgressBar, impl FnMut(&StepRecord, u64)) {
    let pb = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let bar = pb.clone();
    let f = move |r: &StepRecord, total: u64| {
        bar.set_length(total);
        bar.set_position(r.step);
        bar.set_message(format!(
            "{:.0} samples/s  task {:.4} fd {:.5} icl {:.4} total {:.4}  lr {:.2e}",
            r.samples_per_s, r.task, r.fd, r.icl, r.total, r.lr
        ));
    };
    (pb, f)
}

fn train_cmd(a: TrainArgs) -> Result<()> {
    let (model, train) = load_configs(&a.config, &a.sets)?;
    let kernels = KernelTarget::resolve(&a.device)?;
    let opts = TrainOptions {
        stage: engine_stage(a.stage),
        data: a.data,
        out: a.out,
        init: a.init,
        resume: a.resume,
        model,
        train,
        kernels,
    };
    let (pb, mut f) = progress(a.quiet);
    let res = trainer::train(&opts, &mut f);
    pb.finish_and_clear();
    let sum = res?;
    println!(
        "{}",
        serde_json::json!({
            "steps": sum.steps,
            "checkpoint": sum.checkpoint,
            "last": sum.last,
        })
    );
    Ok(())
}

fn load_student(
    config: &std::path::Path,
    sets: &[String],
    ckpt: &std::path::Path,
) -> Result<ClipModel> {
    let (mc, _) = load_configs(config, sets)?;
    let mut model = ClipModel::new(&mc)?;
    trainer::load_init(&mut model, ckpt)?;
    Ok(model)
}

fn eval_report(
    ds: &Arc<Dataset>,
    student: Option<&ClipModel>,
    teacher: Option<&str>,
) -> Result<eval::Report> {
    let classes = ds.manifest().classes.len();
    if classes == 0 {
        bail!(
            "{}: no classes in the manifest; evaluation needs labels",
            ds.dir().display()
        );
    }
    match (student, teacher) {
        (_, Some(t)) => {
            let f = eval::teacher_features(ds, t)?;
            eval::evaluate(t, &f, None, classes)
        }
        (Some(m), None) => {
            let f = eval::student_features(m, ds, 64)?;
            let (p, c, t) = eval::prompt_features(m, ds)?;
            let cls = eval::ensemble_classes(&p, c, t, m.config.embed_dim)?;
            eval::evaluate("student", &f, Some(cls), classes)
        }
        (None, None) => bail!("give --ckpt (with --config) or --teacher"),
    }
}

fn eval_cmd(a: EvalArgs) -> Result<()> {
    let ds =
        Arc::new(Dataset::open(&a.data).with_context(|| format!("opening {}", a.data.display()))?);
    let model = match (&a.teacher, &a.ckpt, &a.config) {
        (Some(_), _, _) => None,
        (None, Some(ck), Some(cfg)) => Some(load_student(cfg, &a.sets, ck)?),
        _ => bail!("give --ckpt and --config for a student, or --teacher NAME"),
    };
    let r = eval_report(&ds, model.as_ref(), a.teacher.as_deref())?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

/// Renders RUN_DIR/metrics.jsonl (one or several runs' files given as RUN_DIR) into
/// RUN_DIR/report.png: loss components, learning rate, logit scale and throughput per step.
pub fn report(run_dir: &std::path::Path) -> Result<PathBuf> {
    let path = run_dir.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut recs = Vec::new();
    for (i, l) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let r: StepRecord = serde_json::from_str(l)
            .with_context(|| format!("{} line {}: not a metrics record", path.display(), i + 1))?;
        recs.push(r);
    }
    if recs.is_empty() {
        bail!("{}: no records", path.display());
    }
    let out = run_dir.join("report.png");
    draw(&recs, &out).map_err(|e| anyhow::anyhow!("drawing {}: {e}", out.display()))?;
    Ok(out)
}

type Series = (&'static str, fn(&StepRecord) -> f64);

/// Registers a TrueType font for the chart text: `MMKD_FONT`, else the usual system paths.
/// Returns whether one was found (without one the curves are drawn without text).
fn register_font() -> bool {
    let mut candidates: Vec<PathBuf> = std::env::var_os("MMKD_FONT")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.extend(
        [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/Library/Fonts/Arial.ttf",
            "C:\\Windows\\Fonts\\arial.ttf",
        ]
        .iter()
        .map(PathBuf::from),
    );
    for c in candidates {
        if let Ok(bytes) = std::fs::read(&c) {
            // plotters keeps registered fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(
                "sans-serif",
                plotters::style::FontStyle::Normal,
                bytes,
            )
            .is_ok()
            {
                return true;
            }
        }
    }
    false
}

fn draw(
    recs: &[StepRecord],
    out: &std::path::Path,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let text = register_font();
    let root = BitMapBackend::new(out, (1200, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 2));
    let groups: [(&str, Vec<Series>); 4] = [
        (
            "loss",
            vec![
                ("total", |r| r.total),
                ("task", |r| r.task),
                ("icl", |r| r.icl),
            ],
        ),
        ("fd (unweighted)", vec![("fd", |r| r.fd)]),
        (
            "lr / logit scale",
            vec![
                ("lr x1e4", |r| r.lr * 1e4),
                ("logit scale", |r| r.logit_scale),
            ],
        ),
        ("samples/s", vec![("samples/s", |r| r.samples_per_s)]),
    ];
    let colors = [RED, BLUE, GREEN];
    let x_max = recs.iter().map(|r| r.step).max().unwrap_or(1).max(1) as f64;
    for (panel, (title, series)) in panels.iter().zip(groups.iter()) {
        let vals: Vec<f64> = recs
            .iter()
            .flat_map(|r| series.iter().map(move |(_, f)| f(r)))
            .filter(|v| v.is_finite())
            .collect();
        let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min).min(0.0);
        let hi = vals
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max)
            .max(lo + 1e-9);
        let mut builder = ChartBuilder::on(panel);
        builder.margin(10);
        if text {
            builder
                .caption(*title, ("sans-serif", 22))
                .x_label_area_size(30)
                .y_label_area_size(60);
        }
        let mut chart = builder.build_cartesian_2d(0f64..x_max, lo..hi * 1.05)?;
        if text {
            chart.configure_mesh().x_desc("step").draw()?;
        }
        for ((name, f), color) in series.iter().zip(colors.iter()) {
            let c = *color;
            chart
                .draw_series(LineSeries::new(
                    recs.iter().map(|r| (r.step as f64, f(r))),
                    c,
                ))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
        }
        if text {
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}

/// The demo's student, built in so that the demo runs from any directory.
const DEMO_CONFIG: &str = include_str!("../../configs/demo.toml");

/// Settings of one demo size.
struct DemoPlan {
    train: usize,
    eval: usize,
    batch: usize,
    stage1_epochs: u64,
    stage2_epochs: u64,
    align_steps: usize,
    align_hidden: usize,
    /// Model overrides applied before the user's.
    model_sets: &'static [&'static str],
}

/// One stage of the demo: a training run and its table row.
struct DemoRun<'a> {
    row: &'a str,
    stage: trainer::Stage,
    data: &'a std::path::Path,
    init: Option<PathBuf>,
    lr: f64,
    epochs: u64,
}

fn demo(a: DemoArgs) -> Result<()> {
    use mmkd_loaders::{pack, synth, PackOptions, SourceFormat, SynthOptions};
    let t0 = std::time::Instant::now();
    let plan = if a.quick {
        DemoPlan {
            train: 256,
            eval: 120,
            batch: 32,
            stage1_epochs: 2,
            stage2_epochs: 2,
            align_steps: 30,
            align_hidden: 64,
            model_sets: &[
                "vision.image_size=32",
                "vision.width=64",
                "vision.heads=1",
                "text.width=64",
                "text.heads=1",
            ],
        }
    } else {
        DemoPlan {
            train: 2000,
            eval: 500,
            batch: 64,
            stage1_epochs: 10,
            stage2_epochs: 20,
            align_steps: 150,
            align_hidden: 256,
            model_sets: &[],
        }
    };
    let root = a
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("mmkd-demo-{}", std::process::id())));
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let config = match &a.config {
        Some(c) => c.clone(),
        None => {
            let c = root.join("demo.toml");
            std::fs::write(&c, DEMO_CONFIG).with_context(|| format!("writing {}", c.display()))?;
            c
        }
    };
    let mut user_sets: Vec<String> = plan.model_sets.iter().map(|s| s.to_string()).collect();
    user_sets.extend(a.sets.iter().cloned());
    let (mc, _) = load_configs(&config, &user_sets)?;
    let side = mc.vision.image_size;
    let ctx = mc.text.context_length;
    eprintln!(
        "[demo] synth: {} train + {} eval samples",
        plan.train, plan.eval
    );
    // Each phase reports its wall time when it ends, so a slow phase is plain to see.
    let mut phase = std::time::Instant::now();
    let mut took = |what: &str| {
        eprintln!("[demo]   {what}: {:.1} s", phase.elapsed().as_secs_f64());
        phase = std::time::Instant::now();
    };
    let mut so = SynthOptions::new(root.join("raw"));
    so.train = plan.train;
    so.eval = plan.eval;
    so.image_size = side.max(32);
    // Bold findings: a student trained from scratch for minutes must be able to see them.
    so.finding_amplitude = 120.0;
    let syn = synth(&so)?;
    took("synth");
    eprintln!("[demo] pack");
    let packed_train = root.join("packed/train");
    let mut po = PackOptions::new(
        SourceFormat::MmkdClip,
        syn.train_dir.display().to_string(),
        &packed_train,
    );
    po.image_size = side;
    po.context_length = ctx;
    po.vocab_size = mc.text.vocab_size;
    po.progress = false;
    pack(&po)?;
    let packed_eval = root.join("packed/eval");
    let mut po = PackOptions::new(
        SourceFormat::MmkdClip,
        syn.eval_dir.display().to_string(),
        &packed_eval,
    );
    po.image_size = side;
    po.context_length = ctx;
    po.tokenizer = Some(packed_train.join("tokenizer.json"));
    po.progress = false;
    pack(&po)?;
    took("pack");
    // Stage 2 learns from the autoencoder's latents of the raw teacher features, not from the
    // release-style projections the importer also stored.
    let (train_data, eval_data) = if a.skip_align {
        eprintln!("[demo] align: skipped, using the stored projected targets");
        (packed_train.clone(), packed_eval.clone())
    } else {
        eprintln!(
            "[demo] align: {} steps on the raw teacher features",
            plan.align_steps
        );
        let aligned_train = root.join("aligned/train");
        let aligned_eval = root.join("aligned/eval");
        let args = |data: &std::path::Path, out: &std::path::Path, weights| AlignArgs {
            data: data.to_path_buf(),
            out: out.to_path_buf(),
            weights,
            steps: plan.align_steps,
            hidden: plan.align_hidden,
            lr: 1e-3,
            seed: 0,
            batch_size: 128,
            ntxent_weight: 1.0,
            temperature: 0.07,
            quiet: true,
        };
        let r = align_dataset(&args(&packed_train, &aligned_train, None))?;
        for t in r["reconstruction_mse"].as_array().into_iter().flatten() {
            eprintln!(
                "[demo]   {:<12} reconstruction MSE image {:.2e}, text {:.2e}",
                t["name"].as_str().unwrap_or("?"),
                t["image"].as_f64().unwrap_or(f64::NAN),
                t["text"].as_f64().unwrap_or(f64::NAN)
            );
        }
        let w = aligned_train.join("align.safetensors");
        align_dataset(&args(&packed_eval, &aligned_eval, Some(w)))?;
        took("align");
        (aligned_train, aligned_eval)
    };
    let proj = Dataset::open(&train_data)?.manifest().proj_dim;
    // The student's joint space must match the teachers' projected width for fd and icl.
    let mut sets = vec![format!("model.embed_dim={proj}")];
    sets.extend([
        format!("batch_size={}", plan.batch),
        "warmup=20".to_string(),
        "save_every=0".to_string(),
        "workers=1".to_string(),
    ]);
    sets.extend(user_sets);
    let (model_cfg, base) = load_configs(&config, &sets)?;
    let s1_ckpt = root.join("run-stage1");
    let runs = [
        DemoRun {
            row: "student stage 1",
            stage: trainer::Stage::Clip,
            data: &packed_train,
            init: None,
            lr: 1e-3,
            epochs: plan.stage1_epochs,
        },
        DemoRun {
            row: "student stage 2",
            stage: trainer::Stage::Kd,
            data: &train_data,
            init: Some(s1_ckpt.clone()),
            lr: 5e-4,
            epochs: plan.stage2_epochs,
        },
        // The control: stage 1 continued for as long as stage 2 ran, so the comparison is
        // distillation against the same compute spent on the captions alone.
        DemoRun {
            row: "student stage 1, continued",
            stage: trainer::Stage::Clip,
            data: &packed_train,
            init: Some(s1_ckpt.clone()),
            lr: 5e-4,
            epochs: plan.stage2_epochs,
        },
    ];
    let dirs = [
        s1_ckpt,
        root.join("run-stage2"),
        root.join("run-stage1-continued"),
    ];
    let mut ckpts = Vec::new();
    for (r, dir) in runs.iter().zip(&dirs) {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        eprintln!(
            "[demo] {} ({}): {} epochs{}",
            r.row,
            match r.stage {
                trainer::Stage::Clip => "clip",
                trainer::Stage::Kd => "kd",
            },
            r.epochs,
            r.init
                .as_ref()
                .map(|p| format!(" from {}", p.display()))
                .unwrap_or_default()
        );
        let (pb, mut f) = progress(false);
        let out = trainer::train(
            &TrainOptions {
                stage: r.stage,
                data: r.data.to_path_buf(),
                out: dir.clone(),
                init: r.init.clone(),
                resume: false,
                model: model_cfg.clone(),
                train: trainer::TrainConfig {
                    lr: r.lr,
                    epochs: r.epochs,
                    ..base.clone()
                },
                kernels: None,
            },
            &mut f,
        );
        pb.finish_and_clear();
        ckpts.push(out?.checkpoint);
        took(r.row);
    }
    eprintln!("[demo] eval on {} held-out samples", plan.eval);
    let eval_ds = Arc::new(Dataset::open(&eval_data)?);
    let mut rows = Vec::new();
    for t in &eval_ds.manifest().teachers {
        rows.push(eval_report(&eval_ds, None, Some(&t.name))?);
    }
    for (r, ck) in runs.iter().zip(&ckpts) {
        let mut m = ClipModel::new(&model_cfg)?;
        trainer::load_init(&mut m, ck)?;
        let mut rep = eval_report(&eval_ds, Some(&m), None)?;
        rep.name = r.row.to_string();
        rows.push(rep);
    }
    took("eval");
    let png = report(&dirs[1])?;
    report(&dirs[0])?;
    report(&dirs[2])?;
    println!("| model | n | zero-shot top-1 | retrieval R@1 (i→t / t→i) | linear probe |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        let star = if r.zero_shot_protocol.starts_with("class means") {
            "*"
        } else {
            ""
        };
        println!(
            "| {} | {} | {:.3}{star} | {:.3} / {:.3} | {:.3} |",
            r.name,
            r.samples,
            r.zero_shot.top1,
            r.retrieval.i2t[0],
            r.retrieval.t2i[0],
            r.probe.accuracy
        );
    }
    println!(
        "\n* teachers: stored features only, so their zero-shot classifier is the class means of \
         their caption features on the probe-train split (students use prompt ensembles)."
    );
    println!("report: {}", png.display());
    println!("demo time: {:.1} s", t0.elapsed().as_secs_f64());
    let n = rows.len();
    let (z1, z2, zc) = (
        rows[n - 3].zero_shot.top1,
        rows[n - 2].zero_shot.top1,
        rows[n - 1].zero_shot.top1,
    );
    if z2 <= z1.max(zc) {
        eprintln!(
            "[demo] warning: the distilled student did not beat stage 1 on zero-shot top-1 \
             ({z2:.3} against {z1:.3}, and {zc:.3} with stage 1 continued)"
        );
    }
    Ok(())
}
