//! Batch assembly throughput: 224 px images with random-resized-crop + flip into bf16, one
//! teacher target per sample, on one thread and on all threads, against a plain memcpy of the
//! same number of output bytes in the same run. Each batch is dropped right after use, which
//! hands its buffer back to the loader for reuse, as in training.
//!
//! `cargo bench -p mmkd-benches --bench loader` (set `MMKD_BENCH_SAMPLES` to change the
//! dataset size, default 512).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mmkd_loaders::batch::Augment;
use mmkd_loaders::{
    pack, synth, BatchConfig, BatchLoader, Dataset, ImageDtype, PackOptions, SourceFormat,
    SynthOptions, TeacherMode,
};
use std::hint::black_box;
use std::sync::Arc;

const BATCH: usize = 64;
const BATCHES_PER_ITER: usize = 4;

fn dataset() -> Arc<Dataset> {
    let n: usize = std::env::var("MMKD_BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    let root = std::env::temp_dir().join(format!("mmkd-bench-loader-{}", std::process::id()));
    let src = synth(&SynthOptions {
        out: root.join("src"),
        train: n,
        eval: 1,
        image_size: 256,
        seed: 0,
        finding_amplitude: 22.0,
    })
    .expect("synth");
    let mut o = PackOptions::new(
        SourceFormat::MmkdClip,
        src.train_dir.to_string_lossy(),
        root.join("packed"),
    );
    o.vocab_size = 2000;
    pack(&o).expect("pack");
    Arc::new(Dataset::open(&root.join("packed")).expect("open"))
}

fn config(workers: usize) -> BatchConfig {
    BatchConfig {
        batch_size: BATCH,
        epochs: u64::MAX,
        workers,
        prefetch: 2 * workers.max(1),
        image_dtype: ImageDtype::Bf16,
        augment: Some(Augment::default()),
        teachers: TeacherMode::One,
        ..Default::default()
    }
}

fn bench(c: &mut Criterion) {
    let ds = dataset();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let bytes_per_batch = BatchLoader::new(ds.clone(), config(0))
        .expect("loader")
        .next_batch()
        .expect("batch")
        .expect("batch")
        .as_bytes()
        .len();
    let mut g = c.benchmark_group("loader_224_crop_flip_bf16");
    g.throughput(Throughput::Elements((BATCH * BATCHES_PER_ITER) as u64));
    g.sample_size(10);
    for (name, workers) in [
        ("1_thread".to_string(), 0),
        (format!("{threads}_threads"), threads),
    ] {
        let mut loader = BatchLoader::new(ds.clone(), config(workers)).expect("loader");
        g.bench_function(name, |b| {
            b.iter(|| {
                for _ in 0..BATCHES_PER_ITER {
                    black_box(
                        loader
                            .next_batch()
                            .expect("batch")
                            .expect("batch")
                            .as_bytes()
                            .len(),
                    );
                }
            })
        });
    }
    // The same output bytes moved by memcpy (per batch: one buffer copy of the batch's size).
    let src = vec![1u8; bytes_per_batch];
    let mut dst = vec![0u8; bytes_per_batch];
    g.bench_function("memcpy_same_bytes", |b| {
        b.iter(|| {
            for _ in 0..BATCHES_PER_ITER {
                dst.copy_from_slice(black_box(&src));
                black_box(&mut dst);
            }
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(ds.dir().parent().unwrap_or(ds.dir()));
}

criterion_group!(benches, bench);
criterion_main!(benches);
