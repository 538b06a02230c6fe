//! The `cargo fuzz` targets of `fuzz/` on stable, bounded: every seed in `fuzz/corpus/<target>/`
//! and every input that once broke a target (`fuzz/regressions/<target>/`) replayed through the
//! target's harness (the same function the fuzz target calls), then a deterministic mutation run
//! of each: byte and bit changes, truncations, insertions and splices of the seeds from a
//! fixed-seed generator, with the plan's and PNG's CRCs recomputed for part of the inputs so
//! that the checks behind them are reached too.
//!
//! A failing input is written to `target/fuzz-corpus-failures/<target>/` and named in the panic:
//! fix the bug, then keep the input in `fuzz/regressions/<target>/`.
//!
//! The plan seeds are made here (`plan_seeds`) and checked against the committed files, so a
//! change of the plan format shows; the image seeds are files (`write_seed_corpus` makes the
//! PNG variants and says where the others came from).

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use kestrel_ops::int8::{
    Add, AveragePool, ConvGeometry, GlobalAveragePool, MaxPool, Mul, PoolGeometry, Rescale, Resize,
    ResizeMode,
};
use kestrel_plan::plan::{DetectorHeader, HeadHeader};
use kestrel_plan::program::{Op, ProgramBuilder};
use kestrel_tests::plans::{header, requant, step, FULL};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted by name (none if it does not exist).
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// xorshift64*: the mutation run's fixed-seed generator.
struct Rng(u64);

impl Rng {
    fn new(name: &str) -> Self {
        // FNV-1a of the target's name: each target its own stream, the same on every run.
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// In `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Values that break parsers more often than random ones do.
const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, 0xfe, 16, 64];

/// One to four stacked changes of `seed`, some involving `other` (another seed).
fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = bytes.len();
        match rng.below(9) {
            0 | 1 if len > 0 => {
                let at = rng.below(len);
                bytes[at] ^= 1 << rng.below(8);
            }
            2 if len > 0 => {
                let at = rng.below(len);
                bytes[at] = rng.next() as u8;
            }
            3 if len > 0 => {
                let at = rng.below(len);
                bytes[at] = INTERESTING[rng.below(INTERESTING.len())];
            }
            4 => bytes.truncate(rng.below(len + 1)),
            5 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let insert: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                bytes.splice(at..at, insert);
            }
            6 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(32));
                bytes.drain(at..at + n);
            }
            7 => {
                // This one's head, the other's tail.
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                bytes.truncate(cut);
                bytes.extend_from_slice(&other[from..]);
            }
            8 if len >= 4 => {
                // A little-endian word set to an edge value: sizes, offsets, counts.
                let at = rng.below(len - 3);
                let word = [0u32, 1, 0x7fff_ffff, 0xffff_ffff, 0x8000, 0x10000][rng.below(6)];
                bytes[at..at + 4].copy_from_slice(&word.to_le_bytes());
            }
            _ => {}
        }
    }
    bytes
}

