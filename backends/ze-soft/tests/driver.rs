//! The driver's semantics through the real loader: strictness, OOM, events, gating, fault
//! injection, handles, allocation properties, regular lists with queues and fences, peers.

#[macro_use]
mod common;

use std::ptr::null_mut;
use std::time::{Duration, Instant};

use common::*;
use level_zero_sys::*;
use ze_soft::control::*;

const INVALID_ARGUMENT: ze_result_t = _ze_result_t::ZE_RESULT_ERROR_INVALID_ARGUMENT;
const NULL_HANDLE: ze_result_t = _ze_result_t::ZE_RESULT_ERROR_INVALID_NULL_HANDLE;
const NOT_READY: ze_result_t = _ze_result_t::ZE_RESULT_NOT_READY;
const DEVICE_LOST: ze_result_t = _ze_result_t::ZE_RESULT_ERROR_DEVICE_LOST;
const OOM_DEVICE: ze_result_t = _ze_result_t::ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY;
const OOM_HOST: ze_result_t = _ze_result_t::ZE_RESULT_ERROR_OUT_OF_HOST_MEMORY;

fn bytes<'a>(p: *mut u8, n: usize) -> &'a mut [u8] {
    // SAFETY: the tests pass driver allocations of at least `n` bytes that no command is
    // writing at the time (their events were waited on, or no command touches them).
    unsafe { std::slice::from_raw_parts_mut(p, n) }
}

#[test]
fn strict_violations_are_counted_and_reported_as_errors() {
    let Some(env) = env() else { return };
    let _s = serial();
    env.reset();
    let host = env.host(4096);
    let dev0 = env.device(0, 4096);
    let dev1 = env.device(1, 4096);
    let dev2 = env.device(2, 4096);
    let list = env.immediate(0);
    let mut stack = [0u8; 64];
    // Memory outside every allocation.
    assert_eq!(
        env.copy(list, dev0, stack.as_mut_ptr(), 64, None, &[]),
        INVALID_ARGUMENT
    );
    // A range running past its allocation.
    assert_eq!(
        env.copy(list, dev0, host, 8192, None, &[]),
        INVALID_ARGUMENT
    );
    // Device 2 is not a peer of device 0 (groups 0,1;2,3).
    assert_eq!(env.copy(list, dev0, dev2, 64, None, &[]), INVALID_ARGUMENT);
    // An event of another context.
    let desc = ze_context_desc_t {
        stype: _ze_structure_type_t::ZE_STRUCTURE_TYPE_CONTEXT_DESC,
        pNext: std::ptr::null(),
        flags: 0,
    };
    let mut other = ze_context_handle_t(null_mut());
    assert_eq!(
        ze!(env.api, context_create(env.driver, &desc, &mut other)),
        OK
    );
    let pool_desc = ze_event_pool_desc_t {
        stype: _ze_structure_type_t::ZE_STRUCTURE_TYPE_EVENT_POOL_DESC,
        pNext: std::ptr::null(),
        flags: _ze_event_pool_flag_t::ZE_EVENT_POOL_FLAG_HOST_VISIBLE.0,
        count: 1,
    };
    let mut pool = ze_event_pool_handle_t(null_mut());
    assert_eq!(
        ze!(
            env.api,
            event_pool_create(other, &pool_desc, 0, null_mut(), &mut pool)
        ),
        OK
    );
    let ev_desc = ze_event_desc_t {
        stype: _ze_structure_type_t::ZE_STRUCTURE_TYPE_EVENT_DESC,
        pNext: std::ptr::null(),
        index: 0,
        signal: 0,
        wait: 0,
    };
    let mut foreign = ze_event_handle_t(null_mut());
    assert_eq!(ze!(env.api, event_create(pool, &ev_desc, &mut foreign)), OK);
    assert_eq!(
        env.copy(list, dev0, host, 64, Some(foreign), &[]),
        INVALID_ARGUMENT
    );
    assert_eq!(
        ze!(env.api, append_wait(list, 1, &mut foreign)),
        INVALID_ARGUMENT
    );
    // Freeing a pointer that is not an allocation's base.
    assert_eq!(
        ze!(env.api, mem_free(env.ctx, host.wrapping_add(8).cast())),
        INVALID_ARGUMENT
    );
    assert_eq!(env.counters().strict_violations, 6);
    // A peer's memory is fine and the bytes arrive.
    let (p, evs) = env.events(1);
    bytes(dev1, 64).fill(0xA5);
    assert_eq!(env.copy(list, dev0, dev1, 64, Some(evs[0]), &[]), OK);
    assert_eq!(env.wait(evs[0]), OK);
    assert!(bytes(dev0, 64).iter().all(|&b| b == 0xA5));
    let c = env.counters();
    assert_eq!((c.strict_violations, c.copies, c.bytes_copied), (6, 1, 64));
    assert_eq!(ze!(env.api, list_destroy(list)), OK);
    env.destroy_events(p, evs);
    assert_eq!(ze!(env.api, event_destroy(foreign)), OK);
    assert_eq!(ze!(env.api, event_pool_destroy(pool)), OK);
    assert_eq!(ze!(env.api, context_destroy(other)), OK);
    for ptr in [host, dev0, dev1, dev2] {
        env.free(ptr);
    }
}

