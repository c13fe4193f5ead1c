//! `ZE_SOFT_STRICT=0`: violations are counted and logged, and the call goes on.

#[macro_use]
mod common;

#[test]
fn lenient_mode_counts_violations_and_runs_the_copy() {
    common::preset(&[("ZE_SOFT_STRICT", "0")]);
    let Some(env) = common::env() else { return };
    let dst = env.device(0, 64);
    let src = [0x5Au8; 64];
    let list = env.immediate(0);
    let (pool, evs) = env.events(1);
    let before = env.counters().strict_violations;
    assert_eq!(
        env.copy(list, dst, src.as_ptr(), 64, Some(evs[0]), &[]),
        common::OK
    );
    assert_eq!(env.wait(evs[0]), common::OK);
    // SAFETY: the copy into `dst` completed.
    assert_eq!(unsafe { std::slice::from_raw_parts(dst, 64) }, &src[..]);
    // Counted at append and again when the engine re-checks the range.
    assert_eq!(env.counters().strict_violations - before, 2);
    assert_eq!(ze!(env.api, list_destroy(list)), common::OK);
    env.destroy_events(pool, evs);
    env.free(dst);
}
