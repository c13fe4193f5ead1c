//! Contexts and what lives in them: memory, command queues and lists, event pools and events.
//! Calls that name memory or events the caller must vouch for are `unsafe fn`s.

use super::{
    ContextHandle, Device, Driver, EventHandle, Failure, List, PoolHandle, Queue, ze_call,
};
use level_zero_sys::*;
use std::ffi::c_void;
use std::ptr::{null, null_mut};
use std::sync::Arc;

/// A Level Zero context of one driver, destroyed when the last user drops it (memory, lists,
/// queues and event pools of it hold an `Arc`).
pub(crate) struct Context {
    pub ze: Loader,
    pub handle: ContextHandle,
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub driver: Driver,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Context({:#x})", self.handle.as_u64())
    }
}

fn queue_desc(ordinal: u32, index: u32) -> ze_command_queue_desc_t {
    ze_command_queue_desc_t {
        stype: ze_structure_type_t::ZE_STRUCTURE_TYPE_COMMAND_QUEUE_DESC,
        pNext: null(),
        ordinal,
        index,
        flags: 0,
        mode: ze_command_queue_mode_t::ZE_COMMAND_QUEUE_MODE_ASYNCHRONOUS,
        priority: ze_command_queue_priority_t::ZE_COMMAND_QUEUE_PRIORITY_NORMAL,
    }
}

/// `ZE_RESULT_NOT_READY` as `Ok(false)`, success as `Ok(true)`.
fn ready(r: Result<(), Failure>) -> Result<bool, Failure> {
    match r {
        Ok(()) => Ok(true),
        Err(f) if f.code() == Some(ze_result_t::ZE_RESULT_NOT_READY) => Ok(false),
        Err(f) => Err(f),
    }
}

impl Context {
    /// A context of `driver` (all its devices).
    pub(crate) fn create(ze: &Loader, driver: Driver) -> Result<Arc<Context>, Failure> {
        let desc = ze_context_desc_t {
            stype: ze_structure_type_t::ZE_STRUCTURE_TYPE_CONTEXT_DESC,
            pNext: null(),
            flags: 0,
        };
        let mut h = ze_context_handle_t(null_mut());
        // SAFETY: a driver handle of the loader, a valid descriptor; the driver writes `h`.
        unsafe { ze_call!(ze, zeContextCreate(driver.0, &desc, &mut h))? };
        Ok(Arc::new(Context {
            ze: ze.clone(),
            handle: ContextHandle(h),
            driver,
        }))
    }

    /// `size` bytes of host memory aligned to `align`, reachable by every device of the
    /// context at the same address.
    pub(crate) fn alloc_host(&self, size: usize, align: usize) -> Result<*mut u8, Failure> {
        let desc = ze_host_mem_alloc_desc_t {
            stype: ze_structure_type_t::ZE_STRUCTURE_TYPE_HOST_MEM_ALLOC_DESC,
            pNext: null(),
            flags: 0,
        };
        let mut p: *mut c_void = null_mut();
        // SAFETY: a valid descriptor; the driver writes `p`.
        unsafe {
            ze_call!(
                self.ze,
                zeMemAllocHost(self.handle.0, &desc, size, align, &mut p)
            )?
        };
        Ok(p as *mut u8)
    }

    /// `size` bytes of `device`'s memory aligned to `align`; its device address.
    pub(crate) fn alloc_device(
        &self,
        device: Device,
        size: usize,
        align: usize,
    ) -> Result<u64, Failure> {
        let desc = ze_device_mem_alloc_desc_t {
            stype: ze_structure_type_t::ZE_STRUCTURE_TYPE_DEVICE_MEM_ALLOC_DESC,
            pNext: null(),
            flags: 0,
            ordinal: 0,
        };
        let mut p: *mut c_void = null_mut();
        // SAFETY: a device of this context, a valid descriptor; the driver writes `p`.
        unsafe {
            ze_call!(
                self.ze,
                zeMemAllocDevice(self.handle.0, &desc, size, align, device.0, &mut p)
            )?
        };
        Ok(p as u64)
    }

