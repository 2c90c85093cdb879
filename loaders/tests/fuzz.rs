//! Mutation fuzzing of the shard reader and the `.pt` reader (`cargo fuzz` needs a nightly
//! toolchain; this loop runs on stable). Ignored by default; run with, e.g.
//! `MMKD_FUZZ_SECS=600 cargo test --release -p mmkd-loaders --test fuzz -- --ignored --nocapture`.
//! Any panic fails the test after saving the input to `$MMKD_FUZZ_CRASH_DIR` (default: temp dir).

use mmkd_loaders::pt::{read_pt_bytes, write_pt_bytes, PtDtype, PtTensor};
use mmkd_loaders::{pack, synth, Dataset, PackOptions, SourceFormat, SynthOptions, Tower};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};

fn budget() -> Duration {
    Duration::from_secs(
        std::env::var("MMKD_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    )
}

const INTERESTING: [u64; 8] = [0, 1, 63, 64, 0x7fff_ffff, 0xffff_ffff, u64::MAX, 1 << 40];

/// Applies 1–4 random mutations: bit flips, byte overwrites, truncation, insertion, removal,
/// interesting little-endian integers, and block duplication.
fn mutate(r: &mut ChaCha8Rng, data: &mut Vec<u8>) {
    for _ in 0..r.gen_range(1..=4) {
        if data.is_empty() {
            data.push(r.gen());
            continue;
        }
        let at = if r.gen_bool(0.5) {
            r.gen_range(0..data.len().min(1024))
        } else {
            r.gen_range(0..data.len())
        };
        match r.gen_range(0..7) {
            0 => data[at] ^= 1 << r.gen_range(0..8),
            1 => data[at] = r.gen(),
            2 => data.truncate(at),
            3 => data.insert(at, r.gen()),
            4 => {
                data.remove(at);
            }
            5 => {
                let v = INTERESTING[r.gen_range(0..INTERESTING.len())].to_le_bytes();
                let w = [1, 2, 4, 8][r.gen_range(0..4)];
                for (k, b) in v.iter().take(w).enumerate() {
                    if at + k < data.len() {
                        data[at + k] = *b;
                    }
                }
            }
            _ => {
                let len = r.gen_range(1..=64).min(data.len() - at);
                let blk = data[at..at + len].to_vec();
                let to = r.gen_range(0..data.len());
                data.splice(to..to, blk);
            }
        }
    }
}

fn crash_dir() -> std::path::PathBuf {
    std::env::var("MMKD_FUZZ_CRASH_DIR")
        .map(Into::into)
        .unwrap_or_else(|_| std::env::temp_dir())
}

#[test]
#[ignore]
fn fuzz_shard_reader() {
    let dir = tempfile::tempdir().unwrap();
    let src = synth(&SynthOptions {
        out: dir.path().join("s"),
        train: 6,
        eval: 1,
        image_size: 32,
        seed: 2,
        finding_amplitude: 22.0,
    })
    .unwrap();
    let out = dir.path().join("p");
    let mut o = PackOptions::new(
        SourceFormat::MmkdClip,
        src.train_dir.to_str().unwrap(),
        &out,
    );
    o.image_size = 8;
    o.context_length = 16;
    o.vocab_size = 200;
    pack(&o).unwrap();
    let shard = out.join("shard-00000.mmkd");
    let seed_bytes = std::fs::read(&shard).unwrap();
    let mut r = ChaCha8Rng::seed_from_u64(
        std::env::var("MMKD_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1),
    );
    let (t0, budget) = (Instant::now(), budget());
    let (mut n, mut accepted) = (0u64, 0u64);
    while t0.elapsed() < budget {
        let mut data = seed_bytes.clone();
        mutate(&mut r, &mut data);
        std::fs::write(&shard, &data).unwrap();
        let verify = r.gen_bool(0.2);
        let res = std::panic::catch_unwind(|| {
            let _ = mmkd_loaders::shard::parse_sections(&data, "fuzz", verify);
            // Through the dataset too, so mutated-but-accepted data reaches every accessor.
            if let Ok(ds) = Dataset::open_with(&out, verify) {
                for i in 0..ds.len() {
                    let _ = ds.sample(i);
                    let _ = ds.raw(i, 0, Tower::Text);
                }
                return true;
            }
            false
        });
        match res {
            Ok(ok) => accepted += ok as u64,
            Err(_) => {
                let p = crash_dir().join(format!("shard-crash-{n}.bin"));
                std::fs::write(&p, &data).unwrap();
                panic!(
                    "shard reader panicked on input {n}, saved to {}",
                    p.display()
                );
            }
        }
        n += 1;
    }
    println!(
        "fuzz_shard_reader: {n} inputs in {:.0} s, {accepted} opened as a dataset, no panic",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore]
fn fuzz_pt_reader() {
    let v: Vec<f32> = (0..24).map(|i| i as f32 * 0.25).collect();
    let seeds: Vec<Vec<u8>> = [
        (PtDtype::F32, false),
        (PtDtype::F16, true),
        (PtDtype::Bf16, false),
    ]
    .iter()
    .map(|&(d, ordered)| {
        let t = vec![
            (
                "A_img".to_string(),
                PtTensor {
                    dtype: d,
                    shape: vec![24],
                    data: v.clone(),
                },
            ),
            (
                "A_txt".to_string(),
                PtTensor {
                    dtype: d,
                    shape: vec![2, 3, 4],
                    data: v.clone(),
                },
            ),
        ];
        write_pt_bytes("archive", &t, ordered).unwrap()
    })
    .collect();
    // Also mutate the pickle alone, re-wrapped in a valid archive, so the interpreter (not only
    // the zip parser) sees most inputs.
    let pickles: Vec<Vec<u8>> = seeds
        .iter()
        .map(|s| {
            let mut z = zip::ZipArchive::new(std::io::Cursor::new(s)).unwrap();
            let mut p = Vec::new();
            std::io::Read::read_to_end(&mut z.by_name("archive/data.pkl").unwrap(), &mut p)
                .unwrap();
            p
        })
        .collect();
    let mut r = ChaCha8Rng::seed_from_u64(
        std::env::var("MMKD_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1),
    );
    let (t0, budget) = (Instant::now(), budget());
    let (mut n, mut accepted) = (0u64, 0u64);
    while t0.elapsed() < budget {
        let k = r.gen_range(0..seeds.len());
        let data = if r.gen_bool(0.5) {
            let mut d = seeds[k].clone();
            mutate(&mut r, &mut d);
            d
        } else {
            let mut p = pickles[k].clone();
            mutate(&mut r, &mut p);
            use std::io::Write;
            let mut zw = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
            let o = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            zw.start_file("archive/data.pkl", o).unwrap();
            zw.write_all(&p).unwrap();
            for (i, len) in [(0, 96), (1, 96)] {
                zw.start_file(format!("archive/data/{i}"), o).unwrap();
                zw.write_all(&vec![0x3c; len]).unwrap();
            }
            zw.finish().unwrap().into_inner()
        };
        match std::panic::catch_unwind(|| read_pt_bytes(&data).is_ok()) {
            Ok(ok) => accepted += ok as u64,
            Err(_) => {
                let p = crash_dir().join(format!("pt-crash-{n}.bin"));
                std::fs::write(&p, &data).unwrap();
                panic!(".pt reader panicked on input {n}, saved to {}", p.display());
            }
        }
        n += 1;
    }
    println!(
        "fuzz_pt_reader: {n} inputs in {:.0} s, {accepted} accepted, no panic",
        t0.elapsed().as_secs_f64()
    );
}