#[test]
fn device_memory_runs_out_at_its_limit_and_frees_give_it_back() {
    let Some(env) = env() else { return };
    let _s = serial();
    env.reset();
    let before = env.counters().live_device_bytes;
    let big = env.device(3, 48 << 20);
    assert_eq!(env.try_device(3, 32 << 20), Err(OOM_DEVICE));
    assert_eq!(env.try_device(3, usize::MAX), Err(OOM_DEVICE));
    // Another device still has its own memory.
    let other = env.device(2, 32 << 20);
    assert_eq!(env.counters().live_device_bytes, before + (80 << 20));
    env.free(big);
    let again = env.device(3, 32 << 20);
    env.free(again);
    env.free(other);
    assert_eq!(env.counters().live_device_bytes, before);
}

#[test]
fn events_stay_signalled_until_reset() {
    let Some(env) = env() else { return };
    let _s = serial();
    env.reset();
    let (pool, evs) = env.events(1);
    let ev = evs[0];
    assert_eq!(ze!(env.api, event_query_status(ev)), NOT_READY);
    assert_eq!(ze!(env.api, event_host_synchronize(ev, 0)), NOT_READY);
    assert_eq!(ze!(env.api, event_host_signal(ev)), OK);
    for _ in 0..3 {
        assert_eq!(ze!(env.api, event_host_synchronize(ev, 0)), OK);
        assert_eq!(ze!(env.api, event_query_status(ev)), OK);
    }
    assert_eq!(ze!(env.api, event_host_reset(ev)), OK);
    assert_eq!(ze!(env.api, event_query_status(ev)), NOT_READY);
    let start = Instant::now();
    assert_eq!(
        ze!(env.api, event_host_synchronize(ev, 30_000_000)),
        NOT_READY
    );
    assert!(start.elapsed() >= Duration::from_millis(25));
    assert_eq!(env.counters().events_host_reset, 1);
    // A command-list reset of a signalled event.
    let list = env.immediate(0);
    let (p2, done) = env.events(1);
    assert_eq!(ze!(env.api, event_host_signal(ev)), OK);
    assert_eq!(ze!(env.api, append_reset(list, ev)), OK);
    assert_eq!(ze!(env.api, append_signal(list, done[0])), OK);
    assert_eq!(env.wait(done[0]), OK);
    assert_eq!(ze!(env.api, event_query_status(ev)), NOT_READY);
    assert_eq!(ze!(env.api, list_destroy(list)), OK);
    env.destroy_events(pool, evs);
    env.destroy_events(p2, done);
}

#[test]
fn wait_events_gate_commands_until_the_host_signals() {
    let Some(env) = env() else { return };
    let _s = serial();
    env.reset();
    let src = env.host(256);
    let dst = env.device(1, 256);
    bytes(src, 256).fill(0x3C);
    let list = env.immediate(1);
    let (pool, evs) = env.events(2);
    assert_eq!(env.copy(list, dst, src, 256, Some(evs[1]), &[evs[0]]), OK);
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(ze!(env.api, event_query_status(evs[1])), NOT_READY);
    assert!(
        bytes(dst, 256).iter().all(|&b| b == 0),
        "the copy ran before its wait event"
    );
    assert_eq!(ze!(env.api, event_host_signal(evs[0])), OK);
    assert_eq!(env.wait(evs[1]), OK);
    assert!(bytes(dst, 256).iter().all(|&b| b == 0x3C));
    assert_eq!(ze!(env.api, list_destroy(list)), OK);
    env.destroy_events(pool, evs);
    env.free(src);
    env.free(dst);
}

