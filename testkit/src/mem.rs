//! Memory of real bytes for simulated devices and tests: an arena that devices (threads) and
//! the CPU may touch concurrently without undefined behaviour (it is made of atomic words,
//! backed lazily in 2 MiB chunks so a large capacity costs nothing until used, or up front
//! with [`AtomicArena::back_chunks`]), the address
//! encoding that names a byte of an arena ([`arena_addr`]), and [`ArenaHostMemory`], a
//! [`HostMemory`](drm_pagemap_core::HostMemory) over an arena.
//!
//! This is what the simulated backend is made of; a real backend brings its own memory (the
//! extent allocator both use is the core's [`ExtentAllocator`](drm_pagemap_core::ExtentAllocator)).

use crate::bytes::BytesHostMemory;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

const CHUNK_BYTES: u64 = 2 << 20;
const CHUNK_WORDS: usize = (CHUNK_BYTES / 8) as usize;
/// Chunks per group: a group's table (1 GiB of memory) is allocated on first write too, so
/// the table of an untouched arena is one entry per GiB.
const GROUP_CHUNKS: usize = 512;

type Chunk = OnceLock<Box<[AtomicU64]>>;

/// Real bytes, shared between threads without data races: words are atomics (relaxed
/// accesses; ordering comes from the fences that guard copies). Chunks of 2 MiB (and the
/// tables of 512 chunks that hold them) are allocated on first write; unwritten memory reads
/// as zeros. An arena costs 24 bytes per GiB of capacity until it is written.
#[derive(Debug)]
pub struct AtomicArena {
    groups: Box<[OnceLock<Box<[Chunk]>>]>,
    bytes: u64,
}

impl AtomicArena {
    /// An arena of `bytes` (rounded up to 2 MiB), all zero. Panics where
    /// [`AtomicArena::try_new`] fails.
    pub fn new(bytes: u64) -> AtomicArena {
        AtomicArena::try_new(bytes).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The largest arena: 256 TiB (what [`arena_addr`] offsets reach; its table is 6 MiB).
    pub const MAX_BYTES: u64 = 1 << 48;

    /// An arena of `bytes` (rounded up to 2 MiB), all zero. A typed error past
    /// [`AtomicArena::MAX_BYTES`] (bad configuration) or when its table (24 bytes per GiB of
    /// capacity) cannot be allocated (out of memory).
    pub fn try_new(bytes: u64) -> Result<AtomicArena, crate::BackendError> {
        if bytes > Self::MAX_BYTES {
            return Err(crate::BackendError::new(
                crate::BackendErrorKind::BadConfig,
                format!(
                    "memory arena of {bytes} bytes exceeds the limit of {} bytes (256 TiB)",
                    Self::MAX_BYTES
                ),
            ));
        }
        let oom = || {
            crate::BackendError::new(
                crate::BackendErrorKind::OutOfMemory,
                format!("memory arena of {bytes} bytes: its chunk table does not fit in memory"),
            )
        };
        let chunks = bytes.div_ceil(CHUNK_BYTES);
        let n = usize::try_from(chunks.div_ceil(GROUP_CHUNKS as u64)).map_err(|_| oom())?;
        let mut groups = Vec::new();
        groups.try_reserve_exact(n).map_err(|_| oom())?;
        groups.extend((0..n).map(|_| OnceLock::new()));
        Ok(AtomicArena {
            groups: groups.into_boxed_slice(),
            bytes: chunks * CHUNK_BYTES,
        })
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Bytes actually backed (chunks written at least once).
    pub fn resident_bytes(&self) -> u64 {
        let chunks: usize = self
            .groups
            .iter()
            .filter_map(|g| g.get())
            .map(|g| g.iter().filter(|c| c.get().is_some()).count())
            .sum();
        chunks as u64 * CHUNK_BYTES
    }

    fn group(&self, i: usize) -> &[Chunk] {
        self.groups[i / GROUP_CHUNKS]
            .get_or_init(|| (0..GROUP_CHUNKS).map(|_| OnceLock::new()).collect())
    }

    fn chunk(&self, i: usize) -> &[AtomicU64] {
        // Zeroed memory straight from the allocator (fresh pages are zero already): no pass
        // that writes zeros before the first copy writes the bytes. Out of memory aborts, as
        // any allocation of the process does.
        self.group(i)[i % GROUP_CHUNKS].get_or_init(|| {
            zeroed_chunk().unwrap_or_else(|()| {
                std::alloc::handle_alloc_error(std::alloc::Layout::new::<[u64; CHUNK_WORDS]>())
            })
        })
    }

    /// Chunks (of 2 MiB) in the arena.
    pub fn chunks(&self) -> usize {
        (self.bytes / CHUNK_BYTES) as usize
    }

    /// Backs chunks `chunks` (indices of 2 MiB chunks, clamped to the arena) now, each page
    /// written once so the operating system has given it a frame: what a device's memory is
    /// (resident), where a lazily backed arena pays a page fault on the first write of each
    /// page. Chunks already backed keep their bytes; a chunk is made resident before it is
    /// published, so this may run while other threads copy into the arena. Several threads
    /// may back disjoint (or overlapping) ranges at once.
    ///
    /// Out of memory while allocating a chunk is an error naming how much was backed; the
    /// chunks backed until then stay.
    pub fn back_chunks(&self, chunks: std::ops::Range<usize>) -> Result<(), crate::BackendError> {
        const WORDS_PER_PAGE: usize = 4096 / 8;
        let end = chunks.end.min(self.chunks());
        for i in chunks.start.min(end)..end {
            let slot = &self.group(i)[i % GROUP_CHUNKS];
            if slot.get().is_some() {
                continue;
            }
            let words = zeroed_chunk().map_err(|()| {
                crate::BackendError::new(
                    crate::BackendErrorKind::OutOfMemory,
                    format!(
                        "memory arena of {} bytes: chunk {i} (at byte {}) cannot be backed:                          out of memory",
                        self.bytes,
                        i as u64 * CHUNK_BYTES
                    ),
                )
            })?;
            for w in words.iter().step_by(WORDS_PER_PAGE) {
                w.store(0, Ordering::Relaxed);
            }
            // Another thread may have published the chunk meanwhile: its bytes win.
            let _ = slot.set(words);
        }
        Ok(())
    }

    fn chunk_if_present(&self, i: usize) -> Option<&[AtomicU64]> {
        self.groups[i / GROUP_CHUNKS].get()?[i % GROUP_CHUNKS]
            .get()
            .map(|b| &b[..])
    }

    /// Copies `buf.len()` bytes at `offset` out. Panics if out of bounds (a backend bug).
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        assert!(
            offset + buf.len() as u64 <= self.bytes,
            "arena read out of bounds"
        );
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let ci = (at / CHUNK_BYTES) as usize;
            let in_chunk = (at % CHUNK_BYTES) as usize;
            let n = (buf.len() - done).min(CHUNK_BYTES as usize - in_chunk);
            let dst = &mut buf[done..done + n];
            match self.chunk_if_present(ci) {
                None => dst.fill(0),
                Some(words) => read_words(words, in_chunk, dst),
            }
            done += n;
        }
    }

