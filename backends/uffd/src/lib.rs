//! # drm-pagemap-uffd
//!
//! Ranges that are real memory of this process: the application reads and writes them with
//! plain loads and stores through a pointer, and a page that lives in device memory faults
//! home through userfaultfd, as `migrate_to_ram` does in the kernel. No kernel module.
//!
//! # Design
//! The engine (`drm-pagemap-core`) has no `unsafe` and no system calls; everything that
//! maps memory lives here, and the engine offers two safe hooks:
//! - [`CpuMappings::take_out`](drm_pagemap_core::CpuMappings): called by a migration to
//!   device memory once its pages are locked and before any copy is issued (the kernel's
//!   `migrate_vma_setup` unmapping the pages). No CPU store can reach a page's frame while
//!   it is copied, nor after the frame went back to the pool.
//! - [`AddressSpace::with_cpu_page`](drm_pagemap_core::AddressSpace::with_cpu_page): the
//!   CPU-fault entry. It makes a page a system page (a device page comes home through the
//!   engine's CPU-fault path, its allocation's window, honouring the timeslice; an
//!   unpopulated page gets a zeroed frame; a page under migration is waited for until the
//!   migration commits or rolls back) and, under the engine's state lock, hands the handler
//!   the page's frame so it maps it before the page can move again.
//!
//! The memory:
//! - System memory is one memfd ([`MemfdMemory`]); frame `f` is the file's bytes at
//!   `f * 4096`. The engine and the simulated copy engines reach it through one shared
//!   mapping of the whole file (the pool); the simulated backend uses it as
//!   `SimConfig::host_bytes`. A freed frame's memory is given back (`FALLOC_FL_PUNCH_HOLE`),
//!   so a page resident on a device holds no host memory.
//! - A range ([`PointerRange`]) is address space reserved at the range's page alignment,
//!   mapped shared and registered with userfaultfd for missing and minor faults
//!   (`UFFD_FEATURE_MISSING_SHMEM`, `UFFD_FEATURE_MINOR_SHMEM`). The range's address in the
//!   engine is the pointer.
//! - **Coalesced** ([`PointerRange::coalesced`], the default where the host memory places
//!   frames, as the simulated backend's and CUDA's memfd memory do): the range gets a *home extent* of the frame
//!   file (`HostMemory::reserve_home`: `pages` frames taken out of the pool, holding no
//!   memory until written) and the engine range is made with it
//!   (`AddressSpace::create_range_homed`): whenever a page needs a system frame (first
//!   touch, back from a device) the engine asks for the page's own frame
//!   (`HostMemory::alloc_frames_at`). The range is then ONE mapping of the file at the
//!   extent, made at creation: a fault maps nothing, only `UFFDIO_CONTINUE`. The one
//!   exception is a page whose home frame is still held when it comes back (a frame kept
//!   aside for a copy that timed out and may still write it): it gets another frame, mapped
//!   over that page alone until it comes home again (the mapping then merges back).
//! - **Page by page** (a host memory that does not place frames; one with
//!   no room for the extent; [`UffdConfig::scattered`]): the range is first mapped from an
//!   empty memfd of its own, and each page's frame is mapped over it when the page faults.
//! - A fault (a first touch: missing; a page taken out: minor, its data still in the page
//!   cache; a page whose frame was freed: missing) is read by the fault handler, which calls
//!   `with_cpu_page`; under its lock, if the range's mapping of that page does not show the
//!   page's current frame (page by page: the frame it last mapped; coalesced: the home
//!   frame) it maps the frame there (`mmap MAP_FIXED|MAP_SHARED` of the pool
//!   file at the frame's offset, registered again), then `UFFDIO_CONTINUE` maps the page and
//!   wakes the thread. The handler never maps a frame the engine did not just name, so a
//!   stale mapping (a frame freed and reused elsewhere) only ever causes another fault.
//! - Taking pages out is `MADV_DONTNEED` on the range's mapping: page-table entries go, the
//!   page cache (the frame's data) stays, and the next access is a minor fault. A migration
//!   that rolls back leaves the frame in place: the next fault maps it again.
//! - Freeing a range frees it in the engine (waiting for migrations on it) and unmaps it.
//!
//! # The fault handler
//! Each [`PointerSpace`] has its own userfaultfd (made with its first range); one pool of
//! threads serves all of them for the whole process (leader/follower over one `epoll` set of
//! every space's descriptor and a stop signal):
//! - **Threads**: one at rest, however many spaces; a thread that takes a fault hands the
//!   polling to an idle thread or starts one, so a steady stream of faults keeps two; a
//!   helper idle for 200 ms ends. The pool starts with the first space's first range and ends
//!   (its threads joined) when the last space is dropped. [`handler_threads`] counts them.
//! - **Bound**: a space has at most 2 faults in service at once (its descriptor is armed
//!   `EPOLLONESHOT` again only below that), and the pool grows to 1 + 2 per space threads (at
//!   most 16). A slow fault of one space (a copy home behind a slow device, a migration it
//!   waits for, a failing copy retried for [`UffdConfig::fault_retry`]) therefore holds up
//!   only that space's further faults beyond its second; with up to 7 spaces another space's
//!   fault always finds a thread. Within one range faults are served one at a time (the
//!   range's mapping lock).
//! - **One space per address space**: [`PointerSpace::new`] on an address space whose
//!   space still lives is [`UffdError::AlreadyAttached`] ([`PointerSpace::attached`] returns
//!   the live one); after it is dropped a new one may attach (it takes over the CPU mapping
//!   layer the engine keeps). A second space is refused rather than returned because it may
//!   name another memory and configuration.
//!
//! # fork
//! A child process inherits nothing of a pointer range: the range's mappings (and every
//! frame mapped into it later) and the [`MemfdMemory`] pool are `MADV_DONTFORK`. A child that
//! touches a range's address, or whose copy of the engine reaches the pool, gets SIGSEGV. The
//! alternatives are worse: an inherited shared mapping would show the child the parent's
//! frames (its stores would land in the parent's memory, and a frame the parent frees and
//! reuses for another range would change under the child), an inherited hole would read
//! zeros, and no handler thread serves the child's faults (threads are not forked; the
//! userfaultfd registration is dropped in the child). The kernel's SVM ranges are not usefully
//! inherited either. `MADV_WIPEONFORK` applies to private anonymous memory only, not to
//! these shared mappings. The parent's ranges keep working while a child lives and after;
//! `fork` + `exec` (`std::process::Command`) is unaffected.
//!
//! # Limits
//! - **Mappings** ([`limits`]): a coalesced range is one mapping; it reserves 16 in the
//!   map-count check (itself, and the pieces around a few pages back in a frame other than
//!   their home; beyond that a fault whose `mmap` hits the limit is retried and then
//!   SIGBUS, counted in [`PointerSpace::fault_stats`]). A range mapped page by page needs up
//!   to one mapping per page (frames contiguous in the file and mapped at contiguous
//!   addresses merge); it is refused at creation ([`UffdError::MapCountLimit`]) unless that
//!   worst case fits under `vm.max_map_count` with headroom, counting the worst case of the
//!   live ranges: with 4 KiB pages and the usual limit of 65,530, about 240 MiB of such
//!   ranges; 2 MiB pages reach 120 GiB. CUDA's memfd memory places frames (its home
//!   extents' 64 MiB chunks are pinned when a frame of theirs is first handed out).
//! - **Home extents take pool capacity**: a coalesced range's extent is taken out of the
//!   host memory's frame pool for the range's life, even while its pages live on devices
//!   (it holds no memory then: only the pool's numbering). Coalesced pointer ranges
//!   therefore add up to at most the host memory's capacity; a range that does not fit is
//!   mapped page by page instead.
//! - **Unprivileged processes** (`vm.unprivileged_userfaultfd=0`): the userfaultfd is made
//!   with `UFFD_USER_MODE_ONLY`, which serves the application's loads and stores; a system
//!   call writing into a page of the range that is not mapped (`read(2)` into it) fails with
//!   `EFAULT` ([`PointerSpace::user_mode_only`] says so).
//! - **userfaultfd unavailable**: [`UffdError::Unavailable`] (or
//!   [`UffdError::MissingFeature`]) from the first [`PointerSpace::create_range`]; the
//!   explicit `AddressSpace::read` / `write` API needs none of this and keeps working.
//! - **A fault the engine cannot serve** (a device copy failing) cannot be returned to the
//!   faulting thread: the handler counts it ([`PointerSpace::fault_stats`],
//!   [`PointerSpace::last_fault_error`]) and retries every millisecond for
//!   [`UffdConfig::fault_retry`] (one second); then, or at once when the engine no longer has
//!   the range (freed through the address space instead of [`PointerRange`]), the faulting
//!   thread gets SIGBUS, as when the kernel's `migrate_to_ram` fails.
//! - **The fault handler** serves at most 2 faults of a space at once and has at most 16
//!   threads (see above).
//!
//! # Backends
//! [`support`] says which backends can give pointer ranges: the simulated backend (on
//! [`MemfdMemory`]); CUDA with the cargo feature `cuda` (on its host memory made with
//! `cuda.host_memfd=1`, as a `CudaHostFile`); Level Zero and plug-ins report
//! "unsupported: reason" for now.
//!
//! On CUDA the frames are pinned (each 64 MiB chunk of the memfd is registered with
//! `cuMemHostRegister`), and a registered page cannot be punched out of the file: a page
//! resident on a device keeps its host memory (its frame goes back to the backend's pool,
//! not to the system). The cost is pinned memory up to the peak of system-resident bytes,
//! rounded up to 64 MiB chunks, for as long as the backend lives.

