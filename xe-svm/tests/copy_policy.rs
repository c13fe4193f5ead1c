//! The copy policy end to end on sim, through the caps a backend declares: a backend without
//! a command limit (the sim) gets exactly the core's calls; one declaring a limit gets each
//! call in pieces; a pre-migrate fence whose native kind the backend declares, and a host
//! fence the backend bridges, both reach the backend still pending (nothing waits for them on
//! the faulting thread), and the copy still lands after them; statistics count calls,
//! commands and bytes. Covers every copy the engine makes through the context's pagemaps,
//! not only the fault handler's.

mod common;

use common::*;
use drm_pagemap_core::{
    AddressSpace, Backend, BackendError, CopyCaps, CopyOp, CopyRequest, DevmemBacking, DevmemOps,
    Direction, DmaAddr, Fence, FenceTimeline, HostFence, MigrateDetails, NativeFenceKind,
    NativeFenceKinds, PageSize, Pagemap, PagemapId, PagemapOps, Pfn, VaRange, stats::Location,
};
use drm_pagemap_sim::{SimBackend, SimConfig};
use drm_pagemap_testkit::fence::NativeTestFence as NativeGate;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use xe_svm::{Access, FaultAction, Placement, Svm, SvmConfig, SvmError};

#[test]
fn large_migrations_reach_the_sim_as_the_core_made_them() {
    for pages in [2048u64, 2049, 4097] {
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
        assert_eq!(
            (s.total_limited_calls(), s.total_commands()),
            (0, 0),
            "{pages} pages: the sim has no limit, the policy splits nothing"
        );
        // Counted once, by the core.
        let (sys, pm1) = (Location::System, Location::Pagemap(1));
        let core = rig.mm.stats().link(sys, pm1);
        assert_eq!((core.calls, core.pages, core.bytes), (1, pages, pages * K4));
        assert!(core.device_time_ns > 0, "{core:?}");
        let sim = rig.sim.stats(PagemapId(1)).unwrap();
        assert_eq!((sim.copy_to_devmem_calls, sim.pages_copied), (1, pages));
        // Evicting goes through the policy too (device 1 pushes its pages home).
        assert_eq!(rig.vms[1].evict_range(range).unwrap(), pages as usize);
        let back = rig.mm.stats().link(pm1, sys);
        assert_eq!((back.calls, back.bytes), (1, pages * K4));
        assert!(back.device_time_ns > 0, "{back:?}");
        assert_eq!(rig.svm.stats(rig.vms[1].device()).total_commands(), 0);
        assert_eq!(rig.sim.stats(PagemapId(1)).unwrap().copy_to_ram_calls, 1);
        check(&rig.mm, range, pages as u8);
        assert_eq!(rig.svm.stats(rig.vms[1].device()).cpu_fence_waits.count, 0);
    }
}

// ---------------------------------------------------------------------------------------
// A probe backend over a sim pagemap.

/// How the probe's pre-migrate fences look to the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    /// The sim's own clear fence.
    None,
    /// A gate with a native handle of a kind the probe declares.
    Native,
    /// A plain host fence.
    Host,
}

/// What the probe saw of one copy call.
#[derive(Clone, Debug)]
struct Seen {
    op: CopyOp,
    pages: usize,
    /// Entries with an address.
    live: usize,
    had_pre: bool,
    pre_pending: bool,
    pre_native: bool,
}

/// An allocation whose gate is still closed.
struct Closed {
    gate: Arc<HostFence>,
    clear: Option<Fence>,
    pfns: Vec<Pfn>,
    page_size: PageSize,
}

/// A sim pagemap that declares `caps`, records every copy call, and with a gate gives each
/// allocation a pre-migrate fence that signals only when the test opens it, after another
/// device (the helper) has written zeros over the pages: a copy that did not wait for the
/// fence is wiped.
struct Probe {
    inner: Arc<dyn DevmemOps>,
    ops: Arc<dyn PagemapOps>,
    caps: CopyCaps,
    gate: Gate,
    helper: Pagemap,
    seen: Mutex<Vec<Seen>>,
    closed: Mutex<Vec<Closed>>,
}

