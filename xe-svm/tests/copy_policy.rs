//! The copy policy end to end on sim: every copy the engine makes through the context's
//! pagemaps (not only the fault handler's) is split into commands of at most 8 MiB of
//! contiguous device pages, and the data lands.

mod common;

use common::*;
use drm_pagemap_core::{AddressSpace, Backend, MigrateDetails, PageSize, PagemapId, VaRange};
use drm_pagemap_sim::{SimBackend, SimConfig};
use std::sync::Arc;
use xe_svm::{Svm, SvmConfig, SvmError};

#[test]
fn large_migrations_are_split_at_8_mib_without_overrun() {
    for (pages, commands) in [(2048u64, 1u64), (2049, 2), (4097, 3)] {
        let rig = rig_default();
        let range = VaRange::new(BASE, pages * K4);
        create(&rig.mm, range, PageSize::Size4K);
        fill(&rig.mm, range, pages as u8);
        let r = rig
            .mm
            .migrate(range, PagemapId(1), &MigrateDetails::default())
            .unwrap();
        assert_eq!(r.calls.len(), 1, "one call from the engine");
        let s = rig.svm.stats(rig.vms[1].device());
        assert_eq!(s.total_copy_calls(), 1);
        assert_eq!(s.total_commands(), commands, "{pages} pages");
        assert_eq!(s.copy_to_devmem[3].bytes, pages * K4);
        // Evicting goes through the policy too (device 1 pushes its pages home).
        assert_eq!(rig.vms[1].evict_range(range).unwrap(), pages as usize);
        let s = rig.svm.stats(rig.vms[1].device());
        assert_eq!(s.copy_to_ram[3].calls, 1);
        assert_eq!(s.copy_to_ram[3].commands, commands, "{pages} pages back");
        check(&rig.mm, range, pages as u8);
    }
}

#[test]
fn context_refuses_pagemaps_given_twice_or_already_added() {
    let sim = SimBackend::new(SimConfig::default()).unwrap();
    let pms = sim.pagemap_per_device().unwrap();
    let mm = Arc::new(AddressSpace::new(sim.host_memory()));
    let twice = vec![pms[0].clone(), pms[0].clone()];
    let e = Svm::new(mm.clone(), twice, SvmConfig::default()).unwrap_err();
    assert!(e.to_string().contains("pagemap 0"), "{e}");
    mm.add_pagemap(pms[1].clone()).unwrap();
    assert!(Svm::new(mm.clone(), vec![pms[1].clone()], SvmConfig::default()).is_err());
    // Nothing was added by the refused calls.
    assert!(mm.pagemap(PagemapId(0)).is_none());
    let svm = Svm::new(mm, vec![pms[0].clone()], SvmConfig::default()).unwrap();
    assert!(matches!(
        svm.vm(PagemapId(1)),
        Err(SvmError::UnknownPagemap { .. })
    ));
    assert!(svm.vm(PagemapId(0)).is_ok());
}

#[test]
fn page_table_queries_on_unknown_addresses() {
    let rig = rig_default();
    let vm = &rig.vms[0];
    assert!(vm.with_page_table(BASE, |_| ()).is_none());
    assert!(!vm.is_valid(BASE));
    assert!(vm.svm_ranges().is_empty());
    assert!(vm.evict_range(VaRange::new(BASE, K4)).is_err());
}
