//! `keyward::fuzzing::audit_file`: see its documentation for what the bytes are.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyward::fuzzing::audit_file(data));