impl Probe {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn record(&self, op: CopyOp, req: &CopyRequest<'_>) {
        self.seen.lock().unwrap().push(Seen {
            op,
            pages: req.pages.len(),
            live: req.addrs.iter().filter(|a| !a.is_none()).count(),
            had_pre: req.pre_fence.is_some(),
            pre_pending: req.pre_fence.is_some_and(|f| !f.is_signaled()),
            pre_native: req.pre_fence.is_some_and(|f| f.native().is_some()),
        });
    }

    /// Opens every closed gate: waits for the sim's clear, zeroes the pages again from the
    /// helper device, then signals.
    fn open_gates(&self) {
        let closed: Vec<Closed> = std::mem::take(&mut *self.closed.lock().unwrap());
        for c in closed {
            if let Some(f) = &c.clear {
                f.wait().unwrap();
            }
            let helper = self.helper.devmem();
            let zero = helper.allocate(1, c.page_size).unwrap();
            zero.wait_ready().unwrap();
            let mut zpfn = [Pfn(0)];
            helper.populate_devmem_pfn(&zero, &mut zpfn).unwrap();
            let n = c.pfns.len();
            let mut addrs = vec![DmaAddr::NONE; n];
            let hdev = self.helper.device();
            self.ops
                .device_map(
                    hdev,
                    &c.pfns,
                    c.page_size,
                    Direction::FromDevice,
                    &mut addrs,
                )
                .unwrap();
            let pages = vec![zpfn[0]; n];
            let req = CopyRequest {
                page_size: c.page_size,
                pages: &pages,
                addrs: &addrs,
                pre_fence: None,
            };
            helper.copy_to_ram(&req).unwrap().wait().unwrap();
            self.ops
                .device_unmap(hdev, &addrs, c.page_size, Direction::FromDevice);
            helper.devmem_release(zero);
            c.gate.signal();
        }
    }
}

impl DevmemOps for Probe {
    fn allocate(&self, npages: usize, page_size: PageSize) -> Result<DevmemBacking, BackendError> {
        let mut b = self.inner.allocate(npages, page_size)?;
        if self.gate == Gate::None {
            return Ok(b);
        }
        let mut pfns = vec![Pfn(0); npages];
        self.inner.populate_devmem_pfn(&b, &mut pfns)?;
        let gate = FenceTimeline::new().host_fence();
        let clear = b.pre_migrate_fence.take();
        b.pre_migrate_fence = Some(match self.gate {
            Gate::Native => Fence::new(NativeGate(gate.clone())),
            _ => Fence::from_host(gate.clone()),
        });
        self.closed.lock().unwrap().push(Closed {
            gate,
            clear,
            pfns,
            page_size,
        });
        Ok(b)
    }
    fn populate_devmem_pfn(&self, b: &DevmemBacking, out: &mut [Pfn]) -> Result<(), BackendError> {
        self.inner.populate_devmem_pfn(b, out)
    }
    fn copy_to_devmem(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.record(CopyOp::ToDevmem, req);
        self.inner.copy_to_devmem(req)
    }
    fn copy_to_ram(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.record(CopyOp::ToRam, req);
        self.inner.copy_to_ram(req)
    }
    fn devmem_release(&self, b: DevmemBacking) {
        self.inner.devmem_release(b)
    }
    fn devmem_release_unused(&self, b: DevmemBacking) {
        self.inner.devmem_release_unused(b)
    }
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
    fn caps(&self) -> CopyCaps {
        self.caps
    }
}

