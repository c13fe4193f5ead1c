//! What a pagemap's copies can do, declared by its backend ([`crate::DevmemOps::caps`]), so
//! that a policy layer over it (xe-svm's copy path, a plug-in adapter) reads the facts
//! instead of guessing them: the largest command the device accepts, which native fences its
//! queue waits on, what it does with fences it cannot wait on, whether its queue runs in
//! order, and a batch size hint.
//!
//! Every type here is plain data of fixed size (no heap, no Rust containers), so the plug-in
//! ABI mirrors it field by field (an `Option<u64>` there is a `u64` with 0 for `None`).
//!
//! The caps describe; they never relax the copy contract of [`crate::backend`]: a backend
//! still accepts any call (any number of entries, any pre-fence) and orders it after its
//! pre-fence. A layer that splits calls or passes fences on uses them to do so without
//! re-planning what the backend plans, and without waiting on the CPU for what the backend
//! handles itself.

use crate::fence::{NativeFence, NativeFenceKind, NativeWait};
use crate::types::PageSize;
use std::fmt;

/// A set of at most [`NativeFenceKinds::CAPACITY`] native fence kinds, stored inline (a C
/// table carries it as a count and a fixed array).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NativeFenceKinds {
    len: u32,
    kinds: [NativeFenceKind; NativeFenceKinds::CAPACITY],
}

impl NativeFenceKinds {
    /// How many kinds a set holds at most.
    pub const CAPACITY: usize = 4;

    /// The empty set: the device waits on no native fence (every pending fence is a host
    /// fence to it).
    pub const NONE: NativeFenceKinds = NativeFenceKinds {
        len: 0,
        kinds: [NativeFenceKind(0); NativeFenceKinds::CAPACITY],
    };

    /// The set of one kind.
    pub const fn one(kind: NativeFenceKind) -> NativeFenceKinds {
        NativeFenceKinds::NONE.with(kind)
    }

    /// This set with `kind` added (no change when it is in already). Panics when the set is
    /// full: a declaration of more than [`NativeFenceKinds::CAPACITY`] kinds is a bug of the
    /// backend (caught at compile time in a `const`).
    pub const fn with(self, kind: NativeFenceKind) -> NativeFenceKinds {
        if self.contains(kind) {
            return self;
        }
        assert!(
            (self.len as usize) < NativeFenceKinds::CAPACITY,
            "more native fence kinds than NativeFenceKinds::CAPACITY"
        );
        let mut out = self;
        out.kinds[self.len as usize] = kind;
        out.len += 1;
        out
    }

    /// Whether `kind` is in the set.
    pub const fn contains(&self, kind: NativeFenceKind) -> bool {
        let mut i = 0;
        while i < self.len as usize {
            if self.kinds[i].0 == kind.0 {
                return true;
            }
            i += 1;
        }
        false
    }

    /// The kinds, in the order they were added.
    pub fn as_slice(&self) -> &[NativeFenceKind] {
        &self.kinds[..self.len as usize]
    }

    /// How many kinds the set holds.
    pub const fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the set is empty.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for NativeFenceKinds {
    fn default() -> Self {
        NativeFenceKinds::NONE
    }
}

impl fmt::Debug for NativeFenceKinds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.as_slice()).finish()
    }
}

/// What a backend does with the pending part of a pre-fence that its device cannot wait on
/// natively (a host fence, a fence of another API, a fence whose wrapper hides its handle):
/// it must still order the copy after it (the copy contract); this says how, and so whether
/// the copy call blocks its caller.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum HostFenceWait {
    /// The copy call waits for it on the CPU, in the caller's thread, before it submits
    /// (the contract's fallback; the default: a backend that declares nothing may do this).
    #[default]
    Blocking = 0,
    /// The device's queue waits for it (a host-visible event signalled from a completion
    /// callback, an engine thread that waits before it runs the command): the call does not
    /// block, and work submitted to the queue later stays behind it.
    InQueue = 1,
    /// The submission is deferred until it has signalled (queued from the core's shared
    /// fence worker, see [`crate::Dependencies::when_host_signaled`]): the call does not
    /// block, but work submitted meanwhile without that fence may run before it.
    Deferred = 2,
}

/// The copy capabilities of one pagemap (one executor's queue), as its backend declares them
/// through [`crate::DevmemOps::caps`]. The default ([`CopyCaps::CONSERVATIVE`]) claims
/// nothing a backend might not do: no command limit (the contract already requires any call
/// to be accepted), no native fence kind, host fences waited in the call, no ordering between
/// calls, no batch preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CopyCaps {
    /// The most bytes (entries with an address, times the page size) one command of the
    /// device may move; `None`: no limit, the backend plans each call itself (one gather
    /// launch, one DMA per run), and a layer above must hand it the core's calls untouched.
    /// A layer that splits for a limit keeps at least one page per command.
    pub max_command_bytes: Option<u64>,
    /// The [`NativeFenceKind`]s its queue waits on by itself (no CPU involved): a pending
    /// pre-fence whose [`crate::Fence::native`] handle is of one of these kinds is passed to
    /// the backend as it is, never waited on the CPU.
    pub native_fence_kinds: NativeFenceKinds,
    /// What it does with the pending rest of a pre-fence (see [`HostFenceWait`]).
    pub host_fences: HostFenceWait,
    /// Its calls run on one queue in submission order: a call issued after another one
    /// returned runs after that one's work (and after what that one waited for on the queue),
    /// so a layer that splits a call may give the pre-fence to the first command only. A call
    /// deferred behind a host fence ([`HostFenceWait::Deferred`]) counts as submitted when it
    /// is queued, not when the call returned.
    pub in_order: bool,
    /// Bytes per call from which the backend's per-call cost is amortised: a caller that can
    /// gather several copies into one call should aim for at least this much. `None`: no
    /// preference.
    pub batch_bytes_hint: Option<u64>,
}

