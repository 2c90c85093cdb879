//! Shard format and `.pt` reader/writer tests.

use half::{bf16, f16};
use mmkd_loaders::pt::{read_pt, read_pt_bytes, write_pt, write_pt_bytes, PtDtype, PtTensor};
use mmkd_loaders::shard::{parse_sections, Dtype, Shard, ShardWriter, ALIGN};

fn sample_writer() -> ShardWriter {
    let mut w = ShardWriter::new(3);
    w.add("images", Dtype::U8, &[3, 2, 5], (0..30u8).collect())
        .unwrap();
    w.add(
        "vals",
        Dtype::F32,
        &[3, 2],
        bytemuck::cast_slice(&[1.5f32, -2.0, 3.25, 0.0, 7.0, 8.0]).to_vec(),
    )
    .unwrap();
    w.add(
        "ids",
        Dtype::U64,
        &[4],
        bytemuck::cast_slice(&[0u64, 9, u64::MAX, 3]).to_vec(),
    )
    .unwrap();
    w.add(
        "half",
        Dtype::F16,
        &[2],
        bytemuck::cast_slice(&[f16::from_f32(0.5), f16::from_f32(-1.0)]).to_vec(),
    )
    .unwrap();
    w
}

#[test]
fn shard_round_trip_and_alignment() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.mmkd");
    let n = sample_writer().finish(&p).unwrap();
    assert_eq!(n, std::fs::metadata(&p).unwrap().len());
    assert!(
        !dir.path().join("a.mmkd.tmp").exists(),
        "temporary file must be renamed away"
    );
    let s = Shard::open(&p, true).unwrap();
    assert_eq!(s.num_samples(), 3);
    for info in s.sections() {
        assert_eq!(info.offset % ALIGN, 0, "section {} misaligned", info.name);
    }
    assert_eq!(
        s.typed::<u8>("images", Dtype::U8, &[3, 2, 5]).unwrap(),
        (0..30u8).collect::<Vec<_>>().as_slice()
    );
    assert_eq!(
        s.typed::<f32>("vals", Dtype::F32, &[3, 2]).unwrap(),
        &[1.5, -2.0, 3.25, 0.0, 7.0, 8.0]
    );
    assert_eq!(
        s.typed::<u64>("ids", Dtype::U64, &[4]).unwrap(),
        &[0, 9, u64::MAX, 3]
    );
    assert_eq!(
        s.typed::<f16>("half", Dtype::F16, &[2]).unwrap()[1].to_f32(),
        -1.0
    );
    // Wrong type or shape is refused, not reinterpreted.
    assert!(s.typed::<f32>("vals", Dtype::F32, &[6]).is_err());
    assert!(s.typed::<u32>("vals", Dtype::U32, &[3, 2]).is_err());
    assert!(s
        .bytes("nope")
        .unwrap_err()
        .to_string()
        .contains("missing section nope"));
}

#[test]
fn writer_rejects_bad_sections() {
    let mut w = ShardWriter::new(1);
    assert!(
        w.add("x", Dtype::F32, &[3], vec![0; 8]).is_err(),
        "length must match the shape"
    );
    assert!(w
        .add(
            "a_name_that_is_far_too_long_for_the_table",
            Dtype::U8,
            &[1],
            vec![0]
        )
        .is_err());
    w.add("x", Dtype::U8, &[1], vec![0]).unwrap();
    assert!(
        w.add("x", Dtype::U8, &[1], vec![0]).is_err(),
        "duplicate names"
    );
}

#[test]
fn truncated_shard_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("trunc.mmkd");
    let bytes = sample_writer().to_bytes();
    for cut in [0, 10, 63, 64, 200, bytes.len() - 1] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = Shard::open(&p, true).unwrap_err().to_string();
        assert!(e.contains("trunc.mmkd"), "error must name the file: {e}");
    }
}

#[test]
fn bit_flips_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("flip.mmkd");
    let bytes = sample_writer().to_bytes();
    let s = {
        std::fs::write(&p, &bytes).unwrap();
        Shard::open(&p, true).unwrap()
    };
    let data_at = s.info("vals").unwrap().offset as usize + 5;
    drop(s);
    // Every bit of the header and table, and one in the data.
    let mut positions: Vec<usize> = (0..(64 + 4 * 96)).collect();
    positions.push(data_at);
    for pos in positions {
        for bit in [0, 3, 7] {
            let mut b = bytes.clone();
            b[pos] ^= 1 << bit;
            std::fs::write(&p, &b).unwrap();
            match Shard::open(&p, true) {
                Err(e) => assert!(e.to_string().contains("flip.mmkd"), "{e}"),
                Ok(_) => panic!("flip of bit {bit} at byte {pos} accepted"),
            }
        }
    }
    // With checksums off, a flipped data bit gets through (header still checked).
    let mut b = bytes.clone();
    b[data_at] ^= 1;
    std::fs::write(&p, &b).unwrap();
    assert!(Shard::open(&p, false).is_ok());
    let e = Shard::open(&p, true).unwrap_err().to_string();
    assert!(e.contains("checksum mismatch") && e.contains("vals"), "{e}");
}

#[test]
fn bad_magic_and_version() {
    let mut b = sample_writer().to_bytes();
    b[0] = b'X';
    assert!(parse_sections(&b, "s", true)
        .unwrap_err()
        .to_string()
        .contains("bad magic"));
    let mut b = sample_writer().to_bytes();
    b[8] = 9;
    assert!(parse_sections(&b, "s", true)
        .unwrap_err()
        .to_string()
        .contains("version 9"));
}

