//! Command lists (regular and immediate) and their append entries.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use level_zero_sys::*;

use super::control::INJECT;
use super::counters::COUNTERS;
use super::device::{Context, Device, MAX_FILL_PATTERN, live_device, queues_in_group};
use super::engine::{Batch, Cmd, Engine, Op};
use super::events::{Event, event};
use super::handles::{Handle, Kind, resolve};
use super::memory::{check_range, table};
use super::{ZeResult, code, guard, violation, write_out};

/// A regular list's commands.
#[derive(Default)]
pub(crate) struct Recording {
    pub cmds: Vec<Cmd>,
    /// Set by close: what executions submit.
    pub closed: Option<Arc<[Cmd]>>,
}

/// A command list.
pub(crate) struct CommandList {
    pub context: &'static Handle<Context>,
    pub device: &'static Handle<Device>,
    /// `Some` for an immediate list: its own engine.
    pub immediate: Option<Engine>,
    pub recording: Mutex<Recording>,
}
impl Kind for CommandList {
    const MAGIC: u64 = 0x5A45_5346_434C_0006;
}

fn check_context_device(
    ctx: ze_context_handle_t,
    dev: ze_device_handle_t,
) -> ZeResult<(&'static Handle<Context>, &'static Handle<Device>)> {
    Ok((resolve!(Context, ctx)?, live_device(dev)?))
}

fn publish(list: CommandList, out: *mut ze_command_list_handle_t) -> ZeResult {
    let list = Handle::create(list);
    COUNTERS.live_command_lists.add(1);
    // SAFETY: the application's out-pointer (checked non-null by the callers).
    unsafe { write_out(out, ze_command_list_handle_t(list.raw())) }
}

/// `zeCommandListCreate`.
pub(crate) unsafe extern "C" fn command_list_create(
    ctx: ze_context_handle_t,
    dev: ze_device_handle_t,
    desc: *const ze_command_list_desc_t,
    out: *mut ze_command_list_handle_t,
) -> ze_result_t {
    guard(|| {
        let (context, device) = check_context_device(ctx, dev)?;
        if desc.is_null() || out.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        // SAFETY: non-null application descriptor.
        if queues_in_group(unsafe { (*desc).commandQueueGroupOrdinal })?.is_none() {
            return Err(code::INVALID_ARGUMENT);
        }
        let list = CommandList {
            context,
            device,
            immediate: None,
            recording: Default::default(),
        };
        publish(list, out)
    })
}

/// `zeCommandListCreateImmediate`: its own engine thread.
pub(crate) unsafe extern "C" fn command_list_create_immediate(
    ctx: ze_context_handle_t,
    dev: ze_device_handle_t,
    desc: *const ze_command_queue_desc_t,
    out: *mut ze_command_list_handle_t,
) -> ze_result_t {
    guard(|| {
        let (context, device) = check_context_device(ctx, dev)?;
        if desc.is_null() || out.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        // SAFETY: non-null application descriptor.
        let (ordinal, index) = unsafe { ((*desc).ordinal, (*desc).index) };
        match queues_in_group(ordinal)? {
            Some(n) if index < n => {}
            _ => return Err(code::INVALID_ARGUMENT),
        }
        let name = format!("ze-soft-imm{}.{ordinal}.{index}", device.obj.index);
        let engine = Engine::start(device, context.obj.id, name)?;
        let list = CommandList {
            context,
            device,
            immediate: Some(engine),
            recording: Default::default(),
        };
        publish(list, out)
    })
}

/// `zeCommandListDestroy`: an immediate list's engine stops (its pending work is abandoned).
pub(crate) unsafe extern "C" fn command_list_destroy(h: ze_command_list_handle_t) -> ze_result_t {
    guard(|| {
        let list = resolve!(CommandList, h)?;
        list.destroy()?;
        if let Some(engine) = &list.obj.immediate {
            engine.shutdown();
        }
        let mut rec = list.obj.recording.lock().unwrap_or_else(|e| e.into_inner());
        *rec = Recording::default();
        COUNTERS.live_command_lists.sub(1);
        Ok(())
    })
}