/// Three sim devices: 0 and 1 in an xe-svm context behind probes declaring
/// `caps(sim's caps)`, 2 the helper that re-clears gated allocations.
fn probe_rig(caps: impl Fn(CopyCaps) -> CopyCaps, gate: Gate) -> (Rig, Vec<Arc<Probe>>) {
    let sim = Arc::new(
        SimBackend::new(SimConfig {
            devices: 3,
            device_capacity: 256 << 20,
            host_capacity: 1 << 30,
            ..SimConfig::default()
        })
        .unwrap(),
    );
    let mm = Arc::new(AddressSpace::new(sim.host_memory()));
    let mut pms = sim.pagemap_per_device().unwrap();
    let helper = pms.pop().unwrap();
    let probes: Vec<Arc<Probe>> = pms
        .iter()
        .map(|pm| {
            Arc::new(Probe {
                inner: pm.devmem().clone(),
                ops: pm.ops().clone(),
                caps: caps(pm.devmem().caps()),
                gate,
                helper: helper.clone(),
                seen: Mutex::new(Vec::new()),
                closed: Mutex::new(Vec::new()),
            })
        })
        .collect();
    let wrapped = pms
        .iter()
        .zip(&probes)
        .map(|(pm, p)| pm.with_ops(pm.ops().clone(), p.clone()))
        .collect();
    let svm = Svm::new(mm.clone(), wrapped, SvmConfig::default()).unwrap();
    let vms = (0..2).map(|d| svm.vm(PagemapId(d)).unwrap()).collect();
    (Rig { sim, mm, svm, vms }, probes)
}

/// Waits until `probe` saw `n` copy calls (the faulting thread issued them: it did not block
/// on the closed gate first).
fn issued(probe: &Probe, n: usize) -> Vec<Seen> {
    eventually(
        &format!("{n} copy calls issued while the pre-migrate fence is pending"),
        || probe.seen().len() >= n,
    );
    probe.seen()
}

#[test]
fn a_backend_without_a_limit_gets_exactly_the_core_calls() {
    let (rig, probes) = probe_rig(|c| c, Gate::None);
    assert_eq!(probes[0].caps.max_command_bytes, None, "the sim's");
    let range = VaRange::new(BASE, 4097 * K4);
    create(&rig.mm, range, PageSize::Size4K);
    fill(&rig.mm, range, 1);
    // Pages scattered over both devices, then all of them to device 1: a peer push by
    // device 0 and a pull by device 1, each one call whatever its layout.
    rig.mm
        .migrate(
            VaRange::new(BASE, 1000 * K4),
            PagemapId(0),
            &MigrateDetails::default(),
        )
        .unwrap();
    let before: Vec<usize> = probes.iter().map(|p| p.seen().len()).collect();
    let r = rig
        .mm
        .migrate(
            range,
            PagemapId(1),
            &MigrateDetails {
                source_peer_migrates: true,
                ..MigrateDetails::default()
            },
        )
        .unwrap();
    for (k, probe) in probes.iter().enumerate() {
        let got: Vec<(CopyOp, usize)> = probe.seen()[before[k]..]
            .iter()
            .map(|s| (s.op, s.live))
            .collect();
        let want: Vec<(CopyOp, usize)> = r
            .calls
            .iter()
            .filter(|c| c.executor == PagemapId(k as u8))
            .map(|c| (c.op, c.pages))
            .collect();
        assert!(!want.is_empty(), "device {k} copied");
        assert_eq!(
            got, want,
            "device {k}: one backend call per core call, whole"
        );
        let s = rig.svm.stats(rig.vms[k].device());
        assert_eq!(s.total_commands(), 0, "device {k}: nothing split");
    }
    check(&rig.mm, range, 1);
}