#[test]
fn fills_write_every_supported_pattern_size() {
    let Some(env) = env() else { return };
    let _s = serial();
    let dst = env.device(0, 1024);
    let list = env.immediate(0);
    let (pool, evs) = env.events(1);
    let pattern: Vec<u8> = (1..=128).collect();
    for size in [1usize, 2, 4, 8, 16, 32, 64, 128] {
        assert_eq!(ze!(env.api, event_host_reset(evs[0])), OK);
        let r = ze!(
            env.api,
            append_fill(
                list,
                dst.cast(),
                pattern.as_ptr().cast(),
                size,
                1024,
                evs[0],
                0,
                null_mut()
            )
        );
        assert_eq!(r, OK, "pattern size {size}");
        assert_eq!(env.wait(evs[0]), OK);
        assert!(
            bytes(dst, 1024)
                .iter()
                .enumerate()
                .all(|(i, &b)| b == pattern[i % size])
        );
    }
    let bad = ze!(
        env.api,
        append_fill(
            list,
            dst.cast(),
            pattern.as_ptr().cast(),
            3,
            1023,
            evs[0],
            0,
            null_mut()
        )
    );
    assert_eq!(bad, _ze_result_t::ZE_RESULT_ERROR_INVALID_SIZE);
    assert_eq!(ze!(env.api, list_destroy(list)), OK);
    env.destroy_events(pool, evs);
    env.free(dst);
}

#[test]
fn a_lost_device_fails_calls_and_its_pending_events() {
    let Some(env) = env() else { return };
    let _s = serial();
    env.reset();
    let src = env.host(64);
    let dst = env.device(3, 64);
    let list = env.immediate(3);
    let (pool, evs) = env.events(2);
    // Pending: waits on an event nobody signals.
    assert_eq!(env.copy(list, dst, src, 64, Some(evs[1]), &[evs[0]]), OK);
    env.control(OP_DEVICE_LOST, 3, 0, OK);
    assert_eq!(
        ze!(env.api, event_host_synchronize(evs[1], u64::MAX)),
        DEVICE_LOST
    );
    assert_eq!(env.try_device(3, 64), Err(DEVICE_LOST));
    assert_eq!(env.copy(list, dst, src, 64, None, &[]), DEVICE_LOST);
    let mut props = {
        let mut v: ze_device_properties_t = zeroed();
        v.stype = _ze_structure_type_t::ZE_STRUCTURE_TYPE_DEVICE_PROPERTIES;
        v
    };
    assert_eq!(
        ze!(env.api, device_get_properties(env.devices[3], &mut props)),
        DEVICE_LOST
    );
    // Other devices are unaffected.
    assert_eq!(
        ze!(env.api, device_get_properties(env.devices[0], &mut props)),
        OK
    );
    env.reset();
    assert_eq!(
        ze!(env.api, device_get_properties(env.devices[3], &mut props)),
        OK
    );
    assert_eq!(ze!(env.api, list_destroy(list)), OK);
    env.destroy_events(pool, evs);
    env.free(src);
    env.free(dst);
}

