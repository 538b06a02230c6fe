//! The CUDA executor against the generic CPU executor, byte for byte, on every zoo model (real
//! imagery) and on random plans of every op.
//!
//! Each test body runs on every executor there is: always on the CPU emulator of the CUDA
//! kernels (the `.cu` sources compiled as C++, the same launch list), and on a GPU when this
//! crate is built with `cuda-13000` or `cuda-12060` on a machine with a driver and a GPU
//! (`tests/gpu/check.sh`). Without one, the GPU half prints why it was skipped.

use std::path::{Path, PathBuf};

use kestrel_backend::Backend;
use kestrel_cuda::emulator::Emulator;
use kestrel_cuda::launch::{DeviceProgram, HeadShape};
use kestrel_cuda::{CudaBackend, CudaError, CudaOptions, DecodedTile, HeadCodes, PeakSearch};
use kestrel_host::decode_image;
use kestrel_ops::int8::{Add, OutputQuant};
use kestrel_ops::Reference;
use kestrel_plan::program::{AlignedBytes, Op, OwnedProgram, Program, ProgramBuilder};
use kestrel_runtime::detect::{decode, decode_peaks, Detections, Head, HeadLayout};
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::preprocess::{prepare_input, Region};
use kestrel_runtime::tile::TileGrid;
use kestrel_testing::conformance::random_cases;
use kestrel_tests::plans::{header, requant, step};
use kestrel_tests::{sorted_files, whole_image_input};
use models::ZooModel;

/// An executor under test.
enum Executor {
    Emulator(Box<Emulator>),
    Gpu(Box<CudaBackend>),
}

impl Executor {
    fn name(&self) -> &'static str {
        match self {
            Self::Emulator(_) => "emulator",
            Self::Gpu(_) => "gpu",
        }
    }

    fn run_arenas(&mut self, arenas: &mut [i8]) -> Result<(), CudaError> {
        match self {
            Self::Emulator(e) => e.run_arenas(arenas),
            Self::Gpu(g) => g.run_arenas(arenas),
        }
    }
}

/// The emulator, and the GPU when there is one (else a line saying why not).
fn executors(program: &Program<'_>, plan: &[u8], max_batch: u32) -> Vec<Executor> {
    let mut all = vec![Executor::Emulator(Box::new(
        Emulator::new(program).unwrap(),
    ))];
    if let Some(gpu) = gpu(plan, max_batch) {
        all.push(Executor::Gpu(Box::new(gpu)));
    }
    all
}

/// The GPU backend, or `None` after saying (once) why there is none. With
/// `KESTREL_REQUIRE_GPU=1` (the device check) a missing GPU fails the test instead.
fn gpu(plan: &[u8], max_batch: u32) -> Option<CudaBackend> {
    static SAID: std::sync::Once = std::sync::Once::new();
    let options = CudaOptions {
        max_batch,
        // Small chunks, so every batch of three or more runs on both streams.
        chunk: 2,
        ..CudaOptions::default()
    };
    match CudaBackend::new(plan, &options) {
        Ok(gpu) => Some(gpu),
        Err(CudaError::NotAvailable(why)) => {
            if std::env::var_os("KESTREL_REQUIRE_GPU").is_some_and(|v| v == "1") {
                panic!("KESTREL_REQUIRE_GPU=1 but {why}");
            }
            SAID.call_once(|| eprintln!("GPU half of the CUDA tests skipped: {why}"));
            None
        }
        Err(e) => panic!("the CUDA backend failed to start: {e}"),
    }
}

fn sample(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../sim/sample")
        .join(dir)
}

/// Arenas for `inputs`, each input quantised into its arena by the CPU executor's code.
fn arenas_for(program: &Program<'_>, inputs: &[Vec<f32>]) -> Vec<i8> {
    let mut arenas = vec![0i8; program.arena_size() * inputs.len()];
    for (arena, input) in arenas.chunks_exact_mut(program.arena_size()).zip(inputs) {
        program.quantize_input(input, arena).unwrap();
    }
    arenas
}

