//! Train subcommands: `loss`, `align`, `train`, `eval`, `report`, `demo`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use mmkd_engine::checkpoint::{read_tensors, write_tensors, NamedTensor};
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
    /// The end-to-end CPU demo: synth → pack → stage 1 → stage 2 → eval table.
    Demo(DemoArgs),
    /// Teacher alignment: train the multi-teacher autoencoder on the raw teacher features and
    /// write the projected 512-d targets (OUT/projected.safetensors) and its weights
    /// (OUT/align.safetensors); prints the reconstruction loss per teacher as JSON.
    Align(AlignArgs),
}

#[derive(Args)]
pub struct AlignArgs {
    /// Packed dataset directory (with raw teacher features).
    #[arg(long)]
    data: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
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
}

fn align_cmd(a: AlignArgs) -> Result<()> {
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
        ..AlignConfig::default()
    };
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("creating output directory {}", a.out.display()))?;
    let mut model = AlignModel::for_dataset(&ds, cfg.hidden, cfg.seed)?;
    let every = (cfg.steps / 20).max(1);
    model.train(&ds, &cfg, &mut |s, l| {
        if (s + 1) % every == 0 || s + 1 == cfg.steps {
            eprintln!("[align] step {}/{}  loss {l:.6}", s + 1, cfg.steps);
        }
    })?;
    eprintln!("[align] projecting {} samples", ds.len());
    let proj = model.project(&ds, None, 1024)?;
    proj.save(&a.out.join("projected.safetensors"))?;
    model
        .params
        .save_safetensors(&a.out.join("align.safetensors"))?;
    let report = serde_json::json!({ "samples": ds.len(), "steps": cfg.steps,
        "reconstruction_mse": proj.losses });
    println!("{report}");
    Ok(())
}

#[derive(Args)]
pub struct TrainArgs {
    /// Model config TOML (top-level model keys, optional [train] table).
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
    /// Model config.
    #[arg(long, default_value = "configs/tiny.toml")]
    config: PathBuf,
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
    let opts = TrainOptions {
        stage: engine_stage(a.stage),
        data: a.data,
        out: a.out,
        init: a.init,
        resume: a.resume,
        model,
        train,
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

/// Settings of one demo size.
struct DemoPlan {
    train: usize,
    eval: usize,
    batch: usize,
    stage1_epochs: u64,
    stage2_epochs: u64,
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
        }
    } else {
        DemoPlan {
            train: 2000,
            eval: 500,
            batch: 64,
            stage1_epochs: 10,
            stage2_epochs: 10,
        }
    };
    let root = a
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("mmkd-demo-{}", std::process::id())));
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    // The findings are small overlays that 32-px images barely show: the full demo packs and
    // trains at 64 px.
    let mut user_sets: Vec<String> = Vec::new();
    if !a.quick {
        user_sets.push("vision.image_size=64".into());
    }
    user_sets.extend(a.sets.iter().cloned());
    let (mc, _) = load_configs(&a.config, &user_sets)?;
    let side = mc.vision.image_size;
    let ctx = mc.text.context_length;
    eprintln!(
        "[demo] synth: {} train + {} eval samples",
        plan.train, plan.eval
    );
    let mut so = SynthOptions::new(root.join("raw"));
    so.train = plan.train;
    so.eval = plan.eval;
    so.image_size = side.max(32);
    let syn = synth(&so)?;
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
    pack(&po)?;
    let train_ds = Dataset::open(&packed_train)?;
    let proj = train_ds.manifest().proj_dim;
    eprintln!(
        "[demo] align: skipped — the packed data already holds projected {proj}-d teacher targets"
    );
    // The student's joint space must match the teachers' projected width for fd and icl.
    let mut sets = vec![format!("model.embed_dim={proj}")];
    sets.extend([
        format!("batch_size={}", plan.batch),
        "warmup=20".to_string(),
        "save_every=0".to_string(),
        "workers=1".to_string(),
    ]);
    sets.extend(user_sets);
    let (model_cfg, base) = load_configs(&a.config, &sets)?;
    let run1 = root.join("run-stage1");
    let run2 = root.join("run-stage2");
    for d in [&run1, &run2] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("clearing {}", d.display()))?;
        }
    }
    let s1 = trainer::TrainConfig {
        lr: 1e-3,
        epochs: plan.stage1_epochs,
        ..base.clone()
    };
    eprintln!("[demo] stage 1 (clip): {} epochs", s1.epochs);
    let (pb, mut f) = progress(false);
    let r1 = trainer::train(
        &TrainOptions {
            stage: trainer::Stage::Clip,
            data: packed_train.clone(),
            out: run1.clone(),
            init: None,
            resume: false,
            model: model_cfg.clone(),
            train: s1,
        },
        &mut f,
    );
    pb.finish_and_clear();
    let r1 = r1?;
    let s2 = trainer::TrainConfig {
        lr: 5e-4,
        epochs: plan.stage2_epochs,
        ..base
    };
    eprintln!(
        "[demo] stage 2 (kd): {} epochs from {}",
        s2.epochs,
        r1.checkpoint.display()
    );
    let (pb, mut f) = progress(false);
    let r2 = trainer::train(
        &TrainOptions {
            stage: trainer::Stage::Kd,
            data: packed_train.clone(),
            out: run2.clone(),
            init: Some(r1.checkpoint.clone()),
            resume: false,
            model: model_cfg.clone(),
            train: s2,
        },
        &mut f,
    );
    pb.finish_and_clear();
    let r2 = r2?;
    eprintln!("[demo] eval on {} held-out samples", plan.eval);
    let eval_ds = Arc::new(Dataset::open(&packed_eval)?);
    let mut rows = Vec::new();
    for t in &eval_ds.manifest().teachers {
        rows.push(eval_report(&eval_ds, None, Some(&t.name))?);
    }
    for (name, ck) in [
        ("student stage 1", &r1.checkpoint),
        ("student stage 2", &r2.checkpoint),
    ] {
        let mut m = ClipModel::new(&model_cfg)?;
        trainer::load_init(&mut m, ck)?;
        let mut r = eval_report(&eval_ds, Some(&m), None)?;
        r.name = name.to_string();
        rows.push(r);
    }
    let png = report(&run2)?;
    report(&run1)?;
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
    let (z1, z2) = (
        rows[rows.len() - 2].zero_shot.top1,
        rows[rows.len() - 1].zero_shot.top1,
    );
    if z2 <= z1 {
        eprintln!("[demo] warning: the distilled student did not beat stage 1 on zero-shot top-1 ({z2:.3} ≤ {z1:.3})");
    }
    Ok(())
}
