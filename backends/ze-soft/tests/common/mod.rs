//! Test support: the real loader opened through libloading, routed to ze-soft, with thin
//! helpers over the entry points the tests use.
#![allow(dead_code)]

use std::ffi::c_void;
use std::ptr::null_mut;
use std::sync::{Mutex, MutexGuard, OnceLock};

use level_zero_sys::*;
use ze_soft::control::*;

/// Success.
pub const OK: ze_result_t = _ze_result_t::ZE_RESULT_SUCCESS;

macro_rules! api {
    ($($field:ident: $ty:ident = $sym:literal,)*) => {
        /// The loader's entry points.
        pub struct Api {
            _lib: libloading::Library,
            $(pub $field: $ty,)*
        }
        impl Api {
            fn load(lib: libloading::Library) -> Result<Self, String> {
                $(
                    // SAFETY: the symbol is the loader's entry with the C signature `$ty`
                    // describes (types from the same headers the loader was built from).
                    let $field: $ty = unsafe {
                        let sym = lib.get::<*mut c_void>(concat!($sym, "\0").as_bytes())
                            .map_err(|e| format!("{}: {e}", $sym))?;
                        std::mem::transmute::<*mut c_void, $ty>(*sym)
                    };
                )*
                Ok(Api { _lib: lib, $($field,)* })
            }
        }
    };
}

api! {
    init: ze_pfnInit_t = "zeInit",
    driver_get: ze_pfnDriverGet_t = "zeDriverGet",
    driver_get_api_version: ze_pfnDriverGetApiVersion_t = "zeDriverGetApiVersion",
    driver_get_extension_properties: ze_pfnDriverGetExtensionProperties_t = "zeDriverGetExtensionProperties",
    driver_get_extension_function_address: ze_pfnDriverGetExtensionFunctionAddress_t = "zeDriverGetExtensionFunctionAddress",
    device_get: ze_pfnDeviceGet_t = "zeDeviceGet",
    device_get_properties: ze_pfnDeviceGetProperties_t = "zeDeviceGetProperties",
    device_get_memory_properties: ze_pfnDeviceGetMemoryProperties_t = "zeDeviceGetMemoryProperties",
    device_get_command_queue_group_properties: ze_pfnDeviceGetCommandQueueGroupProperties_t = "zeDeviceGetCommandQueueGroupProperties",
    device_can_access_peer: ze_pfnDeviceCanAccessPeer_t = "zeDeviceCanAccessPeer",
    device_get_p2p_properties: ze_pfnDeviceGetP2PProperties_t = "zeDeviceGetP2PProperties",
    context_create: ze_pfnContextCreate_t = "zeContextCreate",
    context_destroy: ze_pfnContextDestroy_t = "zeContextDestroy",
    mem_alloc_host: ze_pfnMemAllocHost_t = "zeMemAllocHost",
    mem_alloc_device: ze_pfnMemAllocDevice_t = "zeMemAllocDevice",
    mem_free: ze_pfnMemFree_t = "zeMemFree",
    mem_get_alloc_properties: ze_pfnMemGetAllocProperties_t = "zeMemGetAllocProperties",
    event_pool_create: ze_pfnEventPoolCreate_t = "zeEventPoolCreate",
    event_pool_destroy: ze_pfnEventPoolDestroy_t = "zeEventPoolDestroy",
    event_create: ze_pfnEventCreate_t = "zeEventCreate",
    event_destroy: ze_pfnEventDestroy_t = "zeEventDestroy",
    event_host_signal: ze_pfnEventHostSignal_t = "zeEventHostSignal",
    event_host_synchronize: ze_pfnEventHostSynchronize_t = "zeEventHostSynchronize",
    event_query_status: ze_pfnEventQueryStatus_t = "zeEventQueryStatus",
    event_host_reset: ze_pfnEventHostReset_t = "zeEventHostReset",
    list_create: ze_pfnCommandListCreate_t = "zeCommandListCreate",
    list_create_immediate: ze_pfnCommandListCreateImmediate_t = "zeCommandListCreateImmediate",
    list_destroy: ze_pfnCommandListDestroy_t = "zeCommandListDestroy",
    list_close: ze_pfnCommandListClose_t = "zeCommandListClose",
    list_reset: ze_pfnCommandListReset_t = "zeCommandListReset",
    append_copy: ze_pfnCommandListAppendMemoryCopy_t = "zeCommandListAppendMemoryCopy",
    append_fill: ze_pfnCommandListAppendMemoryFill_t = "zeCommandListAppendMemoryFill",
    append_barrier: ze_pfnCommandListAppendBarrier_t = "zeCommandListAppendBarrier",
    append_signal: ze_pfnCommandListAppendSignalEvent_t = "zeCommandListAppendSignalEvent",
    append_wait: ze_pfnCommandListAppendWaitOnEvents_t = "zeCommandListAppendWaitOnEvents",
    append_reset: ze_pfnCommandListAppendEventReset_t = "zeCommandListAppendEventReset",
    queue_create: ze_pfnCommandQueueCreate_t = "zeCommandQueueCreate",
    queue_destroy: ze_pfnCommandQueueDestroy_t = "zeCommandQueueDestroy",
    queue_execute: ze_pfnCommandQueueExecuteCommandLists_t = "zeCommandQueueExecuteCommandLists",
    queue_synchronize: ze_pfnCommandQueueSynchronize_t = "zeCommandQueueSynchronize",
    fence_create: ze_pfnFenceCreate_t = "zeFenceCreate",
    fence_destroy: ze_pfnFenceDestroy_t = "zeFenceDestroy",
    fence_host_synchronize: ze_pfnFenceHostSynchronize_t = "zeFenceHostSynchronize",
    fence_query_status: ze_pfnFenceQueryStatus_t = "zeFenceQueryStatus",
    fence_reset: ze_pfnFenceReset_t = "zeFenceReset",
}

