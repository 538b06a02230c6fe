//! Where a plan's time goes on this CPU, layer by layer: each step's median time with the
//! fastest kernels this CPU has (`Int8Cpu`'s table), the convolutions' multiply-add rate against
//! the CPU's own peak for the instruction the kernel uses, and the depthwise layers' bytes per
//! second against the memory's copy bandwidth.
//!
//!     cargo run --release -p models --example layer_speed -- PLAN [--runs N] [--steps]
//!
//! The peak is measured, not taken from a data sheet: a loop of independent `vpmaddwd` (the
//! AVX2 kernel's multiply-add: 16 int16 multiply-adds per instruction) or, where the kernel is
//! `avx512-vnni`/`avx-vnni`, of `vpdpbusd` (32 8-bit multiply-adds on 256-bit vectors, 64 on
//! 512-bit ones where the CPU has AVX-512; the faster width counts), 12 chains (enough to
//! cover a 5-cycle latency at two a cycle; 8 chains had measured 1.6 a cycle), on registers
//! only, so it is what one core issues at the clock it runs at now. The copy
//! bandwidth is a 64 MiB `copy_from_slice` (bytes read plus written per second). Multiply-adds
//! are a direct convolution's (`out * in / group * kh * kw` per pixel), so the Winograd layers'
//! figure is an equivalent rate. The input is a constant: time does not depend on the values.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kestrel_ops::table::KernelTable;
use kestrel_plan::program::{Op, OwnedProgram};

/// What a step is, for the totals: its kind and, for convolutions and Gemm, its multiply-adds;
/// for depthwise layers, the bytes they read and write.
struct Step {
    kind: &'static str,
    what: String,
    macs: u64,
    bytes: u64,
}

fn describe(op: &Op) -> Step {
    let step = |kind, what, macs, bytes| Step {
        kind,
        what,
        macs,
        bytes,
    };
    match op {
        Op::Conv { geometry: g, .. }
        | Op::ConvWide { geometry: g, .. }
        | Op::Conv16 { geometry: g, .. } => {
            let [c, h, w] = g.input;
            let [oc, oh, ow] = g.output;
            let [kh, kw] = g.kernel;
            let group = g.group.max(1);
            let macs = (oc * oh * ow * (c / group) * kh * kw) as u64;
            let kind = if matches!(op, Op::ConvWide { .. }) {
                "16-bit input (generic)"
            } else if matches!(op, Op::Conv16 { .. }) {
                "16-bit activations"
            } else if group > 1 && group == c {
                "depthwise"
            } else if g.kernel == [1, 1] {
                "pointwise"
            } else {
                "dense"
            };
            let what = format!(
                "{c}x{h}x{w} -> {oc}x{oh}x{ow}, {kh}x{kw} stride {} group {group}",
                g.stride[0]
            );
            step(kind, what, macs, (c * h * w + oc * oh * ow) as u64)
        }
        Op::Gemm { .. } => step("gemm", String::new(), 0, 0),
        Op::Add(_) => step("add", String::new(), 0, 0),
        Op::Mul(_) | Op::MulWide { .. } => step("mul", String::new(), 0, 0),
        Op::GlobalAveragePool(_) | Op::GlobalAveragePoolWide { .. } | Op::AveragePool(_) => {
            step("average pool", String::new(), 0, 0)
        }
        Op::MaxPool(_) => step("max pool", String::new(), 0, 0),
        Op::Resize(_) => step("resize", String::new(), 0, 0),
        Op::Lut { .. } => step("table", String::new(), 0, 0),
        Op::Rescale { .. } => step("rescale (concat)", String::new(), 0, 0),
        Op::Gather { .. } => step("gather", String::new(), 0, 0),
        Op::Attention { .. } => step("attention", String::new(), 0, 0),
        Op::Add16(_) => step("16-bit element-wise", "Add".into(), 0, 0),
        Op::Mul16(_) => step("16-bit element-wise", "Mul".into(), 0, 0),
        Op::GlobalAveragePool16(_) => step("16-bit element-wise", "GlobalAveragePool".into(), 0, 0),
        Op::Function16 { .. } => step("16-bit element-wise", "function table".into(), 0, 0),
    }
}

