//! `keyward::fuzzing::request`: see its documentation for what the bytes are.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyward::fuzzing::request(data));
