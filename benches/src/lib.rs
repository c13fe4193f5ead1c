//! Criterion benches of drm-pagemap live in `benches/`.