mod attach;
#[cfg(feature = "cuda")]
mod cuda;
mod error;
mod handler;
pub mod limits;
mod memfd;
mod space;
mod sys;

#[cfg(feature = "cuda")]
pub use cuda::CudaHostFile;
pub use error::UffdError;
pub use handler::handler_threads;
pub use memfd::{FrameFile, MemfdMemory};
pub use space::{FaultStats, PointerRange, PointerSpace, UffdConfig};

/// Whether backend `name` can give pointer ranges: `Ok` for `"sim"` (with its host memory a
/// [`MemfdMemory`]) and, when this crate is built with feature `cuda`, for `"cuda"` (its
/// backend opened with `cuda.host_memfd=1`, its host memory given as a `CudaHostFile`);
/// [`UffdError::Unsupported`] with the reason otherwise.
pub fn support(name: &str) -> Result<(), UffdError> {
    let reason = match name {
        "sim" => return Ok(()),
        #[cfg(feature = "cuda")]
        "cuda" => return Ok(()),
        #[cfg(not(feature = "cuda"))]
        "cuda" => {
            "this build of drm-pagemap-uffd lacks its cargo feature `cuda` (which maps the \
             backend's memfd host memory, cuda.host_memfd=1)"
        }
        "level-zero" => {
            "Level Zero host memory is allocated by the driver (zeMemAllocHost) and cannot be \
             a memfd mapped at the range's addresses; importing a memfd needs an external \
             memory extension this backend does not use"
        }
        _ => {
            "a plug-in's system memory is its own and the plug-in interface has no way to \
             name it as a file a process can map"
        }
    };
    Err(UffdError::Unsupported {
        backend: name.to_string(),
        reason,
    })
}
