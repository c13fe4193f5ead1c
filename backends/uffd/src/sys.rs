//! The kernel interfaces this crate uses, each behind a safe function that returns
//! `io::Result`: memfd, mmap/munmap/madvise, fallocate, and userfaultfd (the structures and
//! ioctl numbers of `<linux/userfaultfd.h>`, which the libc crate does not carry).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;
/// `UFFD_FEATURE_MISSING_SHMEM`: missing faults on shmem (memfd) mappings.
pub(crate) const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_MINOR_SHMEM`: minor faults (page in the page cache, not in the page table).
pub(crate) const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `UFFD_FEATURE_THREAD_ID`: a fault message names the faulting thread.
pub(crate) const FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFDIO_REGISTER_MODE_MISSING`.
const MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_MINOR`.
const MODE_MINOR: u64 = 1 << 2;
/// `UFFD_EVENT_PAGEFAULT`.
pub(crate) const EVENT_PAGEFAULT: u8 = 0x12;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}
const IOC_WRITE_READ: u64 = 3;
const IOC_READ: u64 = 2;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

/// `struct uffd_msg` (32 bytes): the event, then for a page fault its flags and address.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct UffdMsg {
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    pub flags: u64,
    pub address: u64,
    feat: u64,
}

impl UffdMsg {
    /// The faulting thread's id (`UFFD_FEATURE_THREAD_ID`): the union's first 32 bits.
    pub(crate) fn thread_id(&self) -> i32 {
        self.feat as u32 as i32
    }
}

const UFFDIO_API: u64 = ioc(IOC_WRITE_READ, 0x3F, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(IOC_WRITE_READ, 0x00, size_of::<UffdioRegister>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, size_of::<UffdioRange>());
const UFFDIO_CONTINUE: u64 = ioc(IOC_WRITE_READ, 0x07, size_of::<UffdioContinue>());
/// `UFFD_USER_MODE_ONLY`: only faults of user-mode accesses are reported.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
/// `USERFAULTFD_IOC_NEW` of `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(rc: libc::c_int) -> io::Result<OwnedFd> {
    let fd = check(rc)?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A userfaultfd (close-on-exec, non-blocking), through the system call or, where that is
/// refused, through `/dev/userfaultfd`. The error of the system call is returned when both
/// fail.
///
/// Where the system call is refused with `EPERM` (an unprivileged process and
/// `vm.unprivileged_userfaultfd=0`), it is tried again with `UFFD_USER_MODE_ONLY` (Linux
/// 5.11), which any process may use: faults of the application's own loads and stores are
/// served; a system call that writes into an unmapped page of a range (`read(2)` into it)
/// fails with `EFAULT` instead of waiting. The second value says whether that mode is in use.
pub(crate) fn userfaultfd() -> io::Result<(OwnedFd, bool)> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: the userfaultfd system call takes one integer argument and touches no memory.
    let rc = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if rc >= 0 {
        return owned(rc as libc::c_int).map(|fd| (fd, false));
    }
    let first = io::Error::last_os_error();
    if first.raw_os_error() == Some(libc::EPERM) {
        // SAFETY: as above.
        let rc = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) };
        if rc >= 0 {
            return owned(rc as libc::c_int).map(|fd| (fd, true));
        }
    }
    let dev = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(f) => f,
        Err(_) => return Err(first),
    };
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument and returns a new
    // descriptor; `dev` is an open descriptor for the call's duration.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    owned(rc).map(|fd| (fd, false)).map_err(|_| first)
}

/// The `UFFDIO_API` handshake asking for `features`; returns the features the kernel has.
pub(crate) fn uffd_api(fd: BorrowedFd<'_>, features: u64) -> io::Result<u64> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is (repr(C),
    // same layout), valid for the call's duration.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) })?;
    Ok(api.features)
}

/// Registers `[start, start + len)` for missing and minor faults.
pub(crate) fn uffd_register(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode: MODE_MISSING | MODE_MINOR,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register` (same layout).
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) }).map(|_| ())
}

/// Wakes the threads waiting on faults in `[start, start + len)`.
pub(crate) fn uffd_wake(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRange { start, len };
    // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range` (same layout).
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WAKE as _, &mut r) }).map(|_| ())
}

/// Maps the page-cache pages of `[start, start + len)` (a minor fault's resolution) and
/// wakes the waiting threads. `EEXIST` (already mapped) is success.
pub(crate) fn uffd_continue(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut c = UffdioContinue {
        range: UffdioRange { start, len },
        mode: 0,
        mapped: 0,
    };
    // SAFETY: UFFDIO_CONTINUE reads and writes a `struct uffdio_continue` (same layout).
    match check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_CONTINUE as _, &mut c) }) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => uffd_wake(fd, start, len),
        Err(e) => Err(e),
    }
}

/// Reads one message; `Ok(None)` when none is pending.
pub(crate) fn uffd_read(fd: BorrowedFd<'_>) -> io::Result<Option<UffdMsg>> {
    let mut msg = UffdMsg::default();
    // SAFETY: reads at most size_of::<UffdMsg>() bytes into `msg`, a plain-data struct.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut msg as *mut UffdMsg).cast(),
            size_of::<UffdMsg>(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(e),
        };
    }
    Ok((n as usize == size_of::<UffdMsg>()).then_some(msg))
}

