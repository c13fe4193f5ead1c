//! Host memory over any byte store: [`FrameBytes`] (what the simulated backend's copy
//! engines read and write) and [`BytesHostMemory`], the
//! [`HostMemory`](drm_pagemap_core::HostMemory) that numbers its 4 KiB granules as frames.
//!
//! [`AtomicArena`] is one such store (the default of the simulated
//! backend); `drm-pagemap-uffd`'s memfd memory is another: frames a process can map at a
//! range's addresses, so the application's loads and stores and the simulated copies reach
//! the same bytes.

use crate::mem::{AtomicArena, arena_addr};
use drm_pagemap_core::{ExtentAllocator, GRANULE};
use std::sync::Arc;

/// Bytes that threads (copy engines, the CPU) read and write concurrently without undefined
/// behaviour. Offsets and lengths stay inside [`FrameBytes::len`] (a caller bug otherwise:
/// implementations may panic).
pub trait FrameBytes: Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn len(&self) -> u64;
    /// Whether it has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `buf.len()` bytes at `offset` out.
    fn read(&self, offset: u64, buf: &mut [u8]);
    /// Copies `data` in at `offset`.
    fn write(&self, offset: u64, data: &[u8]);
    /// Zeroes `len` bytes at `offset`.
    fn zero(&self, offset: u64, len: u64);
    /// Called when the frames `[offset, offset + len)` go back to the pool: a store may give
    /// their memory back (their content is not read again before they are handed out and
    /// written or zeroed). Default: nothing.
    fn release(&self, _offset: u64, _len: u64) {}
    /// The arena behind it, where it is one (lets copies between arenas take the word path).
    fn as_arena(&self) -> Option<&AtomicArena> {
        None
    }
}

impl FrameBytes for AtomicArena {
    fn len(&self) -> u64 {
        AtomicArena::len(self)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) {
        AtomicArena::read(self, offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        AtomicArena::write(self, offset, data)
    }
    fn zero(&self, offset: u64, len: u64) {
        AtomicArena::zero(self, offset, len)
    }
    fn as_arena(&self) -> Option<&AtomicArena> {
        Some(self)
    }
}

/// Copies `len` bytes between two stores, through a stack buffer (no heap allocation);
/// arenas on both sides take [`AtomicArena::copy`].
pub fn copy_bytes(
    src: &dyn FrameBytes,
    src_off: u64,
    dst: &dyn FrameBytes,
    dst_off: u64,
    len: u64,
) {
    if let (Some(a), Some(b)) = (src.as_arena(), dst.as_arena()) {
        return AtomicArena::copy(a, src_off, b, dst_off, len);
    }
    let mut buf = [0u8; 4096];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        src.read(src_off + done, &mut buf[..n]);
        dst.write(dst_off + done, &buf[..n]);
        done += n as u64;
    }
}

/// [`HostMemory`](drm_pagemap_core::HostMemory) over a [`FrameBytes`]: frames are its 4 KiB
/// granules; every device reaches them at [`arena_addr::encode`]`(mem_id, byte offset)`.
/// Freed frames are [`FrameBytes::release`]d. It places frames: home extents
/// ([`HostMemory::reserve_home`](drm_pagemap_core::HostMemory::reserve_home)) are runs of
/// its granules, and a page asking for its frame of one gets it unless that frame is still
/// held (then any frame).
#[derive(Debug)]
pub struct BytesHostMemory {
    mem_id: u16,
    bytes: Arc<dyn FrameBytes>,
    frames: ExtentAllocator,
    homes: drm_pagemap_core::HomeExtents,
}

