//! The CUDA side of the ring (placeholder).
