//! A software Level Zero driver (placeholder docs; see below).

pub mod control;
mod driver;
mod path;

pub use path::{LIBRARY_FILE, library_path, route_loader};