    /// Frees memory allocated by this context.
    ///
    /// # Safety
    /// `ptr` is an allocation of this context, and no command that uses it is pending.
    pub(crate) unsafe fn free(&self, ptr: u64) -> Result<(), Failure> {
        // SAFETY: the caller vouches for `ptr`.
        unsafe { ze_call!(self.ze, zeMemFree(self.handle.0, ptr as *mut c_void)) }
    }

    /// A command queue on queue `index` of group `ordinal` of `device`.
    pub(crate) fn create_queue(
        &self,
        device: Device,
        ordinal: u32,
        index: u32,
    ) -> Result<Queue, Failure> {
        let desc = queue_desc(ordinal, index);
        let mut q = ze_command_queue_handle_t(null_mut());
        // SAFETY: a device of this context and a valid descriptor; the driver writes `q`.
        unsafe {
            ze_call!(
                self.ze,
                zeCommandQueueCreate(self.handle.0, device.0, &desc, &mut q)
            )?
        };
        Ok(Queue(q))
    }

    /// An immediate command list on queue `index` of group `ordinal` of `device`.
    pub(crate) fn create_immediate(
        &self,
        device: Device,
        ordinal: u32,
        index: u32,
    ) -> Result<List, Failure> {
        let desc = queue_desc(ordinal, index);
        let mut l = ze_command_list_handle_t(null_mut());
        // SAFETY: as in `create_queue`.
        unsafe {
            ze_call!(
                self.ze,
                zeCommandListCreateImmediate(self.handle.0, device.0, &desc, &mut l)
            )?
        };
        Ok(List(l))
    }

    /// A regular command list for queues of group `ordinal` of `device`.
    pub(crate) fn create_list(&self, device: Device, ordinal: u32) -> Result<List, Failure> {
        let desc = ze_command_list_desc_t {
            stype: ze_structure_type_t::ZE_STRUCTURE_TYPE_COMMAND_LIST_DESC,
            pNext: null(),
            commandQueueGroupOrdinal: ordinal,
            flags: 0,
        };
        let mut l = ze_command_list_handle_t(null_mut());
        // SAFETY: as in `create_queue`.
        unsafe {
            ze_call!(
                self.ze,
                zeCommandListCreate(self.handle.0, device.0, &desc, &mut l)
            )?
        };
        Ok(List(l))
    }

    /// Destroys a command list.
    ///
    /// # Safety
    /// `list` is a list of this context, not used afterwards, with nothing pending on it.
    pub(crate) unsafe fn destroy_list(&self, list: List) {
        // SAFETY: the caller vouches for `list`.
        let _ = unsafe { ze_call!(self.ze, zeCommandListDestroy(list.0)) };
    }

    /// Destroys a command queue.
    ///
    /// # Safety
    /// `queue` is a queue of this context, not used afterwards, with nothing pending on it.
    pub(crate) unsafe fn destroy_queue(&self, queue: Queue) {
        // SAFETY: the caller vouches for `queue`.
        let _ = unsafe { ze_call!(self.ze, zeCommandQueueDestroy(queue.0)) };
    }

    /// A host-visible event pool of `count` events, usable by every device of the context.
    pub(crate) fn create_event_pool(&self, count: u32) -> Result<PoolHandle, Failure> {
        let desc = ze_event_pool_desc_t {
            stype: ze_structure_type_t::ZE_STRUCTURE_TYPE_EVENT_POOL_DESC,
            pNext: null(),
            flags: ze_event_pool_flag_t::ZE_EVENT_POOL_FLAG_HOST_VISIBLE.0,
            count,
        };
        let mut p = ze_event_pool_handle_t(null_mut());
        // SAFETY: a valid descriptor, no device list (all devices of the context).
        unsafe {
            ze_call!(
                self.ze,
                zeEventPoolCreate(self.handle.0, &desc, 0, null_mut(), &mut p)
            )?
        };
        Ok(PoolHandle(p))
    }