/// `zeCommandListClose`.
pub(crate) unsafe extern "C" fn command_list_close(h: ze_command_list_handle_t) -> ze_result_t {
    guard(|| {
        let list = resolve!(CommandList, h)?;
        if list.obj.immediate.is_none() {
            let mut rec = list.obj.recording.lock().unwrap_or_else(|e| e.into_inner());
            if rec.closed.is_none() {
                rec.closed = Some(Arc::from(std::mem::take(&mut rec.cmds)));
            }
        }
        Ok(())
    })
}

/// `zeCommandListReset`.
pub(crate) unsafe extern "C" fn command_list_reset(h: ze_command_list_handle_t) -> ze_result_t {
    guard(|| {
        let list = resolve!(CommandList, h)?;
        list.obj.device.obj.check()?;
        if let Some(engine) = &list.obj.immediate {
            engine.synchronize(u64::MAX)?;
        }
        *list.obj.recording.lock().unwrap_or_else(|e| e.into_inner()) = Recording::default();
        Ok(())
    })
}

/// A resolved event.
type EventRef = &'static Handle<Event>;

/// Resolves the signal event and wait list and checks that they belong to the list's context.
///
/// # Safety
/// `waits` is null or valid for `n` reads.
unsafe fn sync_args(
    list: &CommandList,
    signal: ze_event_handle_t,
    n: u32,
    waits: *const ze_event_handle_t,
) -> ZeResult<(Option<EventRef>, Vec<EventRef>)> {
    let ctx = list.context.obj.id;
    let foreign = |ev: &'static Handle<Event>| -> ZeResult<&'static Handle<Event>> {
        if ev.obj.context != ctx {
            violation(
                code::INVALID_ARGUMENT,
                format_args!("event of another context"),
            )?;
        }
        Ok(ev)
    };
    let signal = if signal.0.is_null() {
        None
    } else {
        Some(foreign(event(signal)?)?)
    };
    if n > 0 && waits.is_null() {
        return Err(code::INVALID_NULL_POINTER);
    }
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        // SAFETY: `i < n`, within the caller's array.
        out.push(foreign(event(unsafe { *waits.add(i) })?)?);
    }
    Ok((signal, out))
}

/// Checks ranges against the allocation table (strict).
fn check_ranges(list: &CommandList, ranges: &[(usize, usize)]) -> ZeResult {
    let t = table();
    for &(addr, len) in ranges {
        if let Err(why) = check_range(&t, list.context.obj.id, &list.device.obj, addr, len) {
            violation(
                code::INVALID_ARGUMENT,
                format_args!("device {}: {why}", list.device.obj.index),
            )?;
        }
    }
    Ok(())
}

/// Appends (regular) or submits (immediate) a command, after the common checks.
fn append(
    h: ze_command_list_handle_t,
    build: impl FnOnce(&CommandList) -> ZeResult<Cmd>,
) -> ZeResult {
    let list = resolve!(CommandList, h)?;
    let l = &list.obj;
    l.device.obj.check()?;
    let cmd = build(l)?;
    INJECT.on_append(l.device.obj.index)?;
    match &l.immediate {
        Some(engine) => {
            INJECT.on_submit(l.device.obj.index)?;
            engine.submit(Batch {
                cmds: Arc::from(vec![cmd]),
                done: None,
            })?;
            COUNTERS.submissions.add(1);
        }
        None => {
            let mut rec = l.recording.lock().unwrap_or_else(|e| e.into_inner());
            if rec.closed.is_some() {
                return Err(code::INVALID_ARGUMENT);
            }
            rec.cmds.push(cmd);
        }
    }
    COUNTERS.appends.add(1);
    Ok(())
}

/// `zeCommandListAppendMemoryCopy`.
pub(crate) unsafe extern "C" fn append_memory_copy(
    h: ze_command_list_handle_t,
    dst: *mut c_void,
    src: *const c_void,
    size: usize,
    signal: ze_event_handle_t,
    n: u32,
    waits: *mut ze_event_handle_t,
) -> ze_result_t {
    guard(|| {
        append(h, |l| {
            if dst.is_null() || src.is_null() {
                return Err(code::INVALID_NULL_POINTER);
            }
            // SAFETY: the application's wait list of `n` events.
            let (signal, waits) = unsafe { sync_args(l, signal, n, waits) }?;
            let (dst, src) = (dst as usize, src as usize);
            check_ranges(l, &[(dst, size), (src, size)])?;
            Ok(Cmd {
                op: Op::Copy {
                    dst,
                    src,
                    len: size,
                },
                signal,
                waits,
            })
        })
    })
}

