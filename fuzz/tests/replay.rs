//! Stable harness for the fuzz drivers: replays every input of `seeds/<target>/` and a
//! number of pseudo-random inputs through them. Runs without nightly or libFuzzer:
//!
//! `cargo test --manifest-path fuzz/Cargo.toml --no-default-features --release`
//!
//! `FUZZ_REPLAY_CASES=n` sets the number of random inputs per target (default 400 for the
//! API driver, 20,000 for the layout parser).

use std::path::Path;

fn cases(default: usize) -> usize {
    std::env::var("FUZZ_REPLAY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_file() {
            out.push(std::fs::read(&p).unwrap());
        }
    }
    assert!(!out.is_empty(), "empty corpus {}", dir.display());
    out
}

#[test]
fn layout_corpus_and_random_text() {
    for input in corpus("layout_parse") {
        drm_pagemap_fuzz::layout_round_trip(&input);
    }
    let alphabet = b"s.0123456789*,x -9*";
    let mut rng = Rng(0x1A70_u64 | 1);
    for _ in 0..cases(20_000) {
        let n = (rng.next() % 24) as usize;
        let text: Vec<u8> = (0..n)
            .map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize])
            .collect();
        drm_pagemap_fuzz::layout_round_trip(&text);
    }
}

#[test]
fn api_corpus_and_random_sequences() {
    let mut ex = drm_pagemap_fuzz::Exercised::default();
    for input in corpus("api_sequence") {
        ex += drm_pagemap_fuzz::api_sequence(&input);
    }
    let mut rng = Rng(0x00A9_15E9 | 1);
    for _ in 0..cases(400) {
        let n = (rng.next() % 160) as usize;
        // Small operand bytes most of the time, so that calls hit live ranges.
        let input: Vec<u8> = (0..n)
            .map(|_| {
                let x = rng.next();
                if x.is_multiple_of(4) {
                    (x >> 8) as u8
                } else {
                    ((x >> 8) % 24) as u8
                }
            })
            .collect();
        ex += drm_pagemap_fuzz::api_sequence(&input);
    }
    eprintln!("api_sequence replay: {ex:?}");
    // The inputs reach the engine: calls succeed and fail, data is compared, faults fire.
    assert!(
        ex.migrations > 0 && ex.errors > 0 && ex.reads_checked > 0,
        "{ex:?}"
    );
    assert!(ex.evictions > 0 && ex.faults > 0 && ex.parked > 0, "{ex:?}");
}