impl BytesHostMemory {
    /// Host memory over `bytes` (whole granules; at most [`arena_addr::MAX_OFFSET`] + 1
    /// bytes), addressed as memory `mem_id` (non-zero); a typed error otherwise.
    pub fn try_new(
        mem_id: u16,
        bytes: Arc<dyn FrameBytes>,
    ) -> Result<BytesHostMemory, crate::BackendError> {
        let bad = |m: String| crate::BackendError::new(crate::BackendErrorKind::BadConfig, m);
        if mem_id == 0 {
            return Err(bad(
                "host memory: memory id 0 is reserved for 'nothing mapped'".into(),
            ));
        }
        if bytes.len() > arena_addr::MAX_OFFSET + 1 {
            return Err(bad(format!(
                "host memory: capacity {} bytes exceeds the limit of {} bytes",
                bytes.len(),
                arena_addr::MAX_OFFSET + 1
            )));
        }
        let frames = ExtentAllocator::new(bytes.len() / GRANULE);
        Ok(BytesHostMemory {
            mem_id,
            bytes,
            frames,
            homes: Default::default(),
        })
    }

    /// The memory id in its addresses.
    pub fn mem_id(&self) -> u16 {
        self.mem_id
    }

    /// The bytes behind it.
    pub fn bytes(&self) -> &Arc<dyn FrameBytes> {
        &self.bytes
    }

    /// Frames not handed out (nor reserved as home extents), in granules.
    pub fn free_granules(&self) -> u64 {
        self.frames.free_granules()
    }

    fn out_of_memory(&self, count: usize, page_size: crate::PageSize) -> crate::BackendError {
        crate::BackendError::new(
            crate::BackendErrorKind::OutOfMemory,
            format!(
                "host memory: {count} pages of {page_size} requested, {} KiB free",
                self.frames.free_granules() * 4
            ),
        )
    }
}

impl crate::HostMemory for BytesHostMemory {
    fn alloc_frames(
        &self,
        page_size: crate::PageSize,
        out: &mut [crate::HostFrame],
    ) -> Result<(), crate::BackendError> {
        let count = out.len();
        let mut starts = Vec::new();
        if !self
            .frames
            .alloc_pages(count, page_size.granules(), &mut starts)
        {
            return Err(self.out_of_memory(count, page_size));
        }
        for (o, s) in out.iter_mut().zip(starts) {
            *o = crate::HostFrame(s);
        }
        Ok(())
    }

    fn alloc_frames_at(
        &self,
        page_size: crate::PageSize,
        frames: &mut [crate::HostFrame],
    ) -> Result<(), crate::BackendError> {
        let count = frames.len();
        self.homes.alloc_at(
            page_size,
            frames,
            |_| Ok(()),
            |rest| {
                let mut starts = Vec::new();
                if !self
                    .frames
                    .alloc_pages(rest.len(), page_size.granules(), &mut starts)
                {
                    return Err(self.out_of_memory(count, page_size));
                }
                for (f, s) in rest.iter_mut().zip(starts) {
                    *f = crate::HostFrame(s);
                }
                Ok(())
            },
        )
    }

    fn reserve_home(&self, page_size: crate::PageSize, pages: u64) -> Option<crate::HostFrame> {
        self.homes.reserve(&self.frames, page_size, pages)
    }

    fn release_home(&self, first: crate::HostFrame, _page_size: crate::PageSize, _pages: u64) {
        self.homes.release(&self.frames, first)
    }

    fn free_frames(&self, frames: &[crate::HostFrame], page_size: crate::PageSize) {
        for f in frames {
            self.bytes.release(f.0 * GRANULE, page_size.bytes());
        }
        // Frames of home extents go back to their extent, the others to the pool.
        self.homes.free(&self.frames, frames, page_size);
    }

    fn read(
        &self,
        frame: crate::HostFrame,
        offset: usize,
        buf: &mut [u8],
    ) -> Result<(), crate::BackendError> {
        self.bytes.read(frame.0 * GRANULE + offset as u64, buf);
        Ok(())
    }

    fn write(
        &self,
        frame: crate::HostFrame,
        offset: usize,
        data: &[u8],
    ) -> Result<(), crate::BackendError> {
        self.bytes.write(frame.0 * GRANULE + offset as u64, data);
        Ok(())
    }

    fn zero(
        &self,
        frame: crate::HostFrame,
        page_size: crate::PageSize,
    ) -> Result<(), crate::BackendError> {
        self.bytes.zero(frame.0 * GRANULE, page_size.bytes());
        Ok(())
    }