/// Every byte of every arena, intermediate tensors included, as the generic executor leaves it.
fn check_model(name: &str, inputs: &[Vec<f32>]) {
    let model = ZooModel::load(name).unwrap();
    let plan = model.plan_bytes().unwrap().expect("zoo models have plans");
    let owned = OwnedProgram::new(plan).unwrap();
    let program = owned.program();
    let start = arenas_for(program, inputs);
    let mut expected = start.clone();
    for arena in expected.chunks_exact_mut(program.arena_size()) {
        program.run(arena, &mut Reference).unwrap();
    }
    for mut executor in executors(program, plan, inputs.len() as u32) {
        let mut arenas = start.clone();
        executor.run_arenas(&mut arenas).unwrap();
        let size = program.arena_size();
        for (item, (got, want)) in arenas
            .chunks_exact(size)
            .zip(expected.chunks_exact(size))
            .enumerate()
        {
            let differing = got.iter().zip(want).filter(|(a, b)| a != b).count();
            assert_eq!(
                differing,
                0,
                "{name} on the {}, batch item {item}: {differing} of {size} arena bytes differ",
                executor.name()
            );
        }
    }
}

/// The first `n` committed EuroSAT chips, one per class, preprocessed by the runtime.
fn eurosat_inputs(n: usize) -> Vec<Vec<f32>> {
    let spec = ZooModel::load("eurosat-rgb")
        .unwrap()
        .preprocess_spec()
        .unwrap();
    sorted_files(&sample("eurosat-rgb"))
        .iter()
        .take(n)
        .map(|class| whole_image_input(&sorted_files(class)[0], &spec))
        .collect()
}

/// The land-cover classifier on 8 real chips, as one batch.
#[test]
fn eurosat_classifier_is_bit_exact() {
    check_model("eurosat-rgb", &eurosat_inputs(8));
}

/// The detector on one real 512x512 tile of a committed NWPU VHR-10 scene.
#[test]
fn nwpu_detector_is_bit_exact() {
    let model = ZooModel::load("nwpu-vhr10").unwrap();
    let spec = model.preprocess_spec().unwrap();
    let scene = &sorted_files(&sample("nwpu-vhr10/images"))[0];
    let image = decode_image(scene).unwrap();
    let view = FrameView::new(image.geometry, &image.samples).unwrap();
    let region = Region {
        x: 0,
        y: 0,
        width: spec.width() as u32,
        height: spec.height() as u32,
    };
    let mut input = vec![0.0; spec.input_len()];
    prepare_input(view, region, &spec, &mut input).unwrap();
    check_model("nwpu-vhr10", &[input]);
}

/// Every op over 550 random shapes, quantisations and arenas, three arenas to a batch.
#[test]
fn random_plans_are_bit_exact() {
    for case in random_cases(0x6a11_2026_1127, 550).unwrap() {
        let program = case.program().unwrap();
        let expected = case.expected().unwrap();
        let mut executors = executors(&program, case.plan.as_bytes(), 3);
        for executor in &mut executors {
            let mut arenas = [&case.arena[..]; 3].concat();
            executor.run_arenas(&mut arenas).unwrap();
            for got in arenas.chunks_exact(case.arena.len()) {
                assert_eq!(
                    got,
                    &expected[..],
                    "{} on the {}",
                    case.name,
                    executor.name()
                );
            }
        }
    }
}

