//! Synth → pack → dataset → batches, the three importers, and every bad input's error.

use mmkd_loaders::batch::{choose_teacher, epoch_order, Augment, CLIP_MEAN, CLIP_STD};
use mmkd_loaders::pt::{read_pt, write_pt, PtDtype, PtTensor};
use mmkd_loaders::{
    image_proc, pack, synth, BatchConfig, BatchLoader, Cursor, Dataset, FeatureDtype, ImageDtype,
    PackOptions, SourceFormat, SynthOptions, TeacherMode, Tower,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn synth_small(dir: &Path, train: usize) -> PathBuf {
    let s = synth(&SynthOptions {
        out: dir.join("src"),
        train,
        eval: 4,
        image_size: 40,
        seed: 7,
        finding_amplitude: 22.0,
    })
    .unwrap();
    s.train_dir
}

fn opts(input: &Path, out: &Path) -> PackOptions {
    let mut o = PackOptions::new(SourceFormat::MmkdClip, input.to_str().unwrap(), out);
    o.image_size = 32;
    o.context_length = 48;
    o.vocab_size = 400;
    o
}

fn meta_lines(root: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(root.join("meta.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn synth_pack_round_trips_every_section() {
    let dir = tempfile::tempdir().unwrap();
    let root = synth_small(dir.path(), 24);
    let out = dir.path().join("packed");
    let mut o = opts(&root, &out);
    o.feature_dtype = FeatureDtype::F32;
    o.shard_size = 20_000; // forces several shards
    let s = pack(&o).unwrap();
    assert_eq!(s.num_samples, 24);
    assert!(
        s.num_shards > 1,
        "shard rollover expected, got {}",
        s.num_shards
    );
    assert_eq!(s.availability_mismatches, 0);
    let ds = Dataset::open(&out).unwrap();
    let m = ds.manifest();
    assert_eq!(
        m.teachers
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        ["BiomedCLIP", "PMCCLIP", "QuiltNet", "UniMedCLIP"]
    );
    assert_eq!(
        m.teachers.iter().map(|t| t.raw_dim).collect::<Vec<_>>(),
        [512, 768, 512, 768]
    );
    assert_eq!(m.classes.len(), 16);
    assert_eq!(m.templates.len(), 3);
    let tok = mmkd_loaders::tokenizer::load(&ds.tokenizer_path()).unwrap();
    for (i, rec) in meta_lines(&root).iter().enumerate() {
        let i = i as u64;
        let smp = ds.sample(i).unwrap();
        assert_eq!(smp.id, rec["id"].as_str().unwrap());
        assert_eq!(smp.caption, rec["txt"].as_str().unwrap());
        assert_eq!(smp.label as i64, rec["label"].as_i64().unwrap());
        // Image: exactly what the decoder + resize produce from the source file.
        let src = std::fs::read(root.join(rec["imgpath"].as_str().unwrap())).unwrap();
        assert_eq!(smp.image, image_proc::prepare_image(&src, 32, "t").unwrap());
        // Tokens decode back to the (lower-cased) caption.
        let text = tok.decode(&smp.tokens, true).unwrap();
        assert_eq!(
            text.replace(' ', ""),
            rec["txt"].as_str().unwrap().to_lowercase().replace(' ', "")
        );
        // Features: f32 storage is exact against the .pt files; availability matches.
        let fdir = root
            .join("features")
            .join(rec["folderid"].as_str().unwrap())
            .join(rec["id"].as_str().unwrap());
        let proj = read_pt(&fdir.join("clips_project_output.pt")).unwrap();
        let raw = read_pt(&fdir.join("clips_output.pt")).unwrap();
        let avail: Vec<&str> = rec["available_clips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for (t, ti) in m.teachers.iter().enumerate() {
            let on = avail.contains(&ti.name.as_str());
            assert_eq!((smp.available >> t) & 1 == 1, on);
            let get = |items: &[(String, PtTensor)], k: String| {
                items
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|x| x.1.data.clone())
            };
            if on {
                assert_eq!(
                    Some(smp.proj_image[t].clone()),
                    get(&proj, format!("{}_img", ti.name))
                );
                assert_eq!(
                    Some(smp.proj_text[t].clone()),
                    get(&proj, format!("{}_txt", ti.name))
                );
                assert_eq!(
                    Some(smp.raw_image[t].clone()),
                    get(&raw, format!("{}_img", ti.name))
                );
                assert_eq!(
                    Some(smp.raw_text[t].clone()),
                    get(&raw, format!("{}_txt", ti.name))
                );
                let n: f32 = smp.proj_image[t].iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((1.59..=2.41).contains(&n), "projected norm {n}");
                let n: f32 = smp.raw_text[t].iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((n - 1.0).abs() < 1e-4, "raw norm {n}");
            } else {
                assert!(smp.proj_image[t].iter().all(|&x| x == 0.0));
            }
        }
    }
    // Inspect reports the same dataset.
    let r = mmkd_loaders::inspect(&out, Some(3), true).unwrap();
    assert_eq!(
        r.sample.unwrap().id,
        meta_lines(&root)[3]["id"].as_str().unwrap()
    );
    assert_eq!(r.label_counts.iter().sum::<u64>(), 24);
}

#[test]
fn synth_is_deterministic_and_teachers_carry_class_structure() {
    let dir = tempfile::tempdir().unwrap();
    let a = synth(&SynthOptions {
        out: dir.path().join("a"),
        train: 64,
        eval: 2,
        image_size: 32,
        seed: 3,
        finding_amplitude: 22.0,
    })
    .unwrap();
    let b = synth(&SynthOptions {
        out: dir.path().join("b"),
        train: 64,
        eval: 2,
        image_size: 32,
        seed: 3,
        finding_amplitude: 22.0,
    })
    .unwrap();
    assert_eq!(
        std::fs::read(a.train_dir.join("meta.jsonl")).unwrap(),
        std::fs::read(b.train_dir.join("meta.jsonl")).unwrap()
    );
    let out = dir.path().join("p");
    let mut o = opts(&a.train_dir, &out);
    o.image_size = 32;
    pack(&o).unwrap();
    let ds = Dataset::open(&out).unwrap();
    // Expert teachers' image features of the same class are closer than of other classes,
    // and each sample's image and text features agree.
    let (mut same, mut diff, mut pair) = (vec![], vec![], vec![]);
    let mut feats: Vec<(i32, Vec<f32>)> = vec![];
    for i in 0..ds.len() {
        let av = ds.available(i).unwrap();
        if av & 1 == 0 {
            continue;
        }
        let mut a = vec![0f32; 512];
        let mut t = vec![0f32; 512];
        ds.proj_into(i, 0, Tower::Image, &mut a).unwrap();
        ds.proj_into(i, 0, Tower::Text, &mut t).unwrap();
        let l = ds.label(i).unwrap();
        if l / 4 == 3 {
            continue; // BiomedCLIP is not expert on dermoscopy
        }
        let cos = |x: &[f32], y: &[f32]| {
            x.iter().zip(y).map(|(a, b)| a * b).sum::<f32>()
                / (x.iter().map(|v| v * v).sum::<f32>().sqrt()
                    * y.iter().map(|v| v * v).sum::<f32>().sqrt())
        };
        pair.push(cos(&a, &t));
        for (l2, b) in &feats {
            if *l2 == l {
                same.push(cos(&a, b));
            } else {
                diff.push(cos(&a, b));
            }
        }
        feats.push((l, a));
    }
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    assert!(
        mean(&same) > mean(&diff) + 0.2,
        "same-class {} vs other {}",
        mean(&same),
        mean(&diff)
    );
    assert!(
        mean(&pair) > mean(&diff) + 0.2,
        "image-text {} vs other {}",
        mean(&pair),
        mean(&diff)
    );
}

fn expect_pack_error(root: &Path, dir: &Path, needles: &[&str], reason: &str) {
    let out = dir.join(format!("out-{reason}"));
    let e = format!("{:#}", pack(&opts(root, &out)).unwrap_err());
    for n in needles {
        assert!(e.contains(n), "error {e:?} should contain {n:?}");
    }
    assert!(
        !out.join("manifest.json").exists(),
        "a failed pack must leave no dataset"
    );
    assert!(Dataset::open(&out).is_err());
    let mut o = opts(root, &out);
    o.skip_bad = true;
    let s = pack(&o).unwrap();
    assert_eq!(
        s.skipped.get(reason).copied(),
        Some(1),
        "skipped {:?}",
        s.skipped
    );
    let listed = std::fs::read_to_string(out.join("skipped.jsonl")).unwrap();
    assert!(
        listed.contains(reason) && listed.lines().count() == 1,
        "{listed}"
    );
    assert_eq!(Dataset::open(&out).unwrap().len(), s.records - 1);
}

fn fresh(dir: &Path, name: &str) -> PathBuf {
    let root = dir.join(name);
    synth(&SynthOptions {
        out: root.clone(),
        train: 5,
        eval: 1,
        image_size: 40,
        seed: 1,
        finding_amplitude: 22.0,
    })
    .unwrap();
    root.join("train")
}

fn feat_dir(root: &Path, rec: &serde_json::Value) -> PathBuf {
    root.join("features")
        .join(rec["folderid"].as_str().unwrap())
        .join(rec["id"].as_str().unwrap())
}

#[test]
fn bad_inputs_each_get_their_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Missing image.
    let root = fresh(d, "img");
    let rec = &meta_lines(&root)[2];
    std::fs::remove_file(root.join(rec["imgpath"].as_str().unwrap())).unwrap();
    expect_pack_error(
        &root,
        d,
        &["meta.jsonl line 3", rec["imgpath"].as_str().unwrap()],
        "bad_image",
    );

    // Undecodable image.
    let root = fresh(d, "img2");
    let rec = &meta_lines(&root)[1];
    std::fs::write(
        root.join(rec["imgpath"].as_str().unwrap()),
        b"\xff\xd8\xff garbage",
    )
    .unwrap();
    expect_pack_error(
        &root,
        d,
        &["meta.jsonl line 2", "cannot decode"],
        "bad_image",
    );

    // Corrupt .pt.
    let root = fresh(d, "pt");
    let rec = &meta_lines(&root)[0];
    let f = feat_dir(&root, rec).join("clips_project_output.pt");
    let mut b = std::fs::read(&f).unwrap();
    b.truncate(b.len() / 2);
    std::fs::write(&f, b).unwrap();
    expect_pack_error(
        &root,
        d,
        &["meta.jsonl line 1", "clips_project_output.pt"],
        "bad_pt",
    );

    // NaN feature.
    let root = fresh(d, "nan");
    let rec = &meta_lines(&root)[4];
    let f = feat_dir(&root, rec).join("clips_project_output.pt");
    let mut items = read_pt(&f).unwrap();
    items[0].1.data[5] = f32::NAN;
    write_pt(&f, &items, false).unwrap();
    expect_pack_error(
        &root,
        d,
        &["meta.jsonl line 5", "element 5 is NaN"],
        "non_finite_feature",
    );

    // Wrong width.
    let root = fresh(d, "width");
    let rec = &meta_lines(&root)[3];
    let f = feat_dir(&root, rec).join("clips_output.pt");
    let mut items = read_pt(&f).unwrap();
    items[0].1 = PtTensor {
        dtype: PtDtype::F16,
        shape: vec![100],
        data: vec![0.1; 100],
    };
    write_pt(&f, &items, true).unwrap();
    expect_pack_error(
        &root,
        d,
        &["meta.jsonl line 4", "width 100, expected"],
        "wrong_width",
    );

    // No available teacher.
    let root = fresh(d, "none");
    let mut lines = meta_lines(&root);
    lines[1]["available_clips"] = serde_json::json!([]);
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(root.join("meta.jsonl"), text.join("\n")).unwrap();
    expect_pack_error(
        &root,
        d,
        &["meta.jsonl line 2", "no teacher"],
        "no_available_teacher",
    );

    // Invalid UTF-8.
    let root = fresh(d, "utf8");
    let mut raw = std::fs::read(root.join("meta.jsonl")).unwrap();
    let at = raw.iter().position(|&c| c == b'\n').unwrap() + 20;
    raw[at] = 0xff;
    std::fs::write(root.join("meta.jsonl"), raw).unwrap();
    expect_pack_error(&root, d, &["meta.jsonl line 2", "UTF-8"], "invalid_utf8");

    // Empty caption.
    let root = fresh(d, "empty");
    let mut lines = meta_lines(&root);
    lines[0]["txt"] = serde_json::json!("   ");
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(root.join("meta.jsonl"), text.join("\n")).unwrap();
    expect_pack_error(
        &root,
        d,
        &["meta.jsonl line 1", "caption is empty"],
        "empty_caption",
    );
}

#[test]
fn availability_mismatch_is_counted_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let root = fresh(dir.path(), "mm");
    let mut lines = meta_lines(&root);
    // Claim a teacher whose features are absent.
    let names: Vec<String> = lines[0]["available_clips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let f = feat_dir(&root, &lines[0]);
    let items: Vec<_> = read_pt(&f.join("clips_project_output.pt"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !k.starts_with(&names[0]))
        .collect();
    if items.is_empty() {
        lines[0]["available_clips"] = serde_json::json!([names[0], "QuiltNet", "BiomedCLIP"]);
    } else {
        write_pt(&f.join("clips_project_output.pt"), &items, false).unwrap();
    }
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(root.join("meta.jsonl"), text.join("\n")).unwrap();
    let out = dir.path().join("o");
    let s = pack(&opts(&root, &out)).unwrap();
    assert_eq!(s.availability_mismatches, 1);
    let ds = Dataset::open(&out).unwrap();
    let t0 = ds
        .manifest()
        .teachers
        .iter()
        .position(|t| t.name == names[0])
        .unwrap();
    if !items.is_empty() {
        assert_eq!(
            ds.available(0).unwrap() >> t0 & 1,
            0,
            "missing features must not be marked available"
        );
    }
}

#[test]
fn tokenizer_truncation_is_counted_and_keeps_sep() {
    let dir = tempfile::tempdir().unwrap();
    let root = fresh(dir.path(), "tr");
    let out = dir.path().join("o");
    let mut o = opts(&root, &out);
    o.context_length = 6;
    let s = pack(&o).unwrap();
    assert_eq!(s.truncated, 5);
    let ds = Dataset::open(&out).unwrap();
    let tok = mmkd_loaders::tokenizer::load(&ds.tokenizer_path()).unwrap();
    let t = ds.tokens(0).unwrap();
    assert_eq!(t.len(), 6);
    assert_eq!(t[0], tok.token_to_id("[CLS]").unwrap());
    assert_eq!(t[5], tok.token_to_id("[SEP]").unwrap());
    // An existing tokenizer.json is used as given.
    let out2 = dir.path().join("o2");
    let mut o2 = opts(&root, &out2);
    o2.context_length = 6;
    o2.tokenizer = Some(ds.tokenizer_path());
    pack(&o2).unwrap();
    assert_eq!(
        Dataset::open(&out2).unwrap().tokens(2).unwrap(),
        ds.tokens(2).unwrap()
    );
}

fn png(w: u32, h: u32, color: image::ColorType) -> Vec<u8> {
    let n = (w * h) as usize * color.bytes_per_pixel() as usize;
    let data: Vec<u8> = (0..n).map(|i| (i * 37 % 251) as u8).collect();
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut out),
        &data,
        w,
        h,
        color.into(),
    )
    .unwrap();
    out
}