    fn map_frames(
        &self,
        _device: crate::DeviceId,
        frames: &[crate::HostFrame],
        _page_size: crate::PageSize,
        _dir: crate::Direction,
        out: &mut [crate::DmaAddr],
    ) -> Result<(), crate::BackendError> {
        for (o, f) in out.iter_mut().zip(frames) {
            *o = arena_addr::encode(self.mem_id, f.0 * GRANULE);
        }
        Ok(())
    }

    fn unmap_frames(
        &self,
        _device: crate::DeviceId,
        _addrs: &[crate::DmaAddr],
        _page_size: crate::PageSize,
        _dir: crate::Direction,
    ) {
    }

    fn capacity_bytes(&self) -> u64 {
        self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::ArenaHostMemory;
    use drm_pagemap_core::{
        AddressSpace, CpuMappings, HostMemory, MigrateDetails, PageLocation, PageSize, PagemapId,
        VaRange,
    };
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<VaRange>>);

    impl CpuMappings for Recorder {
        fn take_out(&self, range: VaRange) {
            self.0.lock().unwrap().push(range);
        }
    }

    /// A host memory over an arena through [`BytesHostMemory`] (what the sim builds when
    /// given bytes), read back through both.
    #[test]
    fn bytes_host_memory_over_an_arena_reads_back_and_releases() {
        let arena: Arc<dyn FrameBytes> = Arc::new(AtomicArena::new(4 << 20));
        let host = BytesHostMemory::try_new(1, arena.clone()).unwrap();
        let mut f = [crate::HostFrame(0); 2];
        host.alloc_frames(PageSize::Size4K, &mut f).unwrap();
        host.write(f[1], 10, &[5u8; 20]).expect("host memory");
        let mut b = [0u8; 20];
        arena.read(f[1].0 * GRANULE + 10, &mut b);
        assert_eq!(b, [5u8; 20]);
        let free = host.free_granules();
        host.free_frames(&f, PageSize::Size4K);
        assert_eq!(host.free_granules(), free + 2);
        assert!(BytesHostMemory::try_new(0, arena).is_err());
    }

    /// Home extents: a page asking for its frame gets it; a frame is never handed out twice;
    /// the pool never hands out a home frame; all or nothing; a home given back while a
    /// frame is held returns with that frame.
    #[test]
    fn home_extents_place_frames_and_never_hand_one_out_twice() {
        let host = ArenaHostMemory::new(1, 4 << 20);
        let ps = PageSize::Size4K;
        let free0 = host.free_granules();
        let first = host.reserve_home(ps, 16).unwrap().0;
        assert_eq!(host.free_granules(), free0 - 16);
        let home = |i: u64| crate::HostFrame(first + i);
        let in_home = |f: crate::HostFrame| (first..first + 16).contains(&f.0);
        // The pool: every other frame, none of the extent.
        let mut pool = vec![crate::HostFrame(0); host.free_granules() as usize];
        host.alloc_frames(ps, &mut pool).unwrap();
        assert!(!pool.iter().any(|&f| in_home(f)));
        host.free_frames(&pool[..4], ps);
        // Wishes: its own frame, the same frame again (held: another), a frame outside.
        let mut f = [home(3), home(3), home(5), crate::HostFrame(u64::MAX)];
        host.alloc_frames_at(ps, &mut f).unwrap();
        assert_eq!((f[0], f[2]), (home(3), home(5)));
        assert!(!in_home(f[1]) && !in_home(f[3]), "{f:?}");
        // All or nothing: two pool frames are left, three are needed.
        let any = crate::HostFrame(u64::MAX);
        assert!(
            host.alloc_frames_at(ps, &mut [home(7), any, any, any])
                .is_err()
        );
        let mut one = [home(7)];
        host.alloc_frames_at(ps, &mut one).unwrap();
        assert_eq!(one[0], home(7), "the failed call gave its home frame back");
        // Freed, a home frame is handed out again to the page asking for it.
        host.free_frames(&[f[0]], ps);
        let mut again = [home(3)];
        host.alloc_frames_at(ps, &mut again).unwrap();
        assert_eq!(again[0], home(3));
        // Given back while frames are held: the extent returns with the last of them.
        host.release_home(crate::HostFrame(first), ps, 16);
        let mut late = [home(9)];
        host.alloc_frames_at(ps, &mut late).unwrap();
        assert!(!in_home(late[0]), "an extent given back hands out nothing");
        host.free_frames(&[f[1], f[3], late[0]], ps);
        host.free_frames(&pool[4..], ps);
        host.free_frames(&[home(3), home(5)], ps);
        assert_eq!(host.free_granules(), free0 - 16);
        host.free_frames(&one, ps);
        assert_eq!(host.free_granules(), free0);
        // 2 MiB pages: an aligned extent.
        let big = host.reserve_home(PageSize::Size2M, 1).unwrap();
        assert_eq!(big.0 % 512, 0);
        host.release_home(big, PageSize::Size2M, 1);
        assert_eq!(host.free_granules(), free0);
        assert!(host.reserve_home(ps, 0).is_none());
        assert!(host.reserve_home(ps, u64::MAX).is_none());
    }

