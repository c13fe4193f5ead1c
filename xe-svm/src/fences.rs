//! A copy call's pre-migrate fence under the backend's caps ([`CopyCaps`]): the core's
//! [`sort_dependencies`] sorts it into what the device waits on natively (a declared
//! [`drm_pagemap_core::NativeFenceKind`]), what the backend must bridge from the host, and
//! what already failed. Nothing is learnt or guessed: a fence's native handle says what it
//! is, whatever wraps it.
//!
//! The only CPU wait left is for a backend that declares [`HostFenceWait::Blocking`]: it would
//! wait for its host fences in the copy call anyway, on this same thread and without a limit;
//! waiting here first bounds that wait by the context's fence timeout (a typed error instead
//! of a hang) and counts it. Backends that bridge host fences themselves
//! ([`HostFenceWait::InQueue`], [`HostFenceWait::Deferred`]) get them passed on, and the
//! faulting thread never blocks on them.

use crate::stats::Counters;
use drm_pagemap_core::{
    BackendError, CopyCaps, Dependencies, Fence, FenceError, HostFenceWait, sort_dependencies,
};
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// What is pending of a call's pre-fence once the policy has looked at it; the backend gets
/// the pre-fence as it is and orders the copy after these parts itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Pending {
    /// Parts the device waits on natively.
    pub device: bool,
    /// Parts the backend bridges from the host.
    pub host: bool,
}

impl Pending {
    /// Whether the backend has anything to order the copy after.
    pub(crate) fn any(self) -> bool {
        self.device || self.host
    }
}

/// Why a pre-fence stops a call before anything is issued.
#[derive(Debug)]
pub(crate) enum Refused {
    /// It had already failed.
    Failed(BackendError),
    /// The CPU wait for a blocking backend failed or timed out.
    Wait(FenceError),
}

thread_local! {
    /// Scratch lists for sorting (no allocation per call once warm).
    static SCRATCH: RefCell<Dependencies> = RefCell::new(Dependencies::default());
}

/// Sorts `pre` for a backend with `caps`; waits on the CPU (bounded by `timeout`, counted in
/// `stats`) only for the host parts of a [`HostFenceWait::Blocking`] backend.
pub(crate) fn sort_pre(
    pre: Option<&Fence>,
    caps: &CopyCaps,
    stats: &Counters,
    timeout: Option<Duration>,
) -> Result<Pending, Refused> {
    let Some(f) = pre else {
        return Ok(Pending::default());
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut deps) => sort_into(f, caps, stats, timeout, &mut deps),
        Err(_) => sort_into(f, caps, stats, timeout, &mut Dependencies::default()),
    })
}

fn sort_into(
    f: &Fence,
    caps: &CopyCaps,
    stats: &Counters,
    timeout: Option<Duration>,
    deps: &mut Dependencies,
) -> Result<Pending, Refused> {
    sort_dependencies(Some(f), |_, n| caps.native_wait(n), deps);
    let r = decide(caps, stats, timeout, deps);
    deps.clear();
    r
}

fn decide(
    caps: &CopyCaps,
    stats: &Counters,
    timeout: Option<Duration>,
    deps: &mut Dependencies,
) -> Result<Pending, Refused> {
    if let Some(e) = deps.failed.take() {
        stats.pre_fence_errors.inc();
        return Err(Refused::Failed(e));
    }
    let mut p = Pending {
        device: !deps.device.is_empty(),
        host: !deps.host.is_empty(),
    };
    if p.host && caps.host_fences == HostFenceWait::Blocking {
        let t = Instant::now();
        let r = deps.host.iter().try_for_each(|h| h.wait_for(timeout));
        stats.cpu_fence_waits.add(0, t.elapsed());
        if let Err(e) = r {
            if matches!(e, FenceError::Failed(_)) {
                stats.pre_fence_errors.inc();
            }
            return Err(Refused::Wait(e));
        }
        p.host = false;
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use drm_pagemap_core::{
        BackendErrorKind, FenceArray, FenceOps, FenceTimeline, NativeFenceKind, NativeFenceKinds,
    };
    use drm_pagemap_testkit::fence::NativeTestFence as Dev;

    fn caps(host_fences: HostFenceWait) -> CopyCaps {
        CopyCaps {
            native_fence_kinds: NativeFenceKinds::one(NativeFenceKind::PLUGIN_FIRST),
            host_fences,
            ..CopyCaps::default()
        }
    }

    #[test]
    fn device_parts_pass_host_parts_pass_or_wait_by_caps() {
        let tl = FenceTimeline::new();
        let (d, h) = (tl.host_fence(), tl.host_fence());
        let pre = Fence::new(FenceArray::new(vec![
            Fence::new(Dev(d.clone())),
            Fence::from_host(h.clone()),
        ]));
        let stats = Counters::default();
        for bridge in [HostFenceWait::InQueue, HostFenceWait::Deferred] {
            let p = sort_pre(Some(&pre), &caps(bridge), &stats, None).unwrap();
            assert_eq!(
                p,
                Pending {
                    device: true,
                    host: true
                }
            );
        }
        assert_eq!(stats.snapshot().cpu_fence_waits.count, 0);
        // A blocking backend: the host part is waited here, bounded by the timeout.
        let blocking = caps(HostFenceWait::Blocking);
        let e = sort_pre(Some(&pre), &blocking, &stats, Some(Duration::ZERO)).unwrap_err();
        assert!(matches!(e, Refused::Wait(FenceError::Timeout(_))), "{e:?}");
        h.signal();
        let p = sort_pre(Some(&pre), &blocking, &stats, None).unwrap();
        assert_eq!(
            p,
            Pending {
                device: true,
                host: false
            }
        );
        assert!(
            d.status().outcome().is_none(),
            "the device part was not waited"
        );
        // Signalled parts are dropped: only the timed-out wait was one.
        assert_eq!(stats.snapshot().cpu_fence_waits.count, 1);
        // Without the kind declared, the device fence is a host fence to the backend.
        let p = sort_pre(
            Some(&pre),
            &CopyCaps::default(),
            &stats,
            Some(Duration::ZERO),
        );
        assert!(matches!(p, Err(Refused::Wait(FenceError::Timeout(_)))));
        d.signal_error(drm_pagemap_core::BackendError::new(
            BackendErrorKind::CopyFailed,
            "clear failed",
        ));
        let p = sort_pre(Some(&pre), &blocking, &stats, None);
        assert!(matches!(p, Err(Refused::Failed(e)) if e.message == "clear failed"));
        assert_eq!(stats.snapshot().pre_fence_errors, 1);
        assert_eq!(
            sort_pre(None, &blocking, &stats, None).unwrap(),
            Pending::default()
        );
    }
}
