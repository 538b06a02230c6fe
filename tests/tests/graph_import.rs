//! The compiler's ONNX import and float interpreter, checked against tract on the zoo model.

use std::path::Path;

use kestrel_backend::Backend;
use kestrel_host::decode_image;
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::preprocess::{prepare_input, Region};
use models::graph::{Graph, ImportError, Op};
use models::ZooModel;

#[test]
fn float_interpreter_matches_tract_on_real_chips() {
    let model = ZooModel::load(models::DEFAULT_MODEL).unwrap();
    let graph = Graph::from_onnx(model.onnx()).unwrap();
    let count = |f: fn(&Op) -> bool| graph.nodes.iter().filter(|n| f(&n.op)).count();
    assert_eq!(count(|op| matches!(op, Op::Conv { .. })), 12);
    assert_eq!(count(|op| matches!(op, Op::Add)), 4);
    assert_eq!(graph.shapes[0], vec![1, 3, 64, 64]);
    assert_eq!(graph.shapes[graph.output], vec![1, 10]);

    let spec = model.preprocess_spec().unwrap();
    let mut tract = model.tract_backend().unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sim/sample/eurosat-rgb");
    for class in ["Forest", "Industrial", "River"] {
        let chip = std::fs::read_dir(sample.join(class))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let image = decode_image(&chip).unwrap();
        let view = FrameView::new(image.geometry, &image.samples).unwrap();
        let mut input = vec![0.0; spec.input_len()];
        prepare_input(view, Region::whole(64, 64), &spec, &mut input).unwrap();
        let mut expected = vec![0.0; 10];
        tract.run(&input, &mut expected).unwrap();
        let values = graph.run_f32(&input);
        let got = &values[graph.output];
        let worst = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            worst < 1e-3,
            "{}: logits differ from tract by {worst}: {got:?} vs {expected:?}",
            chip.display()
        );
    }
}

#[test]
fn unsupported_ops_and_garbage_are_named_errors() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/unsupported_op.onnx");
    let err = Graph::from_onnx(&std::fs::read(fixture).unwrap()).unwrap_err();
    let ImportError::UnsupportedOps { nodes } = &err else {
        panic!("{err}");
    };
    assert_eq!(
        nodes,
        &[("odd_activation".to_string(), "Softplus".to_string())]
    );
    assert_eq!(
        err.to_string(),
        "1 node uses operators the Kestrel compiler does not support: Softplus ('odd_activation')"
    );
    assert!(matches!(
        Graph::from_onnx(b"\xff\xff\xff garbage"),
        Err(ImportError::Decode(_))
    ));
}

