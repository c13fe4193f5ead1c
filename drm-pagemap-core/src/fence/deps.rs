//! Sorting a copy's pre-fence into what its backend does about each part: one function every
//! backend uses (CUDA, Level Zero, the plug-in adapter), so none of them inspects fences on
//! its own.

use super::{Fence, FenceArray, FenceStatus, NativeFence};
use crate::error::BackendError;

/// What a backend can do with a fence's native handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NativeWait {
    /// Its queue waits for it on the device.
    Device,
    /// Nothing: work submitted to the queue is already ordered after it, and learns of its
    /// failure (e.g. an event of the same in-order queue whose handle is
    /// [`NativeFence::COMPLETE`]).
    Ordered,
    /// It cannot wait for this handle: the fence is bridged from the host.
    No,
}

/// A pre-fence, sorted (see [`sort_dependencies`]).
#[derive(Debug, Default)]
pub struct Dependencies {
    /// Pending fences the queue waits for on the device, each with its native handle. Keep the
    /// fences while the queue may wait (the handle is valid while its fence lives), and look
    /// at them for errors of what they depend on unless the handle is complete.
    pub device: Vec<(Fence, NativeFence)>,
    /// Pending fences the device cannot wait for: bridge them from the host (submit once they
    /// signal, with [`Dependencies::when_host_signaled`], or signal a host-visible device
    /// event from a callback), never with a thread per copy.
    pub host: Vec<Fence>,
    /// A fence that has already failed: the copy must fail without being queued.
    pub failed: Option<BackendError>,
}

impl Dependencies {
    /// Empties the lists (to reuse their memory).
    pub fn clear(&mut self) {
        self.device.clear();
        self.host.clear();
        self.failed = None;
    }

    /// Whether nothing is left to wait for.
    pub fn is_empty(&self) -> bool {
        self.device.is_empty() && self.host.is_empty() && self.failed.is_none()
    }

    /// Runs `work` on the shared fence worker once every host fence has signalled, with the
    /// first error among them (in order), right away (on the worker) if there are none.
    pub fn when_host_signaled(&self, work: super::FenceCallback) {
        match FenceArray::unify(self.host.clone()) {
            Some(f) => f.on_signal(work),
            None => Fence::signaled().on_signal(work),
        }
    }
}

/// Sorts `pre` (containers flattened, signalled fences dropped) into `out` (cleared first):
/// fences whose native handle `can_wait` accepts for the device ([`NativeWait::Device`]),
/// those it says are already ordered ([`NativeWait::Ordered`]: dropped), the rest for the host,
/// and the first error of a fence that already failed (then the lists may be incomplete: the
/// copy fails anyway).
pub fn sort_dependencies(
    pre: Option<&Fence>,
    can_wait: impl Fn(&Fence, &NativeFence) -> NativeWait,
    out: &mut Dependencies,
) {
    out.clear();
    if let Some(f) = pre {
        sort_one(f, &can_wait, out);
    }
}

