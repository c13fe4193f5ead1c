//! Many threads on three VMs faulting on overlapping ranges (different chunkings, peer
//! preferences, atomics), with device memory under pressure and CPU threads writing and
//! reading their own words of the same pages: no deadlock (watchdog), no lost data, no
//! leaked allocation.

mod common;

use common::*;
use drm_pagemap_core::{PageLocation, PageSize, PagemapId, VaRange};
use std::sync::Arc;
use std::time::Duration;
use xe_svm::{Access, Attributes, Placement, PreferredLocation, SvmConfig, SvmError};

fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

const BUF: VaRange = VaRange::new(BASE, 8 * M2);
const SMALL: VaRange = VaRange::new(BASE + 16 * M2, (1 << 20) + K64);
const FAULT_THREADS: u64 = 6;
const FAULTS_PER_THREAD: usize = 120;
const CPU_THREADS: u64 = 2;
const CPU_OPS: usize = 150;

/// Where CPU thread `t` keeps its word in page `p` of `BUF`.
fn slot(p: u64, t: u64) -> u64 {
    BUF.start + p * K4 + 1024 + t * 8
}

#[test]
fn many_threads_on_overlapping_ranges() {
    let rig = Arc::new(rig(Opts {
        svm: SvmConfig {
            capacity: Some(6 * M2 / 2),
            ..SvmConfig::default()
        },
        ..Opts::default()
    }));
    create(&rig.mm, BUF, PageSize::Size4K);
    create(&rig.mm, SMALL, PageSize::Size4K);
    fill(&rig.mm, BUF, 1);
    fill(&rig.mm, SMALL, 2);
    // VM 1 cuts the middle of BUF into 64 KiB ranges (overlapping VM 0's 2 MiB ones); VM 2
    // prefers pagemap 0 for the second half and maps it remotely.
    rig.vms[1]
        .madvise(
            VaRange::new(BUF.start + M2 + K64, 2 * M2),
            Attributes {
                timeslice: Duration::from_micros(200),
                ..Attributes::default()
            },
        )
        .unwrap();
    rig.vms[2]
        .madvise(
            VaRange::new(BUF.start + 4 * M2, 4 * M2),
            Attributes {
                preferred: PreferredLocation::Pagemap(PagemapId(0)),
                ..Attributes::default()
            },
        )
        .unwrap();
    let r2 = rig.clone();
    let (errors, cpu_writes) = watchdog(Duration::from_secs(300), move || {
        let mut faulters = Vec::new();
        for t in 0..FAULT_THREADS {
            let rig = r2.clone();
            faulters.push(std::thread::spawn(move || {
                let vm = &rig.vms[(t % 3) as usize];
                let mut seed = 0x1234_5678_9abc_def1 ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let mut retryable = 0u32;
                for _ in 0..FAULTS_PER_THREAD {
                    let (range, r) = if next(&mut seed).is_multiple_of(5) {
                        (SMALL, next(&mut seed) % SMALL.len)
                    } else {
                        (BUF, next(&mut seed) % BUF.len)
                    };
                    let access = match next(&mut seed) % 3 {
                        0 => Access::Read,
                        1 => Access::Write,
                        _ => Access::Atomic,
                    };
                    match vm.handle_gpu_fault(range.start + r, access) {
                        Ok(rep) => {
                            assert!(rep.range.contains_range(&VaRange::new(range.start + r, 1)))
                        }
                        Err(e @ SvmError::Unstable { .. }) => {
                            let _ = e;
                            retryable += 1;
                        }
                        Err(e)
                            if access == Access::Atomic
                                && (e.busy_reason().is_some()
                                    || matches!(e, SvmError::OutOfDeviceMemory { .. })) =>
                        {
                            retryable += 1;
                        }
                        Err(e) => panic!(
                            "thread {t}: {access:?} fault at {:#x}: {e}",
                            range.start + r
                        ),
                    }
                }
                retryable
            }));
        }
        let mut writers = Vec::new();
        for t in 0..CPU_THREADS {
            let rig = r2.clone();
            writers.push(std::thread::spawn(move || {
                let mut seed = 0xdead_beef_0000_0001 ^ (t + 7).wrapping_mul(0x2545_f491_4f6c_dd1d);
                let mut last: Vec<Option<u64>> = vec![None; (BUF.len / K4) as usize];
                for k in 0..CPU_OPS as u64 {
                    let p = next(&mut seed) % (BUF.len / K4);
                    let v = (t << 56) | (k << 20) | p;
                    rig.mm.write(slot(p, t), &v.to_le_bytes()).unwrap();
                    last[p as usize] = Some(v);
                    let mut back = [0u8; 8];
                    rig.mm.read(slot(p, t), &mut back).unwrap();
                    assert_eq!(
                        u64::from_le_bytes(back),
                        v,
                        "CPU thread {t} lost its write to page {p}"
                    );
                }
                last
            }));
        }
        let errors: u32 = faulters.into_iter().map(|h| h.join().unwrap()).sum();
        let writes: Vec<Vec<Option<u64>>> =
            writers.into_iter().map(|h| h.join().unwrap()).collect();
        (errors, writes)
    });
    // Faults mostly succeed.
    let s = rig.svm.total_stats();
    assert!(s.total_faults() >= (FAULT_THREADS * FAULTS_PER_THREAD as u64) - errors as u64);
    // Every valid page table points where the pages are.
    for vm in &rig.vms {
        for (va, _) in vm.svm_ranges() {
            if !vm.is_valid(va.start) {
                continue;
            }
            let locs = rig.mm.locations(va).unwrap();
            vm.with_page_table(va.start, |pt| {
                for (pte, loc) in pt.ptes.iter().zip(&locs) {
                    let want = match loc {
                        PageLocation::System => Placement::System,
                        PageLocation::Device { pagemap, .. } => Placement::Device(*pagemap),
                        PageLocation::Unpopulated => Placement::None,
                    };
                    assert_eq!(pte.placement, want, "{}", pt.range);
                    assert!(!pte.addr.is_none());
                }
            });
        }
    }
    for pm in 0..3u8 {
        let m = rig.svm.memory(PagemapId(pm)).unwrap();
        assert!(m.peak <= m.capacity, "{m:?}");
    }
    // The data: the pattern, with each CPU thread's last word in each page it wrote.
    let mut want = pattern(BUF, 1);
    for (t, last) in cpu_writes.iter().enumerate() {
        for (p, v) in last.iter().enumerate() {
            if let Some(v) = v {
                let off = (slot(p as u64, t as u64) - BUF.start) as usize;
                want[off..off + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    let mut got = vec![0u8; BUF.len as usize];
    rig.mm.read(BUF.start, &mut got).unwrap();
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("data lost at {:#x}", BUF.start + i as u64);
    }
    check(&rig.mm, SMALL, 2);
    assert!(
        rig.mm.allocations().is_empty(),
        "leaked: {:?}",
        rig.mm.allocations()
    );
    for pm in 0..3u8 {
        assert_eq!(rig.svm.memory(PagemapId(pm)).unwrap().used, 0);
    }
    println!("{s}");
}