fn tensors() -> Vec<(String, PtTensor)> {
    let v: Vec<f32> = (0..7).map(|i| i as f32 * 0.37 - 1.0).collect();
    vec![
        (
            "BMCA_img".to_string(),
            PtTensor {
                dtype: PtDtype::F32,
                shape: vec![7],
                data: v.clone(),
            },
        ),
        (
            "BMCA_txt".to_string(),
            PtTensor {
                dtype: PtDtype::F16,
                shape: vec![7],
                data: v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
            },
        ),
        (
            "PLIP_img".to_string(),
            PtTensor {
                dtype: PtDtype::Bf16,
                shape: vec![2, 3],
                data: v[..6].iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
            },
        ),
        (
            "Big".to_string(),
            PtTensor {
                dtype: PtDtype::F32,
                shape: vec![70000],
                data: (0..70000).map(|i| i as f32).collect(),
            },
        ),
    ]
}

#[test]
fn pt_round_trip_dict_and_ordered_dict() {
    let dir = tempfile::tempdir().unwrap();
    for ordered in [false, true] {
        let p = dir.path().join(format!("clips_{ordered}.pt"));
        write_pt(&p, &tensors(), ordered).unwrap();
        let back = read_pt(&p).unwrap();
        assert_eq!(back, tensors(), "ordered={ordered}");
    }
}

#[test]
fn pt_layout_matches_torch_save() {
    let bytes = write_pt_bytes("archive", &tensors()[..1], false).unwrap();
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(&bytes)).unwrap();
    let names: Vec<String> = z.file_names().map(str::to_string).collect();
    for n in [
        "archive/data.pkl",
        "archive/byteorder",
        "archive/data/0",
        "archive/version",
    ] {
        assert!(names.contains(&n.to_string()), "{n} missing from {names:?}");
    }
    let data_start = z.by_name("archive/data/0").unwrap().data_start();
    assert_eq!(
        data_start % 64,
        0,
        "storages are 64-byte aligned as torch writes them"
    );
    let mut pkl = Vec::new();
    std::io::Read::read_to_end(&mut z.by_name("archive/data.pkl").unwrap(), &mut pkl).unwrap();
    // Protocol 2 header, the rebuild global and a FloatStorage persistent id, as torch.save emits.
    assert_eq!(&pkl[..2], &[0x80, 2]);
    let text = String::from_utf8_lossy(&pkl);
    assert!(text.contains("ctorch._utils\n_rebuild_tensor_v2\n"));
    assert!(text.contains("ctorch\nFloatStorage\n"));
    assert_eq!(*pkl.last().unwrap(), b'.');
}

/// A torch-style archive whose pickle is `pkl`.
fn archive_with_pickle(pkl: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut zw = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let o =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zw.start_file("x/data.pkl", o).unwrap();
    zw.write_all(pkl).unwrap();
    zw.start_file("x/data/0", o).unwrap();
    zw.write_all(&[0u8; 16]).unwrap();
    zw.finish().unwrap().into_inner()
}

#[test]
fn pt_rejects_code_execution_and_unknown_opcodes() {
    let dir = tempfile::tempdir().unwrap();
    // os.system("echo pwned") as a classic pickle exploit.
    let evil = b"\x80\x02cos\nsystem\nq\x00X\x0a\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03.";
    let p = dir.path().join("evil.pt");
    std::fs::write(&p, archive_with_pickle(evil)).unwrap();
    let e = format!("{:#}", read_pt(&p).unwrap_err());
    assert!(
        e.contains("evil.pt") && e.contains("os.system is not allowed"),
        "{e}"
    );
    // builtins.eval via STACK_GLOBAL (protocol 4) is an unknown opcode here.
    let e = format!(
        "{:#}",
        read_pt_bytes(&archive_with_pickle(
            b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93."
        ))
        .unwrap_err()
    );
    assert!(e.contains("opcode 0x93"), "{e}");
    // A list (EMPTY_LIST) is not part of the format either.
    assert!(read_pt_bytes(&archive_with_pickle(b"\x80\x02].")).is_err());
    // A dict of non-tensors.
    assert!(format!(
        "{:#}",
        read_pt_bytes(&archive_with_pickle(b"\x80\x02}X\x01\x00\x00\x00aK\x01s.")).unwrap_err()
    )
    .contains("not a tensor"));
    // Not a zip at all.
    let p = dir.path().join("garbage.pt");
    std::fs::write(&p, b"definitely not a zip").unwrap();
    assert!(format!("{:#}", read_pt(&p).unwrap_err()).contains("garbage.pt"));
}

#[test]
fn pt_rejects_views_past_their_storage() {
    // Storage of 4 floats viewed as 8.
    let mut t = tensors()[..1].to_vec();
    t[0].1 = PtTensor {
        dtype: PtDtype::F32,
        shape: vec![4],
        data: vec![1.0; 4],
    };
    let bytes = write_pt_bytes("archive", &t, false).unwrap();
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(&bytes)).unwrap();
    let mut pkl = Vec::new();
    std::io::Read::read_to_end(&mut z.by_name("archive/data.pkl").unwrap(), &mut pkl).unwrap();
    // The size tuple `K\x04\x85` (the storage's numel is closed by `t`, not TUPLE1); make it 8.
    let at = pkl.windows(3).position(|w| w == b"K\x04\x85").unwrap();
    pkl[at + 1] = 8;
    let mut zw = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let o = zip::write::SimpleFileOptions::default();
    use std::io::Write;
    zw.start_file("archive/data.pkl", o).unwrap();
    zw.write_all(&pkl).unwrap();
    zw.start_file("archive/data/0", o).unwrap();
    zw.write_all(bytemuck::cast_slice(&[1.0f32; 4])).unwrap();
    let e = format!(
        "{:#}",
        read_pt_bytes(&zw.finish().unwrap().into_inner()).unwrap_err()
    );
    assert!(
        e.contains("does not fit") || e.contains("past its storage"),
        "{e}"
    );
}
