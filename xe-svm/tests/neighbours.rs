//! Several CPU ranges inside one 2 MiB block: each gets SVM ranges of its own (the largest of
//! 2 MiB / 64 KiB / 4 KiB that is aligned and fits inside it), and a fault on one never drops
//! or invalidates another's range or page table (issue 11, D4). A CPU range re-created with
//! another page size is recognised by the fault handler and cut again (issue 11, D6).

mod common;

use common::*;
use drm_pagemap_core::{PageSize, PagemapId, VaRange};
use xe_svm::{Access, FaultAction, Placement};

/// Two live 64 KiB buffers 1 MiB apart: faults on one leave the other's range and page table
/// alone, and alternating faults cost no page-table rebuilds after the first two.
#[test]
fn a_fault_on_one_buffer_leaves_its_neighbour_valid() {
    let rig = rig_default();
    let vm = &rig.vms[0];
    let a = VaRange::new(BASE, K64);
    let b = VaRange::new(BASE + (1 << 20), K64);
    for (i, r) in [a, b].into_iter().enumerate() {
        create(&rig.mm, r, PageSize::Size4K);
        fill(&rig.mm, r, i as u8 + 1);
    }
    let ra = vm.handle_gpu_fault(a.start, Access::Write).unwrap();
    assert_eq!(ra.range, a);
    assert!(vm.is_valid(a.start));
    let rb = vm.handle_gpu_fault(b.start, Access::Write).unwrap();
    assert_eq!(rb.range, b);
    assert!(vm.is_valid(b.start));
    assert!(
        vm.is_valid(a.start),
        "a fault on the neighbour invalidated the first buffer's page table"
    );
    assert_eq!(
        vm.svm_ranges(),
        vec![(a, PageSize::Size4K), (b, PageSize::Size4K)]
    );
    let built = rig.svm.stats(vm.device()).page_tables.count;
    for k in 0..10 {
        let addr = if k % 2 == 0 { a.start } else { b.start + K4 };
        let r = vm.handle_gpu_fault(addr, Access::Write).unwrap();
        assert_eq!(
            r.action,
            FaultAction::Valid,
            "fault {k} at {addr:#x}: {r:?}"
        );
    }
    assert_eq!(
        rig.svm.stats(vm.device()).page_tables.count,
        built,
        "alternating faults rebuilt page tables"
    );
    for (i, r) in [a, b].into_iter().enumerate() {
        check_page_table(&rig, vm, r.start, Placement::Device(PagemapId(0)), None);
        check(&rig.mm, r, i as u8 + 1);
    }
}

/// Six small and unaligned buffers in one 2 MiB block, faulted in turn: each is covered by
/// SVM ranges of its own, of the largest chunk size that is aligned and fits in it, and every
/// page table stays valid while the others are faulted.
#[test]
fn small_buffers_in_one_block_get_ranges_of_their_own() {
    let rig = rig_default();
    let vm = &rig.vms[1];
    let b = BASE + 4 * M2;
    // (buffer, page size, fault address, the SVM range it must get)
    let bufs = [
        // One 4 KiB page at an odd page.
        (VaRange::new(b + K4, K4), PageSize::Size4K, b + K4 + 5),
        // 12 KiB not 64 KiB aligned: 4 KiB ranges.
        (
            VaRange::new(b + 3 * K4, 3 * K4),
            PageSize::Size4K,
            b + 4 * K4,
        ),
        // 64 KiB aligned: one 64 KiB range.
        (VaRange::new(b + K64, K64), PageSize::Size4K, b + K64 + K4),
        // 64 KiB + 8 KiB from a 64 KiB boundary: 64 KiB for its first part, 4 KiB after.
        (
            VaRange::new(b + 4 * K64, K64 + 2 * K4),
            PageSize::Size4K,
            b + 5 * K64 + K4,
        ),
        // Two 64 KiB pages: 64 KiB ranges.
        (
            VaRange::new(b + 8 * K64, 2 * K64),
            PageSize::Size64K,
            b + 9 * K64 + 9,
        ),
        // A 4 KiB buffer near the block's end.
        (VaRange::new(b + M2 - K4, K4), PageSize::Size4K, b + M2 - 1),
    ];
    let want = [
        VaRange::new(b + K4, K4),
        VaRange::new(b + 4 * K4, K4),
        VaRange::new(b + K64, K64),
        VaRange::new(b + 5 * K64 + K4, K4),
        VaRange::new(b + 9 * K64, K64),
        VaRange::new(b + M2 - K4, K4),
    ];
    for (i, (r, ps, _)) in bufs.iter().enumerate() {
        create(&rig.mm, *r, *ps);
        fill(&rig.mm, *r, 20 + i as u8);
    }
    for (i, ((_, ps, addr), want)) in bufs.iter().zip(want).enumerate() {
        let r = vm.handle_gpu_fault(*addr, Access::Write).unwrap();
        assert_eq!(r.range, want, "buffer {i}");
        assert_eq!(r.page_size, *ps, "buffer {i}");
        assert!(matches!(r.action, FaultAction::Migrated { .. }), "{r:?}");
        for (j, (_, _, a)) in bufs.iter().enumerate().take(i + 1) {
            assert!(
                vm.is_valid(*a),
                "buffer {j}'s page table went stale at the fault on buffer {i}"
            );
        }
    }
    let ranges: Vec<VaRange> = vm.svm_ranges().into_iter().map(|(r, _)| r).collect();
    assert_eq!(ranges, want.to_vec(), "one SVM range per buffer faulted");
    // Every page of every buffer: the ranges covering them are inside the buffer.
    for (i, (buf, ps, _)) in bufs.iter().enumerate() {
        let mut a = buf.start;
        while a < buf.end() {
            let r = vm.handle_gpu_fault(a, Access::Write).unwrap();
            assert!(
                buf.contains_range(&r.range),
                "{} outside buffer {i}",
                r.range
            );
            assert_eq!(r.page_size, *ps);
            a += ps.bytes();
        }
    }
    for (i, (_, _, addr)) in bufs.iter().enumerate() {
        assert!(vm.is_valid(*addr), "buffer {i}");
        check_page_table(&rig, vm, *addr, Placement::Device(PagemapId(1)), None);
    }
    for (i, (buf, _, _)) in bufs.iter().enumerate() {
        check(&rig.mm, *buf, 20 + i as u8);
    }
}

