//! # level-zero-sys
//!
//! Raw bindings to the oneAPI Level Zero API for drm-pagemap's Level Zero backend.
//!
//! - **Types and constants** (`ze_*_t`, `ZE_*`): bindgen output of the headers of the Level
//!   Zero spec **1.4**, as Debian's `libze-dev` **1.8.12** installs them in
//!   `/usr/include/level_zero` (`ze_api.h`, and `ze_ddi.h` for the driver dispatch tables a
//!   driver fills), checked in (`src/bindings.rs`): building needs neither the headers nor
//!   libclang. Handles are `#[repr(transparent)]` pointer newtypes, enums newtypes over their
//!   C integer (`ze_result_t::ZE_RESULT_SUCCESS`), `ze_pfn*_t` typedefs
//!   `Option<unsafe extern "C" fn ...>`. No `extern` block: nothing links to the loader.
//! - **Entry points** ([`Loader`]): `libze_loader.so.1` is opened at run time through
//!   libloading; each entry point the workspace calls is resolved on its own and is optional:
//!   a missing one is [`LoaderError::MissingEntry`] naming it, when it is asked for. Without
//!   the loader, [`Loader::open`] is [`LoaderError::Unavailable`] saying why; nothing panics,
//!   so the crate builds and its users report "unavailable" on machines without Level Zero.
//!   Entry points newer than spec 1.4 (`zeCommandListHostSynchronize`, `zeInitDrivers`, ...)
//!   are reached with [`Loader::symbol`] and cast by the caller.
//! - **Results** ([`ZeError`], [`check`]): a failed call keeps its raw `ze_result_t` and the
//!   name of the call.
//!
//! ## Regenerating the bindings
//! `apt-get install libze-dev` and `cargo install bindgen-cli --version 0.71.1 --locked`, then
//! run `backends/level-zero-sys/regen.sh` (it writes `src/bindings.rs`; `regen.sh OUT` writes
//! elsewhere). The allowlist keeps `ze_*` types and `ZE_*` constants and blocks every function.
//! The test `tests/regen.rs` regenerates into a temporary file and compares, where bindgen and
//! the headers exist (it prints `skipped: <reason>` elsewhere).

/// The generated types and constants.
#[allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    missing_docs,
    clippy::all
)]
mod bindings;
mod loader;

pub use bindings::*;
pub use loader::{
    Entries, EntryType, LOADER_NAME, Loader, LoaderError, ZeError, check, result_name,
};
