//! The device step's image inputs under the emulation: raw u8 crops normalised on the device
//! give the step of the host-normalised values, and crops staged ahead
//! (`CudaStudent::stage_pixels`) are used first in, first out.

use mmkd_engine::cuda::{
    Arena, CudaStudent, Images, KernelTarget, StepReport, StudentBatch, StudentSetup,
};
use mmkd_engine::loss::distill::{
    DistillConfig, IclScale, TeacherMode, TeacherNorm, REFERENCE_ICL_SCALE,
};
use mmkd_engine::optim::AdamWConfig;
use mmkd_engine::{ClipModel, ModelConfig};
use mmkd_kernels::image_norm::{CLIP_MEAN, CLIP_STD};
use mmkd_kernels::testing::{fresh_seed, rng};
use mmkd_kernels::{Device, DeviceRequest};
use rand::Rng;

const N: usize = 4;
const T: usize = 2;
const S: usize = 16;
const LEN: usize = 16;

fn config() -> ModelConfig {
    let src = r#"
embed_dim = 32
seed = 3

[vision]
image_size = 16
patch_size = 8
width = 64
layers = 1
heads = 1
mlp_ratio = 2.0
act = "quick_gelu"

[text]
vocab_size = 64
context_length = 16
width = 64
layers = 1
heads = 1
mlp_ratio = 2.0
act = "gelu"
norm = "post"
causal = false
pooling = "cls"
"#;
    ModelConfig::from_toml_str(src, "cuda_inputs test config").unwrap()
}

fn setup() -> StudentSetup {
    StudentSetup {
        batch: N,
        text_len: LEN,
        teachers: T,
        loss: DistillConfig {
            fd_weight: 50.0,
            icl_scale: IclScale::Const(REFERENCE_ICL_SCALE),
            teacher_norm: TeacherNorm::L2,
            teacher_mode: TeacherMode::All,
        },
        adamw: AdamWConfig::default(),
        grad_clip: 1.0,
        recompute: false,
        gemm: mmkd_kernels::gemm::GemmPath::MmaSync,
        micro_batch: 0,
    }
}

/// Text and teacher inputs shared by every batch of a test.
struct Rest {
    tokens: Vec<u32>,
    lengths: Vec<usize>,
    ti: Vec<f32>,
    tt: Vec<f32>,
    mask: Vec<u8>,
}

fn rest(g: &mut impl Rng) -> Rest {
    let lengths = vec![16, 3, 9, 12];
    let tokens = (0..N * LEN).map(|_| g.gen_range(0..64u32)).collect();
    let mut rv = |n: usize| {
        (0..n)
            .map(|_| g.gen_range(-1.0f32..1.0))
            .collect::<Vec<_>>()
    };
    let (ti, tt) = (rv(N * T * 32), rv(N * T * 32));
    Rest {
        tokens,
        lengths,
        ti,
        tt,
        mask: vec![1, 0, 1, 1, 0, 1, 1, 1],
    }
}

fn crops(g: &mut impl Rng) -> Vec<u8> {
    (0..N * 3 * S * S).map(|_| g.gen()).collect()
}

/// CLIP's normalisation on the host, in f32.
fn normalise(px: &[u8]) -> Vec<f32> {
    px.iter()
        .enumerate()
        .map(|(k, &p)| {
            let c = (k / (S * S)) % 3;
            (p as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
        })
        .collect()
}

/// A student at the config's initial weights on a fresh emulated arena.
fn student() -> (CudaStudent, Arena) {
    student_on(&KernelTarget::Emu)
}

/// A student at the config's initial weights on a fresh arena of `target`.
fn student_on(target: &KernelTarget) -> (CudaStudent, Arena) {
    let cfg = config();
    let model = ClipModel::new(&cfg).unwrap();
    let mut st = CudaStudent::new(&cfg, setup()).unwrap();
    let mut arena = target.arena(st.layout().clone()).unwrap();
    st.load_params(&mut arena, &model.params).unwrap();
    (st, arena)
}

fn step(st: &mut CudaStudent, arena: &mut Arena, images: Images<'_>, r: &Rest) -> StepReport {
    let b = StudentBatch {
        images,
        tokens: &r.tokens,
        lengths: &r.lengths,
        teacher_image: &r.ti,
        teacher_text: &r.tt,
        mask: &r.mask,
        pick: None,
        stage_next: None,
    };
    st.step(arena, &b, 1e-3).unwrap()
}

fn rel(a: f32, b: f32) -> f64 {
    ((a - b).abs() / a.abs().max(1e-6)) as f64
}

#[test]
fn raw_crops_normalised_on_the_device_match_host_normalisation() {
    let seed = fresh_seed();
    let mut g = rng(seed);
    let r = rest(&mut g);
    let px = crops(&mut g);
    let host = normalise(&px);
    let (mut a, mut aa) = student();
    let (mut b, mut ba) = student();
    let ra = step(&mut a, &mut aa, Images::F32(&host), &r);
    let rb = step(&mut b, &mut ba, Images::U8(&px), &r);
    let (la, lb) = (ra.loss, rb.loss);
    for (x, y, what) in [
        (la.task, lb.task, "task"),
        (la.fd, lb.fd, "fd"),
        (la.icl, lb.icl, "icl"),
        (la.total, lb.total, "total"),
        (ra.grad_norm, rb.grad_norm, "grad norm"),
    ] {
        assert!(rel(x, y) < 2e-3, "seed {seed}: {what} {x} vs {y}");
    }
    // The tower's input is the crops normalised: within one bf16 rounding of the host's.
    assert_input_is(&mut b, &mut ba, &host, seed);
}

/// The image tower's bf16 input in the arena equals `want` up to one bf16 rounding.
fn assert_input_is(st: &mut CudaStudent, arena: &mut Arena, want: &[f32], seed: u64) {
    let got = arena.read_bf16(st.image_tower().images()).unwrap();
    assert_eq!(got.len(), want.len());
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        let g = g.to_f32();
        assert!(
            (g - w).abs() <= w.abs() / 128.0 + 1e-6,
            "seed {seed}: input value {k}: {g} on the device, {w} on the host"
        );
    }
}

