//! The engine's hooks for pointer ranges on the simulated backend, without userfaultfd:
//! `CpuMappings::take_out` is called with a migration's pages while they are locked and
//! before any copy; `AddressSpace::with_cpu_page` brings a device page home with its bytes.

use drm_pagemap_core::*;
use drm_pagemap_sim::{SimBackend, SimConfig};
use std::sync::{Arc, Mutex};

/// Records each call and what the page table said at that moment.
struct Recorder {
    mm: Mutex<Option<std::sync::Weak<AddressSpace>>>,
    calls: Mutex<Vec<(VaRange, Vec<PageLocation>)>>,
}

impl CpuMappings for Recorder {
    fn take_out(&self, range: VaRange) {
        // The pages are still where they were (nothing committed yet): read the snapshot
        // through `locations`, which does not wait on locked pages.
        let mm = self.mm.lock().unwrap().as_ref().and_then(|w| w.upgrade());
        let locs = mm
            .map(|mm| mm.locations(range).unwrap())
            .unwrap_or_default();
        self.calls.lock().unwrap().push((range, locs));
    }
}

#[test]
fn take_out_precedes_the_copy_and_with_cpu_page_brings_pages_home() {
    let sim = SimBackend::new(SimConfig {
        devices: 2,
        ..SimConfig::default()
    })
    .unwrap();
    let mm = Arc::new(AddressSpace::new(sim.host_memory()));
    for pm in sim.pagemap_per_device().unwrap() {
        mm.add_pagemap(pm).unwrap();
    }
    let rec = Arc::new(Recorder {
        mm: Mutex::new(Some(Arc::downgrade(&mm))),
        calls: Mutex::new(Vec::new()),
    });
    assert!(mm.set_cpu_mappings(rec.clone()).is_ok());
    let r = VaRange::new(1 << 30, 8 * 4096);
    mm.create_range(r, PageSize::Size4K).unwrap();
    let data: Vec<u8> = (0..r.len).map(|i| (i % 251) as u8).collect();
    mm.write(r.start, &data).unwrap();

    let d = MigrateDetails::default();
    mm.migrate(r, PagemapId(0), &d).unwrap();
    {
        let calls = rec.calls.lock().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, r);
        // Called before the commit: the pages were still system pages.
        assert!(
            calls[0].1.iter().all(|l| *l == PageLocation::System),
            "{:?}",
            calls[0].1
        );
    }
    // Nothing to move: no call.
    mm.migrate(r, PagemapId(0), &d).unwrap();
    assert_eq!(rec.calls.lock().unwrap().len(), 1);

    // The CPU-fault entry: page 5 comes home with its bytes; the others stay.
    let va = r.start + 5 * 4096 + 100;
    let frame = mm
        .with_cpu_page(va, |page_va, frame, ps| {
            assert_eq!(page_va, r.start + 5 * 4096);
            assert_eq!(ps, PageSize::Size4K);
            frame
        })
        .unwrap();
    let mut b = vec![0u8; 4096];
    sim.host_memory()
        .read(frame, 0, &mut b)
        .expect("host memory");
    assert_eq!(b, data[5 * 4096..6 * 4096]);
    assert_eq!(mm.location(va).unwrap(), PageLocation::System);
    let mut buf = vec![0u8; r.len as usize];
    mm.read(r.start, &mut buf).unwrap();
    assert_eq!(buf, data);
}
