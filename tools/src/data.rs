//! Data subcommands: `synth`, `pack`, `inspect`, `tokenizer train`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use mmkd_loaders::{
    inspect, pack, synth, tokenizer, FeatureDtype, PackOptions, SourceFormat, SynthOptions,
};
use std::io::Write;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Generate the built-in synthetic dataset in the MMKD-CLIP release layout (OUT/train, OUT/eval).
    Synth(SynthArgs),
    /// Pack a source dataset into checksummed, memory-mappable shards.
    Pack(PackArgs),
    /// Show a packed dataset's manifest, counts and one sample (verifies every shard).
    Inspect(InspectArgs),
    /// Tokenizer tools.
    Tokenizer {
        #[command(subcommand)]
        cmd: TokenizerCommand,
    },
}

#[derive(Args)]
pub struct SynthArgs {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Training samples.
    #[arg(long, default_value_t = 2000)]
    train: usize,
    /// Held-out evaluation samples.
    #[arg(long, default_value_t = 500)]
    eval: usize,
    /// Side of the written images in pixels.
    #[arg(long, default_value_t = 256)]
    image_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Peak intensity (0..255) of the finding overlay in the images.
    #[arg(long, default_value_t = 70.0)]
    finding_amplitude: f32,
}

#[derive(Args)]
pub struct PackArgs {
    /// Source layout: mmkd-clip, manifest or wds.
    #[arg(long)]
    format: SourceFormat,
    /// Root folder (mmkd-clip), JSONL file (manifest), or folder / glob of .tar files (wds).
    #[arg(long)]
    input: String,
    /// Output folder for shards, manifest.json and tokenizer.json.
    #[arg(long)]
    out: PathBuf,
    /// Stored image side in pixels.
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// Token context length.
    #[arg(long, default_value_t = 256)]
    context_length: usize,
    /// Use this tokenizer.json instead of training a WordPiece vocabulary.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Vocabulary size when training a tokenizer.
    #[arg(long, default_value_t = 30522)]
    vocab_size: usize,
    /// Teacher feature storage: f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    feature_dtype: FeatureDtype,
    /// Target shard size, in bytes or with a K/M/G suffix.
    #[arg(long, default_value = "1G")]
    shard_size: String,
    /// Skip bad records (counted by reason, listed in skipped.jsonl) instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    /// Hide the progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args)]
pub struct InspectArgs {
    /// Packed dataset folder.
    dir: PathBuf,
    /// Show this sample.
    #[arg(long)]
    sample: Option<u64>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Skip section checksums (header and bounds are still checked).
    #[arg(long)]
    no_verify: bool,
}

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train an uncased WordPiece vocabulary from caption files.
    Train {
        /// Text files (one caption per line) or JSONL files (fields txt or caption).
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        /// Output tokenizer.json.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 30522)]
        vocab_size: usize,
    },
}

