//! CPU engine benchmarks: forward+backward samples/s of the tiny student and of one ViT-B/16
//! block at batch 8, and the engine's matmul against a raw call of the `gemm` crate on the
//! same shapes (FLOP/s, reported by criterion as elements/s).
//!
//! Each measured iteration runs on a worker of rayon's pool, as the `mmkd` binary runs a command
//! (`mmkd_engine::cpu_pool`).
//!
//! Run: `cargo bench -p mmkd-benches --bench engine`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mmkd_engine::cpu_pool::run_on_pool;
use mmkd_engine::ops::linear::{self, WLayout};
use mmkd_engine::{Activation, ClipModel, ModelConfig, ParamStore, Tape, Tensor, TransformerBlock};
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

const BATCH: usize = 8;

fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    // A cheap deterministic fill: benchmarks need values, not statistics.
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tiny_model(c: &mut Criterion) {
    // As the `mmkd` binary does: keep the memory each iteration frees for the next one.
    mmkd_engine::host_memory::keep_freed_memory();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.toml");
    let cfg = ModelConfig::from_file(&path).expect("configs/tiny.toml");
    let mut model = ClipModel::new(&cfg).expect("tiny model");
    let v = &cfg.vision;
    let l = 16;
    let img = Tensor::from_f32(
        pseudo_random(BATCH * 3 * v.image_size * v.image_size, 1),
        &[BATCH, 3, v.image_size, v.image_size],
    )
    .unwrap();
    let toks: Vec<u32> = (0..BATCH * l)
        .map(|i| (i * 37 % cfg.text.vocab_size) as u32)
        .collect();
    let toks = Tensor::from_u32(toks, &[BATCH, l]).unwrap();
    let lens: Vec<usize> = (0..BATCH).map(|i| 4 + i % (l - 4)).collect();
    let mut g = c.benchmark_group("tiny_clip_fwd_bwd");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    g.bench_function("batch8", |b| {
        b.iter(|| {
            run_on_pool(|| {
                let mut tape = Tape::new();
                let i = model.encode_image(&mut tape, &img).unwrap();
                let t = model.encode_text(&mut tape, &toks, &lens).unwrap();
                let loss = model.clip_loss(&mut tape, i, t).unwrap();
                tape.backward(&mut model.params, &[(loss, &[1.0])]).unwrap();
                black_box(model.params.grad()[0])
            })
        })
    });
    g.finish();
}

fn vit_b16_block(c: &mut Criterion) {
    // As the `mmkd` binary does: keep the memory each iteration frees for the next one.
    mmkd_engine::host_memory::keep_freed_memory();
    let (w, l) = (768, 197);
    let mut ps = ParamStore::new();
    let block =
        TransformerBlock::open_clip(&mut ps, "blk", w, 12, 4.0, Activation::QuickGelu, 12, 0)
            .expect("block");
    let x = pseudo_random(BATCH * l * w, 2);
    let dy = pseudo_random(BATCH * l * w, 3);
    let mut g = c.benchmark_group("vit_b16_block_fwd_bwd");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.bench_function("batch8", |b| {
        b.iter(|| {
            run_on_pool(|| {
                let mut tape = Tape::new();
                let xi = tape.input(x.clone(), &[BATCH, l, w]).unwrap();
                let y = block.forward(&mut tape, &ps, xi).unwrap();
                let dx = tape.backward_collect(&mut ps, &[(y, &dy)], &[xi]).unwrap();
                black_box(dx[0][0])
            })
        })
    });
    g.finish();
}

fn matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul_gflops");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    // ViT-B/16 block shapes at batch 8: (rows N, in K, out M) of qkv, fc, proj.
    for (n, k, m) in [
        (BATCH * 197, 768, 2304),
        (BATCH * 197, 768, 3072),
        (BATCH * 197, 3072, 768),
    ] {
        let x = pseudo_random(n * k, 4);
        let wt = pseudo_random(m * k, 5);
        let mut y = vec![0.0f32; n * m];
        g.throughput(Throughput::Elements((2 * n * k * m) as u64));
        let id = format!("{n}x{k}x{m}");
        g.bench_with_input(BenchmarkId::new("engine_linear", &id), &(), |b, _| {
            b.iter(|| {
                run_on_pool(|| linear::forward(&x, &wt, None, WLayout::OutIn, n, k, m, &mut y));
                black_box(y[0])
            })
        });
        g.bench_with_input(BenchmarkId::new("gemm_crate_raw", &id), &(), |b, _| {
            b.iter(|| {
                // SAFETY: y is (n, m) row-major, x (n, k) row-major, wt (m, k) read as its
                // transpose (k, m); all strides stay inside the buffers.
                run_on_pool(|| unsafe {
                    gemm::gemm(
                        n,
                        m,
                        k,
                        y.as_mut_ptr(),
                        1,
                        m as isize,
                        false,
                        x.as_ptr(),
                        1,
                        k as isize,
                        wt.as_ptr(),
                        k as isize,
                        1,
                        0.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(0),
                    )
                });
                black_box(y[0])
            })
        });
    }
    g.finish();
}

criterion_group!(benches, matmul, tiny_model, vit_b16_block);
criterion_main!(benches);
