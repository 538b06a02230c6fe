#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kestrel_host::fuzzing::image_decode(data));