/// A plan whose output range is inverted (`min > max`, as corruption or an upset leaves it:
/// the fuzzer once found the CPU kernels panicking on one) runs to the same bytes on the CPU
/// and the CUDA kernels: both take the lower bound, then the upper.
#[test]
fn an_inverted_output_range_clamps_alike() {
    let mut b = ProgramBuilder::default();
    b.tensor(0, 32);
    b.tensor(32, 32);
    let add = Op::Add(Add {
        input_zero_points: [-3, -3],
        requant: [requant(0.5); 2],
        output_quant: OutputQuant {
            zero_point: 1,
            min: 60,
            max: -60,
        },
    });
    b.push(step(add, [0, 0], 1)).unwrap();
    let plan = AlignedBytes::new(&b.finish(&header("inverted", 64, 1, 32)).unwrap());
    let program = Program::new(plan.as_bytes()).unwrap();
    let input: Vec<f32> = (0..program.input_len())
        .map(|i| (i % 5) as f32 - 2.0)
        .collect();
    let start = arenas_for(&program, std::slice::from_ref(&input));
    let mut expected = start.clone();
    program.run(&mut expected, &mut Reference).unwrap();
    assert!(
        expected[32..].iter().all(|&c| c == -60),
        "the upper bound wins"
    );
    for mut executor in executors(&program, plan.as_bytes(), 1) {
        let mut arena = start.clone();
        executor.run_arenas(&mut arena).unwrap();
        assert_eq!(arena, expected, "on the {}", executor.name());
    }
}

/// The preprocessing kernel cuts, normalises and quantises tiles of a real scene, the last ones
/// reaching past its edges, into the codes the runtime's preprocessing and the CPU executor's
/// quantisation give.
#[test]
fn preprocessing_kernel_matches_the_runtime() {
    let model = ZooModel::load("nwpu-vhr10").unwrap();
    let spec = model.preprocess_spec().unwrap();
    let plan = model.plan_bytes().unwrap().unwrap();
    let owned = OwnedProgram::new(plan).unwrap();
    let program = owned.program();
    let scene = &sorted_files(&sample("nwpu-vhr10/images"))[0];
    let image = decode_image(scene).unwrap();
    let g = image.geometry;
    let view = FrameView::new(g, &image.samples).unwrap();
    let (tile_w, tile_h) = (spec.width() as u32, spec.height() as u32);
    let grid = TileGrid::new(g.width, g.height, tile_w, tile_h, 128).unwrap();
    // The grid's tiles, and one hanging over the bottom-right corner (padded with the mean).
    let mut origins: Vec<(u32, u32)> = grid.iter().map(|r| (r.x, r.y)).collect();
    origins.push((g.width - 100, g.height - 60));

    let size = program.arena_size();
    let input = DeviceProgram::new(program).unwrap().input;
    let mut expected = vec![0i8; size * origins.len()];
    for (arena, &(x, y)) in expected.chunks_exact_mut(size).zip(&origins) {
        let region = Region {
            x,
            y,
            width: tile_w,
            height: tile_h,
        };
        let mut floats = vec![0.0; spec.input_len()];
        prepare_input(view, region, &spec, &mut floats).unwrap();
        program.quantize_input(&floats, arena).unwrap();
    }

    let emulator = Emulator::new(program).unwrap();
    let h = program.header();
    let launch = emulator
        .device_program()
        .preprocess(&spec, h.input_scale, h.input_zero_point, g.width, g.height)
        .unwrap();
    let mut arenas = vec![0i8; size * origins.len()];
    emulator
        .preprocess(&launch, &image.samples, &origins, &mut arenas)
        .unwrap();
    for (i, (got, want)) in arenas
        .chunks_exact(size)
        .zip(expected.chunks_exact(size))
        .enumerate()
    {
        assert_eq!(
            &got[input.clone()],
            &want[input.clone()],
            "emulator, tile {i} at {:?}",
            origins[i]
        );
    }

    // On a GPU: the whole path from frame to output codes, against the CPU executor.
    if let Some(mut gpu) = gpu(plan, origins.len() as u32) {
        let out = program.output_len();
        let mut codes = vec![0i8; out * origins.len()];
        gpu.run_tiles(&image.samples, g.width, g.height, &origins, &mut codes)
            .unwrap();
        let range = program.tensor(h.output_tensor).unwrap();
        for (i, (arena, got)) in expected
            .chunks_exact_mut(size)
            .zip(codes.chunks_exact(out))
            .enumerate()
        {
            program.run(arena, &mut Reference).unwrap();
            assert_eq!(got, &arena[range.clone()], "gpu, tile {i}");
        }
        // And decoded on the GPU: the boxes the runtime decodes from the CPU's heads.
        let Head::CenterNet(layout) = model.detector_config().unwrap().head else {
            panic!("nwpu-vhr10 is a CenterNet");
        };
        let codes = HeadCodes::new(program).unwrap();
        for threshold in [0.05, 0.3] {
            let tiles = gpu
                .detect_tiles(
                    &image.samples,
                    g.width,
                    g.height,
                    &origins,
                    search(&layout, threshold, 512),
                )
                .unwrap();
            for (i, (arena, tile)) in expected.chunks_exact(size).zip(&tiles).enumerate() {
                assert_eq!(
                    boxes_from_tile(tile, program, &codes, &layout, threshold),
                    boxes_from_head(&arena[range.clone()], program, &layout, threshold),
                    "gpu decoding, tile {i}, threshold {threshold}"
                );
            }
        }
    }
}