#[test]
fn image_decode_handles_gray_rgba_and_aspect() {
    let g = image_proc::prepare_image(&png(40, 20, image::ColorType::L8), 16, "g").unwrap();
    assert_eq!(g.len(), 3 * 16 * 16);
    assert_eq!(&g[..256], &g[256..512], "gray becomes three equal channels");
    let a = image_proc::prepare_image(&png(20, 50, image::ColorType::Rgba8), 16, "a").unwrap();
    assert_eq!(a.len(), 3 * 16 * 16);
    // Same size: a pure re-layout from interleaved to planar.
    let raw = png(8, 8, image::ColorType::Rgb8);
    let p = image_proc::prepare_image(&raw, 8, "p").unwrap();
    let dec = image::load_from_memory(&raw).unwrap().to_rgb8();
    assert_eq!(p[64 + 8 * 3 + 5], dec.get_pixel(5, 3)[1]);
    let e = image_proc::prepare_image(b"GIF89a....", 8, "file x.gif")
        .unwrap_err()
        .to_string();
    assert!(e.contains("x.gif"), "{e}");
}

#[test]
fn manifest_importer_reads_npy_safetensors_and_inline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("a.png"), png(30, 30, image::ColorType::Rgb8)).unwrap();
    let v: Vec<f32> = (0..512).map(|i| (i as f32 * 0.01).sin()).collect();
    // .npy float32 [512]
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let mut header = "{'descr': '<f4', 'fortran_order': False, 'shape': (512,), }".to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    npy.extend_from_slice(&(header.len() as u16).to_le_bytes());
    npy.extend_from_slice(header.as_bytes());
    npy.extend_from_slice(bytemuck::cast_slice(&v));
    std::fs::write(d.join("img.npy"), &npy).unwrap();
    // .safetensors with one f32 tensor [1, 512]
    let st = safetensors::serialize(
        [(
            "t",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![1, 512],
                bytemuck::cast_slice(&v),
            )
            .unwrap(),
        )],
        None,
    )
    .unwrap();
    std::fs::write(d.join("txt.safetensors"), &st).unwrap();
    let inline: Vec<f32> = v.iter().map(|x| x * 0.5).collect();
    let lines = [
        serde_json::json!({"image": "a.png", "caption": "an image of things", "label": "b", "teachers": [{"name": "T1", "image": "img.npy", "text": "txt.safetensors"}]}),
        serde_json::json!({"image": "a.png", "caption": "another image", "label": "a", "teachers": [{"name": "T1", "image": inline, "text": inline}, {"name": "T0", "image": "img.npy", "text": "img.npy", "raw_image": [1.0, 2.0], "raw_text": [3.0, 4.0]}]}),
    ];
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(d.join("m.jsonl"), text.join("\n")).unwrap();
    let out = d.join("o");
    let mut o = opts(&d.join("m.jsonl"), &out);
    o.format = SourceFormat::Manifest;
    o.feature_dtype = FeatureDtype::F32;
    pack(&o).unwrap();
    let ds = Dataset::open(&out).unwrap();
    let m = ds.manifest();
    assert_eq!(
        m.teachers
            .iter()
            .map(|t| (t.name.as_str(), t.raw_dim))
            .collect::<Vec<_>>(),
        [("T0", 2), ("T1", 512)]
    );
    assert_eq!(m.classes, ["a", "b"]);
    let s0 = ds.sample(0).unwrap();
    assert_eq!(s0.label, 1);
    assert_eq!(s0.available, 0b10);
    assert_eq!(s0.proj_image[1], v);
    assert_eq!(s0.proj_text[1], v);
    let s1 = ds.sample(1).unwrap();
    assert_eq!(s1.available, 0b11);
    assert_eq!(s1.proj_image[1], inline);
    assert_eq!(s1.raw_text[0], [3.0, 4.0]);
    // A missing feature file names the record and the file.
    std::fs::remove_file(d.join("txt.safetensors")).unwrap();
    let e = format!("{:#}", pack(&o).unwrap_err());
    assert!(
        e.contains("m.jsonl line 1") && e.contains("txt.safetensors"),
        "{e}"
    );
}

