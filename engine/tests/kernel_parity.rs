//! The fused multi-teacher loss kernel (run through the CPU emulation of its CUDA source)
//! against the engine's own loss, which the trainer uses on the CPU. The two were written
//! independently; agreement here ties the GPU path to the CPU path for every teacher mode
//! and switch.

use mmkd_engine::loss::{
    distill_loss, DistillConfig, IclScale, TeacherMode, TeacherNorm, TeacherTargets,
};
use mmkd_kernels::mt_loss::{self, LossConfig, LossInputs};
use mmkd_kernels::testing::{f32_to_f64, fresh_seed, random_f32, rel_err, rng};
use mmkd_kernels::Emu;
use rand::Rng;

struct Case {
    n: usize,
    t: usize,
    d: usize,
    image: Vec<f32>,
    text: Vec<f32>,
    ti: Vec<f32>,
    tt: Vec<f32>,
    mask: Vec<bool>,
    pick: Vec<i32>,
}

fn case(n: usize, t: usize, d: usize, seed: u64) -> Case {
    let mut rng = rng(seed);
    let image = random_f32(&mut rng, n * d, -1.0, 1.0);
    let text = random_f32(&mut rng, n * d, -1.0, 1.0);
    // Unnormalised targets, as in the released data (norms well away from 1).
    let ti = random_f32(&mut rng, n * t * d, -0.2, 0.2);
    let tt = random_f32(&mut rng, n * t * d, -0.2, 0.2);
    let mut mask = vec![false; n * t];
    let mut pick = vec![0i32; n];
    for i in 0..n {
        for m in &mut mask[i * t..(i + 1) * t] {
            *m = rng.gen_bool(0.6);
        }
        // Every sample keeps at least one teacher.
        let forced = rng.gen_range(0..t);
        mask[i * t + forced] = true;
        let avail: Vec<usize> = (0..t).filter(|&k| mask[i * t + k]).collect();
        pick[i] = avail[rng.gen_range(0..avail.len())] as i32;
    }
    Case {
        n,
        t,
        d,
        image,
        text,
        ti,
        tt,
        mask,
        pick,
    }
}

/// Gathers the picked teacher per sample: the `[N, 1, D]` targets the engine takes in random mode.
fn gather(src: &[f32], pick: &[i32], t: usize, d: usize) -> Vec<f32> {
    pick.iter()
        .enumerate()
        .flat_map(|(i, &k)| src[(i * t + k as usize) * d..][..d].iter().copied())
        .collect()
}

/// Norm-wise relative error of f32 gradients (NaN never passes).
fn rel(a: &[f32], b: &[f32]) -> f64 {
    rel_err(&f32_to_f64(a), &f32_to_f64(b))
}

fn check(c: &Case, mode: TeacherMode, l2: bool, learned: bool) {
    let (n, t, d) = (c.n, c.t, c.d);
    let logit_scale = 2.3f32;
    let icl = if learned { 0.9f64 } else { 2.659f64 };
    let engine_cfg = DistillConfig {
        fd_weight: 50.0,
        icl_scale: if learned {
            IclScale::Learned(icl)
        } else {
            IclScale::Const(icl)
        },
        teacher_norm: if l2 {
            TeacherNorm::L2
        } else {
            TeacherNorm::None
        },
        teacher_mode: mode,
    };
    let (gi, gt, ones);
    let targets = if mode == TeacherMode::Random {
        gi = gather(&c.ti, &c.pick, t, d);
        gt = gather(&c.tt, &c.pick, t, d);
        ones = vec![true; n];
        TeacherTargets {
            image: &gi,
            text: &gt,
            mask: &ones,
            teachers: 1,
        }
    } else {
        TeacherTargets {
            image: &c.ti,
            text: &c.tt,
            mask: &c.mask,
            teachers: t,
        }
    };
    let (parts, grads) = distill_loss(&c.image, &c.text, logit_scale, &targets, &engine_cfg, n, d)
        .expect("engine loss");

    let kcfg = LossConfig {
        n,
        t,
        d,
        mode: match mode {
            TeacherMode::Random => mt_loss::TeacherMode::Random,
            TeacherMode::Mean => mt_loss::TeacherMode::Mean,
            TeacherMode::All => mt_loss::TeacherMode::All,
        },
        teacher_l2: l2,
        logit_scale,
        icl: if learned {
            mt_loss::IclScale::Learned(icl as f32)
        } else {
            mt_loss::IclScale::Const(icl as f32)
        },
        fd_weight: 50.0,
    };
    let mask_u8: Vec<u8> = c.mask.iter().map(|&m| u8::from(m)).collect();
    let inputs = LossInputs {
        image: &c.image,
        text: &c.text,
        teacher_image: &c.ti,
        teacher_text: &c.tt,
        mask: &mask_u8,
        pick: (mode == TeacherMode::Random).then_some(&c.pick[..]),
    };
    // Poisoned outputs: a value the kernel fails to write shows up as NaN.
    let mut di = vec![f32::NAN; n * d];
    let mut dt = vec![f32::NAN; n * d];
    let mut out = vec![f32::NAN; 8];
    let mut scratch = vec![f32::NAN; mt_loss::scratch_len::<f32>(&kcfg)];
    mt_loss::mt_loss_emu(
        &Emu::default(),
        &kcfg,
        &inputs,
        &mut di,
        &mut dt,
        &mut out,
        &mut scratch,
    )
    .expect("emulated kernel");
    let k = mt_loss::LossResult::from_out(&out).expect("kernel result");

    let what = format!("mode {mode:?}, l2 {l2}, learned {learned}, n {n}, t {t}, d {d}");
    let scalars = [
        ("task", k.task, parts.task),
        ("fd", k.fd, parts.fd),
        ("icl", k.icl, parts.icl),
        ("total", k.total, parts.total),
        ("dlogit_scale", k.dlogit_scale, f64::from(grads.logit_scale)),
    ];
    for (name, got, want) in scalars {
        let r = ((f64::from(got) - want) / want.abs().max(1e-12)).abs();
        assert!(
            r <= 1e-4,
            "{what}: {name} kernel {got} engine {want} (rel {r:.2e})"
        );
    }
    if learned {
        let want = f64::from(grads.icl_scale.expect("learned icl gradient"));
        let r = ((f64::from(k.dicl_scale) - want) / want.abs().max(1e-12)).abs();
        assert!(
            r <= 1e-4,
            "{what}: dicl kernel {} engine {want}",
            k.dicl_scale
        );
    }
    let (ri, rt) = (rel(&di, &grads.image), rel(&dt, &grads.text));
    assert!(ri <= 1e-4, "{what}: dimage rel err {ri:.2e}");
    assert!(rt <= 1e-4, "{what}: dtext rel err {rt:.2e}");
}

#[test]
fn fused_loss_kernel_matches_engine_loss_in_every_mode() {
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    for (i, &(n, t, d)) in [(5usize, 3usize, 16usize), (13, 4, 40)].iter().enumerate() {
        let c = case(n, t, d, seed.wrapping_add(i as u64));
        for mode in [TeacherMode::Random, TeacherMode::Mean, TeacherMode::All] {
            for (l2, learned) in [(true, false), (false, true)] {
                check(&c, mode, l2, learned);
            }
        }
    }
}
