//! The copy path with `ZE_ENABLE_LOADER_INTERCEPT=1`: the loader wraps every handle.

#[macro_use]
mod common;

#[test]
fn the_copy_path_works_with_wrapped_handles() {
    common::preset(&[("ZE_ENABLE_LOADER_INTERCEPT", "1")]);
    let Some(env) = common::env() else { return };
    common::scenario(env);
    // The control entry takes the loader's wrapped driver handle.
    let c = env.counters();
    assert!(c.copies >= 3, "{c:?}");
}