/// `zeCommandListAppendMemoryFill` (pattern sizes: powers of two up to the group's maximum).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe extern "C" fn append_memory_fill(
    h: ze_command_list_handle_t,
    dst: *mut c_void,
    pattern: *const c_void,
    pattern_size: usize,
    size: usize,
    signal: ze_event_handle_t,
    n: u32,
    waits: *mut ze_event_handle_t,
) -> ze_result_t {
    guard(|| {
        append(h, |l| {
            if dst.is_null() || pattern.is_null() {
                return Err(code::INVALID_NULL_POINTER);
            }
            if !pattern_size.is_power_of_two() || pattern_size > MAX_FILL_PATTERN {
                return Err(code::INVALID_SIZE);
            }
            if !size.is_multiple_of(pattern_size) {
                return Err(code::INVALID_SIZE);
            }
            // SAFETY: the application's wait list of `n` events.
            let (signal, waits) = unsafe { sync_args(l, signal, n, waits) }?;
            check_ranges(l, &[(dst as usize, size)])?;
            // SAFETY: the application's pattern of `pattern_size` bytes (copied now, as the
            // spec allows the caller to reuse it after the call).
            let bytes = unsafe { std::slice::from_raw_parts(pattern.cast::<u8>(), pattern_size) };
            let op = Op::Fill {
                dst: dst as usize,
                pattern: Arc::from(bytes),
                len: size,
            };
            Ok(Cmd { op, signal, waits })
        })
    })
}

/// `zeCommandListAppendBarrier` (engines run in order, so only its events matter).
pub(crate) unsafe extern "C" fn append_barrier(
    h: ze_command_list_handle_t,
    signal: ze_event_handle_t,
    n: u32,
    waits: *mut ze_event_handle_t,
) -> ze_result_t {
    guard(|| {
        append(h, |l| {
            // SAFETY: the application's wait list of `n` events.
            let (signal, waits) = unsafe { sync_args(l, signal, n, waits) }?;
            Ok(Cmd {
                op: Op::Nop,
                signal,
                waits,
            })
        })
    })
}

/// `zeCommandListAppendSignalEvent`.
pub(crate) unsafe extern "C" fn append_signal_event(
    h: ze_command_list_handle_t,
    ev: ze_event_handle_t,
) -> ze_result_t {
    guard(|| {
        if ev.0.is_null() {
            return Err(code::INVALID_NULL_HANDLE);
        }
        append(h, |l| {
            // SAFETY: no wait list.
            let (signal, _) = unsafe { sync_args(l, ev, 0, std::ptr::null()) }?;
            Ok(Cmd {
                op: Op::Nop,
                signal,
                waits: Vec::new(),
            })
        })
    })
}

/// `zeCommandListAppendWaitOnEvents`.
pub(crate) unsafe extern "C" fn append_wait_on_events(
    h: ze_command_list_handle_t,
    n: u32,
    waits: *mut ze_event_handle_t,
) -> ze_result_t {
    guard(|| {
        append(h, |l| {
            // SAFETY: the application's wait list of `n` events.
            let (_, waits) =
                unsafe { sync_args(l, ze_event_handle_t(std::ptr::null_mut()), n, waits) }?;
            Ok(Cmd {
                op: Op::Nop,
                signal: None,
                waits,
            })
        })
    })
}

/// `zeCommandListAppendEventReset`.
pub(crate) unsafe extern "C" fn append_event_reset(
    h: ze_command_list_handle_t,
    ev: ze_event_handle_t,
) -> ze_result_t {
    guard(|| {
        if ev.0.is_null() {
            return Err(code::INVALID_NULL_HANDLE);
        }
        append(h, |l| {
            // SAFETY: no wait list.
            let (target, _) = unsafe { sync_args(l, ev, 0, std::ptr::null()) }?;
            let target = target.ok_or(code::INVALID_NULL_HANDLE)?;
            Ok(Cmd {
                op: Op::Reset(target),
                signal: None,
                waits: Vec::new(),
            })
        })
    })
}