fn sort_one(
    f: &Fence,
    can_wait: &impl Fn(&Fence, &NativeFence) -> NativeWait,
    out: &mut Dependencies,
) {
    if out.failed.is_some() {
        return;
    }
    if let Some(members) = f.members() {
        for m in members {
            sort_one(m, can_wait, out);
        }
        return;
    }
    // The native handle first: a fence of the queue's own order needs no status query.
    let native = f.native();
    if let Some(n) = &native
        && can_wait(f, n) == NativeWait::Ordered
    {
        return;
    }
    match f.status() {
        FenceStatus::Signaled => {}
        FenceStatus::Failed(e) => out.failed = Some(e),
        FenceStatus::Pending => match native {
            Some(n) if can_wait(f, &n) == NativeWait::Device => out.device.push((f.clone(), n)),
            _ => out.host.push(f.clone()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fence::{FenceOps, FenceTimeline, HostFence, NativeFenceKind};
    use crate::{BackendErrorKind, FenceError};
    use std::time::Duration;

    /// A device fence of a made-up kind, completed by the test.
    #[derive(Debug)]
    struct Device {
        host: std::sync::Arc<HostFence>,
        complete: bool,
    }

    impl FenceOps for Device {
        fn context(&self) -> u64 {
            self.host.context()
        }
        fn seqno(&self) -> u64 {
            self.host.seqno()
        }
        fn status(&self) -> FenceStatus {
            self.host.status()
        }
        fn wait(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
            self.host.wait(timeout)
        }
        fn native(&self) -> Option<NativeFence> {
            Some(NativeFence {
                kind: NativeFenceKind::PLUGIN_FIRST,
                flags: if self.complete {
                    NativeFence::COMPLETE
                } else {
                    0
                },
                domain: 7,
                handle: self.host.seqno(),
            })
        }
    }

    /// A wrapper that only observes (as xe-svm's timing fence): it delegates the handle.
    #[derive(Debug)]
    struct Observer(Fence);

    impl FenceOps for Observer {
        fn context(&self) -> u64 {
            self.0.context()
        }
        fn seqno(&self) -> u64 {
            self.0.seqno()
        }
        fn status(&self) -> FenceStatus {
            self.0.status()
        }
        fn wait(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
            self.0.wait_for(timeout)
        }
        fn native(&self) -> Option<NativeFence> {
            self.0.native()
        }
        fn members(&self) -> Option<&[Fence]> {
            self.0.members()
        }
    }

    fn waits(f: &Fence, n: &NativeFence) -> NativeWait {
        match n.kind {
            NativeFenceKind::PLUGIN_FIRST if n.is_complete() && f.context() == 1000 => {
                NativeWait::Ordered
            }
            NativeFenceKind::PLUGIN_FIRST => NativeWait::Device,
            _ => NativeWait::No,
        }
    }

    #[test]
    fn a_pre_fence_is_sorted_by_what_the_backend_can_wait_on() {
        let queue = FenceTimeline::new();
        let dev = |complete| {
            Fence::new(Device {
                host: queue.host_fence(),
                complete,
            })
        };
        let own = Fence::new(Device {
            host: FenceTimeline::on_context(1000).host_fence(),
            complete: true,
        });
        let host = Fence::from_host(queue.host_fence());
        let done = Fence::signaled();
        let (d0, d1) = (dev(true), dev(false));
        // A device fence wrapped twice, inside a container inside a container.
        let wrapped = Fence::new(Observer(Fence::new(Observer(d1.clone()))));
        let inner = Fence::new(FenceArray::new(vec![wrapped, done.clone()]));
        let pre = Fence::new(FenceArray::new(vec![d0.clone(), inner, host.clone(), own]));
        assert_eq!(
            pre.members().unwrap().len(),
            5,
            "nested containers flattened"
        );
        let mut out = Dependencies::default();
        sort_dependencies(Some(&pre), waits, &mut out);
        let device: Vec<u64> = out.device.iter().map(|(_, n)| n.handle).collect();
        assert_eq!(device, vec![d0.seqno(), d1.seqno()], "both device fences");
        assert!(out.device[0].1.is_complete() && !out.device[1].1.is_complete());
        assert_eq!(out.host.len(), 1);
        assert!(out.host[0].ptr_eq(&host));
        assert!(out.failed.is_none());
        // Signalled ones are dropped; a failed one fails the call.
        let failed = Fence::failed(crate::BackendError::new(BackendErrorKind::CopyFailed, "x"));
        let pre = Fence::new(FenceArray::new(vec![done, failed]));
        sort_dependencies(Some(&pre), waits, &mut out);
        assert!(out.device.is_empty() && out.host.is_empty());
        assert_eq!(out.failed.as_ref().map(|e| e.message.as_str()), Some("x"));
        sort_dependencies(None, waits, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    // The fence worker is a thread that lives as long as the process; Miri refuses to end a
    // program with threads still running.
    #[cfg_attr(miri, ignore)]
    fn host_fences_are_bridged_on_the_worker_exactly_once() {
        let tl = FenceTimeline::new();
        let (a, b) = (tl.host_fence(), tl.host_fence());
        let mut deps = Dependencies::default();
        let pre = Fence::new(FenceArray::new(vec![
            Fence::from_host(a.clone()),
            Fence::from_host(b.clone()),
        ]));
        sort_dependencies(Some(&pre), waits, &mut deps);
        assert_eq!(deps.host.len(), 2);
        let (tx, rx) = std::sync::mpsc::channel();
        let me = std::thread::current().id();
        deps.when_host_signaled(Box::new(move |outcome| {
            tx.send((outcome, std::thread::current().id())).unwrap();
        }));
        a.signal();
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err(), "early");
        b.signal_error(crate::BackendError::new(BackendErrorKind::CopyFailed, "b"));
        let (outcome, on) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(matches!(outcome, Err(FenceError::Failed(e)) if e.message == "b"));
        assert_ne!(on, me, "ran on the fence worker");
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err(), "once");
    }
}
