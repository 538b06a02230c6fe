#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kestrel_jetson::fuzzing::flight_config(data));