#[test]
fn injected_append_and_submit_failures_hit_the_nth_call() {
    let Some(env) = env() else { return };
    let _s = serial();
    env.reset();
    let a = env.host(64);
    let b = env.device(0, 64);
    let list = env.immediate(0);
    env.control(OP_FAIL_APPEND, 0, 2, OOM_HOST);
    assert_eq!(env.copy(list, b, a, 64, None, &[]), OK);
    assert_eq!(env.copy(list, b, a, 64, None, &[]), OOM_HOST);
    assert_eq!(env.copy(list, b, a, 64, None, &[]), OK);
    // Another device's appends do not count.
    env.control(OP_FAIL_APPEND, 1, 1, OOM_HOST);
    assert_eq!(env.copy(list, b, a, 64, None, &[]), OK);
    // Drain the list before clearing the counters.
    let (pool, evs) = env.events(1);
    assert_eq!(ze!(env.api, append_signal(list, evs[0])), OK);
    assert_eq!(env.wait(evs[0]), OK);
    env.destroy_events(pool, evs);
    env.reset();
    // Submissions: an immediate append is one.
    env.control(OP_FAIL_SUBMIT, 0, 1, DEVICE_LOST);
    assert_eq!(env.copy(list, b, a, 64, None, &[]), DEVICE_LOST);
    // A queue execution.
    let mut queue = ze_command_queue_handle_t(null_mut());
    let qdesc = Env::copy_desc(1);
    assert_eq!(
        ze!(
            env.api,
            queue_create(env.ctx, env.devices[0], &qdesc, &mut queue)
        ),
        OK
    );
    let regular = regular_list(env, 0);
    assert_eq!(env.copy(regular, b, a, 64, None, &[]), OK);
    assert_eq!(ze!(env.api, list_close(regular)), OK);
    let mut lists = [regular];
    env.control(OP_FAIL_SUBMIT, 0, 2, OOM_HOST);
    let fence = ze_fence_handle_t(null_mut());
    assert_eq!(
        ze!(env.api, queue_execute(queue, 1, lists.as_mut_ptr(), fence)),
        OK
    );
    assert_eq!(
        ze!(env.api, queue_execute(queue, 1, lists.as_mut_ptr(), fence)),
        OOM_HOST
    );
    assert_eq!(ze!(env.api, queue_synchronize(queue, u64::MAX)), OK);
    let c = env.counters();
    assert_eq!((c.submissions, c.copies), (1, 1));
    assert_eq!(ze!(env.api, list_destroy(regular)), OK);
    assert_eq!(ze!(env.api, list_destroy(list)), OK);
    assert_eq!(ze!(env.api, queue_destroy(queue)), OK);
    env.free(a);
    env.free(b);
}

fn regular_list(env: &Env, dev: usize) -> ze_command_list_handle_t {
    let desc = ze_command_list_desc_t {
        stype: _ze_structure_type_t::ZE_STRUCTURE_TYPE_COMMAND_LIST_DESC,
        pNext: std::ptr::null(),
        commandQueueGroupOrdinal: 1,
        flags: 0,
    };
    let mut list = ze_command_list_handle_t(null_mut());
    assert_eq!(
        ze!(
            env.api,
            list_create(env.ctx, env.devices[dev], &desc, &mut list)
        ),
        OK
    );
    list
}

#[test]
fn hung_events_never_signal_and_host_waits_time_out() {
    let Some(env) = env() else { return };
    let _s = serial();
    env.reset();
    let a = env.host(64);
    let b = env.device(0, 64);
    bytes(a, 64).fill(7);
    let list = env.immediate(0);
    let (pool, evs) = env.events(2);
    env.control(OP_HANG_EVENTS, 0, 1, OK);
    assert_eq!(env.copy(list, b, a, 64, Some(evs[0]), &[]), OK);
    assert_eq!(env.copy(list, b, a, 64, Some(evs[1]), &[]), OK);
    assert_eq!(env.wait(evs[1]), OK);
    assert_eq!(
        ze!(env.api, event_host_synchronize(evs[0], 50_000_000)),
        NOT_READY
    );
    assert_eq!(env.counters().copies, 2);
    assert_eq!(ze!(env.api, list_destroy(list)), OK);
    env.destroy_events(pool, evs);
    env.free(a);
    env.free(b);
}

#[test]
fn handles_used_after_destroy_are_detected() {
    let Some(env) = env() else { return };
    let _s = serial();
    env.reset();
    let (pool, evs) = env.events(1);
    let ev = evs[0];
    assert_eq!(ze!(env.api, event_destroy(ev)), OK);
    assert_eq!(ze!(env.api, event_host_signal(ev)), NULL_HANDLE);
    assert_eq!(ze!(env.api, event_destroy(ev)), NULL_HANDLE);
    let list = env.immediate(0);
    assert_eq!(ze!(env.api, list_destroy(list)), OK);
    assert_eq!(
        ze!(
            env.api,
            append_barrier(list, ze_event_handle_t(null_mut()), 0, null_mut())
        ),
        NULL_HANDLE
    );
    // A pointer that was never a handle.
    let mut junk = [0u64; 8];
    let fake = ze_event_handle_t(junk.as_mut_ptr().cast());
    assert_eq!(ze!(env.api, event_host_signal(fake)), NULL_HANDLE);
    // A handle of the wrong kind.
    let wrong = ze_event_handle_t(pool.0.cast());
    assert_eq!(ze!(env.api, event_host_signal(wrong)), INVALID_ARGUMENT);
    assert_eq!(env.counters().strict_violations, 5);
    assert_eq!(ze!(env.api, event_pool_destroy(pool)), OK);
}

