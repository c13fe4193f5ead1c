//! drm-pagemap-cuda: the CUDA backend (being written).
