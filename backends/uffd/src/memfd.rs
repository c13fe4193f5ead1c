//! [`MemfdMemory`]: system memory as one memfd, so a frame can be mapped at a range's
//! addresses (the same physical pages the copies reach), and a freed frame gives its memory
//! back.

use crate::UffdError;
use crate::sys;
use drm_pagemap_testkit::bytes::FrameBytes;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// System memory whose frames are pages of one file a process can map: frame `f` is the
/// file's bytes at `f * 4096`. What a [`crate::PointerSpace`] maps at a range's addresses.
/// [`MemfdMemory`] is one; a GPU backend whose host memory is a memfd registered with the
/// driver would be another.
pub trait FrameFile: Send + Sync {
    /// The file.
    fn frame_fd(&self) -> BorrowedFd<'_>;
}

impl FrameFile for MemfdMemory {
    fn frame_fd(&self) -> BorrowedFd<'_> {
        self.fd()
    }
}

/// The bytes of system memory as a memfd of `capacity` bytes (sparse: memory is allocated
/// when a frame is first written and given back when it is freed), with one shared mapping
/// of the whole file (the pool) through which the engine and the simulated copies reach the
/// frames. Frame `f` is bytes `[f * 4096, ...)` of the file.
///
/// Give it to the simulated backend as `SimConfig::host_bytes` and to a
/// [`crate::PointerSpace`].
#[derive(Debug)]
pub struct MemfdMemory {
    fd: OwnedFd,
    pool: u64,
    len: u64,
}

impl MemfdMemory {
    /// A memfd of `capacity` bytes (rounded up to 4 KiB) and its pool mapping. Fails with
    /// [`UffdError::Memfd`] where the system refuses either.
    pub fn new(capacity: u64) -> Result<MemfdMemory, UffdError> {
        let len = capacity.div_ceil(4096).max(1) * 4096;
        let err = |op: &'static str| {
            move |source| UffdError::Memfd {
                op,
                capacity: len,
                source,
            }
        };
        let fd = sys::memfd(c"drm-pagemap-host", len).map_err(err("memfd_create"))?;
        let pool = sys::map_shared(len, fd.as_fd()).map_err(err("mmap"))?;
        // A child process does not inherit the pool: the engine's copy in a child would
        // otherwise store into frames the parent goes on using (see the crate doc's "fork").
        if let Err(e) = sys::dont_fork(pool, len) {
            sys::munmap(pool, len);
            return Err(err("madvise (MADV_DONTFORK)")(e));
        }
        Ok(MemfdMemory { fd, pool, len })
    }

    /// The memfd (what a range maps its frames from).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Bytes of memory the file holds now (frames written and not freed since).
    pub fn allocated_bytes(&self) -> u64 {
        sys::allocated_bytes(self.fd.as_fd()).unwrap_or(0)
    }

    fn check(&self, offset: u64, len: u64) {
        assert!(
            offset.checked_add(len).is_some_and(|e| e <= self.len),
            "memfd memory: [{offset:#x}, +{len:#x}) runs past {:#x}",
            self.len
        );
    }
}

impl Drop for MemfdMemory {
    fn drop(&mut self) {
        sys::munmap(self.pool, self.len);
    }
}

// The pool is reached only through raw-pointer copies (never as a Rust reference), so
// concurrent copies by several threads, or stores of the application through another
// mapping of the same pages, never alias a `&`/`&mut`. The engine's memory access contract
// keeps two copies of one frame from overlapping; bytes the application stores while the
// engine reads them through `read` are the application's race, as with any shared memory.
impl FrameBytes for MemfdMemory {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, offset: u64, buf: &mut [u8]) {
        self.check(offset, buf.len() as u64);
        // SAFETY: in bounds of the pool mapping (checked above), which lives as long as
        // `self`; `buf` is a distinct Rust buffer, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.pool + offset) as *const u8,
                buf.as_mut_ptr(),
                buf.len(),
            )
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.check(offset, data.len() as u64);
        // SAFETY: as in `read`, the other way.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.pool + offset) as *mut u8,
                data.len(),
            )
        }
    }

    fn zero(&self, offset: u64, len: u64) {
        self.check(offset, len);
        // Written, not punched: a zeroed frame must exist in the page cache so that a range
        // mapping it can map it on a minor fault.
        // SAFETY: in bounds of the pool mapping (checked above).
        unsafe { std::ptr::write_bytes((self.pool + offset) as *mut u8, 0, len as usize) }
    }

    fn release(&self, offset: u64, len: u64) {
        self.check(offset, len);
        // A page living on a device holds no host memory. Failure (a kernel without hole
        // punching on shmem) only keeps the memory allocated.
        let _ = sys::punch_hole(self.fd.as_fd(), offset, len);
    }
}
