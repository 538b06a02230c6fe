#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kestrel_plan::fuzzing::plan_load(data));
