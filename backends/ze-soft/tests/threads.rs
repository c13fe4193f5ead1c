//! Engine threads stop when their queues and immediate lists are destroyed.

#[macro_use]
mod common;

use std::ptr::null_mut;

use common::*;
use level_zero_sys::*;

#[test]
fn engine_threads_stop_when_queues_and_lists_are_destroyed() {
    let Some(env) = env() else { return };
    let engines_before = engine_thread_count();
    let lists: Vec<_> = (0..3).map(|d| env.immediate(d)).collect();
    let queues: Vec<_> = (0..2u32)
        .map(|i| {
            let desc = Env::copy_desc(i);
            let mut q = ze_command_queue_handle_t(null_mut());
            assert_eq!(
                ze!(
                    env.api,
                    queue_create(env.ctx, env.devices[0], &desc, &mut q)
                ),
                OK
            );
            q
        })
        .collect();
    // One list blocked on an event nobody signals: destroy must still stop its thread.
    let (pool, evs) = env.events(1);
    let mut wait = [evs[0]];
    assert_eq!(
        ze!(env.api, append_wait(lists[0], 1, wait.as_mut_ptr())),
        OK
    );
    // One engine thread per list and queue. Counted by name, like the leak check below: a
    // thread the loader or a validation layer starts meanwhile is not the driver's (one made
    // the count of all threads fail in CI). A thread names itself once it runs, a moment
    // after the call that spawned it returned: the count is given a few seconds to get there.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while engine_thread_count() < engines_before + 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(engine_thread_count(), engines_before + 5);
    for l in lists {
        assert_eq!(ze!(env.api, list_destroy(l)), OK);
    }
    for q in queues {
        assert_eq!(ze!(env.api, queue_destroy(q)), OK);
    }
    // Destroy joins the engine threads: none of them is left (counted by name, so that a
    // thread the loader or a validation layer started meanwhile does not count). A joined
    // thread can still be listed in /proc for a moment while the kernel reaps it (seen once
    // in CI), so the count is given a few seconds to settle; a leaked thread never does.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while engine_thread_count() != engines_before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        engine_thread_count(),
        engines_before,
        "engine threads leaked"
    );
    assert_eq!(env.counters().live_queues, 0);
    assert_eq!(env.counters().live_command_lists, 0);
    env.destroy_events(pool, evs);
}
