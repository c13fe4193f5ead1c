//! libFuzzer target: byte strings decoded into API calls on a simulated machine with fault
//! injection; every call answers Ok or a typed error, bytes are never lost, nothing leaks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = drm_pagemap_fuzz::api_sequence(data);
});
