//! [`HostFile`]: the host memory of [`crate::PinnedHostMemory`] as one memfd mapped shared
//! (option `cuda.host_memfd`), so that another mapping of the same file (a pointer range
//! mapping a frame at its own address) reaches the very pages the GPUs copy to and from.
//! Only the mapping is made here; its chunks are pinned by `cuMemHostRegister` as they are
//! first needed (`host.rs`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A memfd of `len` bytes (sparse) and one shared mapping of all of it at `base`.
#[derive(Debug)]
pub(crate) struct HostFile {
    fd: OwnedFd,
    // INVARIANT: `[base, base + len)` is a MAP_SHARED mapping of `fd` made by `new`, unmapped
    // only by Drop.
    base: *mut u8,
    len: u64,
}

// SAFETY: the mapping is plain shared memory; who accesses which bytes when is the owner's
// contract (the core's memory access contract), not the thread's.
unsafe impl Send for HostFile {}
// SAFETY: as above.
unsafe impl Sync for HostFile {}

impl HostFile {
    /// A memfd of `len` bytes (a multiple of 4 KiB) mapped shared: memory is allocated when
    /// a page is first touched (or pinned).
    pub(crate) fn new(len: u64) -> io::Result<HostFile> {
        let size = usize::try_from(len)
            .ok()
            .and_then(|s| libc::off_t::try_from(s).ok().map(|o| (s, o)));
        let Some((size, off)) = size else {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        };
        // SAFETY: a NUL-terminated name and flags; returns a new descriptor or -1.
        let raw =
            unsafe { libc::memfd_create(c"drm-pagemap-cuda-host".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor just returned to us and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sets the size of our own descriptor.
        if unsafe { libc::ftruncate(raw, off) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping of the whole file at an address the kernel chooses; it
        // overlaps nothing of ours.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                raw,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(HostFile {
            fd,
            base: p.cast(),
            len,
        })
    }

    /// The memfd.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The mapping's first byte (the file's byte 0).
    pub(crate) fn base(&self) -> *mut u8 {
        self.base
    }

    /// Bytes of memory the file holds now.
    pub(crate) fn allocated_bytes(&self) -> u64 {
        // SAFETY: `stat` is plain data the call fills.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: our descriptor and a valid out-pointer.
        if unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) } != 0 {
            return 0;
        }
        st.st_blocks as u64 * 512
    }
}

impl Drop for HostFile {
    fn drop(&mut self) {
        // SAFETY: the mapping made by `new` (INVARIANT); its owner unregistered it from the
        // driver and nothing uses it any more.
        unsafe { libc::munmap(self.base.cast(), self.len as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_mapping_of_the_file_sees_the_same_bytes() {
        let len = 8u64 << 20;
        let f = HostFile::new(len).unwrap();
        assert_eq!(f.allocated_bytes(), 0, "sparse until touched");
        // SAFETY: offset 4 MiB + 16 lies inside the mapping of `len` bytes.
        unsafe { f.base().add((4 << 20) + 16).write(0x5a) };
        assert!(f.allocated_bytes() >= 4096);
        // SAFETY: a new shared mapping of one page of the file at an address the kernel
        // chooses; unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.fd().as_raw_fd(),
                4 << 20,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let p = p.cast::<u8>();
        // SAFETY: inside the one-page mapping just made.
        unsafe {
            assert_eq!(p.add(16).read(), 0x5a);
            p.add(17).write(0xa5);
            assert_eq!(f.base().add((4 << 20) + 17).read(), 0xa5);
            libc::munmap(p.cast(), 4096);
        }
    }

    #[test]
    fn a_size_past_the_address_space_is_an_error() {
        assert!(HostFile::new(!4095).is_err());
    }
}
