//! The copy path under the loader's validation layer with parameter validation: every call
//! succeeds (the layer finds nothing to reject).

#[macro_use]
mod common;

#[test]
fn the_copy_path_passes_the_validation_layer() {
    common::preset(&[
        ("ZE_ENABLE_VALIDATION_LAYER", "1"),
        ("ZE_ENABLE_PARAMETER_VALIDATION", "1"),
    ]);
    let Some(env) = common::env() else { return };
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    assert!(
        maps.contains("libze_validation_layer"),
        "the validation layer is not loaded"
    );
    common::scenario(env);
}
