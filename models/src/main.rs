//! `cargo run -p models -- compile <model.onnx> --calib <dir> --out <model.plan>`: the plan
//! compiler's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kestrel_eval::Split;
use models::calibrate::Method;
use models::compile::{compile, Options, INT16_ABOVE, MIN_ERROR_REDUCTION, WIDEN_ABOVE};
use models::ZooModel;

#[derive(Parser)]
#[command(about = "Kestrel's model tools: compile an ONNX model into an int8 plan")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum CalibrationMethod {
    /// Calibrate by percentile, minmax and mse, verify the three plans against tract and keep,
    /// of those that agree with tract on at most one image (or box) fewer than percentile's,
    /// the closest
    Auto,
    /// Observed minimum and maximum.
    Minmax,
    /// Clip 0.01% of values at each end.
    Percentile,
    /// Minimise the KL divergence of the int8 histogram (TensorRT's entropy calibration).
    Entropy,
    /// Minimise the squared error of each tensor's int8 values (rounding inside the range,
    /// clipping outside).
    Mse,
}

#[derive(Clone, Copy, ValueEnum)]
enum SplitArg {
    All,
    Train,
    Val,
}

#[derive(Subcommand)]
enum Command {
    /// Calibrate, quantise and plan a model, verify the plan against tract, write it.
    Compile {
        /// The ONNX model (with its manifest.json beside it), a zoo folder, or a built-in name.
        model: String,
        /// Folder of calibration images (PNG or JPEG), directly or in class folders; class
        /// folders named as the model's labels also give accuracy numbers.
        #[arg(long)]
        calib: PathBuf,
        /// Where to write the plan.
        #[arg(long)]
        out: PathBuf,
        /// Write the compile report (JSON) here as well, with every layer's error against the
        /// float graph (relative RMS at its output, and how much of it the layer adds).
        #[arg(long)]
        report: Option<PathBuf>,
        /// How activation ranges are chosen.
        #[arg(long, value_enum, default_value = "auto")]
        method: CalibrationMethod,
        /// Calibrate on at most this many images, spread evenly over the folder.
        #[arg(long, default_value_t = 200)]
        max_images: usize,
        /// Which part of the calibration folder to use (the file-name hash split of the
        /// training scripts): calibrate on `train` so validation stays unseen.
        #[arg(long, value_enum, default_value = "all")]
        split: SplitArg,
        /// Try keeping the function tables (Sigmoid, SiLU, HardSwish...) whose int8 output adds
        /// at least this relative RMS error at 16 bits, where every reader is a Conv,
        /// GlobalAveragePool or Mul (they read the function's input through a 16-bit table;
        /// the CPU runs those layers on its generic kernels). The wider plan is written only
        /// if it agrees with tract on at most one calibration image (or box) fewer and its
        /// output's relative RMS error is lower by `--min-error-reduction`. `0`: try every
        /// table; `off`: every activation int8.
        #[arg(long, default_value_t = WidenAbove(Some(WIDEN_ABOVE)))]
        widen_above: WidenAbove,
        /// Where the int8 plan's output is at least this relative RMS error away from tract's
        /// on the calibration images, try a plan with 16-bit activations (weights stay int8)
        /// wherever every layer around a tensor has a 16-bit kernel (Conv, Gemm, Add, Mul,
        /// GlobalAveragePool, Sigmoid/SiLU/HardSwish...): written only if it agrees with tract
        /// on at most one image (or box) fewer and its output's relative RMS error is lower by
        /// `--min-error-reduction`. 16-bit layers are slower than int8 ones
        /// (twice the bytes, half the products per instruction: EfficientNet-B0 at 64x64 about
        /// 1.7x its int8 plan's time on an AVX-512 VNNI CPU). `off`: never.
        #[arg(long, default_value_t = WidenAbove(Some(INT16_ABOVE)))]
        int16_above: WidenAbove,
        /// How much lower (relative) the output's error against tract's must be in a wider
        /// plan (`--widen-above`, `--int16-above`) than in the int8 plan for the compiler to
        /// write the wider one, which is slower: 0.05 asks for 5% less error; 0 writes any
        /// closer plan.
        #[arg(long, default_value_t = MIN_ERROR_REDUCTION, value_parser = reduction)]
        min_error_reduction: f64,
        /// Keep the model's own biases. By default the compiler also verifies two plans whose
        /// Conv and Gemm biases are moved against the mean error that int8 weights and inputs
        /// add to each channel (the inputs' means estimated from the float values, or measured
        /// on the plan layer by layer: a plan build and run per layer), and writes the closer
        /// where it agrees with tract on at most one image (or box) fewer and its output is
        /// closer.
        #[arg(long)]
        no_bias_correction: bool,
    },
}

/// `--widen-above`: a threshold or `off`.
#[derive(Clone, Copy, Debug)]
struct WidenAbove(Option<f64>);

impl std::str::FromStr for WidenAbove {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Self(None));
        }
        match s.parse::<f64>() {
            Ok(v) if v >= 0.0 => Ok(Self(Some(v))),
            _ => Err(format!(
                "{s:?} is neither `off` nor a relative RMS error of 0 or more"
            )),
        }
    }
}

impl std::fmt::Display for WidenAbove {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v}"),
            None => f.write_str("off"),
        }
    }
}