/// Multiply-adds per second one core issues with the instruction `kernel` is built on; `None`
/// where this example has no loop for it.
fn peak_macs_per_s(kernel: &str) -> Option<(f64, &'static str)> {
    #[cfg(target_arch = "x86_64")]
    {
        peak::measure(kernel)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = kernel;
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;
    use std::hint::black_box;
    use std::time::Instant;

    const ROUNDS: usize = 20_000_000;

    /// Independent chains: enough to cover a 5-cycle latency at two instructions a cycle.
    const CHAINS: usize = 12;

    #[target_feature(enable = "avx2")]
    fn madd_loop(a: __m256i, b: __m256i) -> [__m256i; CHAINS] {
        let mut acc = [a; CHAINS];
        for _ in 0..ROUNDS / CHAINS {
            for acc in &mut acc {
                *acc = _mm256_madd_epi16(*acc, b);
            }
        }
        acc
    }

    #[target_feature(enable = "avx512vnni,avx512vl")]
    fn dpbusd_loop(a: __m256i, b: __m256i) -> [__m256i; CHAINS] {
        let mut acc = [a; CHAINS];
        for _ in 0..ROUNDS / CHAINS {
            for acc in &mut acc {
                *acc = _mm256_dpbusd_epi32(*acc, a, b);
            }
        }
        acc
    }

    #[target_feature(enable = "avx512f,avx512vnni")]
    fn dpbusd512_loop(a: __m256i, b: __m256i) -> [__m512i; CHAINS] {
        let (a, b) = (_mm512_broadcast_i64x4(a), _mm512_broadcast_i64x4(b));
        let mut acc = [a; CHAINS];
        for _ in 0..ROUNDS / CHAINS {
            for acc in &mut acc {
                *acc = _mm512_dpbusd_epi32(*acc, a, b);
            }
        }
        acc
    }

    pub(super) fn measure(kernel: &str) -> Option<(f64, &'static str)> {
        let a = black_box(unsafe { _mm256_set1_epi16(3) });
        let b = black_box(unsafe { _mm256_set1_epi16(5) });
        let vnni = kernel.contains("vnni")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl");
        let (macs_per_instruction, name) = if vnni {
            (32.0, "vpdpbusd ymm")
        } else if is_x86_feature_detected!("avx2") {
            (16.0, "vpmaddwd ymm")
        } else {
            return None;
        };
        let fastest = |run: &dyn Fn()| {
            let mut best = f64::MAX;
            for _ in 0..3 {
                let start = Instant::now();
                run();
                best = best.min(start.elapsed().as_secs_f64());
            }
            best
        };
        // SAFETY (each loop): its features were detected.
        let best = fastest(&|| unsafe {
            if vnni {
                black_box(dpbusd_loop(a, b));
            } else {
                black_box(madd_loop(a, b));
            }
        });
        let rate = ROUNDS as f64 * macs_per_instruction / best;
        if vnni && is_x86_feature_detected!("avx512f") {
            let wide = fastest(&|| unsafe {
                black_box(dpbusd512_loop(a, b));
            });
            let wide_rate = ROUNDS as f64 * 2.0 * macs_per_instruction / wide;
            if wide_rate > rate {
                return Some((wide_rate, "vpdpbusd zmm"));
            }
        }
        Some((rate, name))
    }
}

/// Bytes read plus written per second copying 64 MiB.
fn copy_bytes_per_s() -> f64 {
    let source = vec![1u8; 64 << 20];
    let mut target = vec![0u8; 64 << 20];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        target.copy_from_slice(std::hint::black_box(&source));
        std::hint::black_box(&target);
        best = best.min(start.elapsed().as_secs_f64());
    }
    2.0 * source.len() as f64 / best
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut plan, mut runs, mut each_step) = (None, 50usize, false);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .context("--runs takes a count above 0")?
            }
            "--steps" => each_step = true,
            "-h" | "--help" => {
                println!("usage: layer_speed PLAN [--runs N (50)] [--steps: every step's line]");
                return Ok(());
            }
            _ if plan.is_none() => plan = Some(arg),
            _ => bail!("unexpected argument {arg:?} (see --help)"),
        }
    }
    let plan = plan.context("usage: layer_speed PLAN [--runs N] [--steps]")?;
    let bytes = std::fs::read(&plan).with_context(|| format!("cannot read {plan}"))?;
    let owned = OwnedProgram::new(&bytes).context("not a loadable plan")?;
    let program = owned.program();
    // The table `Int8Cpu` runs with: the fastest kernels this CPU has.
    let mut kernels = KernelTable::for_this_cpu(&program.convs(), &program.convs16());
    let kernel = kernels.conv.name;
    let steps: Vec<Step> = program
        .steps()
        .map(|s| s.map(|s| describe(&s.op)))
        .collect::<Result<_, _>>()?;
    let mut arena = vec![0i8; program.arena_size()];
    program.quantize_input(&vec![0.25f32; program.input_len()], &mut arena)?;

    // Per-step times come from the executor's observer: the time between one step's end and
    // the next's is that step's. One run first, to warm the caches.
    let mut times = vec![Vec::with_capacity(runs); steps.len()];
    program.run(&mut arena, &mut kernels)?;
    for _ in 0..runs {
        let mut last = Instant::now();
        program.run_observed(&mut arena, &mut kernels, |index, _| {
            let now = Instant::now();
            if let Some(t) = times.get_mut(index) {
                t.push((now - last).as_secs_f64());
            }
            last = now;
        })?;
    }
    let medians: Vec<f64> = times
        .iter_mut()
        .map(|t| {
            t.sort_by(f64::total_cmp);
            t.get(t.len() / 2).copied().unwrap_or(0.0)
        })
        .collect();
    let total: f64 = medians.iter().sum();
    // The whole run, unobserved: each layer's weights are then streamed once per run, as in
    // use, instead of staying hot across repeats of one step, so small models take longer
    // whole than their steps' medians add up to.
    let mut whole = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        program.run(&mut arena, &mut kernels)?;
        whole.push(started.elapsed().as_secs_f64());
    }
    whole.sort_by(f64::total_cmp);
    let whole = whole[whole.len() / 2];

    println!(
        "{plan}: {} steps, convolutions on `{kernel}`, {runs} runs, medians",
        steps.len()
    );
    if each_step {
        for (i, (step, t)) in steps.iter().zip(&medians).enumerate() {
            let rate = if step.macs > 0 {
                format!("{:6.1} GMAC/s", step.macs as f64 / t / 1e9)
            } else {
                String::new()
            };
            println!(
                "{i:4} {:9.1} us  {:16} {rate:14} {}",
                t * 1e6,
                step.kind,
                step.what
            );
        }
    }
    let mut kinds: BTreeMap<&str, (f64, u64, u64, usize)> = BTreeMap::new();
    for (step, t) in steps.iter().zip(&medians) {
        let k = kinds.entry(step.kind).or_default();
        *k = (k.0 + t, k.1 + step.macs, k.2 + step.bytes, k.3 + 1);
    }
    let peak = peak_macs_per_s(kernel);
    let copy = copy_bytes_per_s();
    match peak {
        Some((peak, name)) => println!(
            "peak: {:.1} GMAC/s ({name}, measured); copy bandwidth {:.1} GB/s",
            peak / 1e9,
            copy / 1e9
        ),
        None => println!(
            "peak: not measured on this CPU; copy bandwidth {:.1} GB/s",
            copy / 1e9
        ),
    }
    println!(
        "{:>18} {:>6} {:>10} {:>6} {:>22}",
        "kind", "steps", "time us", "share", "rate"
    );
    for (kind, (t, macs, bytes, count)) in &kinds {
        let rate = match (*kind, peak) {
            ("depthwise", _) => format!(
                "{:.1} GB/s, {:.0}% of copy",
                *bytes as f64 / t / 1e9,
                100.0 * *bytes as f64 / t / copy
            ),
            (_, Some((peak, _))) if *macs > 0 => format!(
                "{:.1} GMAC/s, {:.0}% of peak",
                *macs as f64 / t / 1e9,
                100.0 * *macs as f64 / t / peak
            ),
            _ => String::new(),
        };
        println!(
            "{kind:>18} {count:6} {:10.1} {:5.1}% {rate:>22}",
            t * 1e6,
            100.0 * t / total
        );
    }
    println!("{:>18} {:6} {:10.1}", "total", steps.len(), total * 1e6);
    println!("{:>18} {:6} {:10.1}", "whole run", "", whole * 1e6);
    Ok(())
}