    /// Copies `data` in at `offset`. Panics if out of bounds (a backend bug).
    pub fn write(&self, offset: u64, data: &[u8]) {
        assert!(
            offset + data.len() as u64 <= self.bytes,
            "arena write out of bounds"
        );
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let ci = (at / CHUNK_BYTES) as usize;
            let in_chunk = (at % CHUNK_BYTES) as usize;
            let n = (data.len() - done).min(CHUNK_BYTES as usize - in_chunk);
            write_words(self.chunk(ci), in_chunk, &data[done..done + n]);
            done += n;
        }
    }

    /// Zeroes `len` bytes at `offset`.
    pub fn zero(&self, offset: u64, len: u64) {
        let mut done = 0u64;
        while done < len {
            let at = offset + done;
            let ci = (at / CHUNK_BYTES) as usize;
            let in_chunk = at % CHUNK_BYTES;
            let n = (len - done).min(CHUNK_BYTES - in_chunk);
            if let Some(words) = self.chunk_if_present(ci) {
                if in_chunk.is_multiple_of(8) && n.is_multiple_of(8) {
                    let w = (in_chunk / 8) as usize;
                    for x in &words[w..w + (n / 8) as usize] {
                        x.store(0, Ordering::Relaxed);
                    }
                } else {
                    write_words(words, in_chunk as usize, &vec![0u8; n as usize]);
                }
            }
            done += n;
        }
    }

    /// Copies `len` bytes from `src` at `src_off` into `dst` at `dst_off` (8-byte aligned
    /// offsets and length take the fast word path).
    pub fn copy(src: &AtomicArena, src_off: u64, dst: &AtomicArena, dst_off: u64, len: u64) {
        assert!(
            src_off + len <= src.bytes && dst_off + len <= dst.bytes,
            "arena copy out of bounds"
        );
        let aligned =
            src_off.is_multiple_of(8) && dst_off.is_multiple_of(8) && len.is_multiple_of(8);
        let mut done = 0u64;
        let mut bounce = Vec::new();
        while done < len {
            let s = src_off + done;
            let d = dst_off + done;
            let n = (len - done)
                .min(CHUNK_BYTES - s % CHUNK_BYTES)
                .min(CHUNK_BYTES - d % CHUNK_BYTES);
            match src.chunk_if_present((s / CHUNK_BYTES) as usize) {
                // Never-written source bytes read as zeros: zero the destination where it
                // has bytes, and leave it unbacked where it has none (it reads as zeros).
                None => dst.zero(d, n),
                Some(sw) if aligned => {
                    let dw = dst.chunk((d / CHUNK_BYTES) as usize);
                    let si = ((s % CHUNK_BYTES) / 8) as usize;
                    let di = ((d % CHUNK_BYTES) / 8) as usize;
                    let nw = (n / 8) as usize;
                    for (a, b) in sw[si..si + nw].iter().zip(&dw[di..di + nw]) {
                        b.store(a.load(Ordering::Relaxed), Ordering::Relaxed);
                    }
                }
                Some(_) => {
                    bounce.resize(n as usize, 0);
                    src.read(s, &mut bounce);
                    dst.write(d, &bounce);
                }
            }
            done += n;
        }
    }
}