#[test]
fn wds_importer_reads_tars() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    add("000001.png", &png(24, 30, image::ColorType::L8));
    add("000001.txt", b"a gray radiograph");
    add("000002.jpg", &{
        let mut out = Vec::new();
        image::ImageEncoder::write_image(
            image::codecs::jpeg::JpegEncoder::new(&mut out),
            &vec![120u8; 32 * 32 * 3],
            32,
            32,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
        out
    });
    add(
        "000002.json",
        br#"{"caption": "a flat colour image", "other": 1}"#,
    );
    add("000003.png", &png(20, 20, image::ColorType::Rgba8));
    add("000003.json", br#"{"no_caption": true}"#);
    std::fs::write(d.join("shard-0.tar"), b.into_inner().unwrap()).unwrap();
    let out = d.join("o");
    let mut o = opts(d, &out);
    o.format = SourceFormat::Wds;
    let e = format!("{:#}", pack(&o).unwrap_err());
    assert!(
        e.contains("shard-0.tar key 000003") && e.contains("no caption"),
        "{e}"
    );
    o.skip_bad = true;
    o.input = d.join("*.tar").to_str().unwrap().to_string();
    let s = pack(&o).unwrap();
    assert_eq!(
        (s.num_samples, s.skipped.get("bad_record").copied()),
        (2, Some(1))
    );
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.num_teachers(), 0);
    assert_eq!(ds.caption(1).unwrap(), "a flat colour image");
    assert_eq!(ds.id(0).unwrap(), "000001");
    assert!(ds
        .image(1)
        .unwrap()
        .iter()
        .all(|&p| (p as i32 - 120).abs() <= 2));
    // Stage-1 batches work without teachers.
    let mut l = BatchLoader::new(
        Arc::new(ds),
        BatchConfig {
            batch_size: 2,
            teachers: TeacherMode::One,
            workers: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let bt = l.next_batch().unwrap().unwrap();
    assert_eq!(bt.teacher_index(), &[-1, -1]);
}

fn packed(dir: &Path, n: usize) -> Arc<Dataset> {
    let root = synth_small(dir, n);
    let out = dir.join("packed");
    pack(&opts(&root, &out)).unwrap();
    Arc::new(Dataset::open(&out).unwrap())
}

fn all_batches(l: &mut BatchLoader) -> Vec<mmkd_loaders::Batch> {
    let mut v = vec![];
    while let Some(b) = l.next_batch().unwrap() {
        v.push(b);
    }
    v
}

#[test]
fn batches_are_deterministic_resumable_and_sharded() {
    let dir = tempfile::tempdir().unwrap();
    let ds = packed(dir.path(), 21);
    let cfg = BatchConfig {
        batch_size: 4,
        seed: 11,
        epochs: 2,
        workers: 0,
        augment: Some(Augment::default()),
        image_dtype: ImageDtype::Bf16,
        ..Default::default()
    };
    let a = all_batches(&mut BatchLoader::new(ds.clone(), cfg.clone()).unwrap());
    assert_eq!(a.len(), 12, "2 epochs of ceil(21/4)");
    // Worker threads give the same bytes in the same order.
    let b = all_batches(
        &mut BatchLoader::new(
            ds.clone(),
            BatchConfig {
                workers: 3,
                prefetch: 2,
                ..cfg.clone()
            },
        )
        .unwrap(),
    );
    assert_eq!(
        a.iter().map(|x| x.as_bytes().to_vec()).collect::<Vec<_>>(),
        b.iter().map(|x| x.as_bytes().to_vec()).collect::<Vec<_>>()
    );
    // Each epoch is a permutation; the two epochs differ.
    let e0: Vec<u64> = a[..6].iter().flat_map(|x| x.indices().to_vec()).collect();
    let e1: Vec<u64> = a[6..].iter().flat_map(|x| x.indices().to_vec()).collect();
    let mut s0 = e0.clone();
    s0.sort();
    assert_eq!(s0, (0..21).collect::<Vec<_>>());
    assert_ne!(e0, e1);
    // Resume from the cursor after batch 7 (mid epoch 1), even after reading further.
    let mut l = BatchLoader::new(
        ds.clone(),
        BatchConfig {
            workers: 2,
            ..cfg.clone()
        },
    )
    .unwrap();
    for _ in 0..9 {
        l.next_batch().unwrap();
    }
    l.seek(a[7].start).unwrap();
    let rest = all_batches(&mut l);
    assert_eq!(rest.len(), 5);
    for (x, y) in rest.iter().zip(&a[7..]) {
        assert_eq!(x.as_bytes(), y.as_bytes());
    }
    assert_eq!(
        a[7].start,
        Cursor {
            epoch: 1,
            position: 4
        }
    );
    // Ranks: disjoint, equal counts, together a subset of the epoch.
    let mut seen = std::collections::BTreeSet::new();
    for rank in 0..3 {
        let c = BatchConfig {
            rank,
            world_size: 3,
            epochs: 1,
            ..cfg.clone()
        };
        let idx: Vec<u64> = all_batches(&mut BatchLoader::new(ds.clone(), c.clone()).unwrap())
            .iter()
            .flat_map(|x| x.indices().to_vec())
            .collect();
        assert_eq!(idx.len(), 7);
        assert_eq!(idx, epoch_order(21, &c, 0));
        for i in idx {
            assert!(seen.insert(i), "sample {i} on two ranks");
        }
    }
    assert!(BatchLoader::new(
        ds,
        BatchConfig {
            rank: 3,
            world_size: 3,
            ..cfg
        }
    )
    .is_err());
}

#[test]
fn batch_contents_match_the_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let ds = packed(dir.path(), 10);
    let cfg = BatchConfig {
        batch_size: 10,
        seed: 5,
        workers: 0,
        teachers: TeacherMode::All,
        pad_to_longest: true,
        ..Default::default()
    };
    let b = BatchLoader::new(ds.clone(), cfg)
        .unwrap()
        .next_batch()
        .unwrap()
        .unwrap();
    let s = ds.image_size();
    let nt = ds.num_teachers();
    let longest = (0..10).map(|i| ds.token_len(i).unwrap()).max().unwrap();
    assert_eq!(b.token_len, longest);
    let img = b.images_f32().unwrap();
    for (k, &i) in b.indices().iter().enumerate() {
        let raw = ds.image(i).unwrap();
        for &p in &[0usize, 5, s * s + 7, 2 * s * s + 3] {
            let c = p / (s * s);
            let want = (raw[p] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
            assert!((img[k * 3 * s * s + p] - want).abs() < 1e-6);
        }
        let toks = ds.tokens(i).unwrap();
        assert_eq!(
            &b.tokens()[k * longest..k * longest + toks.len()],
            toks.as_slice()
        );
        assert_eq!(b.lengths()[k] as usize, toks.len());
        let mask = &b.attention_mask()[k * longest..(k + 1) * longest];
        assert_eq!(mask.iter().map(|&m| m as usize).sum::<usize>(), toks.len());
        assert_eq!(b.labels()[k], ds.label(i).unwrap());
        let av = ds.available(i).unwrap();
        for t in 0..nt {
            assert_eq!(b.teacher_mask()[k * nt + t] as u64, (av >> t) & 1);
            let mut f = vec![0f32; 512];
            ds.proj_into(i, t, Tower::Text, &mut f).unwrap();
            assert_eq!(
                &b.teacher_text()[(k * nt + t) * 512..(k * nt + t + 1) * 512],
                f.as_slice()
            );
        }
    }
    // The buffer is one allocation with 64-byte-aligned tensors.
    for r in [
        b.layout.images,
        b.layout.tokens,
        b.layout.teacher_image,
        b.layout.labels,
        b.layout.indices,
    ] {
        assert_eq!(r.0 % 64, 0);
    }
    // One teacher per sample: drawn from the available ones, same draw on reload.
    let one = BatchConfig {
        batch_size: 10,
        seed: 5,
        workers: 0,
        teachers: TeacherMode::One,
        ..Default::default()
    };
    let b1 = BatchLoader::new(ds.clone(), one.clone())
        .unwrap()
        .next_batch()
        .unwrap()
        .unwrap();
    for (k, &i) in b1.indices().iter().enumerate() {
        let t = b1.teacher_index()[k];
        assert!(t >= 0 && (ds.available(i).unwrap() >> t) & 1 == 1);
        let mut f = vec![0f32; 512];
        ds.proj_into(i, t as usize, Tower::Image, &mut f).unwrap();
        assert_eq!(&b1.teacher_image()[k * 512..(k + 1) * 512], f.as_slice());
    }
    // Over many epochs each available teacher is drawn about equally often.
    let av = 0b1011u64;
    let mut counts = [0usize; 4];
    for e in 0..3000 {
        counts[choose_teacher(1, e, 3, av).unwrap()] += 1;
    }
    assert_eq!(counts[2], 0);
    for &c in &[counts[0], counts[1], counts[3]] {
        assert!((800..1200).contains(&c), "{counts:?}");
    }
}

#[test]
fn augmentation_is_seeded_and_changes_images() {
    let dir = tempfile::tempdir().unwrap();
    let ds = packed(dir.path(), 6);
    let base = BatchConfig {
        batch_size: 6,
        seed: 1,
        workers: 0,
        shuffle: false,
        teachers: TeacherMode::None,
        ..Default::default()
    };
    let plain = BatchLoader::new(ds.clone(), base.clone())
        .unwrap()
        .next_batch()
        .unwrap()
        .unwrap();
    let aug = BatchConfig {
        augment: Some(Augment {
            scale: (0.3, 0.6),
            ratio: (0.75, 1.33),
            flip: 0.5,
        }),
        ..base.clone()
    };
    let a1 = BatchLoader::new(ds.clone(), aug.clone())
        .unwrap()
        .next_batch()
        .unwrap()
        .unwrap();
    let a2 = BatchLoader::new(ds.clone(), aug.clone())
        .unwrap()
        .next_batch()
        .unwrap()
        .unwrap();
    assert_eq!(a1.as_bytes(), a2.as_bytes());
    assert_ne!(a1.images_f32().unwrap(), plain.images_f32().unwrap());
    // A full-image crop with certain flip is an exact mirror.
    let mirror = BatchConfig {
        augment: Some(Augment {
            scale: (1.0, 1.0),
            ratio: (1.0, 1.0),
            flip: 1.0,
        }),
        ..base
    };
    let m = BatchLoader::new(ds.clone(), mirror)
        .unwrap()
        .next_batch()
        .unwrap()
        .unwrap();
    let s = ds.image_size();
    let (p, q) = (plain.images_f32().unwrap(), m.images_f32().unwrap());
    for y in [0, 7, s - 1] {
        for x in [0, 3, s - 1] {
            assert!((p[y * s + x] - q[y * s + (s - 1 - x)]).abs() < 1e-5);
        }
    }
}

#[test]
fn interrupted_pack_leaves_no_dataset_and_tmp_shards_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ds = packed(dir.path(), 4);
    let out = ds.dir().to_path_buf();
    drop(ds);
    // Simulate a kill between shard write and manifest: a half-written temp shard, no manifest.
    let shard = out.join("shard-00000.mmkd");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(out.join("shard-00001.mmkd.tmp"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(out.join("manifest.json")).unwrap();
    assert!(Dataset::open(&out)
        .unwrap_err()
        .to_string()
        .contains("manifest"));
    assert!(mmkd_loaders::shard::Shard::open(&out.join("shard-00001.mmkd.tmp"), true).is_err());
}

#[test]
fn bf16_conversion_matches_half_bit_for_bit() {
    let specials = [
        0.0f32,
        -0.0,
        1.0,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7F80_0001), // signalling NaN, payload only in the low half
        f32::from_bits(0x3F80_8000), // exact tie, even below: rounds down
        f32::from_bits(0x3F81_8000), // exact tie, odd below: rounds up
        f32::from_bits(0x7F7F_FFFF), // rounds up to infinity
    ];
    let strided = (0..u32::MAX / 1009).map(|k| f32::from_bits(k * 1009));
    for x in specials.into_iter().chain(strided) {
        assert_eq!(
            mmkd_loaders::batch::f32_to_bf16_bits(x),
            half::bf16::from_f32(x).to_bits(),
            "{x:e} ({:#010x})",
            x.to_bits()
        );
    }
}

/// Plain per-pixel bilinear sampling of the whole image at `s × s`, the definition the
/// loader's separable resampler must reproduce exactly.
fn reference_resize(raw: &[u8], src: usize, s: usize, c: usize, y: usize, x: usize) -> f32 {
    let tap = |k: usize| {
        let f = ((k as f32 + 0.5) * src as f32 / s as f32 - 0.5).clamp(0.0, (src - 1) as f32);
        let i0 = f as usize;
        (i0, (i0 + 1).min(src - 1), f - i0 as f32)
    };
    let ((y0, y1, wy), (x0, x1, wx)) = (tap(y), tap(x));
    let p = |yy: usize, xx: usize| raw[c * src * src + yy * src + xx] as f32;
    let (a, b) = (p(y0, x0), p(y0, x1));
    let t0 = a + (b - a) * wx;
    let (a, b) = (p(y1, x0), p(y1, x1));
    let t1 = a + (b - a) * wx;
    t0 + (t1 - t0) * wy
}

/// The exact-image cases: resampled (down and up), at the stored size, and mirrored through a
/// full-image crop; the first batch of 4 of each, in `dtype`, with `teachers`.
fn image_cases(
    ds: &Arc<Dataset>,
    dtype: ImageDtype,
    teachers: TeacherMode,
) -> Vec<(Option<usize>, bool, mmkd_loaders::Batch)> {
    let src = ds.image_size();
    [
        (Some(37), false),
        (Some(src + 9), false),
        (None, false),
        (None, true),
    ]
    .into_iter()
    .map(|(out, mirror)| {
        let cfg = BatchConfig {
            batch_size: 4,
            workers: 0,
            shuffle: false,
            image_dtype: dtype,
            teachers,
            output_size: out,
            augment: mirror.then_some(Augment {
                scale: (1.0, 1.0),
                ratio: (1.0, 1.0),
                flip: 1.0,
            }),
            ..Default::default()
        };
        let b = BatchLoader::new(ds.clone(), cfg)
            .unwrap()
            .next_batch()
            .unwrap()
            .unwrap();
        (out, mirror, b)
    })
    .collect()
}

/// Calls `f(at, c, v)` for every value of `b`'s images: its index in the image tensor, its
/// channel and the reference sample (the plain bilinear definition, or the stored pixel), before
/// normalisation and rounding.
fn for_each_reference_value(
    ds: &Dataset,
    b: &mmkd_loaders::Batch,
    resampled: bool,
    mirror: bool,
    mut f: impl FnMut(usize, usize, f32),
) {
    let (src, s) = (ds.image_size(), b.image_size);
    for (k, &i) in b.indices().iter().enumerate() {
        let raw = ds.image(i).unwrap();
        for c in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    let v = match (resampled, mirror) {
                        (true, _) => reference_resize(raw, src, s, c, y, x),
                        (false, true) => raw[c * s * s + y * s + (s - 1 - x)] as f32,
                        (false, false) => raw[c * s * s + y * s + x] as f32,
                    };
                    f(((k * 3 + c) * s + y) * s + x, c, v);
                }
            }
        }
    }
}

