//! Device-memory accounting of one pagemap: bytes in use against a capacity, allocations in
//! least-recently-used order, and the migrations in flight.
//!
//! `used` is exact: it moves in the pagemap's `allocate` / `devmem_release` (see
//! [`crate::copy`]), whoever asked for the memory. The LRU list only holds allocations the
//! fault handler made; entries whose allocation went away by other means (a CPU access brought
//! the pages home, another device took them) are dropped when met, and pruned in bulk when the
//! list grows past twice the live allocations.

use drm_pagemap_core::{AllocId, DeviceId, PagemapId};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// A public snapshot of one pagemap's accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryUsage {
    /// The pagemap.
    pub pagemap: PagemapId,
    /// Its device.
    pub device: DeviceId,
    /// Bytes it may hand out.
    pub capacity: u64,
    /// Bytes allocated now (live allocations, including ones being migrated into).
    pub used: u64,
    /// The most bytes ever allocated at once.
    pub peak: u64,
    /// Allocations alive now.
    pub allocations: u64,
    /// Allocations the fault handler made that are candidates for eviction.
    pub lru_entries: usize,
}

/// A hasher for allocation ids (two small integers, not attacker-chosen): a multiply per
/// word instead of SipHash's rounds.
#[derive(Clone, Copy, Debug, Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64);
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type BuildIdHasher = std::hash::BuildHasherDefault<IdHasher>;

#[derive(Debug, Default)]
struct Lru {
    /// tick -> (allocation, bytes); the smallest tick is the least recently used.
    by_tick: BTreeMap<u64, (AllocId, u64)>,
    tick_of: HashMap<AllocId, u64, BuildIdHasher>,
    next_tick: u64,
    /// Allocations made by faults and not yet migrated into (or released).
    inflight: usize,
}

/// The accounting of one pagemap.
#[derive(Debug)]
pub(crate) struct Account {
    pub pagemap: PagemapId,
    pub device: DeviceId,
    pub capacity: u64,
    used: AtomicU64,
    peak: AtomicU64,
    live: AtomicU64,
    lru: Mutex<Lru>,
    changed: Condvar,
    /// Threads in [`Account::wait_change`]: a notification is a system call, made only when
    /// someone waits (every fault ends an in-flight migration).
    waiters: AtomicUsize,
}