impl CopyCaps {
    /// The default: nothing claimed (see [`CopyCaps`]).
    pub const CONSERVATIVE: CopyCaps = CopyCaps {
        max_command_bytes: None,
        native_fence_kinds: NativeFenceKinds::NONE,
        host_fences: HostFenceWait::Blocking,
        in_order: false,
        batch_bytes_hint: None,
    };

    /// Whether the queue waits for `native` by itself (its kind is declared).
    pub fn waits_natively(&self, native: &NativeFence) -> bool {
        self.native_fence_kinds.contains(native.kind)
    }

    /// What the queue does with `native`, for [`crate::sort_dependencies`]:
    /// [`NativeWait::Device`] for a declared kind, else [`NativeWait::No`] (a host fence to
    /// it). A backend sorting its own pre-fences may know more (a fence of its own queue is
    /// [`NativeWait::Ordered`]).
    pub fn native_wait(&self, native: &NativeFence) -> NativeWait {
        if self.waits_natively(native) {
            NativeWait::Device
        } else {
            NativeWait::No
        }
    }

    /// The most pages of `page_size` per command: `None` without a limit, else at least 1.
    pub fn max_pages_per_command(&self, page_size: PageSize) -> Option<usize> {
        self.max_command_bytes.map(|b| {
            usize::try_from(b / page_size.bytes())
                .unwrap_or(usize::MAX)
                .max(1)
        })
    }
}

impl Default for CopyCaps {
    fn default() -> Self {
        CopyCaps::CONSERVATIVE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XE: CopyCaps = CopyCaps {
        max_command_bytes: Some(8 << 20),
        native_fence_kinds: NativeFenceKinds::one(NativeFenceKind::LEVEL_ZERO_EVENT)
            .with(NativeFenceKind::PLUGIN_FIRST),
        host_fences: HostFenceWait::InQueue,
        in_order: true,
        batch_bytes_hint: None,
    };

    #[test]
    fn kinds_are_a_small_inline_set() {
        let k = XE
            .native_fence_kinds
            .with(NativeFenceKind::LEVEL_ZERO_EVENT);
        assert_eq!(k.len(), 2, "adding a kind twice keeps one");
        assert!(k.contains(NativeFenceKind::PLUGIN_FIRST));
        assert!(!k.contains(NativeFenceKind::CUDA_EVENT));
        assert_eq!(
            k.as_slice(),
            &[
                NativeFenceKind::LEVEL_ZERO_EVENT,
                NativeFenceKind::PLUGIN_FIRST
            ]
        );
        assert!(NativeFenceKinds::default().is_empty());
        assert_eq!(format!("{:?}", NativeFenceKinds::NONE), "{}");
        let full = (0..4).fold(NativeFenceKinds::NONE, |k, i| {
            k.with(NativeFenceKind(10 + i))
        });
        assert_eq!(full.len(), NativeFenceKinds::CAPACITY);
        assert!(std::panic::catch_unwind(|| full.with(NativeFenceKind(99))).is_err());
    }

    #[test]
    fn defaults_claim_nothing_and_limits_keep_a_page() {
        let d = CopyCaps::default();
        assert_eq!(d, CopyCaps::CONSERVATIVE);
        assert_eq!(d.max_pages_per_command(PageSize::Size4K), None);
        assert_eq!(d.host_fences, HostFenceWait::Blocking);
        assert!(!d.in_order && d.native_fence_kinds.is_empty());
        assert_eq!(XE.max_pages_per_command(PageSize::Size4K), Some(2048));
        assert_eq!(XE.max_pages_per_command(PageSize::Size2M), Some(4));
        let tiny = CopyCaps {
            max_command_bytes: Some(1),
            ..CopyCaps::default()
        };
        assert_eq!(tiny.max_pages_per_command(PageSize::Size2M), Some(1));
        let n = |kind| NativeFence {
            kind,
            flags: 0,
            domain: 0,
            handle: 1,
        };
        assert_eq!(
            XE.native_wait(&n(NativeFenceKind::LEVEL_ZERO_EVENT)),
            NativeWait::Device
        );
        assert_eq!(
            XE.native_wait(&n(NativeFenceKind::CUDA_EVENT)),
            NativeWait::No
        );
    }
}
