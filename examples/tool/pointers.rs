//! `--pointers`: the range is memory of the process (`drm_pagemap::uffd`), and the tool
//! fills and checks it with plain CPU stores and loads through its pointer (a page on a
//! device faults home through userfaultfd) instead of `AddressSpace::write` / `read`.

use drm_pagemap::sim::{SimBackend, SimConfig};
use drm_pagemap::uffd::{self, FrameFile, MemfdMemory, PointerRange};
use drm_pagemap::{AddressSpace, Backend, BackendConfig, Error};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// How a tool's CPU side reaches its range: the explicit API (`AddressSpace::write` /
/// `read`), or plain stores and loads through the range's pointer.
pub enum Cpu<'a> {
    /// `AddressSpace::write` / `read`.
    Explicit(&'a AddressSpace),
    /// Through the pointer of this range.
    Pointer(&'a PointerRange),
}

/// Why a CPU access failed.
#[derive(Debug)]
pub enum CpuError {
    /// The explicit API's error.
    Engine(Error),
    /// The access does not fit the pointer range.
    Pointer(String),
}

impl std::fmt::Display for CpuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CpuError::Engine(e) => write!(f, "{e}"),
            CpuError::Pointer(e) => write!(f, "{e}"),
        }
    }
}

impl Cpu<'_> {
    /// Writes `data` at address `va`.
    pub fn write(&self, va: u64, data: &[u8]) -> Result<(), CpuError> {
        match self {
            Cpu::Explicit(mm) => mm.write(va, data).map_err(CpuError::Engine),
            Cpu::Pointer(r) => store(r, va.wrapping_sub(r.range().start), data)
                .map_err(|e| CpuError::Pointer(format!("storing through the pointer: {e}"))),
        }
    }

    /// Reads `buf.len()` bytes at address `va`.
    pub fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), CpuError> {
        match self {
            Cpu::Explicit(mm) => mm.read(va, buf).map_err(CpuError::Engine),
            Cpu::Pointer(r) => load(r, va.wrapping_sub(r.range().start), buf)
                .map_err(|e| CpuError::Pointer(format!("loading through the pointer: {e}"))),
        }
    }
}

/// Why `backend` cannot run with `--pointers`, if it cannot: `uffd::support`'s reason (the
/// tools run pointer ranges wherever the library gives them: the simulated backend, and CUDA
/// in a build with the `cuda` feature).
pub fn unsupported(backend: &str) -> Option<String> {
    uffd::support(backend).err().map(|e| e.to_string())
}

/// A backend and the frame file its pointer ranges map (see [`open_backend`]).
pub type PointerBackend = (Arc<dyn Backend>, Arc<dyn FrameFile>);

/// A backend whose system memory pointer ranges map, and that memory as the frame file of
/// a `PointerSpace`: the simulated backend over memfd memory of its host capacity, or the
/// CUDA backend opened with `cuda.host_memfd=1` (its pinned memory a memfd). `name` is a
/// backend `unsupported` accepted ("auto" resolved).
pub fn open_backend(name: &str, config: &BackendConfig) -> Result<PointerBackend, String> {
    match name {
        "sim" => {
            let sim = SimConfig::from_backend_config(config).map_err(|e| e.to_string())?;
            let capacity = sim.host_capacity;
            let (sim, mem) = sim_over_memfd(sim, capacity)?;
            Ok((Arc::new(sim), mem))
        }
        #[cfg(feature = "cuda")]
        "cuda" => {
            use drm_pagemap::cuda::{CudaBackend, CudaConfig};
            let cuda = CudaConfig {
                host_memfd: true,
                ..CudaConfig::from_backend_config(config).map_err(|e| e.to_string())?
            };
            let backend = CudaBackend::new(cuda).map_err(|e| format!("backend cuda: {e}"))?;
            let file = uffd::CudaHostFile::new(backend.pinned_host().clone())
                .map_err(|e| e.to_string())?;
            Ok((Arc::new(backend), file))
        }
        other => Err(unsupported(other).unwrap_or_else(|| {
            format!("pointer ranges unsupported on backend {other} in this tool")
        })),
    }
}

/// The simulated backend over memfd memory of `capacity` bytes (the memory a pointer range
/// maps its frames from).
fn sim_over_memfd(
    mut config: SimConfig,
    capacity: u64,
) -> Result<(SimBackend, Arc<MemfdMemory>), String> {
    let mem = Arc::new(MemfdMemory::new(capacity).map_err(|e| e.to_string())?);
    config.host_bytes = Some(mem.clone());
    let sim = SimBackend::new(config).map_err(|e| format!("backend sim: {e}"))?;
    Ok((sim, mem))
}

/// The 8-byte words `[offset, offset + len)` of `range`, or why not.
fn words(range: &PointerRange, offset: u64, len: usize) -> Result<std::ops::Range<u64>, String> {
    let end = offset.checked_add(len as u64).filter(|&e| e <= range.len());
    match end {
        Some(end) if offset.is_multiple_of(8) && end.is_multiple_of(8) => Ok(offset / 8..end / 8),
        _ => Err(format!(
            "[{offset:#x}, +{len:#x}) is not whole words inside the {}-byte range",
            range.len()
        )),
    }
}

/// Stores `data` at byte `offset` of `range` through its pointer (8-byte stores; `offset`
/// and the length are multiples of 8).
fn store(range: &PointerRange, offset: u64, data: &[u8]) -> Result<(), String> {
    for (i, w) in words(range, offset, data.len())?.zip(data.chunks_exact(8)) {
        let v = u64::from_ne_bytes(w.try_into().unwrap_or_default());
        match range.word(i) {
            Some(word) => word.store(v, Ordering::Relaxed),
            None => return Err(format!("word {i} is outside the range")),
        }
    }
    Ok(())
}

/// Loads `buf.len()` bytes at byte `offset` of `range` through its pointer (8-byte loads;
/// `offset` and the length are multiples of 8).
fn load(range: &PointerRange, offset: u64, buf: &mut [u8]) -> Result<(), String> {
    for (i, w) in words(range, offset, buf.len())?.zip(buf.chunks_exact_mut(8)) {
        match range.word(i) {
            Some(word) => w.copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes()),
            None => return Err(format!("word {i} is outside the range")),
        }
    }
    Ok(())
}
