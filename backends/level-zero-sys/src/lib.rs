//! Raw bindings to the oneAPI Level Zero API (work in progress: the loader comes next).

/// The generated types and constants.
#[allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    missing_docs,
    clippy::all
)]
mod bindings;
pub use bindings::*;
