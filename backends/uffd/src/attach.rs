//! One [`PointerSpace`] per [`AddressSpace`]: the process's table of address spaces that have
//! this crate's CPU mapping layer, and the space (if any) that lives on each.
//!
//! The engine takes a CPU mapping layer once per address space and never gives it back
//! (`AddressSpace::set_cpu_mappings`), so the layer installed by the first space stays; its
//! table of ranges is kept here and handed to the next space of the same address space once
//! the first is dropped.

use crate::error::UffdError;
use crate::space::{PointerSpace, Ranges, TakeOut};
use drm_pagemap_core::AddressSpace;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

pub(crate) struct Entry {
    mm: Weak<AddressSpace>,
    /// The ranges table the installed layer looks pages up in.
    ranges: Ranges,
    space: Weak<PointerSpace>,
}

static TABLE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

pub(crate) fn lock() -> MutexGuard<'static, Vec<Entry>> {
    TABLE.lock().unwrap_or_else(|p| p.into_inner())
}

fn find<'a>(table: &'a mut [Entry], mm: &Arc<AddressSpace>) -> Option<&'a mut Entry> {
    table
        .iter_mut()
        .find(|e| std::ptr::eq(e.mm.as_ptr(), Arc::as_ptr(mm)))
}

/// The ranges table for a new space of `mm`: the installed layer's when `mm` had a space
/// before, a new layer's otherwise. [`UffdError::AlreadyAttached`] when a space of `mm` lives
/// or `mm` has a layer of somebody else's.
pub(crate) fn claim(table: &mut Vec<Entry>, mm: &Arc<AddressSpace>) -> Result<Ranges, UffdError> {
    // Entries of address spaces that are gone (their addresses may be reused).
    table.retain(|e| e.mm.strong_count() > 0);
    if let Some(e) = find(table, mm) {
        if e.space.strong_count() > 0 {
            return Err(UffdError::AlreadyAttached {
                holder: "a live PointerSpace (PointerSpace::attached returns it)",
            });
        }
        return Ok(e.ranges.clone());
    }
    let ranges = Ranges::default();
    mm.set_cpu_mappings(Arc::new(TakeOut {
        ranges: ranges.clone(),
    }))
    .map_err(|_| UffdError::AlreadyAttached {
        holder: "a CPU mapping layer that is not drm-pagemap-uffd's",
    })?;
    table.push(Entry {
        mm: Arc::downgrade(mm),
        ranges: ranges.clone(),
        space: Weak::new(),
    });
    Ok(ranges)
}

/// Records `space` as `mm`'s live space (after [`claim`], under the same lock).
pub(crate) fn settle(table: &mut [Entry], mm: &Arc<AddressSpace>, space: Weak<PointerSpace>) {
    if let Some(e) = find(table, mm) {
        e.space = space;
    }
}

/// The live space of `mm`.
pub(crate) fn live(table: &[Entry], mm: &Arc<AddressSpace>) -> Option<Arc<PointerSpace>> {
    table
        .iter()
        .find(|e| std::ptr::eq(e.mm.as_ptr(), Arc::as_ptr(mm)))
        .and_then(|e| e.space.upgrade())
}