/// Calls an entry point of the loader (tests pass raw handles and pointers on purpose, some of
/// them bad, so the arguments are part of the unsafe call).
macro_rules! ze {
    ($api:expr, $f:ident ( $($arg:expr),* $(,)? )) => {{
        let f = $api.$f.expect(concat!("loader entry ", stringify!($f)));
        // SAFETY: the test passes arguments that follow the Level Zero API contract for this
        // entry (valid handles and pointers to live locals or driver allocations), or
        // deliberately bad handles that the driver must detect without dereferencing.
        unsafe { f($($arg),*) }
    }};
}

/// An initialised loader with the driver, one context and the devices.
pub struct Env {
    pub api: Api,
    pub driver: ze_driver_handle_t,
    pub devices: Vec<ze_device_handle_t>,
    pub ctx: ze_context_handle_t,
    pub control: SoftControlFn,
}

// SAFETY: the handles are plain identifiers the driver accepts from any thread.
unsafe impl Send for Env {}
// SAFETY: as above; the driver is thread-safe.
unsafe impl Sync for Env {}

/// Environment knobs every test binary sets before zeInit (one process = one configuration).
const KNOBS: &[(&str, &str)] = &[
    ("ZE_SOFT_DEVICES", "4"),
    ("ZE_SOFT_DEVICE_MEMORY", "64M"),
    ("ZE_SOFT_PEER_GROUPS", "0,1;2,3"),
    ("ZE_SOFT_COPY_ENGINES", "2"),
];

fn open() -> Result<Env, String> {
    for (k, v) in KNOBS {
        if std::env::var_os(k).is_none() {
            // SAFETY: set once (OnceLock) before the loader is opened and before zeInit, while
            // the test threads only wait on that OnceLock.
            unsafe { std::env::set_var(k, v) };
        }
    }
    let path = ze_soft::route_loader()?;
    // SAFETY: opening the system's Level Zero loader runs its initialisers, which are sound.
    let lib = unsafe { libloading::Library::new("libze_loader.so.1") }
        .map_err(|e| format!("libze_loader.so.1 not loadable: {e}"))?;
    let api = Api::load(lib)?;
    let r = ze!(api, init(0));
    if r != OK {
        return Err(format!("zeInit with {} returned {r:?}", path.display()));
    }
    let mut n = 1u32;
    let mut driver = ze_driver_handle_t(null_mut());
    let r = ze!(api, driver_get(&mut n, &mut driver));
    if r != OK || n != 1 {
        return Err(format!("zeDriverGet: {r:?} count {n}"));
    }
    let mut count = 0u32;
    assert_eq!(ze!(api, device_get(driver, &mut count, null_mut())), OK);
    let mut devices = vec![ze_device_handle_t(null_mut()); count as usize];
    assert_eq!(
        ze!(api, device_get(driver, &mut count, devices.as_mut_ptr())),
        OK
    );
    let desc = ze_context_desc_t {
        stype: _ze_structure_type_t::ZE_STRUCTURE_TYPE_CONTEXT_DESC,
        pNext: std::ptr::null(),
        flags: 0,
    };
    let mut ctx = ze_context_handle_t(null_mut());
    assert_eq!(ze!(api, context_create(driver, &desc, &mut ctx)), OK);
    let mut entry: *mut c_void = null_mut();
    let name = c"zexSoftControl";
    assert_eq!(
        ze!(
            api,
            driver_get_extension_function_address(driver, name.as_ptr(), &mut entry)
        ),
        OK
    );
    assert!(!entry.is_null());
    // SAFETY: the driver returns its control entry, whose signature is `SoftControlFn`.
    let control = unsafe { std::mem::transmute::<*mut c_void, SoftControlFn>(entry) };
    Ok(Env {
        api,
        driver,
        devices,
        ctx,
        control,
    })
}