impl Account {
    pub(crate) fn new(pagemap: PagemapId, device: DeviceId, capacity: u64) -> Account {
        Account {
            pagemap,
            device,
            capacity,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            live: AtomicU64::new(0),
            lru: Mutex::new(Lru::default()),
            changed: Condvar::new(),
            waiters: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the threads in [`Account::wait_change`], if any. A waiter registers under the
    /// lock and holds it until it sleeps, so taking the lock first means none is between
    /// registering and sleeping (it would miss the notification).
    fn notify(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            drop(self.lock());
            self.changed.notify_all();
        }
    }

    /// Takes `bytes` of the capacity; false if they do not fit.
    pub(crate) fn try_reserve(&self, bytes: u64) -> bool {
        let mut cur = self.used.load(Ordering::Acquire);
        loop {
            let Some(next) = cur.checked_add(bytes).filter(|&n| n <= self.capacity) else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::Relaxed);
                    self.live.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Err(v) => cur = v,
            }
        }
    }

    /// Gives back `bytes` (an allocation was released, or its creation failed).
    pub(crate) fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        self.live.fetch_sub(1, Ordering::Relaxed);
        self.notify();
    }

    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// A fault's allocation exists and is being migrated into.
    pub(crate) fn begin_inflight(&self) {
        self.lock().inflight += 1;
    }

    /// That migration finished; `done` holds the allocation and its bytes if it now holds
    /// pages (it becomes the most recently used).
    pub(crate) fn end_inflight(&self, done: Option<(AllocId, u64)>) {
        let mut l = self.lock();
        l.inflight -= 1;
        if let Some((id, bytes)) = done {
            let t = l.next_tick;
            l.next_tick += 1;
            l.by_tick.insert(t, (id, bytes));
            if let Some(old) = l.tick_of.insert(id, t) {
                l.by_tick.remove(&old);
            }
        }
        drop(l);
        self.notify();
    }

    /// Marks `ids` used now.
    pub(crate) fn touch(&self, ids: impl IntoIterator<Item = AllocId>) {
        let mut l = self.lock();
        for id in ids {
            if let Some(old) = l.tick_of.get(&id).copied() {
                if old + 1 == l.next_tick {
                    // Already the most recently used (the fault that just migrated into
                    // it): a new tick would not change the order.
                    continue;
                }
                let t = l.next_tick;
                l.next_tick += 1;
                if let Some(e) = l.by_tick.remove(&old) {
                    l.by_tick.insert(t, e);
                }
                l.tick_of.insert(id, t);
            }
        }
    }

    /// Takes the least recently used entry off the list.
    pub(crate) fn pop_oldest(&self) -> Option<(AllocId, u64)> {
        let mut l = self.lock();
        let (_, (id, bytes)) = l.by_tick.pop_first()?;
        l.tick_of.remove(&id);
        Some((id, bytes))
    }

    /// Puts an entry back as the most recently used (its eviction was refused for now).
    pub(crate) fn requeue(&self, id: AllocId, bytes: u64) {
        let mut l = self.lock();
        let t = l.next_tick;
        l.next_tick += 1;
        l.by_tick.insert(t, (id, bytes));
        l.tick_of.insert(id, t);
    }

    /// Allocations of other faults being migrated into right now.
    pub(crate) fn inflight(&self) -> usize {
        self.lock().inflight
    }

    /// Waits (briefly) for memory to be released or a migration to finish.
    pub(crate) fn wait_change(&self, limit: Duration) {
        let l = self.lock();
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let l = self
            .changed
            .wait_timeout(l, limit)
            .unwrap_or_else(|p| p.into_inner())
            .0;
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        drop(l);
    }

    /// Whether the LRU list has grown past twice the live allocations (stale entries).
    pub(crate) fn needs_prune(&self) -> bool {
        let n = self.lock().by_tick.len() as u64;
        n > 2 * self.live.load(Ordering::Relaxed) + 16
    }

    /// Drops the entries `alive` says are gone.
    pub(crate) fn prune(&self, alive: impl Fn(AllocId) -> bool) {
        let entries: Vec<(u64, AllocId)> = self
            .lock()
            .by_tick
            .iter()
            .map(|(&t, &(id, _))| (t, id))
            .collect();
        let dead: Vec<(u64, AllocId)> = entries.into_iter().filter(|&(_, id)| !alive(id)).collect();
        let mut l = self.lock();
        for (t, id) in dead {
            if l.tick_of.get(&id) == Some(&t) {
                l.tick_of.remove(&id);
                l.by_tick.remove(&t);
            }
        }
    }

    pub(crate) fn usage(&self) -> MemoryUsage {
        MemoryUsage {
            pagemap: self.pagemap,
            device: self.device,
            capacity: self.capacity,
            used: self.used(),
            peak: self.peak.load(Ordering::Relaxed),
            allocations: self.live.load(Ordering::Relaxed),
            lru_entries: self.lock().by_tick.len(),
        }
    }

    /// The LRU order, oldest first (for tests and tables).
    pub(crate) fn lru_order(&self) -> Vec<AllocId> {
        self.lock().by_tick.values().map(|&(id, _)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_respects_capacity_and_tracks_peak() {
        let a = Account::new(PagemapId(0), DeviceId(0), 100);
        assert!(a.try_reserve(60));
        assert!(!a.try_reserve(41));
        assert!(a.try_reserve(40));
        assert_eq!(a.usage().used, 100);
        a.release(60);
        assert_eq!(a.usage().used, 40);
        assert_eq!(a.usage().peak, 100);
        assert_eq!(a.usage().allocations, 1);
        assert!(!a.try_reserve(u64::MAX));
    }
}