/// Parses `123`, `64K`, `512M`, `1G`.
fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mul) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .with_context(|| format!("size {s:?}: expected a number with an optional K/M/G suffix"))?;
    if n.is_nan() || n <= 0.0 {
        bail!("size {s:?} must be positive");
    }
    Ok((n * mul as f64) as u64)
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Synth(a) => {
            let s = synth(&SynthOptions {
                out: a.out,
                train: a.train,
                eval: a.eval,
                image_size: a.image_size,
                seed: a.seed,
                finding_amplitude: a.finding_amplitude,
            })?;
            println!(
                "synth: {} train samples in {}, {} eval samples in {}",
                s.train,
                s.train_dir.display(),
                s.eval,
                s.eval_dir.display()
            );
            println!(
                "  {} classes, teachers: {}",
                s.classes.len(),
                s.teachers
                    .iter()
                    .map(|(n, w)| format!("{n} ({w})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!("  {:.1} s", s.seconds);
        }
        DataCommand::Pack(a) => {
            let mut o = PackOptions::new(a.format, a.input, a.out);
            o.image_size = a.image_size;
            o.context_length = a.context_length;
            o.tokenizer = a.tokenizer;
            o.vocab_size = a.vocab_size;
            o.feature_dtype = a.feature_dtype;
            o.shard_size = parse_size(&a.shard_size)?;
            o.skip_bad = a.skip_bad;
            o.progress = !a.no_progress;
            let s = pack(&o)?;
            println!(
                "pack: {} of {} records into {} shard(s), {:.1} MiB, in {:.1} s ({:.0} samples/s)",
                s.num_samples,
                s.records,
                s.num_shards,
                s.bytes as f64 / (1 << 20) as f64,
                s.seconds,
                s.num_samples as f64 / s.seconds.max(1e-9)
            );
            println!(
                "  vocabulary {}, truncated captions {}, availability mismatches {}",
                s.vocab_size, s.truncated, s.availability_mismatches
            );
            for t in &s.teachers {
                println!(
                    "  teacher {:<12} raw width {:>4}, available for {}",
                    t.name, t.raw_dim, t.available
                );
            }
            if !s.skipped.is_empty() {
                let total: u64 = s.skipped.values().sum();
                println!(
                    "  skipped {total} record(s) (listed in {}):",
                    s.out.join("skipped.jsonl").display()
                );
                for (r, n) in &s.skipped {
                    println!("    {r}: {n}");
                }
            }
        }
        DataCommand::Inspect(a) => {
            let r = inspect(&a.dir, a.sample, !a.no_verify)?;
            if a.json {
                // Written without println! so a closed pipe (`| head`) ends quietly.
                let text = serde_json::to_string_pretty(&r)?;
                let mut out = std::io::stdout().lock();
                return match writeln!(out, "{text}") {
                    Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                    _ => Ok(()),
                };
            }
            let m = &r.manifest;
            println!(
                "dataset {}: {} samples in {} shard(s), checksums {}",
                r.dir,
                m.num_samples,
                m.shards.len(),
                if r.checksums_verified {
                    "verified"
                } else {
                    "not checked"
                }
            );
            println!(
                "  images u8 [3, {}, {}]; tokens {} [{}], vocabulary {}; features {:?}",
                m.image_size,
                m.image_size,
                m.token_dtype,
                m.context_length,
                m.vocab_size,
                m.feature_dtype
            );
            for t in &m.teachers {
                println!(
                    "  teacher {:<12} raw width {:>4}, available for {}",
                    t.name, t.raw_dim, t.available
                );
            }
            if m.has_labels {
                println!(
                    "  {} classes; samples per class: {:?}",
                    m.classes.len(),
                    r.label_counts
                );
            }
            println!("  source {}; stats {}", m.source, m.stats);
            if let Some(s) = &r.sample {
                println!("sample {}: id {}", s.index, s.id);
                println!("  caption: {}", s.caption);
                println!(
                    "  label: {} {}",
                    s.label,
                    s.class_name.as_deref().unwrap_or("")
                );
                println!("  tokens ({}): {:?}", s.tokens.len(), s.tokens);
                println!(
                    "  image channel means: {:.1} {:.1} {:.1}",
                    s.image_channel_means[0], s.image_channel_means[1], s.image_channel_means[2]
                );
                for f in &s.features {
                    println!(
                        "  {:<12} proj |img| {:.3} |txt| {:.3}  raw[{}] |img| {:.3} |txt| {:.3}  img[..4] {:?}",
                        f.teacher,
                        f.proj_image_norm,
                        f.proj_text_norm,
                        f.raw_dim,
                        f.raw_image_norm,
                        f.raw_text_norm,
                        &f.proj_image[..4.min(f.proj_image.len())]
                    );
                }
            }
        }
        DataCommand::Tokenizer {
            cmd:
                TokenizerCommand::Train {
                    input,
                    out,
                    vocab_size,
                },
        } => {
            let mut texts = Vec::new();
            for p in &input {
                let t = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                let jsonl = p.extension().is_some_and(|e| e == "jsonl");
                for (k, line) in t.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    if jsonl {
                        let v: serde_json::Value =
                            serde_json::from_str(line).with_context(|| {
                                format!("{} line {}: invalid JSON", p.display(), k + 1)
                            })?;
                        let c = v
                            .get("txt")
                            .or_else(|| v.get("caption"))
                            .and_then(|c| c.as_str());
                        let c = c.with_context(|| {
                            format!("{} line {}: no txt or caption field", p.display(), k + 1)
                        })?;
                        texts.push(c.to_string());
                    } else {
                        texts.push(line.to_string());
                    }
                }
            }
            let tok = tokenizer::train_wordpiece(texts.iter(), vocab_size)?;
            tokenizer::save(&tok, &out)?;
            println!(
                "tokenizer: {} entries from {} texts written to {}",
                tok.get_vocab_size(true),
                texts.len(),
                out.display()
            );
        }
    }
    Ok(())
}
