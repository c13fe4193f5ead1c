//! Command queues (one engine thread each) and fences.

use level_zero_sys::*;

use super::cmdlist::CommandList;
use super::control::INJECT;
use super::counters::COUNTERS;
use super::device::{Context, Device, live_device, queues_in_group};
use super::engine::{Batch, Engine};
use super::events::Signal;
use super::handles::{Handle, Kind, resolve};
use super::{ZeResult, code, guard, write_out};

/// A command queue.
pub(crate) struct CommandQueue {
    pub context: &'static Handle<Context>,
    pub device: &'static Handle<Device>,
    pub engine: Engine,
}
impl Kind for CommandQueue {
    const MAGIC: u64 = 0x5A45_5346_4351_0007;
}

/// A fence of a queue.
pub(crate) struct Fence {
    pub queue: &'static Handle<CommandQueue>,
    pub signal: Signal,
}
impl Kind for Fence {
    const MAGIC: u64 = 0x5A45_5346_4645_0008;
}

/// `zeCommandQueueCreate`.
pub(crate) unsafe extern "C" fn command_queue_create(
    ctx: ze_context_handle_t,
    dev: ze_device_handle_t,
    desc: *const ze_command_queue_desc_t,
    out: *mut ze_command_queue_handle_t,
) -> ze_result_t {
    guard(|| {
        let context = resolve!(Context, ctx)?;
        let device = live_device(dev)?;
        if desc.is_null() || out.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        // SAFETY: non-null application descriptor.
        let (ordinal, index) = unsafe { ((*desc).ordinal, (*desc).index) };
        match queues_in_group(ordinal)? {
            Some(n) if index < n => {}
            _ => return Err(code::INVALID_ARGUMENT),
        }
        let name = format!("ze-soft-q{}.{ordinal}.{index}", device.obj.index);
        let engine = Engine::start(device, context.obj.id, name)?;
        let queue = Handle::create(CommandQueue {
            context,
            device,
            engine,
        });
        COUNTERS.live_queues.add(1);
        // SAFETY: non-null application out-pointer.
        unsafe { write_out(out, ze_command_queue_handle_t(queue.raw())) }
    })
}

/// `zeCommandQueueDestroy`: the engine stops and its thread is joined.
pub(crate) unsafe extern "C" fn command_queue_destroy(h: ze_command_queue_handle_t) -> ze_result_t {
    guard(|| {
        let q = resolve!(CommandQueue, h)?;
        q.destroy()?;
        q.obj.engine.shutdown();
        COUNTERS.live_queues.sub(1);
        Ok(())
    })
}

/// `zeCommandQueueExecuteCommandLists`: closed regular lists of the queue's device and context.
pub(crate) unsafe extern "C" fn command_queue_execute_command_lists(
    h: ze_command_queue_handle_t,
    n: u32,
    lists: *mut ze_command_list_handle_t,
    fence: ze_fence_handle_t,
) -> ze_result_t {
    guard(|| {
        let q = resolve!(CommandQueue, h)?;
        q.obj.device.obj.check()?;
        if n == 0 {
            return Err(code::INVALID_SIZE);
        }
        if lists.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        let fence = if fence.0.is_null() {
            None
        } else {
            Some(resolve!(Fence, fence)?)
        };
        if fence.is_some_and(|f| !std::ptr::eq(f.obj.queue, q)) {
            return Err(super::hard_violation(code::INVALID_ARGUMENT));
        }
        let mut batches = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            // SAFETY: `i < n`, within the application's array.
            let list = Handle::<CommandList>::resolve(unsafe { *lists.add(i) }.0)?;
            if list.obj.immediate.is_some() {
                return Err(code::INVALID_COMMAND_LIST_TYPE);
            }
            if !std::ptr::eq(list.obj.device, q.obj.device)
                || !std::ptr::eq(list.obj.context, q.obj.context)
            {
                return Err(super::hard_violation(code::INVALID_ARGUMENT));
            }
            let rec = list.obj.recording.lock().unwrap_or_else(|e| e.into_inner());
            batches.push(rec.closed.clone().ok_or(code::INVALID_ARGUMENT)?);
        }
        INJECT.on_submit(q.obj.device.obj.index)?;
        if let Some(f) = fence {
            f.obj.signal.reset();
        }
        let last = batches.len() - 1;
        for (i, cmds) in batches.into_iter().enumerate() {
            let done = fence.filter(|_| i == last).map(|f| &f.obj.signal);
            q.obj.engine.submit(Batch { cmds, done })?;
            COUNTERS.submissions.add(1);
        }
        Ok(())
    })
}

/// `zeCommandQueueSynchronize`.
pub(crate) unsafe extern "C" fn command_queue_synchronize(
    h: ze_command_queue_handle_t,
    timeout: u64,
) -> ze_result_t {
    guard(|| resolve!(CommandQueue, h)?.obj.engine.synchronize(timeout))
}

/// `zeFenceCreate`.
pub(crate) unsafe extern "C" fn fence_create(
    h: ze_command_queue_handle_t,
    desc: *const ze_fence_desc_t,
    out: *mut ze_fence_handle_t,
) -> ze_result_t {
    guard(|| {
        let queue = resolve!(CommandQueue, h)?;
        if desc.is_null() || out.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        let fence = Handle::create(Fence {
            queue,
            signal: Signal::default(),
        });
        // SAFETY: non-null application out-pointer.
        unsafe { write_out(out, ze_fence_handle_t(fence.raw())) }
    })
}

/// `zeFenceDestroy`.
pub(crate) unsafe extern "C" fn fence_destroy(h: ze_fence_handle_t) -> ze_result_t {
    guard(|| resolve!(Fence, h)?.destroy())
}

fn fence_wait(h: ze_fence_handle_t, timeout: u64) -> ZeResult {
    let f = resolve!(Fence, h)?;
    f.obj.queue.obj.device.obj.check()?;
    f.obj.signal.host_synchronize(timeout)
}

/// `zeFenceHostSynchronize`.
pub(crate) unsafe extern "C" fn fence_host_synchronize(
    h: ze_fence_handle_t,
    timeout: u64,
) -> ze_result_t {
    guard(|| fence_wait(h, timeout))
}

/// `zeFenceQueryStatus`.
pub(crate) unsafe extern "C" fn fence_query_status(h: ze_fence_handle_t) -> ze_result_t {
    guard(|| fence_wait(h, 0))
}

/// `zeFenceReset`.
pub(crate) unsafe extern "C" fn fence_reset(h: ze_fence_handle_t) -> ze_result_t {
    guard(|| {
        let f = resolve!(Fence, h)?;
        f.obj.signal.reset();
        Ok(())
    })
}