#[test]
fn staged_crops_are_used_first_in_first_out() {
    let seed = fresh_seed();
    let mut g = rng(seed);
    let r = rest(&mut g);
    let (p1, p2) = (crops(&mut g), crops(&mut g));

    // Reference: two steps, each copying its crops directly.
    let (mut a, mut aa) = student();
    let want = [
        step(&mut a, &mut aa, Images::U8(&p1), &r).loss,
        step(&mut a, &mut aa, Images::U8(&p2), &r).loss,
    ];

    let (mut b, mut ba) = student();
    let none = StudentBatch {
        images: Images::Staged,
        tokens: &r.tokens,
        lengths: &r.lengths,
        teacher_image: &r.ti,
        teacher_text: &r.tt,
        mask: &r.mask,
        pick: None,
        stage_next: None,
    };
    let e = b.step(&mut ba, &none, 1e-3).unwrap_err();
    assert!(format!("{e:#}").contains("none are staged"), "{e:#}");
    assert_eq!(b.steps(), 0);
    let e = b.stage_pixels(&mut ba, &p1[1..]).unwrap_err();
    assert!(format!("{e:#}").contains("elements"), "{e:#}");
    b.stage_pixels(&mut ba, &p1).unwrap();
    b.stage_pixels(&mut ba, &p2).unwrap();
    let e = b.stage_pixels(&mut ba, &p1).unwrap_err();
    assert!(format!("{e:#}").contains("two batches are staged"), "{e:#}");
    // With two staged, a step that stages the next batch would overwrite crops still needed
    // (its own, which a micro-batched step reads once per pass), and crops given with the
    // batch would not be the ones it takes: both refused before anything runs.
    let third = StudentBatch {
        stage_next: Some(&p1),
        ..none
    };
    let e = b.step(&mut ba, &third, 1e-3).unwrap_err();
    assert!(format!("{e:#}").contains("free staging region"), "{e:#}");
    let given = StudentBatch {
        images: Images::U8(&p1),
        ..none
    };
    let e = b.step(&mut ba, &given, 1e-3).unwrap_err();
    assert!(format!("{e:#}").contains("would take the oldest"), "{e:#}");
    assert_eq!(b.steps(), 0);
    let first = step(&mut b, &mut ba, Images::Staged, &r).loss;
    assert_input_is(&mut b, &mut ba, &normalise(&p1), seed);
    let second = step(&mut b, &mut ba, Images::Staged, &r).loss;
    assert_input_is(&mut b, &mut ba, &normalise(&p2), seed);
    let got = [first, second];
    // The same launches on the same values: identical under the emulation.
    assert_eq!(got, want, "seed {seed}");
    assert_ne!(want[0], want[1]);

    // The second batch staged by the first step itself, once its backward is launched (as
    // the training loop does): the same two steps.
    let (mut c, mut ca) = student();
    c.stage_pixels(&mut ca, &p1).unwrap();
    let with_next = StudentBatch {
        stage_next: Some(&p2),
        ..none
    };
    let first = c.step(&mut ca, &with_next, 1e-3).unwrap().loss;
    let second = step(&mut c, &mut ca, Images::Staged, &r).loss;
    assert_input_is(&mut c, &mut ca, &normalise(&p2), seed);
    assert_eq!([first, second], want, "seed {seed}");
}

