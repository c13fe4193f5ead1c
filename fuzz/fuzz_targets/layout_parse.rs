//! libFuzzer target: the `--layout` parser never panics and round-trips.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    drm_pagemap_fuzz::layout_round_trip(data);
});