type Boxes = Detections<4096>;

fn search(layout: &HeadLayout, threshold: f32, capacity: u32) -> PeakSearch {
    PeakSearch {
        shape: HeadShape {
            classes: layout.classes,
            height: layout.height,
            width: layout.width,
        },
        threshold,
        capacity,
    }
}

/// The runtime's decoding of head codes, dequantised by the CPU executor.
fn boxes_from_head(
    codes: &[i8],
    program: &Program<'_>,
    layout: &HeadLayout,
    threshold: f32,
) -> Boxes {
    let mut head = vec![0.0; codes.len()];
    program.dequantize_codes(codes, &mut head).unwrap();
    let mut boxes = Boxes::new();
    decode(&head, layout, threshold, &mut boxes).unwrap();
    boxes
}

/// The boxes of a tile decoded on the GPU (or the emulator); its head when the list was full.
fn boxes_from_tile(
    tile: &DecodedTile,
    program: &Program<'_>,
    codes: &HeadCodes,
    layout: &HeadLayout,
    threshold: f32,
) -> Boxes {
    match tile {
        DecodedTile::Peaks(peaks) => {
            let mut boxes = Boxes::new();
            decode_peaks(
                peaks.iter().map(|p| p.values(&codes.values)),
                layout,
                &mut boxes,
            )
            .unwrap();
            boxes
        }
        DecodedTile::Codes(head) => boxes_from_head(head, program, layout, threshold),
    }
}

