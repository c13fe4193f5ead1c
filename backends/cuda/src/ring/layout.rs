//! The ring's shared memory block: a [`Header`] of control words, then [`RING_SLOTS`]
//! descriptors ([`Desc`]). The layout is `dpm_ring_header` / `dpm_ring_desc` of
//! `kernels/pages.cu` (a unit test checks the two agree). The block is pinned host memory on
//! CUDA (both the CPU and the persistent kernel reach it) and plain heap memory in tests; a
//! [`RingBlock`] hands it out.

use std::sync::atomic::AtomicU64;

/// Descriptor slots of a ring (a power of two: slot of seq `s` is `s % RING_SLOTS`).
pub(crate) const RING_SLOTS: usize = 64;
/// Most entries of one descriptor (as `dpm_copy_small`'s lists).
pub(crate) const RING_ENTRIES: usize = 64;

/// The control words. Each side writes its own words only: the CPU `head` and `stop`, the
/// consumer `done`, `alive`, `exited` and `fault` (no read-modify-write on either side: a
/// GPU behind PCIe has no atomics on host memory). Producer and consumer words sit in
/// different 64-byte lines.
#[repr(C, align(64))]
pub(crate) struct Header {
    /// CPU -> consumer: seq of the newest published descriptor (0: none yet). Written after
    /// the descriptor (release).
    pub head: AtomicU64,
    /// CPU -> consumer: an instance of epoch `e` returns once it has nothing to do and
    /// `stop >= e`.
    pub stop: AtomicU64,
    _cpu: [u64; 6],
    /// Consumer -> CPU: seq of the newest completed descriptor; every lower seq is complete
    /// too (descriptors complete in order). Written after the copy's bytes are visible.
    pub done: AtomicU64,
    /// Consumer -> CPU: the epoch of the instance that started last (its lease).
    pub alive: AtomicU64,
    /// Consumer -> CPU: the epoch of the instance that returned last.
    pub exited: AtomicU64,
    /// Consumer -> CPU: seq of a descriptor found malformed (its seq word never matched);
    /// the instance returned without copying it. 0: none.
    pub fault: AtomicU64,
    /// Consumer -> CPU (NVRTC kernels; the fallback PTX leaves them 0): `%globaltimer`
    /// nanoseconds summed over the copies, for profiles: head seen -> slot loaded, slot
    /// loaded -> bytes copied and visible, -> `done` written; and the copies timed.
    pub clocks: [AtomicU64; 4],
}

/// One descriptor slot: the copy (`body`) and the seq it was written for, stored last.
#[repr(C)]
pub(crate) struct Desc {
    /// The seq this slot holds, written (release) after `body`: a consumer takes the slot
    /// for seq `s` only when it reads `s` here, so a stale slot is never taken for a new one.
    pub seq: AtomicU64,
    /// The copy.
    pub body: DescBody,
}

/// The copy of one descriptor: `n_entries` entries; entry `e` has its own page at
/// `own_base + pfns[e] * 4096` and the other side at `addrs[e]` (0: skipped); pages of
/// `1 << item_shift` 4 KiB items; `to_own != 0`: other -> own, else own -> other. As
/// `dpm_copy_small`'s parameters.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct DescBody {
    pub own_base: u64,
    pub n_entries: u32,
    pub item_shift: u32,
    pub to_own: u32,
    pub _pad: u32,
    pub addrs: [u64; RING_ENTRIES],
    pub pfns: [u32; RING_ENTRIES],
}

impl DescBody {
    /// An empty descriptor.
    pub(crate) const EMPTY: DescBody = DescBody {
        own_base: 0,
        n_entries: 0,
        item_shift: 0,
        to_own: 0,
        _pad: 0,
        addrs: [0; RING_ENTRIES],
        pfns: [0; RING_ENTRIES],
    };
}

/// Bytes of a ring's block.
pub(crate) const RING_BYTES: usize =
    std::mem::size_of::<Header>() + RING_SLOTS * std::mem::size_of::<Desc>();