/// A range whose CPU range is gone is still dropped when a new range is cut in its block
/// (what the old rule was for), while live neighbours stay.
#[test]
fn only_ranges_of_gone_cpu_ranges_are_dropped() {
    let rig = rig_default();
    let vm = &rig.vms[0];
    let a = VaRange::new(BASE, K64);
    let gone = VaRange::new(BASE + K64, K64);
    let c = VaRange::new(BASE + 4 * K64, K64);
    for r in [a, gone, c] {
        create(&rig.mm, r, PageSize::Size4K);
    }
    vm.handle_gpu_fault(a.start, Access::Read).unwrap();
    vm.handle_gpu_fault(gone.start, Access::Read).unwrap();
    rig.mm.free_range(gone.start).unwrap();
    // A bigger CPU range takes the freed one's place.
    let d = VaRange::new(BASE + K64, 2 * K64);
    create(&rig.mm, d, PageSize::Size4K);
    fill(&rig.mm, d, 3);
    let r = vm.handle_gpu_fault(c.start, Access::Read).unwrap();
    assert_eq!(r.range, c);
    let ranges: Vec<VaRange> = vm.svm_ranges().into_iter().map(|(r, _)| r).collect();
    assert_eq!(
        ranges,
        vec![a, c],
        "the stale range went, the live ones stayed"
    );
    assert!(vm.is_valid(a.start));
    let r = vm.handle_gpu_fault(d.start + K64, Access::Read).unwrap();
    assert_eq!(r.range, VaRange::new(d.start + K64, K64));
    check(&rig.mm, d, 3);
}

/// A CPU range freed and created again with the same page size but a larger extent (no
/// invalidate): a fault in it is served by a range cut from the new CPU range (the chunk it
/// calls for), not by the old range, and a fault on a neighbour then leaves it alone.
#[test]
fn recreated_with_another_extent_is_cut_again() {
    let rig = rig_default();
    let vm = &rig.vms[0];
    let old = VaRange::new(BASE, 10 * K4);
    create(&rig.mm, old, PageSize::Size4K);
    let r = vm.handle_gpu_fault(BASE + K4, Access::Write).unwrap();
    assert_eq!(
        r.range,
        VaRange::new(BASE + K4, K4),
        "10 pages: 4 KiB chunks"
    );
    rig.mm.free_range(BASE).unwrap();
    let new = VaRange::new(BASE, K64);
    create(&rig.mm, new, PageSize::Size4K);
    fill(&rig.mm, new, 7);
    let r = vm.handle_gpu_fault(BASE + K4, Access::Write).unwrap();
    assert_eq!(r.range, new, "served by a range of the old CPU range");
    let neighbour = VaRange::new(BASE + 2 * K64, K64);
    create(&rig.mm, neighbour, PageSize::Size4K);
    vm.handle_gpu_fault(neighbour.start, Access::Write).unwrap();
    assert!(vm.is_valid(BASE + K4));
    assert_eq!(
        vm.handle_gpu_fault(BASE + K4, Access::Write)
            .unwrap()
            .action,
        FaultAction::Valid
    );
    check(&rig.mm, new, 7);
}

/// Frees a CPU range and creates one at the same address with `second` pages (no
/// invalidate): the next faults serve the new range with its page size.
fn recreate_with_another_page_size(first: PageSize, second: PageSize) {
    let rig = rig_default();
    let vm = &rig.vms[0];
    let buf = VaRange::new(BASE, M2);
    create(&rig.mm, buf, first);
    fill(&rig.mm, buf, 5);
    let r = vm.handle_gpu_fault(buf.start, Access::Write).unwrap();
    assert_eq!(r.page_size, first);
    rig.mm.free_range(buf.start).unwrap();
    create(&rig.mm, buf, second);
    fill(&rig.mm, buf, 6);
    for access in [Access::Read, Access::Write, Access::Atomic, Access::Write] {
        let r = vm
            .handle_gpu_fault(buf.start + K64, access)
            .unwrap_or_else(|e| panic!("{access:?} fault after re-creation: {e}"));
        assert_eq!(r.page_size, second, "{r:?}");
        assert!(buf.contains_range(&r.range));
    }
    assert!(vm.is_valid(buf.start + K64));
    assert!(
        vm.svm_ranges().iter().all(|&(_, ps)| ps == second),
        "a range of the old page size is left: {:?}",
        vm.svm_ranges()
    );
    check_page_table(
        &rig,
        vm,
        buf.start + K64,
        Placement::Device(PagemapId(0)),
        None,
    );
    check(&rig.mm, buf, 6);
}

#[test]
fn recreated_with_bigger_pages_is_cut_again() {
    recreate_with_another_page_size(PageSize::Size4K, PageSize::Size64K);
    recreate_with_another_page_size(PageSize::Size4K, PageSize::Size2M);
}

#[test]
fn recreated_with_smaller_pages_is_cut_again() {
    recreate_with_another_page_size(PageSize::Size64K, PageSize::Size4K);
    recreate_with_another_page_size(PageSize::Size2M, PageSize::Size64K);
}