/// The decoding kernel finds exactly the peaks `runtime::detect::decode` finds: on the heads
/// of real scene tiles, and on random heads of a few codes around the threshold, full of
/// plateaus and ties (three to a batch). A list too small for a tile's peaks hands back the
/// head, which decodes the same.
#[test]
fn decoding_kernel_matches_the_runtime() {
    let model = ZooModel::load("nwpu-vhr10").unwrap();
    let Head::CenterNet(layout) = model.detector_config().unwrap().head else {
        panic!("nwpu-vhr10 is a CenterNet");
    };
    let plan = model.plan_bytes().unwrap().unwrap();
    let owned = OwnedProgram::new(plan).unwrap();
    let program = owned.program();
    let emulator = Emulator::new(program).unwrap();
    let codes = HeadCodes::new(program).unwrap();
    let size = program.arena_size();
    let head = DeviceProgram::new(program).unwrap().output;

    // Real heads: two tiles of a committed scene, run by the CPU executor (its fastest
    // kernels, which the plan tests hold bit-identical to the generic ones).
    let mut cpu = model.int8_backend().unwrap().unwrap();
    let spec = model.preprocess_spec().unwrap();
    let scene = &sorted_files(&sample("nwpu-vhr10/images"))[1];
    let image = decode_image(scene).unwrap();
    let view = FrameView::new(image.geometry, &image.samples).unwrap();
    let mut arenas = vec![0i8; 2 * size];
    for (arena, x) in arenas
        .chunks_exact_mut(size)
        .zip([0, image.geometry.width - 300])
    {
        let region = Region {
            x,
            y: 0,
            width: spec.width() as u32,
            height: spec.height() as u32,
        };
        let mut input = vec![0.0; spec.input_len()];
        prepare_input(view, region, &spec, &mut input).unwrap();
        let mut output = vec![0.0; program.output_len()];
        cpu.infer(&input, &mut output).unwrap();
        arena.copy_from_slice(cpu.arena());
    }
    // Random heads, three arenas: codes within two of the threshold's code in the top 12 rows
    // of every plane (some thousands of peaks per head), the lowest code below.
    let threshold = 0.3;
    let at = codes.threshold_code(threshold);
    let mut random = vec![0i8; 3 * size];
    for (i, arena) in random.chunks_exact_mut(size).enumerate() {
        for (j, code) in arena[head.clone()].iter_mut().enumerate() {
            let mixed = ((i * head.len() + j) as u64 ^ 0x5eed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let row = j % (layout.height * layout.width) / layout.width;
            *code = if row < 12 {
                (at - 2 + (mixed >> 61) as i32 % 5).clamp(-128, 127) as i8
            } else {
                -128
            };
        }
    }

    let mut peaks_seen = 0;
    for (arenas, thresholds) in [(&arenas, [0.05, threshold]), (&random, [threshold, 0.0])] {
        for threshold in thresholds {
            for capacity in [1 << 16, 3, 0] {
                let tiles = emulator
                    .decode(arenas, search(&layout, threshold, capacity))
                    .unwrap();
                for (i, (arena, tile)) in arenas.chunks_exact(size).zip(&tiles).enumerate() {
                    let want = boxes_from_head(&arena[head.clone()], program, &layout, threshold);
                    let got = boxes_from_tile(tile, program, &codes, &layout, threshold);
                    assert_eq!(
                        got, want,
                        "tile {i}, threshold {threshold}, list of {capacity}"
                    );
                    match tile {
                        DecodedTile::Peaks(p) => peaks_seen += p.len(),
                        DecodedTile::Codes(_) => {
                            assert!(want.as_slice().len() > capacity as usize)
                        }
                    }
                }
            }
        }
    }
    // The comparisons above must have had peaks to compare.
    assert!(peaks_seen > 100, "only {peaks_seen} peaks");
}

/// Through the `Backend` trait (float in, float out) the GPU gives the CPU executor's floats.
#[test]
fn float_path_matches_the_cpu_executor() {
    let inputs = eurosat_inputs(4);
    let model = ZooModel::load("eurosat-rgb").unwrap();
    let plan = model.plan_bytes().unwrap().unwrap();
    let Some(mut gpu) = gpu(plan, 1) else {
        return;
    };
    let mut cpu = model.int8_backend().unwrap().unwrap();
    for input in &inputs {
        let (mut a, mut b) = (vec![0.0; 10], vec![0.0; 10]);
        cpu.run(input, &mut a).unwrap();
        gpu.run(input, &mut b).unwrap();
        assert_eq!(a, b);
    }
    let info = gpu.info();
    eprintln!(
        "ran on {} (sm_{}{}, driver {}, NVRTC {}.{}), kernels {}",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.driver_version,
        info.nvrtc_version.0,
        info.nvrtc_version.1,
        if info.cache_hit {
            "from the cache"
        } else {
            "compiled by NVRTC"
        }
    );
}

/// Without CUDA (no feature, no driver, no GPU) the backend is a typed `NotAvailable` with a
/// reason, never a panic; with a GPU it starts.
#[test]
fn missing_cuda_is_a_typed_error() {
    let model = ZooModel::load("eurosat-rgb").unwrap();
    let plan = model.plan_bytes().unwrap().unwrap();
    match CudaBackend::new(plan, &CudaOptions::default()) {
        Ok(gpu) => assert_eq!(gpu.name(), "cuda"),
        Err(CudaError::NotAvailable(why)) => assert!(!why.is_empty()),
        Err(e) => panic!("expected NotAvailable or a session, got: {e}"),
    }
    // A corrupt plan is refused before any device is touched.
    let error = CudaBackend::new(&plan[..plan.len() / 2], &CudaOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(error, CudaError::Plan(_) | CudaError::NotAvailable(_)),
        "{error}"
    );
}

/// A failed driver call says what it means for the device, and the backend contract carries
/// that to failover: out of memory, a failed launch and a lost device apart from the rest.
#[test]
fn driver_failures_are_typed_for_failover() {
    use kestrel_backend::BackendError;
    use kestrel_cuda::DeviceFault;
    for (fault, expected) in [
        (DeviceFault::OutOfMemory, BackendError::OutOfMemory),
        (DeviceFault::LaunchFailed, BackendError::LaunchFailed),
        (DeviceFault::DeviceLost, BackendError::DeviceLost),
        (DeviceFault::Other, BackendError::Execution),
    ] {
        let error = CudaError::Driver {
            fault,
            detail: "from the driver".into(),
        };
        assert_eq!(error.backend_error(), expected, "{error}");
        assert!(expected.is_device_fault());
    }
    assert_eq!(
        CudaError::NotAvailable("no driver".into()).backend_error(),
        BackendError::NotAvailable
    );
    #[cfg(any(feature = "cuda-13000", feature = "cuda-12060"))]
    {
        use kestrel_cuda::{fault_of, CUresult as R};
        assert_eq!(
            fault_of(R::CUDA_ERROR_OUT_OF_MEMORY),
            DeviceFault::OutOfMemory
        );
        assert_eq!(
            fault_of(R::CUDA_ERROR_LAUNCH_FAILED),
            DeviceFault::LaunchFailed
        );
        assert_eq!(
            fault_of(R::CUDA_ERROR_LAUNCH_TIMEOUT),
            DeviceFault::LaunchFailed
        );
        for lost in [
            R::CUDA_ERROR_ILLEGAL_ADDRESS,
            R::CUDA_ERROR_ECC_UNCORRECTABLE,
            R::CUDA_ERROR_NO_DEVICE,
            R::CUDA_ERROR_HARDWARE_STACK_ERROR,
        ] {
            assert_eq!(fault_of(lost), DeviceFault::DeviceLost, "{lost:?}");
        }
        assert_eq!(fault_of(R::CUDA_ERROR_INVALID_VALUE), DeviceFault::Other);
    }
}

/// The `.cu` sources compile to PTX through NVRTC for Jetson Orin (sm_87) and H100 (sm_90), with
/// every kernel's entry point, wherever NVRTC can be loaded (no GPU needed).
#[cfg(any(feature = "cuda-13000", feature = "cuda-12060"))]
#[test]
fn kernels_compile_to_ptx_with_nvrtc() {
    use kestrel_cuda::launch::Kernel;
    for arch in ["sm_87", "sm_90"] {
        match kestrel_cuda::compile_ptx(arch) {
            Ok(ptx) => {
                assert!(ptx.contains(&format!(".target {arch}")), "{arch}");
                for kernel in Kernel::ALL {
                    assert!(
                        ptx.contains(&format!(".entry {}(", kernel.name())),
                        "{arch}: {} missing",
                        kernel.name()
                    );
                }
                // The dense convolution's inner product is the DP4A instruction.
                assert!(ptx.contains("dp4a.s32.s32"), "{arch}: no dp4a");
                eprintln!("{arch}: {} bytes of PTX", ptx.len());
            }
            Err(CudaError::NotAvailable(why)) => {
                eprintln!("NVRTC compile check skipped: {why}");
                return;
            }
            Err(e) => panic!("{arch}: {e}"),
        }
    }
}