/// Memory that holds one ring.
///
/// # Safety
/// An implementor guarantees that [`RingBlock::host`] points to [`RING_BYTES`] bytes,
/// 64-byte aligned, zeroed when the block was made, readable and writable by the CPU at that
/// address for as long as the block lives (it never moves), and that [`RingBlock::device`]
/// is the address the consumer reaches the same bytes at.
pub(crate) unsafe trait RingBlock: Send + Sync {
    /// The CPU address of the block.
    fn host(&self) -> *mut u8;
    /// The consumer's address of the block (the CPU address for a CPU consumer).
    fn device(&self) -> u64;
}

/// A ring block on the heap, for CPU consumers (tests).
pub(crate) struct HeapBlock {
    // INVARIANT: `p` is an `alloc_zeroed` allocation of `layout()`, freed only by Drop.
    p: *mut u8,
}

// SAFETY: the block is plain memory; every shared access goes through atomics or follows
// the protocol's release/acquire pairs.
unsafe impl Send for HeapBlock {}
// SAFETY: as above.
unsafe impl Sync for HeapBlock {}

impl HeapBlock {
    fn layout() -> std::alloc::Layout {
        // RING_BYTES is a non-zero multiple of 64 (checked by a test): the layout is valid.
        std::alloc::Layout::from_size_align(RING_BYTES, 64).expect("ring layout")
    }

    /// A zeroed block.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn new() -> HeapBlock {
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(Self::layout()) };
        if p.is_null() {
            std::alloc::handle_alloc_error(Self::layout());
        }
        HeapBlock { p }
    }
}

impl Drop for HeapBlock {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout (INVARIANT).
        unsafe { std::alloc::dealloc(self.p, Self::layout()) }
    }
}

// SAFETY: RING_BYTES zeroed bytes, 64-aligned, owned until Drop; the CPU consumer uses the
// CPU address.
unsafe impl RingBlock for HeapBlock {
    fn host(&self) -> *mut u8 {
        self.p
    }
    fn device(&self) -> u64 {
        self.p as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layout_matches_the_kernel_source() {
        let src = crate::kernel::KERNEL_SOURCE;
        assert_eq!(size_of::<Header>(), 128);
        assert_eq!(offset_of!(Header, done), 64);
        assert_eq!(size_of::<DescBody>(), 792);
        assert_eq!(size_of::<Desc>(), 800);
        assert_eq!(RING_BYTES % 64, 0);
        assert!(src.contains(&format!("#define DPM_RING_SLOTS {RING_SLOTS}\n")));
        assert!(src.contains(&format!("#define DPM_SMALL {RING_ENTRIES}\n")));
        assert!(src.contains(&format!(
            "static_assert(sizeof(dpm_ring_desc) == {}, \"ring descriptor\");",
            size_of::<Desc>()
        )));
        assert!(src.contains(&format!(
            "static_assert(sizeof(dpm_ring_header) == {}, \"ring header\");",
            size_of::<Header>()
        )));
        // The IR twin (pages.ll, the fallback PTX) spells the same numbers out.
        let ll = include_str!("../../kernels/pages.ll");
        let warps = crate::kernel::RING_THREADS / 32;
        for want in [
            format!("%slot_off = mul i64 %slot, {}", size_of::<Desc>()),
            format!("%desc0 = add i64 %ring, {}", size_of::<Header>()),
            format!("%slot = and i64 %next, {}", RING_SLOTS - 1),
            format!("%loader = icmp ult i32 %tid, {}", size_of::<Desc>() / 16),
            format!("%item_next = add i64 %item, {warps}"),
            format!("!\"maxntidx\", i32 {}}}", crate::kernel::RING_THREADS),
            format!(
                "getelementptr i8, i8 addrspace(3)* %desc_b, i64 {}",
                8 + std::mem::offset_of!(DescBody, pfns)
            ),
            format!(
                "getelementptr i64, i64 addrspace(1)* %hp, i64 {}",
                offset_of!(Header, done) / 8
            ),
        ] {
            assert!(ll.contains(&want), "pages.ll lacks {want:?}");
        }
    }
}