/// The process's environment, or the reason it is unavailable (tests then print `skipped:`).
pub fn env() -> Option<&'static Env> {
    static ENV: OnceLock<Result<Env, String>> = OnceLock::new();
    match ENV.get_or_init(open) {
        Ok(env) => Some(env),
        Err(why) => {
            println!("skipped: {why}");
            None
        }
    }
}

/// Serialises tests that use injections or counters (they are process-wide).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

impl Env {
    /// Sends a control request.
    pub fn control(&self, op: u32, device: u32, count: u64, result: ze_result_t) -> SoftControl {
        let mut req = SoftControl {
            op,
            device,
            count,
            result: result.0 as i32,
            ..Default::default()
        };
        // SAFETY: `req` is a live local; the driver handle is the one zeDriverGet returned.
        let r = unsafe { (self.control)(self.driver, &mut req) };
        assert_eq!(r, OK, "control op {op}");
        req
    }
    /// Resets injections and counters.
    pub fn reset(&self) {
        self.control(OP_RESET, 0, 0, OK);
    }
    /// Reads the counters.
    pub fn counters(&self) -> SoftCounters {
        self.control(OP_READ_COUNTERS, 0, 0, OK).counters
    }
    /// A host allocation.
    pub fn host(&self, size: usize) -> *mut u8 {
        let desc = ze_host_mem_alloc_desc_t {
            stype: _ze_structure_type_t::ZE_STRUCTURE_TYPE_HOST_MEM_ALLOC_DESC,
            pNext: std::ptr::null(),
            flags: 0,
        };
        let mut p = null_mut();
        assert_eq!(
            ze!(self.api, mem_alloc_host(self.ctx, &desc, size, 64, &mut p)),
            OK
        );
        p.cast()
    }
    /// A device allocation (the raw result).
    pub fn try_device(&self, dev: usize, size: usize) -> Result<*mut u8, ze_result_t> {
        let desc = ze_device_mem_alloc_desc_t {
            stype: _ze_structure_type_t::ZE_STRUCTURE_TYPE_DEVICE_MEM_ALLOC_DESC,
            pNext: std::ptr::null(),
            flags: 0,
            ordinal: 0,
        };
        let mut p = null_mut();
        let r = ze!(
            self.api,
            mem_alloc_device(self.ctx, &desc, size, 4096, self.devices[dev], &mut p)
        );
        if r == OK { Ok(p.cast()) } else { Err(r) }
    }
    /// A device allocation.
    pub fn device(&self, dev: usize, size: usize) -> *mut u8 {
        self.try_device(dev, size).expect("zeMemAllocDevice")
    }
    /// Frees an allocation.
    pub fn free(&self, p: *mut u8) {
        assert_eq!(ze!(self.api, mem_free(self.ctx, p.cast())), OK);
    }
    /// An event pool of `n` host-visible events and its events.
    pub fn events(&self, n: u32) -> (ze_event_pool_handle_t, Vec<ze_event_handle_t>) {
        let desc = ze_event_pool_desc_t {
            stype: _ze_structure_type_t::ZE_STRUCTURE_TYPE_EVENT_POOL_DESC,
            pNext: std::ptr::null(),
            flags: _ze_event_pool_flag_t::ZE_EVENT_POOL_FLAG_HOST_VISIBLE.0,
            count: n,
        };
        let mut pool = ze_event_pool_handle_t(null_mut());
        assert_eq!(
            ze!(
                self.api,
                event_pool_create(self.ctx, &desc, 0, null_mut(), &mut pool)
            ),
            OK
        );
        let events = (0..n)
            .map(|index| {
                let desc = ze_event_desc_t {
                    stype: _ze_structure_type_t::ZE_STRUCTURE_TYPE_EVENT_DESC,
                    pNext: std::ptr::null(),
                    index,
                    signal: _ze_event_scope_flag_t::ZE_EVENT_SCOPE_FLAG_HOST.0,
                    wait: _ze_event_scope_flag_t::ZE_EVENT_SCOPE_FLAG_HOST.0,
                };
                let mut ev = ze_event_handle_t(null_mut());
                assert_eq!(ze!(self.api, event_create(pool, &desc, &mut ev)), OK);
                ev
            })
            .collect();
        (pool, events)
    }
    /// Destroys events and their pool.
    pub fn destroy_events(&self, pool: ze_event_pool_handle_t, events: Vec<ze_event_handle_t>) {
        for ev in events {
            assert_eq!(ze!(self.api, event_destroy(ev)), OK);
        }
        assert_eq!(ze!(self.api, event_pool_destroy(pool)), OK);
    }
    /// A queue descriptor for the COPY-only group.
    pub fn copy_desc(index: u32) -> ze_command_queue_desc_t {
        ze_command_queue_desc_t {
            stype: _ze_structure_type_t::ZE_STRUCTURE_TYPE_COMMAND_QUEUE_DESC,
            pNext: std::ptr::null(),
            ordinal: 1,
            index,
            flags: 0,
            mode: _ze_command_queue_mode_t::ZE_COMMAND_QUEUE_MODE_ASYNCHRONOUS,
            priority: _ze_command_queue_priority_t::ZE_COMMAND_QUEUE_PRIORITY_NORMAL,
        }
    }
    /// An immediate list on the COPY group of device `dev`.
    pub fn immediate(&self, dev: usize) -> ze_command_list_handle_t {
        let desc = Self::copy_desc(0);
        let mut list = ze_command_list_handle_t(null_mut());
        assert_eq!(
            ze!(
                self.api,
                list_create_immediate(self.ctx, self.devices[dev], &desc, &mut list)
            ),
            OK
        );
        list
    }
    /// Appends a copy.
    pub fn copy(
        &self,
        list: ze_command_list_handle_t,
        dst: *mut u8,
        src: *const u8,
        len: usize,
        signal: Option<ze_event_handle_t>,
        waits: &[ze_event_handle_t],
    ) -> ze_result_t {
        let mut waits = waits.to_vec();
        let signal = signal.unwrap_or(ze_event_handle_t(null_mut()));
        let wp = if waits.is_empty() {
            null_mut()
        } else {
            waits.as_mut_ptr()
        };
        ze!(
            self.api,
            append_copy(
                list,
                dst.cast(),
                src.cast(),
                len,
                signal,
                waits.len() as u32,
                wp
            )
        )
    }
    /// Waits for an event (forever).
    pub fn wait(&self, ev: ze_event_handle_t) -> ze_result_t {
        ze!(self.api, event_host_synchronize(ev, u64::MAX))
    }
}

/// Threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Threads of this process that are the driver's engine threads (named `ze-soft-q...` and
/// `ze-soft-imm...`, once they have named themselves): what the driver owns, whatever other
/// threads the loader or a layer starts meanwhile.
pub fn engine_thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|t| t.ok())
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("ze-soft-"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// An all-zero C struct of the Level Zero API.
pub fn zeroed<T: Copy>() -> T {
    // SAFETY: used only for bindgen structs of integers, raw pointers, arrays and newtype enums,
    // for all of which the all-zero bit pattern is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Sets loader variables before [`env`] opens the loader (call first in a test binary).
pub fn preset(vars: &[(&str, &str)]) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (k, v) in vars {
            // SAFETY: runs once, before the loader is opened and before zeInit; the test binary
            // using it has a single test, so no other thread reads the environment.
            unsafe { std::env::set_var(k, v) };
        }
    });
}

/// A scenario over the whole copy path: immediate and regular lists, a queue with a fence,
/// fills, allocation properties and the control entry. Panics on any unexpected result.
pub fn scenario(env: &Env) {
    const N: usize = 8192;
    let src = env.host(N);
    let dev0 = env.device(0, N);
    let dev1 = env.device(1, N);
    let back = env.host(N);
    // SAFETY: a fresh host allocation of N bytes.
    let s = unsafe { std::slice::from_raw_parts_mut(src, N) };
    s.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 253) as u8);
    let before = env.counters();
    // Immediate: host -> dev0 -> dev1 (peer), gated by events.
    let list = env.immediate(0);
    let (pool, evs) = env.events(3);
    assert_eq!(env.copy(list, dev0, src, N, Some(evs[0]), &[]), OK);
    assert_eq!(env.copy(list, dev1, dev0, N, Some(evs[1]), &[evs[0]]), OK);
    assert_eq!(env.wait(evs[1]), OK);
    // Regular: dev1 -> back, then a fill of the first 64 bytes of dev0, on a queue with a fence.
    let desc = ze_command_list_desc_t {
        stype: _ze_structure_type_t::ZE_STRUCTURE_TYPE_COMMAND_LIST_DESC,
        pNext: std::ptr::null(),
        commandQueueGroupOrdinal: 1,
        flags: 0,
    };
    let mut regular = ze_command_list_handle_t(null_mut());
    assert_eq!(
        ze!(
            env.api,
            list_create(env.ctx, env.devices[1], &desc, &mut regular)
        ),
        OK
    );
    let r = ze!(
        env.api,
        append_copy(regular, back.cast(), dev1.cast(), N, evs[2], 0, null_mut())
    );
    assert_eq!(r, OK);
    let pattern = 0xDEAD_BEEFu32;
    let r = ze!(
        env.api,
        append_fill(
            regular,
            dev1.cast(),
            (&pattern as *const u32).cast(),
            4,
            64,
            ze_event_handle_t(null_mut()),
            1,
            [evs[2]].as_mut_ptr()
        )
    );
    assert_eq!(r, OK);
    assert_eq!(ze!(env.api, list_close(regular)), OK);
    let qdesc = Env::copy_desc(1);
    let mut queue = ze_command_queue_handle_t(null_mut());
    assert_eq!(
        ze!(
            env.api,
            queue_create(env.ctx, env.devices[1], &qdesc, &mut queue)
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
    let mut lists = [regular];
    assert_eq!(
        ze!(env.api, queue_execute(queue, 1, lists.as_mut_ptr(), fence)),
        OK
    );
    assert_eq!(ze!(env.api, fence_host_synchronize(fence, u64::MAX)), OK);
    assert_eq!(ze!(env.api, queue_synchronize(queue, u64::MAX)), OK);
    // SAFETY: the fence covers every write to `back` and `dev1`.
    let (b, d1) = unsafe {
        (
            std::slice::from_raw_parts(back, N),
            std::slice::from_raw_parts(dev1, 64),
        )
    };
    assert_eq!(b, &s[..]);
    assert!(d1.chunks(4).all(|c| c == pattern.to_ne_bytes()));
    // Allocation properties of an interior pointer.
    let mut props: ze_memory_allocation_properties_t = zeroed();
    props.stype = _ze_structure_type_t::ZE_STRUCTURE_TYPE_MEMORY_ALLOCATION_PROPERTIES;
    let mut owner = ze_device_handle_t(null_mut());
    let r = ze!(
        env.api,
        mem_get_alloc_properties(
            env.ctx,
            dev1.wrapping_add(100).cast(),
            &mut props,
            &mut owner
        )
    );
    assert_eq!(r, OK);
    assert_eq!(props.type_, _ze_memory_type_t::ZE_MEMORY_TYPE_DEVICE);
    assert_eq!(owner.0, env.devices[1].0);
    let after = env.counters();
    assert_eq!(after.copies - before.copies, 3);
    assert_eq!(after.fills - before.fills, 1);
    assert_eq!(after.strict_violations, before.strict_violations);
    assert_eq!(ze!(env.api, fence_destroy(fence)), OK);
    assert_eq!(ze!(env.api, queue_destroy(queue)), OK);
    assert_eq!(ze!(env.api, list_destroy(regular)), OK);
    assert_eq!(ze!(env.api, list_destroy(list)), OK);
    env.destroy_events(pool, evs);
    for p in [src, dev0, dev1, back] {
        env.free(p);
    }
}