    /// Destroys an event pool.
    ///
    /// # Safety
    /// Every event of `pool` has been destroyed.
    pub(crate) unsafe fn destroy_event_pool(&self, pool: PoolHandle) {
        // SAFETY: the caller vouches for `pool`.
        let _ = unsafe { ze_call!(self.ze, zeEventPoolDestroy(pool.0)) };
    }

    /// Event `index` of `pool` (signalled and waited for with host scope: the host sees the
    /// memory the signalling command wrote).
    pub(crate) fn create_event(
        &self,
        pool: PoolHandle,
        index: u32,
    ) -> Result<EventHandle, Failure> {
        let scope = ze_event_scope_flag_t::ZE_EVENT_SCOPE_FLAG_HOST.0;
        let desc = ze_event_desc_t {
            stype: ze_structure_type_t::ZE_STRUCTURE_TYPE_EVENT_DESC,
            pNext: null(),
            index,
            signal: scope,
            wait: scope,
        };
        let mut e = ze_event_handle_t(null_mut());
        // SAFETY: a pool of this context; the index is below the pool's count (the caller's
        // bookkeeping); the driver writes `e`.
        unsafe { ze_call!(self.ze, zeEventCreate(pool.0, &desc, &mut e))? };
        Ok(EventHandle(e))
    }

    /// Destroys an event.
    ///
    /// # Safety
    /// No command that signals or waits for `event` is pending, and it is not used afterwards.
    pub(crate) unsafe fn destroy_event(&self, event: EventHandle) {
        // SAFETY: the caller vouches for `event`.
        let _ = unsafe { ze_call!(self.ze, zeEventDestroy(event.0)) };
    }

    /// Signals `event` from the host.
    pub(crate) fn host_signal(&self, event: EventHandle) -> Result<(), Failure> {
        // SAFETY: events are only destroyed once nothing refers to them (`EventSlot`).
        unsafe { ze_call!(self.ze, zeEventHostSignal(event.0)) }
    }

    /// Resets `event` to not signalled.
    pub(crate) fn host_reset(&self, event: EventHandle) -> Result<(), Failure> {
        // SAFETY: as in `host_signal`.
        unsafe { ze_call!(self.ze, zeEventHostReset(event.0)) }
    }

    /// Whether `event` has signalled.
    pub(crate) fn query(&self, event: EventHandle) -> Result<bool, Failure> {
        // SAFETY: as in `host_signal`.
        ready(unsafe { ze_call!(self.ze, zeEventQueryStatus(event.0)) })
    }

    /// Waits for `event` at most `timeout_ns` (`u64::MAX`: for ever); `Ok(false)` when the
    /// time ran out.
    pub(crate) fn host_synchronize(
        &self,
        event: EventHandle,
        timeout_ns: u64,
    ) -> Result<bool, Failure> {
        // SAFETY: as in `host_signal`.
        ready(unsafe { ze_call!(self.ze, zeEventHostSynchronize(event.0, timeout_ns)) })
    }

    /// Appends a copy of `size` bytes.
    ///
    /// # Safety
    /// `list` is a list of this context used by this thread only (its owner's lock);
    /// `dst` and `src` are `size` bytes of memory reachable by the list's device that stay
    /// allocated until the command completes; `signal` and `waits` are events of this
    /// context that stay alive until then.
    pub(crate) unsafe fn append_copy(
        &self,
        list: List,
        dst: u64,
        src: u64,
        size: usize,
        signal: Option<EventHandle>,
        waits: &mut [EventHandle],
    ) -> Result<(), Failure> {
        let signal = signal.map_or(ze_event_handle_t(null_mut()), |e| e.0);
        let (n, w) = wait_list(waits);
        // SAFETY: the caller vouches for every argument.
        unsafe {
            ze_call!(
                self.ze,
                zeCommandListAppendMemoryCopy(
                    list.0,
                    dst as *mut c_void,
                    src as *const c_void,
                    size,
                    signal,
                    n,
                    w
                )
            )
        }
    }

