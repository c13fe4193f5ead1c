//! Handles: pointers to leaked heap objects whose first field is a magic number.
//!
//! Every object ever created is remembered in a set of addresses, so a pointer is only read
//! after it is known to be one of ours. Destroying an object poisons its magic; the memory is
//! never freed or reused, so a stale handle is detected (use after destroy), never a crash.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, RwLock};

use super::{ZeResult, code, hard_violation};

/// Set in the magic of a destroyed object.
const POISON: u64 = 0xDEAD_0000_0000_0000;

/// An object type behind a handle.
pub(crate) trait Kind: Send + Sync + 'static {
    /// The live object's magic (its high 16 bits are zero).
    const MAGIC: u64;
}

/// The object a handle points to.
#[repr(C)]
pub(crate) struct Handle<T> {
    magic: AtomicU64,
    /// The object.
    pub obj: T,
}

/// The addresses of every object ever created.
static KNOWN: LazyLock<RwLock<HashSet<usize>>> = LazyLock::new(Default::default);

impl<T: Kind> Handle<T> {
    /// Creates the object; it lives for the rest of the process.
    pub fn create(obj: T) -> &'static Self {
        let handle: &'static Self = Box::leak(Box::new(Handle {
            magic: AtomicU64::new(T::MAGIC),
            obj,
        }));
        KNOWN
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(handle as *const Self as usize);
        handle
    }

    /// The handle value given to the application.
    pub fn raw<P>(&'static self) -> *mut P {
        self as *const Self as *mut P
    }

    /// Resolves a handle of kind `T`: null is `INVALID_NULL_HANDLE`; an unknown pointer, a
    /// destroyed object or an object of another kind is a strict violation
    /// (`INVALID_NULL_HANDLE` / `INVALID_ARGUMENT`).
    pub fn resolve<P>(ptr: *mut P) -> ZeResult<&'static Self> {
        if ptr.is_null() {
            return Err(code::INVALID_NULL_HANDLE);
        }
        let addr = ptr as usize;
        if !KNOWN
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&addr)
        {
            return Err(hard_violation(code::INVALID_NULL_HANDLE));
        }
        // SAFETY: `addr` is the address of a `Handle<_>` created by `create` and never freed;
        // every `Handle<_>` is `repr(C)` with the magic first, so reading it as an AtomicU64 is
        // valid whatever the kind.
        let magic = unsafe { &*(addr as *const AtomicU64) }.load(Ordering::Acquire);
        if magic == T::MAGIC {
            // SAFETY: the magic says this object is a live `Handle<T>` (magics are unique per kind).
            Ok(unsafe { &*(addr as *const Self) })
        } else if magic == T::MAGIC | POISON {
            Err(hard_violation(code::INVALID_NULL_HANDLE))
        } else {
            Err(hard_violation(code::INVALID_ARGUMENT))
        }
    }

    /// Whether the object is still alive.
    pub fn alive(&self) -> bool {
        self.magic.load(Ordering::Acquire) == T::MAGIC
    }

    /// Poisons the object; destroying it twice is a violation (`INVALID_NULL_HANDLE`).
    pub fn destroy(&self) -> ZeResult {
        match self.magic.compare_exchange(
            T::MAGIC,
            T::MAGIC | POISON,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Ok(()),
            Err(_) => Err(hard_violation(code::INVALID_NULL_HANDLE)),
        }
    }
}

/// Resolves a pointer-newtype handle (`ze_*_handle_t`).
macro_rules! resolve {
    ($kind:ty, $handle:expr) => {
        $crate::driver::handles::Handle::<$kind>::resolve($handle.0)
    };
}
pub(crate) use resolve;