/// A close-on-exec epoll instance (the fault handler's: every space's userfaultfd and its
/// stop signal).
pub(crate) fn epoll() -> io::Result<OwnedFd> {
    // SAFETY: epoll_create1 takes one integer and touches no memory.
    owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })
}

/// `epoll_ctl` of `fd` in `ep` with `events` and the token `data` (ignored by `EPOLL_CTL_DEL`).
pub(crate) fn epoll_ctl(
    ep: BorrowedFd<'_>,
    op: libc::c_int,
    fd: BorrowedFd<'_>,
    events: u32,
    data: u64,
) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: `ev` is a valid epoll_event for the call's duration; both descriptors are open.
    check(unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, fd.as_raw_fd(), &mut ev) }).map(|_| ())
}

/// Waits at most `timeout_ms` for one event of `ep`: its token, or `None` (timeout or signal).
pub(crate) fn epoll_wait1(ep: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<Option<u64>> {
    let mut ev = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: room for exactly one event, valid for the call's duration.
    let rc = unsafe { libc::epoll_wait(ep.as_raw_fd(), &mut ev, 1, timeout_ms) };
    match check(rc) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(ev.u64)),
        Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A close-on-exec eventfd (the fault handler's stop signal).
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes two integers and touches no memory.
    owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
}

/// Signals an eventfd.
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes the 8 bytes of `one` to the eventfd.
    let _ = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// A close-on-exec memfd of `len` bytes (sparse: nothing is allocated until written).
pub(crate) fn memfd(name: &std::ffi::CStr, len: u64) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a NUL-terminated string valid for the call.
    let fd = owned(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: ftruncate on a descriptor we own.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) })?;
    Ok(fd)
}

/// Gives back the memory of `[offset, offset + len)` of a memfd (the range reads as zeros
/// afterwards and every mapping of it loses its page-table entries).
pub(crate) fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an open descriptor with integer arguments.
    check(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
    .map(|_| ())
}

/// Bytes of memory a memfd holds.
pub(crate) fn allocated_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat writes a `struct stat` into `st`, valid for the call.
    check(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it initialised `st` (and it was zeroed before).
    let st = unsafe { st.assume_init() };
    Ok(st.st_blocks as u64 * 512)
}

/// Reserves `len` bytes of address space aligned to `align` (a power of two), inaccessible.
pub(crate) fn reserve(len: u64, align: u64) -> io::Result<u64> {
    let total = len + align;
    // SAFETY: a new anonymous mapping at an address the kernel chooses; it replaces nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = p as u64;
    let start = (base + align - 1) & !(align - 1);
    // Give back the unaligned head and the tail.
    if start > base {
        munmap(base, start - base);
    }
    let end = start + len;
    if base + total > end {
        munmap(end, base + total - end);
    }
    Ok(start)
}

/// Maps `len` bytes of `fd` from `offset` shared and read-write at exactly `addr`,
/// replacing what was there.
///
/// # Safety
/// `[addr, addr + len)` must be address space this crate reserved for a range (nothing of
/// anybody else's lives there): the mapping replaces it.
pub(crate) unsafe fn map_fixed(
    addr: u64,
    len: u64,
    fd: BorrowedFd<'_>,
    offset: u64,
) -> io::Result<()> {
    // SAFETY: the caller guarantees the addresses are the crate's own (see # Safety).
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Maps `len` bytes of `fd` shared and read-write where the kernel chooses.
pub(crate) fn map_shared(len: u64, fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: a new mapping at an address the kernel chooses; it replaces nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p as u64)
    }
}

/// Unmaps `[addr, addr + len)`; the crate calls it only on mappings it made.
pub(crate) fn munmap(addr: u64, len: u64) {
    // SAFETY: the crate unmaps only address space it mapped itself and no longer hands out.
    let _ = unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) };
}

/// Drops the page-table entries of `[addr, addr + len)` of a shared mapping (the page cache
/// keeps the data); the next access faults.
pub(crate) fn zap(addr: u64, len: u64) -> io::Result<()> {
    // SAFETY: MADV_DONTNEED on a shared file mapping changes no content, only page tables;
    // the crate calls it on its own mappings.
    check(unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) })
        .map(|_| ())
}

/// Marks `[addr, addr + len)` not to be inherited by a child process (`MADV_DONTFORK`): the
/// child has nothing mapped there, so a touch is SIGSEGV rather than a look at frames the
/// parent goes on moving and reusing.
pub(crate) fn dont_fork(addr: u64, len: u64) -> io::Result<()> {
    // SAFETY: MADV_DONTFORK only changes how the mapping is copied at fork; the crate calls
    // it on its own mappings.
    check(unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_DONTFORK) })
        .map(|_| ())
}

/// Sends SIGBUS to thread `tid` of this process (a fault that cannot be served, as the
/// kernel does when a device page cannot come home).
pub(crate) fn sigbus(tid: i32) -> io::Result<()> {
    // SAFETY: getpid has no arguments and cannot fail.
    let pid = unsafe { libc::getpid() };
    // SAFETY: tgkill takes three integers and touches no memory.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGBUS) };
    check(rc as libc::c_int).map(|_| ())
}