/// CRC-32 (IEEE), the plan's and PNG's checksum.
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut crc = !0u32;
    for &byte in parts.iter().flat_map(|p| p.iter()) {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Recompute a plan's section and table CRCs where the table can be read, as a plan writer
/// would: so mutations reach the loader's checks behind the CRCs.
fn fix_plan_crcs(bytes: &mut [u8]) {
    let Some(count) = bytes
        .get(10..12)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
    else {
        return;
    };
    let table_end = 16 + count * 16;
    if bytes.len() < table_end {
        return;
    }
    for entry in (16..table_end).step_by(16) {
        let (Some(offset), Some(len)) = (u32_at(bytes, entry + 4), u32_at(bytes, entry + 8)) else {
            continue;
        };
        let (offset, len) = (offset as usize, len as usize);
        if let Some(payload) = offset
            .checked_add(len)
            .and_then(|end| bytes.get(offset..end))
        {
            let crc = crc32(&[payload]);
            bytes[entry + 12..entry + 16].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let crc = crc32(&[&bytes[..12], &bytes[16..table_end]]);
    bytes[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// Recompute every PNG chunk's CRC that lies within the bytes.
fn fix_png_crcs(bytes: &mut [u8]) {
    if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return;
    }
    let mut at = 8;
    while let Some(len) = bytes.get(at..at + 4) {
        let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
        let Some(end) = (at + 8).checked_add(len) else {
            return;
        };
        if end + 4 > bytes.len() {
            return;
        }
        let crc = crc32(&[&bytes[at + 4..end]]);
        bytes[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
}

/// Run `harness` on `bytes`; on a panic, keep the input and say where.
fn check(target: &str, what: &str, harness: fn(&[u8]), bytes: &[u8]) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| harness(bytes))) {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("../fuzz-corpus-failures")
            .join(target);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(what.replace('/', "_"));
        std::fs::write(&file, bytes).unwrap();
        eprintln!(
            "{target}: {what} broke the harness; input kept in {}",
            file.display()
        );
        resume_unwind(panic);
    }
}

/// A target: its harness, how its checksums are recomputed, and whether an input got past
/// the first checks (a plan that loads, an image that decodes, a configuration accepted), so
/// that a mutation run that only ever exercises the first refusal is caught.
struct Target {
    name: &'static str,
    /// Mutated inputs on each test run: as many as take about a second in a debug build.
    mutations: usize,
    harness: fn(&[u8]),
    fix: fn(&mut [u8]),
    accepted: fn(&[u8]) -> bool,
}

/// Replay the corpus and the regressions, then the mutation run.
fn run_target(target: Target) {
    let Target {
        name: target,
        mutations,
        harness,
        fix,
        accepted,
    } = target;
    let started = std::time::Instant::now();
    let corpus = files(&fuzz_dir().join("corpus").join(target));
    assert!(!corpus.is_empty(), "fuzz/corpus/{target} has no seeds");
    let regressions = files(&fuzz_dir().join("regressions").join(target));
    for (path, bytes) in corpus.iter().chain(&regressions) {
        check(target, &path.display().to_string(), harness, bytes);
    }
    let mut rng = Rng::new(target);
    let mut deep = 0;
    for i in 0..mutations {
        let seed = &corpus[rng.below(corpus.len())].1;
        let other = &corpus[rng.below(corpus.len())].1;
        let mut input = mutate(&mut rng, seed, other);
        if rng.below(2) == 0 {
            fix(&mut input);
        }
        check(target, &format!("mutation-{i}"), harness, &input);
        deep += usize::from(accepted(&input));
    }
    println!(
        "{target}: {} seeds, {} regressions, {mutations} mutations ({deep} accepted) in {:.2?}",
        corpus.len(),
        regressions.len(),
        started.elapsed()
    );
    assert!(
        deep >= mutations / 20,
        "{target}: only {deep} of {mutations} mutations got past the first checks"
    );
}

fn decodes(bytes: &[u8]) -> bool {
    let max = kestrel_host::fuzzing::MAX_SAMPLES;
    kestrel_host::decode_image_bytes_within(Path::new("input"), bytes, max).is_ok()
}

#[test]
fn plan_load() {
    run_target(Target {
        name: "plan_load",
        mutations: 20_000,
        harness: kestrel_plan::fuzzing::plan_load,
        fix: fix_plan_crcs,
        // Loads, its CRCs checked or not: the harness runs it either way.
        accepted: |bytes| {
            let aligned = kestrel_plan::program::AlignedBytes::new(bytes);
            kestrel_plan::program::Program::new_unchecked_crcs(aligned.as_bytes()).is_ok()
        },
    });
}

#[test]
fn image_decode() {
    run_target(Target {
        name: "image_decode",
        mutations: 5_000,
        harness: kestrel_host::fuzzing::image_decode,
        fix: fix_png_crcs,
        accepted: decodes,
    });
}

#[test]
fn spool_file() {
    run_target(Target {
        name: "spool_file",
        mutations: 1_000,
        harness: kestrel_jetson::fuzzing::spool_file,
        fix: fix_png_crcs,
        accepted: decodes,
    });
}

#[test]
fn flight_config() {
    run_target(Target {
        name: "flight_config",
        mutations: 5_000,
        harness: kestrel_jetson::fuzzing::flight_config,
        fix: |_| {},
        accepted: |bytes| {
            kestrel_jetson::config::FlightConfig::parse(&String::from_utf8_lossy(bytes)).is_ok()
        },
    });
}

/// No regression is kept for a target that does not exist.
#[test]
fn regressions_belong_to_targets() {
    let Ok(dirs) = std::fs::read_dir(fuzz_dir().join("regressions")) else {
        return;
    };
    for dir in dirs {
        let name = dir.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            ["plan_load", "image_decode", "spool_file", "flight_config"].contains(&name.as_str()),
            "fuzz/regressions/{name}: no such target"
        );
    }
}

// The plan seeds.

/// Conv (t0 -> t1), residual Add (t0 + t1 -> t2), GlobalAveragePool (t2 -> t3), Gemm
/// (t3 -> t4) in a 128-byte arena: the `tiny` plan of kestrel-plan's own tests.
fn tiny_classifier() -> Vec<u8> {
    let mut b = ProgramBuilder::default();
    for (offset, len) in [(0, 32), (32, 32), (64, 32), (96, 2), (112, 3)] {
        b.tensor(offset, len);
    }
    let conv_weights: Vec<i8> = (0..2 * 2 * 9).map(|i| (i * 7 % 23) as i8 - 11).collect();
    let conv = Op::Conv {
        geometry: ConvGeometry {
            input: [2, 4, 4],
            output: [2, 4, 4],
            kernel: [3, 3],
            stride: [1, 1],
            pad: [1, 1],
            dilation: [1, 1],
            group: 1,
        },
        weights: b.i8_blob(&conv_weights),
        channels: b.channels(&[10, -10], &[requant(0.01); 2]),
        input_zero_point: -3,
        output_quant: FULL,
    };
    b.push(step(conv, [0, 0], 1)).unwrap();
    let add = Op::Add(Add {
        input_zero_points: [-3, 1],
        requant: [requant(0.5); 2],
        output_quant: FULL,
    });
    b.push(step(add, [0, 1], 2)).unwrap();
    let pool = Op::GlobalAveragePool(GlobalAveragePool {
        channels: 2,
        input_zero_point: 1,
        requant: requant(1.0 / 16.0),
        output_quant: FULL,
    });
    b.push(step(pool, [2, 2], 3)).unwrap();
    let gemm = Op::Gemm {
        weights: b.i8_blob(&[5, -3, 2, 7, -1, 4]),
        channels: b.channels(&[0, 5, -5], &[requant(0.3); 3]),
        input_zero_point: 1,
        output_quant: FULL,
    };
    b.push(step(gemm, [3, 3], 4)).unwrap();
    let mut header = header("tiny", 128, 4, 3);
    header.output_softmax = true;
    b.finish(&header).unwrap()
}

/// Every other op, with a detector's header: a strided depthwise Conv, MaxPool, AveragePool,
/// bilinear and nearest Resize, Lut, GlobalAveragePool, a per-channel Mul, a Concat of two
/// Rescales and a pointwise Conv.
fn every_op_detector() -> Vec<u8> {
    let mut b = ProgramBuilder::default();
    // (offset, len): t0 input [2,4,4]; t1 [2,2,2]; t2 [2,3,3]; t3 [2,4,4]; t4 [2,4,4];
    // t5 [2,4,4]; t6 [2]; t7 [2,4,4]; t8 [4,4,4]; t9 [2,4,4]; t10 [2,2,2].
    let lens = [32, 8, 18, 32, 32, 32, 2, 32, 64, 32, 8];
    let mut offset = 0;
    for len in lens {
        b.tensor(offset, len);
        offset = (offset + len).next_multiple_of(16);
    }
    let arena = offset as u32;
    let depthwise = Op::Conv {
        geometry: ConvGeometry {
            input: [2, 4, 4],
            output: [2, 2, 2],
            kernel: [3, 3],
            stride: [2, 2],
            pad: [1, 1],
            dilation: [1, 1],
            group: 2,
        },
        weights: b.i8_blob(&[3, -1, 4, 1, -5, 9, 2, -6, 5, 3, 5, -8, 9, 7, -9, 3, 2, 3]),
        channels: b.channels(&[7, -7], &[requant(0.02), requant(0.04)]),
        input_zero_point: -3,
        output_quant: FULL,
    };
    b.push(step(depthwise, [0, 0], 1)).unwrap();
    let pool = |kernel, stride, pad, output| PoolGeometry {
        channels: 2,
        input: [4, 4],
        output,
        kernel,
        stride,
        pad,
    };
    let max = Op::MaxPool(MaxPool {
        geometry: pool([2, 2], [1, 1], [0, 0], [3, 3]),
    });
    b.push(step(max, [0, 0], 2)).unwrap();
    let average = Op::AveragePool(AveragePool {
        geometry: pool([3, 3], [1, 1], [1, 1], [4, 4]),
        count_include_pad: false,
        input_zero_point: -3,
        requant: requant(0.9),
        output_quant: FULL,
    });
    b.push(step(average, [0, 0], 3)).unwrap();
    let resize = |mode, output| {
        Op::Resize(Resize {
            channels: 2,
            input: [2, 2],
            output,
            mode,
        })
    };
    b.push(step(resize(ResizeMode::Bilinear, [4, 4]), [1, 1], 4))
        .unwrap();
    let table: Vec<i8> = (0..=255u8).map(|q| (q as i8).max(0)).collect();
    let lut = Op::Lut {
        table: b.i8_blob(&table),
    };
    b.push(step(lut, [4, 4], 5)).unwrap();
    let gap = Op::GlobalAveragePool(GlobalAveragePool {
        channels: 2,
        input_zero_point: 1,
        requant: requant(1.0 / 16.0),
        output_quant: FULL,
    });
    b.push(step(gap, [3, 3], 6)).unwrap();
    let mul = Op::Mul(Mul {
        input_zero_points: [0, 1],
        requant: requant(0.05),
        output_quant: FULL,
    });
    b.push(step(mul, [5, 6], 7)).unwrap();
    let rescale = |offset| Op::Rescale {
        rescale: Rescale {
            input_zero_point: 1,
            requant: requant(0.7),
            output_quant: FULL,
        },
        offset,
    };
    b.push(step(rescale(0), [7, 7], 8)).unwrap();
    b.push(step(rescale(32), [3, 3], 8)).unwrap();
    let pointwise = Op::Conv {
        geometry: ConvGeometry {
            input: [4, 4, 4],
            output: [2, 4, 4],
            kernel: [1, 1],
            stride: [1, 1],
            pad: [0, 0],
            dilation: [1, 1],
            group: 1,
        },
        weights: b.i8_blob(&[1, -2, 3, -4, 5, -6, 7, -8]),
        channels: b.channels(&[0, 3], &[requant(0.1); 2]),
        input_zero_point: 1,
        output_quant: FULL,
    };
    b.push(step(pointwise, [8, 8], 9)).unwrap();
    b.push(step(resize(ResizeMode::Nearest, [2, 2]), [1, 1], 10))
        .unwrap();
    let mut header = header("every-op", arena, 9, 32);
    header.labels = "a\nb";
    header.detector = Some(DetectorHeader {
        head: HeadHeader::CenterNet {
            stride: 2,
            wh_scale: 4.0,
        },
        score_threshold: 0.3,
        nms_iou: 0.5,
        tile_overlap: 2,
        seam_containment: 0.8,
        max_per_class: 10,
    });
    b.finish(&header).unwrap()
}

/// The ops that read their input through a 16-bit table: a Conv (t0 -> t1), a
/// GlobalAveragePool (t1 -> t2) and a per-channel Mul of both (t1 * t2 -> t3), each input
/// through a SiLU-like table but the Mul's second.
fn wide_inputs_classifier() -> Vec<u8> {
    let mut b = ProgramBuilder::default();
    for (offset, len) in [(0, 32), (32, 32), (64, 2), (80, 32)] {
        b.tensor(offset, len);
    }
    let table: Vec<i16> = (0..=255u8)
        .map(|q| i16::from(q as i8).max(-8) * 200)
        .collect();
    let conv = Op::ConvWide {
        geometry: ConvGeometry {
            input: [2, 4, 4],
            output: [2, 4, 4],
            kernel: [3, 3],
            stride: [1, 1],
            pad: [1, 1],
            dilation: [1, 1],
            group: 2,
        },
        weights: b.i8_blob(&[3, -1, 2, 5, -7, 1, 0, 4, -2, 1, 1, -3, 6, 2, -5, 0, 3, 1]),
        channels: b.channels(&[100, -100], &[requant(1e-4); 2]),
        table: b.i16_blob(&table),
        output_quant: FULL,
    };
    b.push(step(conv, [0, 0], 1)).unwrap();
    let pool = Op::GlobalAveragePoolWide {
        pool: GlobalAveragePool {
            channels: 2,
            input_zero_point: 0,
            requant: requant(1.0 / 3200.0),
            output_quant: FULL,
        },
        table: b.i16_blob(&table),
    };
    b.push(step(pool, [1, 1], 2)).unwrap();
    let mul = Op::MulWide {
        mul: Mul {
            input_zero_points: [0, 1],
            requant: requant(1e-3),
            output_quant: FULL,
        },
        tables: [b.i16_blob(&table), b.i16_blob(&[])],
    };
    b.push(step(mul, [1, 2], 3)).unwrap();
    b.finish(&header("wide-inputs", 112, 3, 32)).unwrap()
}

/// The layers on 16-bit activations: a grouped Conv from the int8 input (t0 -> t1), a
/// SiLU-like function (t1 -> t2), the channel means (t2 -> t3), a per-channel Mul (t2 * t3 ->
/// t4), a residual Add (t4 + t1 -> t5) and a 1x1 Conv back to int8 (t5 -> t6).
fn sixteen_bit_classifier() -> Vec<u8> {
    use kestrel_ops::int16::{
        build_function16, Add16, GlobalAveragePool16, Mul16, WideOutput, Width,
    };
    let mut b = ProgramBuilder::default();
    for (offset, len) in [
        (0, 32),
        (32, 64),
        (96, 64),
        (160, 4),
        (176, 64),
        (240, 64),
        (304, 32),
    ] {
        b.tensor(offset, len);
    }
    let wide = WideOutput {
        width: Width::I16,
        zero_point: 0,
        min: -32767,
        max: 32767,
    };
    let geometry = |kernel: usize, group: usize| ConvGeometry {
        input: [2, 4, 4],
        output: [2, 4, 4],
        kernel: [kernel, kernel],
        stride: [1, 1],
        pad: [kernel / 2, kernel / 2],
        dilation: [1, 1],
        group,
    };
    let conv = Op::Conv16 {
        geometry: geometry(3, 2),
        weights: b.i8_blob(&[3, -1, 2, 5, -7, 1, 0, 4, -2, 1, 1, -3, 6, 2, -5, 0, 3, 1]),
        channels: b.channels(&[100, -100], &[requant(20.0); 2]),
        input_width: Width::I8,
        input_zero_point: 1,
        output: wide,
    };
    b.push(step(conv, [0, 0], 1)).unwrap();
    let scale = 8.0 / 32767.0;
    let table = build_function16(scale, scale, |x| x / (1.0 + (-x).exp()));
    let function = Op::Function16 {
        table: b.i16_blob(&table),
    };
    b.push(step(function, [1, 1], 2)).unwrap();
    let pool = Op::GlobalAveragePool16(GlobalAveragePool16 {
        channels: 2,
        requant: requant(1.0 / 16.0),
        output: wide,
    });
    b.push(step(pool, [2, 2], 3)).unwrap();
    let mul = Op::Mul16(Mul16 {
        requant: requant(1.0 / 4096.0),
        output: wide,
    });
    b.push(step(mul, [2, 3], 4)).unwrap();
    let add = Op::Add16(Add16 {
        requant: [requant(0.5), requant(0.5)],
        output: wide,
    });
    b.push(step(add, [4, 1], 5)).unwrap();
    let head = Op::Conv16 {
        geometry: geometry(1, 1),
        weights: b.i8_blob(&[7, -3, 2, 9]),
        channels: b.channels(&[0, 50], &[requant(1.0 / 512.0); 2]),
        input_width: Width::I16,
        input_zero_point: 0,
        output: WideOutput {
            width: Width::I8,
            zero_point: 1,
            min: -128,
            max: 127,
        },
    };
    b.push(step(head, [5, 5], 6)).unwrap();
    b.finish(&header("sixteen-bit", 336, 6, 32)).unwrap()
}

/// The plan seeds by file name: three valid plans that run, and cut-short and damaged ones.
fn plan_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let tiny = tiny_classifier();
    let every = every_op_detector();
    let mut flipped = every.clone();
    // A bit of the arena table flipped, the CRCs left alone: an upset as the loader finds it.
    let last = flipped.len() - 1;
    flipped[last] ^= 0x10;
    vec![
        ("tiny-classifier.plan", tiny.clone()),
        ("every-op-detector.plan", every.clone()),
        ("every-op-detector-upset.plan", flipped),
        ("wide-inputs-classifier.plan", wide_inputs_classifier()),
        ("sixteen-bit-classifier.plan", sixteen_bit_classifier()),
        ("tiny-preamble-only.plan", tiny[..16].to_vec()),
        ("tiny-cut-after-table.plan", tiny[..16 + 4 * 16].to_vec()),
        (
            "every-op-cut-in-half.plan",
            every[..every.len() / 2].to_vec(),
        ),
    ]
}

/// The plan seeds are valid where they should be, and the committed files are theirs: a change
/// of the plan format must regenerate them (`write_seed_corpus`).
#[test]
fn plan_seeds_are_current() {
    use kestrel_plan::program::{AlignedBytes, Program};
    for (name, bytes) in plan_seeds() {
        let aligned = AlignedBytes::new(&bytes);
        let program = Program::new(aligned.as_bytes());
        let expect_valid = name.ends_with("detector.plan") || name.ends_with("classifier.plan");
        assert_eq!(program.is_ok(), expect_valid, "{name}: {program:?}");
        if let Ok(program) = program {
            let mut arena = vec![0i8; program.arena_size()];
            let input = vec![0.5f32; program.input_len()];
            program.quantize_input(&input, &mut arena).unwrap();
            program
                .run(&mut arena, &mut kestrel_ops::Reference)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let committed = std::fs::read(fuzz_dir().join("corpus/plan_load").join(name));
        assert!(
            committed.as_ref().is_ok_and(|c| *c == bytes),
            "fuzz/corpus/plan_load/{name} differs from the generator: run \
             `cargo test -p kestrel-tests --test fuzz_corpus -- --ignored write_seed_corpus`"
        );
    }
}

/// Write the generated seeds: the plans, and PNG variants of a EuroSAT chip (RGB, grey, grey
/// with alpha, RGBA, 16-bit grey which the board refuses). The JPEG seeds are chips copied from
/// `sim/sample/eurosat-rgb` and `jpegtran` variants of one (see fuzz/README.md).
#[test]
#[ignore = "writes fuzz/corpus: run by hand after a format change"]
fn write_seed_corpus() {
    let corpus = fuzz_dir().join("corpus");
    let plans = corpus.join("plan_load");
    std::fs::create_dir_all(&plans).unwrap();
    for (name, bytes) in plan_seeds() {
        std::fs::write(plans.join(name), bytes).unwrap();
    }

    let chip = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../sim/sample/eurosat-rgb/Residential/Residential_202.jpg");
    let rgb = kestrel_host::decode_image(&chip).unwrap();
    let rgb = image::RgbImage::from_raw(64, 64, rgb.samples).unwrap();
    let crop = |size: u32| image::imageops::crop_imm(&rgb, 8, 8, size, size).to_image();
    let images = corpus.join("image_decode");
    std::fs::create_dir_all(&images).unwrap();
    let variants: [(&str, image::DynamicImage); 5] = [
        ("eurosat-rgb-32.png", crop(32).into()),
        (
            "eurosat-grey-16.png",
            image::DynamicImage::from(crop(16)).to_luma8().into(),
        ),
        (
            "eurosat-grey-alpha-8.png",
            image::DynamicImage::from(crop(8)).to_luma_alpha8().into(),
        ),
        (
            "eurosat-rgba-16.png",
            image::DynamicImage::from(crop(16)).to_rgba8().into(),
        ),
        (
            "eurosat-grey16-8.png",
            image::DynamicImage::from(crop(8)).to_luma16().into(),
        ),
    ];
    for (name, image) in variants {
        image.save(images.join(name)).unwrap();
    }
}
