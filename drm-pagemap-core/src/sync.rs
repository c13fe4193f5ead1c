//! The synchronisation primitives the fence code uses: `std::sync`, or `loom::sync` when
//! built with `--cfg loom` so that the model checker can explore every interleaving.
//!
//! `Arc` stays `std::sync::Arc` in both builds: a [`crate::Fence`] is an `Arc<dyn FenceOps>`,
//! and loom's `Arc` cannot hold an unsized value. The state loom must see (the fence's mutex,
//! condition variable and the timeline's counter) is swapped.

pub(crate) use std::sync::Arc;

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex};