#[test]
fn alloc_properties_resolve_interior_pointers() {
    let Some(env) = env() else { return };
    let _s = serial();
    let dev = env.device(1, 1 << 20);
    let host = env.host(4096);
    let query = |p: *const u8| {
        let mut props = {
            let mut v: ze_memory_allocation_properties_t = zeroed();
            v.stype = _ze_structure_type_t::ZE_STRUCTURE_TYPE_MEMORY_ALLOCATION_PROPERTIES;
            v
        };
        let mut owner = ze_device_handle_t(null_mut());
        assert_eq!(
            ze!(
                env.api,
                mem_get_alloc_properties(env.ctx, p.cast(), &mut props, &mut owner)
            ),
            OK
        );
        (props.type_, props.id, owner.0)
    };
    let (ty, id, owner) = query(dev);
    assert_eq!(ty, _ze_memory_type_t::ZE_MEMORY_TYPE_DEVICE);
    assert_eq!(owner, env.devices[1].0);
    assert_eq!(query(dev.wrapping_add(12345)), (ty, id, owner));
    assert_eq!(query(dev.wrapping_add((1 << 20) - 1)).1, id);
    let (hty, hid, _) = query(host.wrapping_add(100));
    assert_eq!(hty, _ze_memory_type_t::ZE_MEMORY_TYPE_HOST);
    assert_ne!(hid, id);
    let local = 0u8;
    assert_eq!(query(&local).0, _ze_memory_type_t::ZE_MEMORY_TYPE_UNKNOWN);
    env.free(dev);
    assert_eq!(
        query(dev.wrapping_add(12345)).0,
        _ze_memory_type_t::ZE_MEMORY_TYPE_UNKNOWN
    );
    env.free(host);
}

#[test]
fn regular_lists_run_on_queues_and_signal_fences() {
    let Some(env) = env() else { return };
    let _s = serial();
    let src = env.host(4096);
    let dev = env.device(0, 4096);
    let back = env.host(4096);
    bytes(src, 4096)
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 251) as u8);
    let list = regular_list(env, 0);
    assert_eq!(env.copy(list, dev, src, 4096, None, &[]), OK);
    assert_eq!(
        ze!(
            env.api,
            append_barrier(list, ze_event_handle_t(null_mut()), 0, null_mut())
        ),
        OK
    );
    assert_eq!(env.copy(list, back, dev, 4096, None, &[]), OK);
    assert_eq!(ze!(env.api, list_close(list)), OK);
    // Appending to a closed list fails.
    assert_eq!(env.copy(list, back, dev, 16, None, &[]), INVALID_ARGUMENT);
    let mut queue = ze_command_queue_handle_t(null_mut());
    let qdesc = Env::copy_desc(0);
    assert_eq!(
        ze!(
            env.api,
            queue_create(env.ctx, env.devices[0], &qdesc, &mut queue)
        ),
        OK
    );
    let fdesc = ze_fence_desc_t {
        stype: _ze_structure_type_t::ZE_STRUCTURE_TYPE_FENCE_DESC,
        pNext: std::ptr::null(),
        flags: 0,
    };
    let mut fence = ze_fence_handle_t(null_mut());
    assert_eq!(ze!(env.api, fence_create(queue, &fdesc, &mut fence)), OK);
    assert_eq!(ze!(env.api, fence_query_status(fence)), NOT_READY);
    let mut lists = [list];
    assert_eq!(
        ze!(env.api, queue_execute(queue, 1, lists.as_mut_ptr(), fence)),
        OK
    );
    assert_eq!(ze!(env.api, fence_host_synchronize(fence, u64::MAX)), OK);
    assert_eq!(bytes(back, 4096), bytes(src, 4096));
    // Run it again after a reset of the fence and of the destination.
    assert_eq!(ze!(env.api, fence_reset(fence)), OK);
    assert_eq!(ze!(env.api, fence_query_status(fence)), NOT_READY);
    bytes(back, 4096).fill(0);
    assert_eq!(
        ze!(
            env.api,
            queue_execute(queue, 1, lists.as_mut_ptr(), ze_fence_handle_t(null_mut()))
        ),
        OK
    );
    assert_eq!(ze!(env.api, queue_synchronize(queue, u64::MAX)), OK);
    assert_eq!(bytes(back, 4096), bytes(src, 4096));
    // Reset: the list records again.
    assert_eq!(ze!(env.api, list_reset(list)), OK);
    assert_eq!(env.copy(list, back, dev, 16, None, &[]), OK);
    assert_eq!(ze!(env.api, fence_destroy(fence)), OK);
    assert_eq!(ze!(env.api, list_destroy(list)), OK);
    assert_eq!(ze!(env.api, queue_destroy(queue)), OK);
    for p in [src, dev, back] {
        env.free(p);
    }
}