    /// The engine asks for a homed range's own frames (populating a hole).
    #[test]
    fn a_homed_range_populates_into_its_home_frames() {
        let host = Arc::new(ArenaHostMemory::new(1, 8 << 20));
        let mm = AddressSpace::new(host.clone());
        let r = VaRange::new(1 << 30, 8 * 4096);
        let home = host.reserve_home(PageSize::Size4K, 8).unwrap();
        mm.create_range_homed(r, PageSize::Size4K, home).unwrap();
        for i in [5u64, 0, 7] {
            let frame = mm.with_cpu_page(r.start + i * 4096, |_, f, _| f).unwrap();
            assert_eq!(frame.0, home.0 + i);
        }
        // A write populating several holes at once.
        mm.write(r.start + 4096, &[1u8; 3 * 4096]).unwrap();
        for i in 1..4u64 {
            let frame = mm.with_cpu_page(r.start + i * 4096, |_, f, _| f).unwrap();
            assert_eq!(frame.0, home.0 + i);
        }
        mm.free_range(r.start).unwrap();
        host.release_home(home, PageSize::Size4K, 8);
        assert_eq!(host.free_granules(), (8 << 20) / 4096);
    }

    /// The engine's side of pointer ranges, without userfaultfd: a migration to a device
    /// calls `take_out` with its pages (locked, before copying), and `with_cpu_page`
    /// populates a hole zeroed and brings a device page home with its bytes.
    #[test]
    fn take_out_is_called_per_migration_and_with_cpu_page_brings_pages_home() {
        let host = Arc::new(ArenaHostMemory::new(1, 8 << 20));
        host.arena().write(0, &vec![0xEE; 8 << 20]); // dirty frames: holes must read zero
        let mm = AddressSpace::new(host.clone());
        let rec = Arc::new(Recorder::default());
        assert!(mm.set_cpu_mappings(rec.clone()).is_ok());
        assert!(
            mm.set_cpu_mappings(rec.clone()).is_err(),
            "once per address space"
        );
        let r = VaRange::new(1 << 30, 4 * 4096);
        mm.create_range(r, PageSize::Size4K).unwrap();

        // A hole: populated zeroed, the frame handed over under the lock.
        let (va, frame, ps) = mm
            .with_cpu_page(r.start + 4096 + 17, |va, f, ps| (va, f, ps))
            .unwrap();
        assert_eq!((va, ps), (r.start + 4096, PageSize::Size4K));
        let mut b = vec![1u8; 4096];
        host.read(frame, 0, &mut b).expect("host memory");
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(mm.location(va).unwrap(), PageLocation::System);
        assert!(rec.0.lock().unwrap().is_empty());

        // No pagemap: a migration fails before taking anything out.
        assert!(
            mm.migrate(r, PagemapId(0), &MigrateDetails::default())
                .is_err()
        );
        assert!(rec.0.lock().unwrap().is_empty());
        assert!(mm.with_cpu_page(r.end() + 1, |_, _, _| ()).is_err());
    }
}