#[test]
fn a_backend_declaring_a_limit_gets_split_calls_ordered_behind_the_first() {
    let limit = |c| CopyCaps {
        max_command_bytes: Some(xe_svm::copy::MAX_COMMAND_BYTES),
        ..c
    };
    let (rig, probes) = probe_rig(limit, Gate::Host);
    let pages = 4097u64;
    let range = VaRange::new(BASE, pages * K4);
    create(&rig.mm, range, PageSize::Size4K);
    fill(&rig.mm, range, 2);
    let mm = rig.mm.clone();
    let t = std::thread::spawn(move || {
        mm.migrate(range, PagemapId(0), &MigrateDetails::default())
            .map(|r| r.calls.len())
    });
    let seen = issued(&probes[0], 3);
    let lens: Vec<usize> = seen.iter().map(|s| s.pages).collect();
    assert_eq!(lens, vec![2048, 2048, 1]);
    assert!(seen[0].had_pre && seen[0].pre_pending, "the first waits");
    assert!(
        !seen[1].had_pre && !seen[2].had_pre,
        "in order on the sim's queue"
    );
    probes[0].open_gates();
    assert_eq!(t.join().unwrap().unwrap(), 1, "one call from the engine");
    // The later pieces were ordered behind the first (which waited for the re-clear).
    check(&rig.mm, range, 2);
    let s = rig.svm.stats(rig.vms[0].device());
    assert_eq!(
        (s.commands_to_devmem.calls, s.commands_to_devmem.commands),
        (1, 3)
    );
    // The read above brought the pages home through device 0: pieces of at most 8 MiB.
    let back: Vec<usize> = probes[0]
        .seen()
        .iter()
        .filter(|s| s.op == CopyOp::ToRam)
        .map(|s| s.pages)
        .collect();
    assert!(
        !back.is_empty() && back.iter().all(|&n| n <= 2048),
        "{back:?}"
    );
    let (calls, commands) = (s.commands_to_ram.calls, s.commands_to_ram.commands);
    assert_eq!(commands, back.len() as u64);
    assert!(calls >= 1 && calls <= commands);
    // The core counts the engine's calls, not the pieces.
    let core = rig.mm.stats();
    let to0 = core.link(Location::System, Location::Pagemap(0));
    assert_eq!((to0.calls, to0.bytes), (1, pages * K4));
    assert_eq!(
        core.link(Location::Pagemap(0), Location::System).calls,
        calls
    );
    assert_eq!((s.bridged_fences, s.cpu_fence_waits.count), (1, 0));
    assert_eq!(s.ordering_repairs, 0);
}

/// A pre-migrate fence the backend can wait on natively, and a host fence it bridges: the
/// fault issues its copy while the fence is pending (no CPU wait on the faulting thread),
/// the sim's engine waits for it, and the data lands after the late clear it guards.
#[test]
fn pre_fences_reach_the_backend_unwaited_and_the_copy_orders_after_them() {
    for gate in [Gate::Native, Gate::Host] {
        let declare = |c| CopyCaps {
            native_fence_kinds: NativeFenceKinds::one(NativeFenceKind::PLUGIN_FIRST),
            ..c
        };
        let (rig, probes) = probe_rig(declare, gate);
        let buf = VaRange::new(BASE, M2);
        create(&rig.mm, buf, PageSize::Size4K);
        fill(&rig.mm, buf, 3);
        let vm = rig.vms[0].clone();
        let t =
            std::thread::spawn(move || vm.handle_gpu_fault(BASE, Access::Write).map_err(Box::new));
        let seen = issued(&probes[0], 1);
        assert_eq!(seen[0].op, CopyOp::ToDevmem);
        assert!(seen[0].pre_pending, "{gate:?}: the backend saw it pending");
        assert_eq!(seen[0].pre_native, gate == Gate::Native);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.is_finished(), "{gate:?}: the copy did not wait");
        probes[0].open_gates();
        let r = t.join().unwrap().unwrap();
        assert_eq!(r.action, FaultAction::Migrated { pages: 512 });
        check_page_table(
            &rig,
            &rig.vms[0],
            BASE,
            Placement::Device(PagemapId(0)),
            None,
        );
        let s = rig.svm.stats(rig.vms[0].device());
        let native = u64::from(gate == Gate::Native);
        assert_eq!(
            (s.fence_dependencies, s.bridged_fences),
            (native, 1 - native),
            "{gate:?}"
        );
        assert_eq!(s.cpu_fence_waits.count, 0, "{gate:?}");
        assert_eq!(s.total_commands(), 0, "no limit: nothing split");
        // The core timed the copy from its submission to the engine seeing it done: it
        // waited for the gate.
        let core = rig.mm.stats().link(Location::System, Location::Pagemap(0));
        assert_eq!((core.calls, core.bytes), (1, M2), "{gate:?}");
        assert!(core.device_time_ns >= 20_000_000, "{gate:?}: {core:?}");
        // The data landed after the re-clear: read back through the CPU path.
        check(&rig.mm, buf, 3);
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
