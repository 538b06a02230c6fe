//! End to end through the library: the committed sample chips, the host board's folder source,
//! the threaded runtime and the built-in model on tract, scored against the folder labels.

use std::path::Path;

use kestrel_backend::Backend;
use kestrel_eval::dataset::scan_labelled;
use kestrel_eval::Split;
use kestrel_host::{FolderSource, HostClock};
use kestrel_runtime::step::ClassifierStep;
use kestrel_runtime::threaded::{run_pipeline, DropPolicy, PipelineConfig};
use models::ZooModel;

#[test]
fn sample_replay_matches_the_validation_accuracy() {
    let model = ZooModel::load(models::DEFAULT_MODEL).unwrap();
    let spec = model.preprocess_spec().unwrap();
    let backend = model.tract_backend().unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sim/sample/eurosat-rgb");
    let images = scan_labelled(&sample, &model.manifest.labels, Split::All).unwrap();
    assert_eq!(images.len(), 300);
    assert!(
        images
            .iter()
            .all(|i| Split::Validation.contains(i.path.file_name().unwrap().to_str().unwrap())),
        "the sample holds validation chips only"
    );

    let (mut input, mut output) = (vec![0.0; spec.input_len()], vec![0.0; backend.output_len()]);
    let step = ClassifierStep::new(backend, spec, &mut input, &mut output).unwrap();
    let source = FolderSource::new(images.iter().map(|i| i.path.clone()).collect());
    let config = PipelineConfig {
        queue_depth: 4,
        drop_policy: DropPolicy::Block,
        max_frame_samples: 64 * 64 * 3,
        scrub_every: 0,
        monotonic_capture: false,
    };
    let mut correct = 0;
    let health = run_pipeline(source, step, &HostClock::default(), config, |o| {
        let truth = images[o.sequence as usize].label;
        correct += usize::from(
            o.result
                .map(|c| usize::from(c.class()) == truth)
                .unwrap_or(false),
        );
    });

    assert_eq!(
        (health.frames_in, health.frames_done, health.total_errors()),
        (300, 300, 0)
    );
    let top1 = correct as f64 / 300.0;
    let validation = model.manifest.validation_top1;
    assert!(top1 >= 0.93, "sample top-1 {top1}");
    // 300 chips: a binomial standard error of about 1 point at 97%; 4 points is far outside it.
    assert!(
        (top1 - validation).abs() <= 0.04,
        "sample top-1 {top1} vs validation {validation}"
    );
}

#[test]
fn step_loop_over_a_frame_pool_classifies_real_chips() {
    // The no_std shape of the pipeline: a fixed pool, one step, no threads, no allocation
    // in the loop (the host source decodes JPEGs with libjpeg-turbo, outside the runtime).
    use kestrel_runtime::health::Health;
    use kestrel_runtime::pool::FramePool;

    let model = ZooModel::load(models::DEFAULT_MODEL).unwrap();
    let spec = model.preprocess_spec().unwrap();
    let backend = model.tract_backend().unwrap();
    let (mut input, mut output) = (vec![0.0; spec.input_len()], vec![0.0; backend.output_len()]);
    let mut step = ClassifierStep::new(backend, spec, &mut input, &mut output).unwrap();
    let forest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sim/sample/eurosat-rgb/Forest");
    let mut files: Vec<_> = std::fs::read_dir(forest)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.truncate(10);
    let mut source = FolderSource::new(files);
    let mut pool: Box<FramePool<u8, { 64 * 64 * 3 }, 2>> = Box::default();
    let (clock, mut health) = (HostClock::default(), Health::default());
    let forest_class = model
        .manifest
        .labels
        .iter()
        .position(|l| l == "Forest")
        .unwrap() as u16;
    let mut forest_votes = 0;
    loop {
        let slot = pool.acquire().unwrap();
        let Some(_) = pool.fill(slot, &mut source).unwrap() else {
            break;
        };
        health.frames_in += 1;
        let (c, _latency_us) = step
            .process(pool.view(slot).unwrap(), &clock, &mut health)
            .unwrap();
        forest_votes += usize::from(c.class() == forest_class);
        pool.release(slot).unwrap();
    }
    assert_eq!((health.frames_in, health.frames_done), (10, 10));
    assert_eq!(health.latency.total(), 10);
    assert!(
        forest_votes >= 9,
        "{forest_votes}/10 forest chips classified as Forest"
    );
}

/// The threaded pipeline runs a detector as it runs a classifier: the 7 sample scenes through
/// the built-in int8 detector give, frame by frame, the boxes `DetectorStep` gives on its own.
#[test]
fn the_threaded_pipeline_runs_the_detector() {
    use kestrel_host::decode_image;
    use kestrel_runtime::detect::Detections;
    use kestrel_runtime::frame::FrameView;
    use kestrel_runtime::step::DetectorStep;
    use kestrel_runtime::threaded::Outcome;

    let model = ZooModel::load(models::DEFAULT_DETECTOR).unwrap();
    let (spec, config) = (
        model.preprocess_spec().unwrap(),
        model.detector_config().unwrap(),
    );
    let scenes = kestrel_tests::sorted_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../sim/sample/nwpu-vhr10/images"),
    );
    let clock = HostClock::default();

    let backend = model.int8_backend().unwrap().unwrap();
    let (mut input, mut head) = (vec![0.0; spec.input_len()], vec![0.0; backend.output_len()]);
    let mut step =
        DetectorStep::<_, 128>::new(backend, spec, config, &mut input, &mut head).unwrap();
    let alone: Vec<Detections<512>> = scenes
        .iter()
        .map(|path| {
            let image = decode_image(path).unwrap();
            let frame = FrameView::new(image.geometry, &image.samples).unwrap();
            let mut found = Detections::new();
            step.detect(frame, &mut found).unwrap();
            found
        })
        .collect();
    drop(step);

    let backend = model.int8_backend().unwrap().unwrap();
    let (mut input, mut head) = (vec![0.0; spec.input_len()], vec![0.0; backend.output_len()]);
    let step = DetectorStep::<_, 128>::new(backend, spec, config, &mut input, &mut head).unwrap();
    let pipeline = PipelineConfig {
        queue_depth: 2,
        drop_policy: DropPolicy::Block,
        max_frame_samples: 1200 * 1200 * 3,
        scrub_every: 0,
        monotonic_capture: false,
    };
    let mut threaded: Vec<Option<Detections<512>>> = vec![None; scenes.len()];
    let source = FolderSource::new(scenes.clone());
    let health = run_pipeline(
        source,
        step,
        &clock,
        pipeline,
        |o: Outcome<_, Detections<512>>| {
            threaded[o.sequence as usize] = Some(o.result.unwrap());
        },
    );
    assert_eq!((health.frames_in, health.frames_done), (7, 7));
    let boxes: usize = alone.iter().map(|d| d.as_slice().len()).sum();
    assert!(boxes >= 30, "the 7 scenes hold 61 objects; found {boxes}");
    for (i, (alone, threaded)) in alone.iter().zip(&threaded).enumerate() {
        assert!(
            threaded.as_ref() == Some(alone),
            "scene {i}: {:?}",
            scenes[i]
        );
    }
}