#[test]
fn constants_passed_through_identity_stay_constants() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/identity_weights.onnx");
    let graph = Graph::from_onnx(&std::fs::read(fixture).unwrap()).unwrap();
    assert_eq!(graph.nodes.len(), 1);
    assert!(matches!(&graph.nodes[0].op, Op::Conv { weight, .. } if weight == &[1.0, 1.0]));
    let y = &graph.run_f32(&[1.0, 2.0, 3.0, 4.0])[graph.output];
    assert_eq!(y, &[1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn calibration_on_real_chips_gives_usable_int8_ranges() {
    use models::calibrate::{Calibrator, Method};

    let model = ZooModel::load(models::DEFAULT_MODEL).unwrap();
    let graph = Graph::from_onnx(model.onnx()).unwrap();
    let spec = model.preprocess_spec().unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sim/sample/eurosat-rgb");
    let inputs: Vec<Vec<f32>> = ["AnnualCrop", "Highway", "SeaLake", "Residential"]
        .iter()
        .flat_map(|class| std::fs::read_dir(sample.join(class)).unwrap().take(2))
        .map(|entry| {
            let image = decode_image(&entry.unwrap().path()).unwrap();
            let view = FrameView::new(image.geometry, &image.samples).unwrap();
            let mut input = vec![0.0; spec.input_len()];
            prepare_input(view, Region::whole(64, 64), &spec, &mut input).unwrap();
            input
        })
        .collect();
    let runs: Vec<Vec<Vec<f32>>> = inputs.iter().map(|i| graph.run_f32(i)).collect();
    let mut calibrator = Calibrator::new(graph.shapes.len());
    runs.iter()
        .for_each(|values| calibrator.observe_range(values));
    runs.iter()
        .for_each(|values| calibrator.observe_histogram(values));
    for method in [Method::MinMax, Method::Percentile(0.01), Method::Entropy] {
        let params = calibrator.finish(method);
        assert_eq!(params.len(), graph.shapes.len());
        for (id, q) in params.iter().enumerate() {
            assert!(
                q.scale.is_finite() && q.scale > 0.0,
                "{method:?} tensor {id}: {q:?}"
            );
        }
        // ReLU outputs are non-negative: their whole int8 range lies above zero.
        for node in graph.nodes.iter().filter(|n| matches!(n.op, Op::Relu)) {
            assert_eq!(
                params[node.output].zero_point, -128,
                "{method:?} {}",
                node.name
            );
        }
        // The normalised input spans both signs, so its zero point is inside the range.
        assert!(
            params[0].zero_point > -128 && params[0].zero_point < 127,
            "{:?}",
            params[0]
        );
    }
}

#[test]
fn int8_program_agrees_with_the_float_model_on_real_chips() {
    use models::calibrate::{Calibrator, Method};
    use models::quantize::QuantizedGraph;

    let model = ZooModel::load(models::DEFAULT_MODEL).unwrap();
    let graph = Graph::from_onnx(model.onnx()).unwrap();
    let spec = model.preprocess_spec().unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sim/sample/eurosat-rgb");
    let mut chips = Vec::new();
    for (label, class) in model.manifest.labels.iter().enumerate() {
        let mut paths: Vec<_> = std::fs::read_dir(sample.join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        for path in paths.into_iter().take(6) {
            let image = decode_image(&path).unwrap();
            let view = FrameView::new(image.geometry, &image.samples).unwrap();
            let mut input = vec![0.0; spec.input_len()];
            prepare_input(view, Region::whole(64, 64), &spec, &mut input).unwrap();
            chips.push((label, input));
        }
    }
    // Calibrate on the first two chips of each class, evaluate on the other four.
    let (calibration, evaluation): (Vec<_>, Vec<_>) =
        chips.iter().enumerate().partition(|(i, _)| i % 6 < 2);
    let runs: Vec<_> = calibration
        .iter()
        .map(|(_, (_, input))| graph.run_f32(input))
        .collect();
    let mut calibrator = Calibrator::new(graph.shapes.len());
    runs.iter().for_each(|v| calibrator.observe_range(v));
    runs.iter().for_each(|v| calibrator.observe_histogram(v));
    let program =
        QuantizedGraph::build(&graph, &calibrator.finish(Method::Percentile(0.01))).unwrap();
    assert_eq!(
        program.steps.len(),
        12 + 4 + 1 + 1,
        "every ReLU fused, Flatten a view: convs, adds, pool, gemm"
    );
    let plan = models::compile::encode(&model, &program).unwrap();
    let mut int8_backend = kestrel_plan::cpu::Int8Cpu::from_bytes(&plan).unwrap();
    let mut logits = vec![0.0; 10];

    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0
    };
    let (mut agree, mut int8_right, mut float_right) = (0, 0, 0);
    for (_, (label, input)) in &evaluation {
        let float = argmax(&graph.run_f32(input)[graph.output]);
        int8_backend.infer(input, &mut logits).unwrap();
        let int8 = argmax(&logits);
        agree += usize::from(float == int8);
        int8_right += usize::from(int8 == *label);
        float_right += usize::from(float == *label);
    }
    let n = evaluation.len();
    assert_eq!(n, 40);
    assert!(agree >= 36, "int8 agrees with float on {agree}/{n} chips");
    assert!(
        int8_right + 2 >= float_right,
        "int8 {int8_right}/{n} vs float {float_right}/{n}"
    );
}