fn clip_norm() -> [(f32, f32); 3] {
    std::array::from_fn(|c| (1.0 / (255.0 * CLIP_STD[c]), -CLIP_MEAN[c] / CLIP_STD[c]))
}

#[test]
fn bf16_images_match_the_reference_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ds = packed(dir.path(), 4);
    let norm = clip_norm();
    for (out, mirror, b) in image_cases(&ds, ImageDtype::Bf16, TeacherMode::None) {
        let img = b.images_bf16().unwrap();
        for_each_reference_value(&ds, &b, out.is_some(), mirror, |at, c, v| {
            let want = half::bf16::from_f32(v * norm[c].0 + norm[c].1);
            assert_eq!(img[at].to_bits(), want.to_bits(), "{out:?} {mirror} {at}");
        });
    }
}

/// Raw u8 crops: the bilinear sample rounded to nearest, the stored pixels unchanged at the
/// stored size and mirrored by a flip; and the same batch in f32 is these values normalised
/// (exactly where no resampling happens, within half a pixel level where it does). The rest
/// of the batch is that of the f32 batch.
#[test]
fn u8_images_are_rounded_crops_of_the_f32_ones() {
    let dir = tempfile::tempdir().unwrap();
    let ds = packed(dir.path(), 4);
    let norm = clip_norm();
    let raw = image_cases(&ds, ImageDtype::U8, TeacherMode::All);
    let f32s = image_cases(&ds, ImageDtype::F32, TeacherMode::All);
    for ((out, mirror, b), (_, _, f)) in raw.into_iter().zip(f32s) {
        assert!(b.images_f32().is_none() && b.images_bf16().is_none());
        let img = b.images_u8().unwrap();
        assert_eq!(img.len(), 4 * 3 * b.image_size * b.image_size);
        let fimg = f.images_f32().unwrap();
        for_each_reference_value(&ds, &b, out.is_some(), mirror, |at, c, v| {
            assert_eq!(img[at], v.round() as u8, "{out:?} {mirror} {at}");
            let from_u8 = img[at] as f32 * norm[c].0 + norm[c].1;
            let bound = if out.is_some() {
                0.5 * norm[c].0 * 1.0001
            } else {
                0.0
            };
            assert!(
                (from_u8 - fimg[at]).abs() <= bound,
                "{out:?} {mirror} {at}: {from_u8} vs {}",
                fimg[at]
            );
        });
        // Everything after the images is laid out and filled as in the f32 batch.
        assert_eq!(b.tokens(), f.tokens());
        assert_eq!(b.teacher_image(), f.teacher_image());
        assert_eq!(b.teacher_mask(), f.teacher_mask());
        assert_eq!(b.indices(), f.indices());
        assert!(b.as_bytes().len() < f.as_bytes().len());
    }
}

#[test]
fn reused_batch_buffers_give_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let ds = packed(dir.path(), 23);
    for workers in [0, 2] {
        // Captions of different lengths make consecutive buffers differ in size, and the last
        // batch of each epoch is smaller, so reuse must shrink, grow and re-zero buffers.
        let cfg = BatchConfig {
            batch_size: 5,
            seed: 3,
            epochs: 2,
            workers,
            prefetch: 2,
            augment: Some(Augment::default()),
            image_dtype: ImageDtype::Bf16,
            pad_to_longest: true,
            teachers: TeacherMode::All,
            ..Default::default()
        };
        let kept = all_batches(&mut BatchLoader::new(ds.clone(), cfg.clone()).unwrap());
        let mut l = BatchLoader::new(ds.clone(), cfg).unwrap();
        let mut n = 0;
        while let Some(b) = l.next_batch().unwrap() {
            assert_eq!(
                b.as_bytes(),
                kept[n].as_bytes(),
                "workers {workers}, batch {n}"
            );
            l.recycle(b);
            n += 1;
        }
        assert_eq!(n, kept.len());
        assert!(kept.windows(2).any(|w| w[0].token_len != w[1].token_len));
    }
}