/// `--min-error-reduction`: a fraction in `[0, 1)`.
fn reduction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a fraction from 0 up to (not including) 1"
        )),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Command::Compile {
        model,
        calib,
        out,
        report,
        method,
        max_images,
        split,
        widen_above,
        int16_above,
        min_error_reduction,
        no_bias_correction,
    } = cli.command;
    let model = ZooModel::load(&model)?;
    let options = Options {
        method: match method {
            CalibrationMethod::Auto => None,
            CalibrationMethod::Minmax => Some(Method::MinMax),
            CalibrationMethod::Percentile => Some(Method::Percentile(0.01)),
            CalibrationMethod::Entropy => Some(Method::Entropy),
            CalibrationMethod::Mse => Some(Method::Mse),
        },
        max_images,
        split: match split {
            SplitArg::All => Split::All,
            SplitArg::Train => Split::Train,
            SplitArg::Val => Split::Validation,
        },
        widen_above: widen_above.0,
        int16_above: int16_above.0,
        min_error_reduction,
        bias_correction: !no_bias_correction,
    };
    let (plan, summary) = compile(&model, &calib, &options, &mut |phase| {
        eprintln!("{phase}...")
    })?;
    // Write beside, then rename: a failed write never leaves a half plan under the final name.
    let partial = out.with_extension("plan.partial");
    std::fs::write(&partial, &plan)
        .and_then(|()| std::fs::rename(&partial, &out))
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    let percent = |v: Option<f64>| {
        v.map_or("n/a (unlabelled)".to_string(), |v| {
            format!("{:.2}%", 100.0 * v)
        })
    };
    println!(
        "plan        {} ({} bytes, {} steps)",
        out.display(),
        summary.plan_bytes,
        summary.steps
    );
    println!("arena       {} bytes", summary.arena_bytes);
    println!("output      {}-bit codes", summary.output_bits);
    println!(
        "calibration {} images, {} ({} skipped)",
        summary.calibration_images,
        summary.method,
        summary.skipped.len()
    );
    for skipped in &summary.skipped {
        println!("  skipped   {skipped}");
    }
    // Each range method's plan, where none was named: the closest to tract is written.
    for trial in &summary.ranges {
        match &trial.failed {
            Some(reason) => println!("ranges      {}: not built: {reason}", trial.method),
            None => println!(
                "ranges      {:<17} agreement {:.2}%, output relative RMS error {:.4}{}",
                format!("{}:", trial.method),
                100.0 * trial.agreement,
                trial.output_rel_rms,
                if trial.kept { ": kept" } else { "" }
            ),
        }
    }
    // Biases corrected for the int8 inputs' channel means, estimated or measured on the plan.
    if let Some(trial) = &summary.bias_correction {
        for (index, means) in [(1, "estimated"), (2, "measured")] {
            println!(
                "bias        {}",
                comparison(
                    &format!("corrected by {means} means"),
                    [trial.agreement[0], trial.agreement[index]],
                    [trial.output_rel_rms[0], trial.output_rel_rms[index]],
                    if trial.written == index {
                        "written"
                    } else {
                        "not written"
                    }
                )
            );
        }
    }
    match (summary.top1_agreement, summary.box_agreement) {
        (Some(top1), _) => println!(
            "agreement   {:.2}% top-1 with tract, output relative RMS error {:.4}",
            100.0 * top1,
            summary.output_rel_rms
        ),
        (None, Some(boxes)) => println!(
            "agreement   {:.2}% of tract's {} boxes (same class, IoU >= 0.5), output relative RMS error {:.4}",
            100.0 * boxes,
            summary.float_boxes,
            summary.output_rel_rms
        ),
        (None, None) => {}
    }
    println!("float top-1 {}", percent(summary.float_top1));
    println!("int8 top-1  {}", percent(summary.int8_top1));
    if let Some(delta) = summary.delta_points {
        println!("delta       {delta:+.2} points");
    }
    // The layers that add the most error: where a wider type or a better range would help.
    let mut worst: Vec<_> = summary.layers.iter().collect();
    worst.sort_by(|a, b| b.added.total_cmp(&a.added));
    println!("layers adding the most error (relative RMS at the output: added, total):");
    for layer in worst.iter().take(5) {
        println!(
            "  {:+.4} {:.4}  {} ({})",
            layer.added, layer.rel_rms, layer.node, layer.op
        );
    }
    if let Some(trial) = &summary.widening {
        println!(
            "16-bit      {}",
            comparison(
                &format!("{} function tables at 16 bits", trial.tables),
                trial.agreement,
                trial.output_rel_rms,
                if trial.kept {
                    "kept (their int8 output added, in relative RMS):"
                } else {
                    "not closer to float by --min-error-reduction, so every activation stays int8"
                }
            )
        );
        for layer in &summary.widened {
            println!("  {:+.4}  {}", layer.added, layer.node);
        }
    }
    if let Some(trial) = &summary.int16 {
        match &trial.failed {
            Some(reason) => println!("16-bit      activations not built: {reason}"),
            None => println!(
                "16-bit      {}",
                comparison(
                    &format!("activations ({} tensors)", trial.tensors),
                    trial.agreement,
                    trial.output_rel_rms,
                    if trial.kept {
                        "kept (slower: 16-bit layers move twice the bytes of int8 ones)"
                    } else {
                        "not closer to float by --min-error-reduction, so the int8 plan is written"
                    }
                )
            ),
        }
    }
    if let Some(path) = report {
        std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Two plans the compiler verified against tract, side by side: `what` was tried, the top-1
/// (or box) agreement and output relative RMS error before -> after, and what was decided.
fn comparison(what: &str, agreement: [f64; 2], output_rel_rms: [f64; 2], decision: &str) -> String {
    let [before, after] = agreement.map(|a| 100.0 * a);
    let [before_rms, after_rms] = output_rel_rms;
    format!(
        "{what}: agreement {before:.2}% -> {after:.2}%, output relative RMS error {before_rms:.4} -> {after_rms:.4}: {decision}"
    )
}
