//! `keyward::fuzzing::wrapped_key`: see its documentation for what the bytes are.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyward::fuzzing::wrapped_key(data));