    /// Appends a fill of `size` bytes at `dst` with zeros.
    ///
    /// # Safety
    /// As [`Context::append_copy`], for `dst`.
    pub(crate) unsafe fn append_zero_fill(
        &self,
        list: List,
        dst: u64,
        size: usize,
        signal: Option<EventHandle>,
        waits: &mut [EventHandle],
    ) -> Result<(), Failure> {
        static ZERO: u8 = 0;
        let signal = signal.map_or(ze_event_handle_t(null_mut()), |e| e.0);
        let (n, w) = wait_list(waits);
        // SAFETY: the caller vouches for every argument; the pattern is a static byte.
        unsafe {
            ze_call!(
                self.ze,
                zeCommandListAppendMemoryFill(
                    list.0,
                    dst as *mut c_void,
                    &ZERO as *const u8 as *const c_void,
                    1,
                    size,
                    signal,
                    n,
                    w
                )
            )
        }
    }

    /// Appends a barrier: later commands of the list start once `waits` have signalled (or,
    /// without waits, once every earlier command completed); signals `signal` then.
    ///
    /// # Safety
    /// As [`Context::append_copy`], for the list and the events.
    pub(crate) unsafe fn append_barrier(
        &self,
        list: List,
        signal: Option<EventHandle>,
        waits: &mut [EventHandle],
    ) -> Result<(), Failure> {
        let signal = signal.map_or(ze_event_handle_t(null_mut()), |e| e.0);
        let (n, w) = wait_list(waits);
        // SAFETY: the caller vouches for every argument.
        unsafe { ze_call!(self.ze, zeCommandListAppendBarrier(list.0, signal, n, w)) }
    }

    /// Closes a regular list for execution.
    ///
    /// # Safety
    /// `list` is a regular list of this context under its owner's lock.
    pub(crate) unsafe fn close(&self, list: List) -> Result<(), Failure> {
        // SAFETY: the caller vouches for `list`.
        unsafe { ze_call!(self.ze, zeCommandListClose(list.0)) }
    }

    /// Resets a regular list for recording again.
    ///
    /// # Safety
    /// `list` is a regular list of this context with no execution pending.
    pub(crate) unsafe fn reset(&self, list: List) -> Result<(), Failure> {
        // SAFETY: the caller vouches for `list`.
        unsafe { ze_call!(self.ze, zeCommandListReset(list.0)) }
    }

    /// Submits a closed regular list to `queue`.
    ///
    /// # Safety
    /// Both belong to this context and one queue group; what the list names stays valid
    /// until its commands complete.
    pub(crate) unsafe fn execute(&self, queue: Queue, list: List) -> Result<(), Failure> {
        let mut lists = [list.0];
        // SAFETY: the caller vouches for both; one list, no fence.
        unsafe {
            ze_call!(
                self.ze,
                zeCommandQueueExecuteCommandLists(
                    queue.0,
                    1,
                    lists.as_mut_ptr(),
                    ze_fence_handle_t(null_mut())
                )
            )
        }
    }
}

fn wait_list(waits: &mut [EventHandle]) -> (u32, *mut ze_event_handle_t) {
    if waits.is_empty() {
        (0, null_mut())
    } else {
        // `EventHandle` is `#[repr(transparent)]` over `ze_event_handle_t`.
        const _: () =
            assert!(std::mem::size_of::<EventHandle>() == std::mem::size_of::<ze_event_handle_t>());
        (
            waits.len() as u32,
            waits.as_mut_ptr() as *mut ze_event_handle_t,
        )
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the last user of the context is gone (every object of it holds an `Arc`).
        let _ = unsafe { ze_call!(self.ze, zeContextDestroy(self.handle.0)) };
    }
}
