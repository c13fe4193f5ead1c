//! Native fence handles: what a device can wait on without the CPU.

/// What kind of primitive a [`NativeFence`] handle is. The values are stable (a C ABI carries
/// them); plug-ins define their own kinds from [`NativeFenceKind::PLUGIN_FIRST`] on.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NativeFenceKind(pub u32);

impl NativeFenceKind {
    /// A CUDA event (`CUevent`); `domain` is the `CUcontext` it was created in.
    pub const CUDA_EVENT: NativeFenceKind = NativeFenceKind(1);
    /// A Level Zero event (`ze_event_handle_t`); `domain` is its `ze_context_handle_t`.
    pub const LEVEL_ZERO_EVENT: NativeFenceKind = NativeFenceKind(2);
    /// The first value a plug-in may use for a kind of its own.
    pub const PLUGIN_FIRST: NativeFenceKind = NativeFenceKind(0x1000);
}

/// A fence's native primitive: a backend that knows `kind` (and can reach `domain`) makes its
/// queue wait for it on the device instead of waiting on the CPU. The handle stays valid while
/// the [`super::Fence`] it came from lives: keep the fence with the handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NativeFence {
    /// What the handle is.
    pub kind: NativeFenceKind,
    /// [`NativeFence::COMPLETE`] and future flags.
    pub flags: u32,
    /// The API instance that owns the handle (a CUDA context, a Level Zero context): a
    /// backend waits on the device only for handles of a domain it can reach.
    pub domain: u64,
    /// The raw handle.
    pub handle: u64,
}

impl NativeFence {
    /// Flag: the handle's completion carries the fence's whole outcome (it depends on
    /// nothing else that could fail). Without it, a queue that waits on the handle must keep
    /// the fence to learn of a failure of what the fence also depends on.
    pub const COMPLETE: u32 = 1;

    /// Whether [`NativeFence::COMPLETE`] is set.
    pub fn is_complete(&self) -> bool {
        self.flags & NativeFence::COMPLETE != 0
    }
}
