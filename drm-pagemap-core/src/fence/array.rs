//! Containers of fences.

use super::{Fence, FenceCallback, FenceContext, FenceOps, FenceStatus};
use crate::error::{BackendError, FenceError};
use crate::sync::{Arc, AtomicU64, Mutex, Ordering};
use std::time::{Duration, Instant};

/// A container: signals when every member has signalled; its error is the first member error
/// in member order. Lives on a fresh context of its own (seqno 1). Nested containers are
/// flattened: the members are never containers.
#[derive(Debug)]
pub struct FenceArray {
    context: u64,
    members: Vec<Fence>,
}

impl FenceArray {
    /// A container of `members` (containers among them contribute their members).
    pub fn new(members: Vec<Fence>) -> FenceArray {
        let flat = if members.iter().any(Fence::is_container) {
            let mut flat = Vec::with_capacity(members.len());
            for m in members {
                match m.members() {
                    Some(inner) => flat.extend(inner.iter().cloned()),
                    None => flat.push(m),
                }
            }
            flat
        } else {
            members
        };
        FenceArray {
            context: FenceContext::new(),
            members: flat,
        }
    }

    /// The fences it aggregates.
    pub fn members(&self) -> &[Fence] {
        &self.members
    }

    /// One fence for `fences`: none → `None`; one → that fence; several → a container.
    pub fn unify(mut fences: Vec<Fence>) -> Option<Fence> {
        match fences.len() {
            0 => None,
            1 => fences.pop(),
            _ => Some(Fence::new(FenceArray::new(fences))),
        }
    }
}

/// The members' callbacks counting down to the container's.
struct Join {
    left: AtomicU64,
    /// The error of the lowest-numbered failed member so far.
    first_err: Mutex<Option<(usize, BackendError)>>,
    cb: Mutex<Option<FenceCallback>>,
}

impl Join {
    fn member_done(&self, index: usize, outcome: Result<(), FenceError>) {
        if let Err(e) = outcome {
            let e = match e {
                FenceError::Failed(b) => b,
                // Callbacks never report timeouts; keep whatever came as a copy failure.
                other => BackendError::new(crate::BackendErrorKind::CopyFailed, other.to_string()),
            };
            let mut first = self.first_err.lock().unwrap_or_else(|p| p.into_inner());
            if first.as_ref().is_none_or(|(i, _)| index < *i) {
                *first = Some((index, e));
            }
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let cb = self.cb.lock().unwrap_or_else(|p| p.into_inner()).take();
            let first = self
                .first_err
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(cb) = cb {
                cb(match first {
                    None => Ok(()),
                    Some((_, e)) => Err(FenceError::Failed(e)),
                });
            }
        }
    }
}

impl FenceOps for FenceArray {
    fn context(&self) -> u64 {
        self.context
    }

    fn seqno(&self) -> u64 {
        1
    }

    fn status(&self) -> FenceStatus {
        let mut first_err = None;
        for m in &self.members {
            match m.status() {
                FenceStatus::Pending => return FenceStatus::Pending,
                FenceStatus::Signaled => {}
                FenceStatus::Failed(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(FenceStatus::Signaled, FenceStatus::Failed)
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
        let start = Instant::now();
        let mut first_err = None;
        for m in &self.members {
            let left = timeout.map(|t| t.saturating_sub(start.elapsed()));
            match m.wait_for(left) {
                Ok(()) => {}
                Err(FenceError::Timeout(_)) => {
                    return Err(FenceError::Timeout(timeout.unwrap_or_default()));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn members(&self) -> Option<&[Fence]> {
        Some(&self.members)
    }

    fn add_callback(&self, cb: FenceCallback) -> Result<(), FenceCallback> {
        if self.members.is_empty() {
            cb(Ok(()));
            return Ok(());
        }
        let join = Arc::new(Join {
            left: AtomicU64::new(self.members.len() as u64),
            first_err: Mutex::new(None),
            cb: Mutex::new(Some(cb)),
        });
        for (i, m) in self.members.iter().enumerate() {
            let j = join.clone();
            m.add_callback(Box::new(move |outcome| j.member_done(i, outcome)));
        }
        Ok(())
    }
}
