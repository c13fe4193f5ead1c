//! Fence context ids: unique among every allocator that shares one source.
//!
//! Code that holds fences of several timelines trusts context ids to be unique (xe-svm's
//! table of queue contexts, a backend's "ordered by my own queue" test). A counter in a
//! `static` is unique only within one copy of the core: a plug-in built separately carries its
//! own copy and would start again at 1. So the ids come from a [`FenceContexts`], and a host
//! hands its allocator to a plug-in, whose copy of the core installs it as its global one
//! ([`FenceContexts::install_global`]) before it makes any fence.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Where fence context ids come from. Implemented by [`FenceContexts`] (a counter, or a
/// delegate to another allocator) and, across a C ABI, by a host-provided function.
pub trait FenceContextSource: Send + Sync {
    /// Reserves `count` (at least 1) consecutive ids and returns the first. Never hands out an
    /// id twice, and never 0.
    fn reserve(&self, count: u64) -> u64;
}

/// The root source: a counter from 1.
struct Counter(AtomicU64);

impl FenceContextSource for Counter {
    fn reserve(&self, count: u64) -> u64 {
        self.0.fetch_add(count.max(1), Ordering::Relaxed)
    }
}

/// An allocator of fence context ids. Clones share the source; an allocator made with
/// [`FenceContexts::from_source`] of another shares that one's, so the two never collide.
#[derive(Clone)]
pub struct FenceContexts(Arc<dyn FenceContextSource>);

impl fmt::Debug for FenceContexts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FenceContexts")
    }
}

impl Default for FenceContexts {
    fn default() -> Self {
        FenceContexts::new()
    }
}

static GLOBAL: OnceLock<FenceContexts> = OnceLock::new();

impl FenceContexts {
    /// A new root allocator (ids from 1). Two roots collide: share one instead.
    pub fn new() -> FenceContexts {
        FenceContexts(Arc::new(Counter(AtomicU64::new(1))))
    }

    /// An allocator drawing from `source` (another allocator, or a host's function).
    pub fn from_source(source: Arc<dyn FenceContextSource>) -> FenceContexts {
        FenceContexts(source)
    }

    /// A fresh id.
    pub fn next(&self) -> u64 {
        self.0.reserve(1)
    }

    /// `count` consecutive fresh ids; returns the first.
    pub fn reserve(&self, count: u64) -> u64 {
        self.0.reserve(count)
    }

    /// This copy of the core's process-wide allocator: the one installed with
    /// [`FenceContexts::install_global`], else a root made on first use.
    pub fn global() -> &'static FenceContexts {
        GLOBAL.get_or_init(FenceContexts::new)
    }

    /// Makes `contexts` this copy of the core's global allocator. Must come before any id
    /// was taken from the global one (a plug-in does it first thing when the host opens it);
    /// afterwards it is refused and `contexts` comes back.
    pub fn install_global(contexts: FenceContexts) -> Result<(), FenceContexts> {
        GLOBAL.set(contexts)
    }
}

impl FenceContextSource for FenceContexts {
    fn reserve(&self, count: u64) -> u64 {
        self.0.reserve(count)
    }
}

/// Fresh context ids from [`FenceContexts::global`].
#[derive(Clone, Copy, Debug)]
pub struct FenceContext;

impl FenceContext {
    /// A fresh context id from the global allocator.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> u64 {
        FenceContexts::global().next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn allocators_sharing_a_source_never_collide() {
        // The host's allocator, and a plug-in's copy drawing from it (through the trait, as
        // a C function would).
        let host = FenceContexts::new();
        let plugin = FenceContexts::from_source(Arc::new(host.clone()));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let a = if t % 2 == 0 {
                    host.clone()
                } else {
                    plugin.clone()
                };
                std::thread::spawn(move || {
                    let mut ids = Vec::new();
                    // Miri runs every step of the atomics: fewer rounds there.
                    let rounds = if cfg!(miri) { 40u64 } else { 2000 };
                    for k in 0..rounds {
                        if k % 7 == 0 {
                            let first = a.reserve(3);
                            ids.extend([first, first + 1, first + 2]);
                        } else {
                            ids.push(a.next());
                        }
                    }
                    ids
                })
            })
            .collect();
        let mut seen = HashSet::new();
        for t in threads {
            for id in t.join().unwrap() {
                assert_ne!(id, 0);
                assert!(seen.insert(id), "context {id} handed out twice");
            }
        }
        // Two roots, by contrast, collide: the reason to share one.
        assert_eq!(FenceContexts::new().next(), FenceContexts::new().next());
    }
}
