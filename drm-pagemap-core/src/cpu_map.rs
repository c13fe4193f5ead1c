//! The CPU mapping of ranges that are real memory of the process (see the
//! `drm-pagemap-uffd` crate): the one hook the engine calls so that a layer above can keep a
//! process mapping in step with where pages live.
//!
//! The engine itself has no mapping of its own: it reaches system pages through
//! [`crate::HostMemory`]. A layer that maps a range's system frames at the range's addresses
//! (so the application uses plain loads and stores) installs a [`CpuMappings`] with
//! [`crate::AddressSpace::set_cpu_mappings`]; the engine then calls
//! [`CpuMappings::take_out`] on the pages of every migration to device memory, after they are
//! locked and before any copy is issued, as the kernel's `migrate_vma_setup` unmaps them. The
//! way back is the layer's own: its CPU-fault handler calls
//! [`crate::AddressSpace::with_cpu_page`], which brings the page home (or populates it) and
//! hands the layer the page's frame under the state lock, so it can map it again before the
//! page can move.

use crate::types::VaRange;

/// Keeps a process mapping of ranges in step with the engine (see the module docs).
pub trait CpuMappings: Send + Sync {
    /// Removes the CPU mapping of `range` (page aligned, inside one range of the address
    /// space): called with the range's pages locked for a migration, before any copy is
    /// issued. When it returns, no CPU store may reach those pages' frames through the
    /// mapping; a later CPU access must wait (a fault) until the layer maps the page again.
    /// Ranges the layer does not map must be ignored. Must not call back into the address
    /// space (the pages are locked: it would wait for itself).
    fn take_out(&self, range: VaRange);
}
