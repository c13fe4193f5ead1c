//! Shared set-up of the backend's tests: the software driver through the real loader, one
//! test at a time (fault injection and the driver's counters are process-wide).

#![allow(dead_code)]

use drm_pagemap_core::{
    Backend, DeviceId, DevmemBacking, Direction, DmaAddr, Fence, HostFrame, HostMemory, PageSize,
    Pagemap, PagemapId, PagemapSpec, Pfn,
};
use drm_pagemap_level_zero::testing::{SoftCounters, SoftDriver};
use drm_pagemap_level_zero::{LevelZeroBackend, LevelZeroConfig, probe};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Devices of the software driver in these tests: 0 and 1 are peers, 2 is alone.
pub const DEVICES: &str = "3";
pub const PEER_GROUPS: &str = "0,1;2";
/// Device memory per device.
pub const DEVICE_MEMORY: u64 = 256 << 20;

pub const LONG: Duration = Duration::from_secs(30);

/// One test's backend, the driver's control, and the lock that keeps other tests out.
pub struct Env {
    pub backend: LevelZeroBackend,
    pub soft: SoftDriver,
    _guard: MutexGuard<'static, ()>,
}

/// The backend on the software driver, or `None` (after printing `skipped: level-zero:
/// <reason>` once) where the loader or the driver is missing.
pub fn setup(config: LevelZeroConfig) -> Option<Env> {
    static LOCK: Mutex<()> = Mutex::new(());
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    static SKIPPED: std::sync::Once = std::sync::Once::new();
    let guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let ready = READY.get_or_init(|| {
        for (k, v) in [
            ("ZE_SOFT_DEVICES", DEVICES.to_string()),
            ("ZE_SOFT_PEER_GROUPS", PEER_GROUPS.to_string()),
            ("ZE_SOFT_DEVICE_MEMORY", DEVICE_MEMORY.to_string()),
        ] {
            if std::env::var_os(k).is_none() {
                // SAFETY: set once, under the test lock, before the loader is opened and before
                // zeInit (the driver reads them then); nothing else of this process reads them.
                unsafe { std::env::set_var(k, v) };
            }
        }
        ze_soft::route_loader()?;
        probe()
    });
    if let Err(reason) = ready {
        SKIPPED.call_once(|| println!("skipped: level-zero: {reason}"));
        return None;
    }
    let backend = LevelZeroBackend::new(config).expect("the probe found the driver");
    let soft = SoftDriver::new(&backend).expect("the software driver's control entry");
    soft.reset().expect("reset");
    Some(Env {
        backend,
        soft,
        _guard: guard,
    })
}

impl Env {
    pub fn counters(&self) -> SoftCounters {
        self.soft.counters().expect("counters")
    }

    pub fn pagemap(&self, id: u8, device: u32, capacity: u64) -> Pagemap {
        self.backend
            .create_pagemap(&PagemapSpec {
                id: PagemapId(id),
                device: DeviceId(device),
                owner: None,
                capacity_bytes: capacity,
            })
            .expect("pagemap")
    }

    pub fn host(&self) -> std::sync::Arc<dyn HostMemory> {
        self.backend.host_memory()
    }
}

/// The byte at `offset` of page `page` of pattern `seed`.
pub fn byte(seed: u8, page: usize, offset: usize) -> u8 {
    (seed as usize)
        .wrapping_mul(31)
        .wrapping_add(page * 7)
        .wrapping_add(offset / 64)
        .wrapping_add(offset) as u8
}

/// `n` system pages of `ps` filled with pattern `seed` (0: zeros), mapped for `device`.
pub fn host_pages(
    host: &dyn HostMemory,
    n: usize,
    ps: PageSize,
    seed: u8,
    device: u32,
) -> (Vec<HostFrame>, Vec<DmaAddr>) {
    let mut frames = vec![HostFrame(0); n];
    host.alloc_frames(ps, &mut frames).expect("host frames");
    let len = ps.bytes() as usize;
    let mut buf = vec![0u8; len];
    for (i, &f) in frames.iter().enumerate() {
        for (o, b) in buf.iter_mut().enumerate() {
            *b = if seed == 0 { 0 } else { byte(seed, i, o) };
        }
        host.write(f, 0, &buf).expect("host memory");
    }
    let mut addrs = vec![DmaAddr::NONE; n];
    host.map_frames(
        DeviceId(device),
        &frames,
        ps,
        Direction::ToDevice,
        &mut addrs,
    )
    .expect("map frames");
    (frames, addrs)
}

/// Whether system pages hold pattern `seed` (0: zeros); the first mismatch otherwise.
pub fn check_host(
    host: &dyn HostMemory,
    frames: &[HostFrame],
    ps: PageSize,
    seed: u8,
) -> Result<(), String> {
    let mut buf = vec![0u8; ps.bytes() as usize];
    for (i, &f) in frames.iter().enumerate() {
        host.read(f, 0, &mut buf).expect("host memory");
        for (o, &b) in buf.iter().enumerate() {
            let want = if seed == 0 { 0 } else { byte(seed, i, o) };
            if b != want {
                return Err(format!("page {i} offset {o}: {b} != {want}"));
            }
        }
    }
    Ok(())
}

/// An allocation of `n` pages of `ps` on `pm`, ready (its clear waited for), and its pfns.
pub fn alloc(pm: &Pagemap, n: usize, ps: PageSize) -> (DevmemBacking, Vec<Pfn>) {
    let b = pm.devmem().allocate(n, ps).expect("allocate");
    b.wait_ready().expect("clear");
    let mut pfns = vec![Pfn(0); n];
    pm.devmem()
        .populate_devmem_pfn(&b, &mut pfns)
        .expect("pfns");
    (b, pfns)
}

pub fn wait(f: &Fence) {
    f.wait_timeout(LONG).expect("fence");
}

/// Threads of this process now.
pub fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}
