//! A persistent copy kernel fed through a ring of descriptors in pinned host memory: small
//! copies skip the driver's submission (issue 16; option `cuda.ring`, off by default).
//!
//! - [`layout`]: the shared block (control words, descriptor slots), as `pages.cu` has it;
//! - [`proto`]: the protocol (publishing, the per-slot seq, back-pressure, stop words) and a
//!   CPU consumer that follows the kernel's steps, for tests;
//! - [`engine`]: the lifecycle (launch on demand, idle stop by a keeper thread, the
//!   consumer's lease, failures, bounded shutdown that leaks rather than frees memory a
//!   consumer may still write);
//! - [`fence`]: the fence of a ring copy;
//! - `cuda`: the block in pinned memory and the launcher of `dpm_ring` on a stream of its
//!   own.
//!
//! Everything but the `cuda` module is backend-agnostic and tested on the CPU.

pub(crate) mod cuda;
pub(crate) mod engine;
pub(crate) mod fence;
pub(crate) mod layout;
pub(crate) mod proto;
#[cfg(test)]
mod tests;
