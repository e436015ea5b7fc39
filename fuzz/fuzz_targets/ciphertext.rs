//! `keyward::fuzzing::ciphertext`: see its documentation for what the bytes are.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyward::fuzzing::ciphertext(data));
