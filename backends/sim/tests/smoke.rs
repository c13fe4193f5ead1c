//! End-to-end smoke test of the engine on sim.
use drm_pagemap_core::*;
use drm_pagemap_sim::{SimBackend, SimConfig};
use drm_pagemap_testkit::layout;
use std::sync::Arc;

#[test]
fn mixed_layout_migrates_and_reads_back() {
    let sim = SimBackend::new(SimConfig {
        devices: 3,
        ..SimConfig::default()
    })
    .unwrap();
    let mm = AddressSpace::new(sim.host_memory());
    for pm in sim.pagemap_per_device().unwrap() {
        mm.add_pagemap(pm).unwrap();
    }
    let ps = 4096u64;
    let base = 1 << 30;
    let n = 9u64;
    mm.create_range(VaRange::new(base, n * ps), PageSize::Size4K)
        .unwrap();
    for i in 0..n {
        mm.write(base + i * ps, &vec![i as u8 + 1; ps as usize])
            .unwrap();
    }
    // Layout ss00s11s0
    let d = MigrateDetails::default();
    for (i, k) in [(2u64, 0u8), (3, 0), (5, 1), (6, 1), (8, 0)] {
        mm.migrate(VaRange::new(base + i * ps, ps), PagemapId(k), &d)
            .unwrap();
    }
    let l = layout::format(&layout::of(&mm, VaRange::new(base, n * ps)).unwrap());
    assert_eq!(l, "ss00s11s0");
    let r = mm
        .migrate(VaRange::new(base, n * ps), PagemapId(2), &d)
        .unwrap();
    let calls: Vec<_> = r
        .calls
        .iter()
        .map(|c| (c.executor.0, c.op, c.pages))
        .collect();
    assert_eq!(
        calls,
        vec![
            (2, CopyOp::ToDevmem, 4),
            (0, CopyOp::ToRam, 3),
            (1, CopyOp::ToRam, 2)
        ]
    );
    assert_eq!(
        layout::format(&layout::of(&mm, VaRange::new(base, n * ps)).unwrap()),
        "2*9"
    );
    for i in 0..n {
        let mut b = vec![0u8; ps as usize];
        mm.read(base + i * ps, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == i as u8 + 1), "page {i}");
    }
    assert_eq!(
        layout::format(&layout::of(&mm, VaRange::new(base, n * ps)).unwrap()),
        "s*9"
    );
    // Every allocation was released.
    assert!(mm.allocations().is_empty());
    let _ = Arc::new(());
}