/// A chunk of zero words from the allocator's zeroed memory (`Err` when it cannot be had).
fn zeroed_chunk() -> Result<Box<[AtomicU64]>, ()> {
    use zerocopy::FromZeros;
    <[AtomicU64]>::new_box_zeroed_with_elems(CHUNK_WORDS).map_err(|_| ())
}

fn read_words(words: &[AtomicU64], byte_off: usize, dst: &mut [u8]) {
    let mut i = 0usize;
    while i < dst.len() {
        let at = byte_off + i;
        let w = words[at / 8].load(Ordering::Relaxed).to_le_bytes();
        let k = at % 8;
        let n = (8 - k).min(dst.len() - i);
        dst[i..i + n].copy_from_slice(&w[k..k + n]);
        i += n;
    }
}

fn write_words(words: &[AtomicU64], byte_off: usize, src: &[u8]) {
    let mut i = 0usize;
    while i < src.len() {
        let at = byte_off + i;
        let k = at % 8;
        let n = (8 - k).min(src.len() - i);
        let slot = &words[at / 8];
        if n == 8 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&src[i..i + 8]);
            slot.store(u64::from_le_bytes(b), Ordering::Relaxed);
        } else {
            let mut b = slot.load(Ordering::Relaxed).to_le_bytes();
            b[k..k + n].copy_from_slice(&src[i..i + n]);
            slot.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        i += n;
    }
}

/// Address encoding for arena-backed memory: the top 16 bits name the memory (never 0, so
/// an encoded address is never [`DmaAddr::NONE`](drm_pagemap_core::DmaAddr::NONE)), the low 48 bits are a byte offset.
pub mod arena_addr {
    use drm_pagemap_core::DmaAddr;

    /// The largest offset an address carries (48 bits).
    pub const MAX_OFFSET: u64 = (1 << 48) - 1;

    /// Encodes `offset` in memory `mem` (`mem != 0`).
    pub const fn encode(mem: u16, offset: u64) -> DmaAddr {
        DmaAddr(((mem as u64) << 48) | (offset & ((1 << 48) - 1)))
    }

    /// The memory id and byte offset of an encoded address.
    pub const fn decode(addr: DmaAddr) -> (u16, u64) {
        ((addr.0 >> 48) as u16, addr.0 & ((1 << 48) - 1))
    }
}

/// [`HostMemory`](drm_pagemap_core::HostMemory) over an [`AtomicArena`]: frames are 4 KiB granules of the arena;
/// every device reaches them at [`arena_addr::encode`]`(mem_id, byte offset)`.
#[derive(Debug)]
pub struct ArenaHostMemory {
    arena: std::sync::Arc<AtomicArena>,
    /// The frames and their accesses: [`BytesHostMemory`] over the arena.
    inner: BytesHostMemory,
}

