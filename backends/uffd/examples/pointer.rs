//! A range used through a pointer on the simulated backend: `memcpy` in, a migration to a
//! device, a load that faults the page home.
//!
//! `cargo run -p drm-pagemap-uffd --example pointer`

use drm_pagemap_core::{AddressSpace, Backend, MigrateDetails, PageLocation, PageSize, PagemapId};
use drm_pagemap_sim::{SimBackend, SimConfig};
use drm_pagemap_uffd::{MemfdMemory, PointerSpace, UffdConfig, UffdError};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mem = Arc::new(MemfdMemory::new(1 << 30)?);
    let sim = SimBackend::new(SimConfig {
        devices: 2,
        host_bytes: Some(mem.clone()),
        ..SimConfig::default()
    })?;
    let mm = Arc::new(AddressSpace::new(sim.host_memory()));
    for pm in sim.pagemap_per_device()? {
        mm.add_pagemap(pm)?;
    }
    let space = PointerSpace::new(mm.clone(), mem.clone(), UffdConfig::default())?;
    let range = match space.create_range(8 << 20, PageSize::Size2M) {
        Ok(r) => r,
        Err(e @ UffdError::Unavailable { .. }) => {
            println!("skipped: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let text = b"stored through the pointer";
    // SAFETY: the range maps 8 MiB at `as_ptr()` while `range` lives; `text` is shorter.
    unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), range.as_ptr(), text.len()) };
    println!("range {} at {:p}", range.range(), range.as_ptr());
    mm.migrate(range.range(), PagemapId(1), &MigrateDetails::default())?;
    println!(
        "migrated: page 0 is {:?}, host memory held: {} bytes",
        mm.location(range.range().start)?,
        mem.allocated_bytes()
    );
    let mut back = vec![0u8; text.len()];
    // SAFETY: as above; the load faults the page home first.
    unsafe { std::ptr::copy_nonoverlapping(range.as_ptr(), back.as_mut_ptr(), back.len()) };
    assert_eq!(mm.location(range.range().start)?, PageLocation::System);
    println!(
        "read back through the pointer: {:?} ({} faults served)",
        String::from_utf8_lossy(&back),
        space.fault_stats().served
    );
    let w = range.word(1 << 18).ok_or("word out of range")?;
    println!(
        "first touch of another page reads {}",
        w.load(Ordering::Relaxed)
    );
    range.free()?;
    Ok(())
}