/// On a GPU: crops staged through pinned buffers on the copy stream, two ahead, give the
/// emulation's losses for the same two steps.
#[test]
fn staged_crops_on_the_gpu_follow_the_emulation_when_present() {
    let gpu = match Device::select(DeviceRequest::Auto).unwrap() {
        Device::Cuda(g) => g,
        Device::Cpu => {
            eprintln!("no CUDA driver or device: the GPU staging test is skipped");
            return;
        }
    };
    let seed = fresh_seed();
    let mut g = rng(seed);
    let r = rest(&mut g);
    let (p1, p2) = (crops(&mut g), crops(&mut g));
    let (mut a, mut aa) = student();
    let want = [
        step(&mut a, &mut aa, Images::U8(&p1), &r),
        step(&mut a, &mut aa, Images::U8(&p2), &r),
    ];
    let (mut b, mut ba) = student_on(&KernelTarget::Gpu(gpu));
    b.stage_pixels(&mut ba, &p1).unwrap();
    b.stage_pixels(&mut ba, &p2).unwrap();
    for w in &want {
        let got = step(&mut b, &mut ba, Images::Staged, &r);
        for (x, y, what) in [
            (w.loss.total, got.loss.total, "total"),
            (w.grad_norm, got.grad_norm, "grad norm"),
        ] {
            assert!(
                rel(x, y) < 1e-2,
                "seed {seed}: {what} {x} (emulation) vs {y} (GPU)"
            );
        }
    }
}

/// A student of `setup` at the config's initial weights on a fresh emulated arena.
fn student_with(setup: StudentSetup) -> (CudaStudent, Arena, ClipModel) {
    let cfg = config();
    let model = ClipModel::new(&cfg).unwrap();
    let mut st = CudaStudent::new(&cfg, setup).unwrap();
    let mut arena = KernelTarget::Emu.arena(st.layout().clone()).unwrap();
    st.load_params(&mut arena, &model.params).unwrap();
    (st, arena, model)
}

/// Gradient accumulation: the batch of 4 as two passes of 2 (towers sized for 2, the loss on
/// all 4) gives the one-pass step. The first loss is the same bit for bit (the features are
/// per row, so a pass fed the wrong rows would change it); the gradients, hence the weights
/// and the next loss, agree up to the order of the fp32 sums. Raw crops and host-normalised
/// images both; a micro-batch that does not divide the batch is refused.
#[test]
fn two_passes_of_two_match_one_pass_of_four() {
    let seed = fresh_seed();
    let mut g = rng(seed);
    let r = rest(&mut g);
    let px = crops(&mut g);
    let host = normalise(&px);
    for images in [Images::U8(&px), Images::F32(&host)] {
        let (mut a, mut aa, model) = student_with(setup());
        let (mut b, mut ba, _) = student_with(StudentSetup {
            micro_batch: 2,
            ..setup()
        });
        assert!(
            b.layout().section_bytes(mmkd_engine::cuda::Section::Acts)
                < a.layout().section_bytes(mmkd_engine::cuda::Section::Acts)
        );
        for k in 0..2 {
            let (ra, rb) = (
                step(&mut a, &mut aa, images, &r),
                step(&mut b, &mut ba, images, &r),
            );
            if k == 0 {
                assert_eq!(ra.loss, rb.loss, "seed {seed}: first loss");
            } else {
                assert!(
                    rel(ra.loss.total, rb.loss.total) < 1e-5,
                    "seed {seed}: second loss {} vs {}",
                    ra.loss.total,
                    rb.loss.total
                );
            }
            assert!(
                rel(ra.grad_norm, rb.grad_norm) < 1e-4,
                "seed {seed}: step {k}: grad norm {} vs {}",
                ra.grad_norm,
                rb.grad_norm
            );
        }
        let (mut pa, mut pb) = (model.params.clone(), model.params.clone());
        a.read_params(&mut aa, &mut pa).unwrap();
        b.read_params(&mut ba, &mut pb).unwrap();
        let worst = pa
            .data()
            .iter()
            .zip(pb.data())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        let moved = pa
            .data()
            .iter()
            .zip(model.params.data())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst < 1e-3 * moved,
            "seed {seed}: weights differ by {worst} (the step moved them by {moved})"
        );
    }
    let bad = CudaStudent::new(
        &config(),
        StudentSetup {
            micro_batch: 3,
            ..setup()
        },
    );
    assert!(format!("{:#}", bad.err().unwrap()).contains("does not divide"));
}
