//! The minimal path through the real loader: host -> device -> host through an immediate list.

#[macro_use]
mod common;

use common::*;

#[test]
fn host_device_host_round_trip_through_the_loader() {
    let Some(env) = env() else { return };
    let _serial = serial();
    const N: usize = 1 << 16;
    let src = env.host(N);
    let back = env.host(N);
    let dev = env.device(0, N);
    // SAFETY: `src` is a host allocation of N bytes.
    let src_bytes = unsafe { std::slice::from_raw_parts_mut(src, N) };
    for (i, b) in src_bytes.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    let list = env.immediate(0);
    let (pool, events) = env.events(2);
    assert_eq!(env.copy(list, dev, src, N, Some(events[0]), &[]), OK);
    assert_eq!(
        env.copy(list, back, dev, N, Some(events[1]), &[events[0]]),
        OK
    );
    assert_eq!(env.wait(events[1]), OK);
    // SAFETY: the copy into `back` completed (its event is signalled).
    let back_bytes = unsafe { std::slice::from_raw_parts(back, N) };
    assert_eq!(back_bytes, &src_bytes[..]);
    assert_eq!(ze!(env.api, list_destroy(list)), OK);
    env.destroy_events(pool, events);
    for p in [src, back, dev] {
        env.free(p);
    }
}