impl ArenaHostMemory {
    /// Host memory of `bytes`, addressed as memory `mem_id` (non-zero). Panics where
    /// [`ArenaHostMemory::try_new`] fails.
    pub fn new(mem_id: u16, bytes: u64) -> ArenaHostMemory {
        ArenaHostMemory::try_new(mem_id, bytes).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Host memory of `bytes` (at most [`arena_addr::MAX_OFFSET`] + 1, what its addresses
    /// can carry), addressed as memory `mem_id` (non-zero); a typed error otherwise.
    pub fn try_new(mem_id: u16, bytes: u64) -> Result<ArenaHostMemory, crate::BackendError> {
        let bad = |m: String| crate::BackendError::new(crate::BackendErrorKind::BadConfig, m);
        if mem_id == 0 {
            return Err(bad(
                "host memory: memory id 0 is reserved for 'nothing mapped'".into(),
            ));
        }
        if bytes > arena_addr::MAX_OFFSET + 1 {
            return Err(bad(format!(
                "host memory: capacity {bytes} bytes exceeds the limit of {} bytes (256 TiB: \
                 addresses carry 48-bit offsets)",
                arena_addr::MAX_OFFSET + 1
            )));
        }
        let arena = std::sync::Arc::new(AtomicArena::try_new(bytes)?);
        let inner = BytesHostMemory::try_new(mem_id, arena.clone())?;
        Ok(ArenaHostMemory { arena, inner })
    }

    /// The memory id in its addresses.
    pub fn mem_id(&self) -> u16 {
        self.inner.mem_id()
    }

    /// The bytes behind it.
    pub fn arena(&self) -> &std::sync::Arc<AtomicArena> {
        &self.arena
    }

    /// Frames not handed out, in granules.
    pub fn free_granules(&self) -> u64 {
        self.inner.free_granules()
    }
}

/// Forwards to the [`BytesHostMemory`] over the arena (one implementation of frames and
/// accesses for every byte store).
impl crate::HostMemory for ArenaHostMemory {
    fn alloc_frames(
        &self,
        page_size: crate::PageSize,
        out: &mut [crate::HostFrame],
    ) -> Result<(), crate::BackendError> {
        self.inner.alloc_frames(page_size, out)
    }

    fn free_frames(&self, frames: &[crate::HostFrame], page_size: crate::PageSize) {
        self.inner.free_frames(frames, page_size)
    }

    fn alloc_frames_at(
        &self,
        page_size: crate::PageSize,
        frames: &mut [crate::HostFrame],
    ) -> Result<(), crate::BackendError> {
        self.inner.alloc_frames_at(page_size, frames)
    }

    fn reserve_home(&self, page_size: crate::PageSize, pages: u64) -> Option<crate::HostFrame> {
        self.inner.reserve_home(page_size, pages)
    }

    fn release_home(&self, first: crate::HostFrame, page_size: crate::PageSize, pages: u64) {
        self.inner.release_home(first, page_size, pages)
    }

    fn read(
        &self,
        frame: crate::HostFrame,
        offset: usize,
        buf: &mut [u8],
    ) -> Result<(), crate::BackendError> {
        self.inner.read(frame, offset, buf)
    }

    fn write(
        &self,
        frame: crate::HostFrame,
        offset: usize,
        data: &[u8],
    ) -> Result<(), crate::BackendError> {
        self.inner.write(frame, offset, data)
    }

    fn zero(
        &self,
        frame: crate::HostFrame,
        page_size: crate::PageSize,
    ) -> Result<(), crate::BackendError> {
        self.inner.zero(frame, page_size)
    }

    fn map_frames(
        &self,
        device: crate::DeviceId,
        frames: &[crate::HostFrame],
        page_size: crate::PageSize,
        dir: crate::Direction,
        out: &mut [crate::DmaAddr],
    ) -> Result<(), crate::BackendError> {
        self.inner.map_frames(device, frames, page_size, dir, out)
    }

    fn unmap_frames(
        &self,
        device: crate::DeviceId,
        addrs: &[crate::DmaAddr],
        page_size: crate::PageSize,
        dir: crate::Direction,
    ) {
        self.inner.unmap_frames(device, addrs, page_size, dir)
    }

    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drm_pagemap_core::{AddressSpace, PageBacking, PageSize, VaRange};
    use std::sync::Arc;

    #[test]
    fn copying_unwritten_memory_backs_nothing_and_reads_as_zeros() {
        let src = AtomicArena::new(8 << 20);
        let dst = AtomicArena::new(8 << 20);
        // Regression: the destination chunk used to be materialised before looking at the
        // source, so moving never-written pages cost their full size in memory.
        AtomicArena::copy(&src, 0, &dst, 2 << 20, 4 << 20);
        assert_eq!(dst.resident_bytes(), 0);
        // Where the destination has bytes, they become zeros.
        dst.write(4096, &[0xAB; 64]);
        assert_eq!(dst.resident_bytes(), 2 << 20);
        AtomicArena::copy(&src, 4096, &dst, 4096, 4096);
        let mut buf = [1u8; 64];
        dst.read(4096, &mut buf);
        assert_eq!(buf, [0u8; 64]);
        // Written source bytes still land.
        src.write(0, &[7u8; 4096]);
        AtomicArena::copy(&src, 0, &dst, 6 << 20, 4096);
        dst.read(6 << 20, &mut buf);
        assert_eq!(buf, [7u8; 64]);
        assert_eq!(dst.resident_bytes(), 4 << 20);
    }

    #[test]
    fn backing_chunks_keeps_written_bytes_and_reads_zeros_elsewhere() {
        let a = AtomicArena::new(8 << 20);
        assert_eq!(a.chunks(), 4);
        a.write((2 << 20) + 8, &[9u8; 100]);
        assert_eq!(a.resident_bytes(), 2 << 20);
        // Ranges past the end are clamped; an empty or reversed range backs nothing.
        a.back_chunks(3..usize::MAX).unwrap();
        assert_eq!(a.resident_bytes(), 4 << 20);
        #[allow(clippy::reversed_empty_ranges)]
        a.back_chunks(2..1).unwrap();
        a.back_chunks(usize::MAX..usize::MAX).unwrap();
        assert_eq!(a.resident_bytes(), 4 << 20);
        a.back_chunks(0..4).unwrap();
        assert_eq!(a.resident_bytes(), 8 << 20);
        let mut buf = vec![1u8; 4 << 20];
        a.read(0, &mut buf);
        assert!(buf[..(2 << 20) + 8].iter().all(|&x| x == 0));
        assert!(buf[(2 << 20) + 8..(2 << 20) + 108].iter().all(|&x| x == 9));
        assert!(buf[(2 << 20) + 108..].iter().all(|&x| x == 0));
    }

    #[test]
    fn backing_while_other_threads_write_loses_no_byte() {
        // Threads back the whole arena while others write a pattern into every chunk: a
        // chunk is published once, so every written byte is read back.
        let a = AtomicArena::new(32 << 20);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| a.back_chunks(0..a.chunks()).unwrap());
            }
            for t in 0..2u8 {
                let a = &a;
                s.spawn(move || {
                    for c in 0..16u64 {
                        a.write(c * (2 << 20) + u64::from(t) * 4096, &[t + 1; 4096]);
                    }
                });
            }
        });
        assert_eq!(a.resident_bytes(), 32 << 20);
        let mut buf = vec![0u8; 4096];
        for c in 0..16u64 {
            for t in 0..2u8 {
                a.read(c * (2 << 20) + u64::from(t) * 4096, &mut buf);
                assert!(buf.iter().all(|&x| x == t + 1), "chunk {c} thread {t}");
            }
        }
    }

    /// The engine over arena host memory (moved from the core's `mm.rs`, whose unit tests
    /// can no longer use this crate's memory).
    #[test]
    fn populate_zeroes_holes_keeps_data_and_backing_reports_frames() {
        let host = Arc::new(ArenaHostMemory::new(1, 1 << 20));
        // Dirty every frame so that a hole populated without clearing would show it.
        host.arena().write(0, &vec![0xAB; 1 << 20]);
        let mm = AddressSpace::new(host.clone());
        let r = VaRange::new(1 << 20, 4 * 4096);
        mm.create_range(r, PageSize::Size4K).unwrap();
        mm.write(r.start + 4096, &[7u8; 4096]).unwrap();
        let mut b = Vec::new();
        mm.backing(r, &mut b).unwrap();
        assert_eq!(b[0], PageBacking::Unpopulated);
        assert!(matches!(b[1], PageBacking::System(_)));
        mm.populate(r).unwrap();
        mm.backing(r, &mut b).unwrap();
        assert_eq!(b.len(), 4);
        assert!(b.iter().all(|p| matches!(p, PageBacking::System(_))));
        let mut buf = vec![1u8; 4 * 4096];
        mm.read(r.start, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 0));
        assert!(buf[4096..8192].iter().all(|&x| x == 7));
        assert!(buf[8192..].iter().all(|&x| x == 0));
        assert!(mm.backing(VaRange::new(r.start, 100), &mut b).is_err());
    }
}