#[test]
fn devices_groups_and_peers_follow_the_configuration() {
    let Some(env) = env() else { return };
    // Serial: another test marks device 3 lost for a moment, and a peer query of a lost device
    // answers DEVICE_LOST.
    let _s = serial();
    assert_eq!(env.devices.len(), 4);
    let mut version = _ze_api_version_t(0);
    assert_eq!(
        ze!(env.api, driver_get_api_version(env.driver, &mut version)),
        OK
    );
    assert_eq!(version, _ze_api_version_t::ZE_API_VERSION_1_4);
    let peer = |a: usize, b: usize| {
        let mut can: ze_bool_t = 9;
        assert_eq!(
            ze!(
                env.api,
                device_can_access_peer(env.devices[a], env.devices[b], &mut can)
            ),
            OK
        );
        let mut p2p = {
            let mut v: ze_device_p2p_properties_t = zeroed();
            v.stype = _ze_structure_type_t::ZE_STRUCTURE_TYPE_DEVICE_P2P_PROPERTIES;
            v
        };
        assert_eq!(
            ze!(
                env.api,
                device_get_p2p_properties(env.devices[a], env.devices[b], &mut p2p)
            ),
            OK
        );
        assert_eq!(can != 0, p2p.flags & 1 != 0);
        can != 0
    };
    assert!(peer(0, 1) && peer(2, 3) && peer(1, 1));
    assert!(!peer(0, 2) && !peer(3, 1));
    let mut n = 0u32;
    assert_eq!(
        ze!(
            env.api,
            device_get_command_queue_group_properties(env.devices[0], &mut n, null_mut())
        ),
        OK
    );
    assert_eq!(n, 2);
    let mut groups = [zeroed::<ze_command_queue_group_properties_t>(); 2];
    assert_eq!(
        ze!(
            env.api,
            device_get_command_queue_group_properties(env.devices[0], &mut n, groups.as_mut_ptr())
        ),
        OK
    );
    assert_eq!((groups[0].flags, groups[0].numQueues), (3, 1));
    assert_eq!((groups[1].flags, groups[1].numQueues), (2, 2));
    assert!(groups[1].maxMemoryFillPatternSize >= 4);
    let mut mem = [zeroed::<ze_device_memory_properties_t>()];
    let mut n = 1u32;
    assert_eq!(
        ze!(
            env.api,
            device_get_memory_properties(env.devices[2], &mut n, mem.as_mut_ptr())
        ),
        OK
    );
    assert_eq!(mem[0].totalSize, 64 << 20);
    let mut props = zeroed::<ze_device_properties_t>();
    assert_eq!(
        ze!(env.api, device_get_properties(env.devices[2], &mut props)),
        OK
    );
    // SAFETY: the driver wrote a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(props.name.as_ptr()) };
    assert_eq!(name.to_str(), Ok("ze-soft device 2"));
    let mut ext = [ze_driver_extension_properties_t {
        name: [0; 256],
        version: 0,
    }];
    let mut n = 1u32;
    assert_eq!(
        ze!(
            env.api,
            driver_get_extension_properties(env.driver, &mut n, ext.as_mut_ptr())
        ),
        OK
    );
    // SAFETY: as above.
    let ext_name = unsafe { std::ffi::CStr::from_ptr(ext[0].name.as_ptr()) };
    assert_eq!(ext_name.to_str(), Ok(EXTENSION_NAME));
}
