//! The `ze*/zet*/zes*Get*ProcAddrTable` getters the loader calls: each checks the requested
//! version and fills the entries this driver implements (only those that exist in that version).

use std::ffi::c_void;

use level_zero_sys::*;

use super::{ZeResult, cmdlist, code, device, events, guard, memory, queue};

/// Checks the table pointer and that the loader speaks API major version 1.
fn check<T>(version: ze_api_version_t, table: *mut T) -> ZeResult<&'static mut T> {
    if table.is_null() {
        return Err(code::INVALID_NULL_POINTER);
    }
    if version.0 >> 16 != device::API_VERSION.0 >> 16 {
        return Err(code::UNSUPPORTED_VERSION);
    }
    // SAFETY: the loader passes a valid table for `version`, which holds every 1.0 entry; later
    // entries are written only under `version >=` guards.
    Ok(unsafe { &mut *table })
}

fn at_least(version: ze_api_version_t, v: ze_api_version_t) -> bool {
    version.0 >= v.0
}

/// Tables this driver leaves empty (it fills no entry in them): SUCCESS, entries untouched.
macro_rules! empty_getters {
    ($($name:ident),* $(,)?) => {$(
        #[doc = concat!("`", stringify!($name), "`: no entries (SUCCESS).")]
        ///
        /// # Safety
        /// `table` is null or a table of the requested version.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(version: ze_api_version_t, table: *mut c_void) -> ze_result_t {
            guard(|| check(version, table).map(|_| ()))
        }
    )*};
}

empty_getters!(
    zeGetImageProcAddrTable,
    zeGetKernelProcAddrTable,
    zeGetModuleProcAddrTable,
    zeGetModuleBuildLogProcAddrTable,
    zeGetPhysicalMemProcAddrTable,
    zeGetSamplerProcAddrTable,
    zeGetVirtualMemProcAddrTable,
    zetGetDeviceProcAddrTable,
    zetGetContextProcAddrTable,
    zetGetCommandListProcAddrTable,
    zetGetModuleProcAddrTable,
    zetGetKernelProcAddrTable,
    zetGetMetricGroupProcAddrTable,
    zetGetMetricProcAddrTable,
    zetGetMetricStreamerProcAddrTable,
    zetGetMetricQueryPoolProcAddrTable,
    zetGetMetricQueryProcAddrTable,
    zetGetDebugProcAddrTable,
    zetGetTracerExpProcAddrTable,
    zesGetDeviceProcAddrTable,
    zesGetDriverProcAddrTable,
    zesGetDiagnosticsProcAddrTable,
    zesGetEngineProcAddrTable,
    zesGetFabricPortProcAddrTable,
    zesGetFanProcAddrTable,
    zesGetFirmwareProcAddrTable,
    zesGetFrequencyProcAddrTable,
    zesGetLedProcAddrTable,
    zesGetMemoryProcAddrTable,
    zesGetPerformanceFactorProcAddrTable,
    zesGetPowerProcAddrTable,
    zesGetPsuProcAddrTable,
    zesGetRasProcAddrTable,
    zesGetSchedulerProcAddrTable,
    zesGetStandbyProcAddrTable,
    zesGetTemperatureProcAddrTable,
);

/// `zeGetGlobalProcAddrTable`.
///
/// # Safety
/// `table` is null or a table of the requested version.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zeGetGlobalProcAddrTable(
    version: ze_api_version_t,
    table: *mut ze_global_dditable_t,
) -> ze_result_t {
    guard(|| {
        let t = check(version, table)?;
        t.pfnInit = Some(device::ze_init);
        Ok(())
    })
}

/// `zeGetDriverProcAddrTable`.
///
/// # Safety
/// `table` is null or a table of the requested version.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zeGetDriverProcAddrTable(
    version: ze_api_version_t,
    table: *mut ze_driver_dditable_t,
) -> ze_result_t {
    guard(|| {
        let t = check(version, table)?;
        t.pfnGet = Some(device::driver_get);
        t.pfnGetApiVersion = Some(device::driver_get_api_version);
        t.pfnGetProperties = Some(device::driver_get_properties);
        t.pfnGetIpcProperties = Some(device::driver_get_ipc_properties);
        t.pfnGetExtensionProperties = Some(device::driver_get_extension_properties);
        if at_least(version, _ze_api_version_t::ZE_API_VERSION_1_1) {
            t.pfnGetExtensionFunctionAddress = Some(device::driver_get_extension_function_address);
        }
        Ok(())
    })
}

/// `zeGetDeviceProcAddrTable`.
///
/// # Safety
/// `table` is null or a table of the requested version.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zeGetDeviceProcAddrTable(
    version: ze_api_version_t,
    table: *mut ze_device_dditable_t,
) -> ze_result_t {
    guard(|| {
        let t = check(version, table)?;
        t.pfnGet = Some(device::device_get);
        t.pfnGetSubDevices = Some(device::device_get_sub_devices);
        t.pfnGetProperties = Some(device::device_get_properties);
        t.pfnGetComputeProperties = Some(device::device_get_compute_properties);
        t.pfnGetCommandQueueGroupProperties =
            Some(device::device_get_command_queue_group_properties);
        t.pfnGetMemoryProperties = Some(device::device_get_memory_properties);
        t.pfnGetP2PProperties = Some(device::device_get_p2p_properties);
        t.pfnCanAccessPeer = Some(device::device_can_access_peer);
        t.pfnGetStatus = Some(device::device_get_status);
        Ok(())
    })
}

/// `zeGetContextProcAddrTable`.
///
/// # Safety
/// `table` is null or a table of the requested version.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zeGetContextProcAddrTable(
    version: ze_api_version_t,
    table: *mut ze_context_dditable_t,
) -> ze_result_t {
    guard(|| {
        let t = check(version, table)?;
        t.pfnCreate = Some(device::context_create);
        t.pfnDestroy = Some(device::context_destroy);
        t.pfnGetStatus = Some(device::context_get_status);
        Ok(())
    })
}

/// `zeGetCommandQueueProcAddrTable`.
///
/// # Safety
/// `table` is null or a table of the requested version.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zeGetCommandQueueProcAddrTable(
    version: ze_api_version_t,
    table: *mut ze_command_queue_dditable_t,
) -> ze_result_t {
    guard(|| {
        let t = check(version, table)?;
        t.pfnCreate = Some(queue::command_queue_create);
        t.pfnDestroy = Some(queue::command_queue_destroy);
        t.pfnExecuteCommandLists = Some(queue::command_queue_execute_command_lists);
        t.pfnSynchronize = Some(queue::command_queue_synchronize);
        Ok(())
    })
}

/// `zeGetCommandListProcAddrTable`.
///
/// # Safety
/// `table` is null or a table of the requested version.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zeGetCommandListProcAddrTable(
    version: ze_api_version_t,
    table: *mut ze_command_list_dditable_t,
) -> ze_result_t {
    guard(|| {
        let t = check(version, table)?;
        t.pfnCreate = Some(cmdlist::command_list_create);
        t.pfnCreateImmediate = Some(cmdlist::command_list_create_immediate);
        t.pfnDestroy = Some(cmdlist::command_list_destroy);
        t.pfnClose = Some(cmdlist::command_list_close);
        t.pfnReset = Some(cmdlist::command_list_reset);
        t.pfnAppendBarrier = Some(cmdlist::append_barrier);
        t.pfnAppendMemoryCopy = Some(cmdlist::append_memory_copy);
        t.pfnAppendMemoryFill = Some(cmdlist::append_memory_fill);
        t.pfnAppendSignalEvent = Some(cmdlist::append_signal_event);
        t.pfnAppendWaitOnEvents = Some(cmdlist::append_wait_on_events);
        t.pfnAppendEventReset = Some(cmdlist::append_event_reset);
        Ok(())
    })
}

/// `zeGetFenceProcAddrTable`.
///
/// # Safety
/// `table` is null or a table of the requested version.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zeGetFenceProcAddrTable(
    version: ze_api_version_t,
    table: *mut ze_fence_dditable_t,
) -> ze_result_t {
    guard(|| {
        let t = check(version, table)?;
        t.pfnCreate = Some(queue::fence_create);
        t.pfnDestroy = Some(queue::fence_destroy);
        t.pfnHostSynchronize = Some(queue::fence_host_synchronize);
        t.pfnQueryStatus = Some(queue::fence_query_status);
        t.pfnReset = Some(queue::fence_reset);
        Ok(())
    })
}

/// `zeGetEventPoolProcAddrTable`.
///
/// # Safety
/// `table` is null or a table of the requested version.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zeGetEventPoolProcAddrTable(
    version: ze_api_version_t,
    table: *mut ze_event_pool_dditable_t,
) -> ze_result_t {
    guard(|| {
        let t = check(version, table)?;
        t.pfnCreate = Some(events::event_pool_create);
        t.pfnDestroy = Some(events::event_pool_destroy);
        Ok(())
    })
}

/// `zeGetEventProcAddrTable`.
///
/// # Safety
/// `table` is null or a table of the requested version.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zeGetEventProcAddrTable(
    version: ze_api_version_t,
    table: *mut ze_event_dditable_t,
) -> ze_result_t {
    guard(|| {
        let t = check(version, table)?;
        t.pfnCreate = Some(events::event_create);
        t.pfnDestroy = Some(events::event_destroy);
        t.pfnHostSignal = Some(events::event_host_signal);
        t.pfnHostSynchronize = Some(events::event_host_synchronize);
        t.pfnQueryStatus = Some(events::event_query_status);
        t.pfnHostReset = Some(events::event_host_reset);
        Ok(())
    })
}

/// `zeGetMemProcAddrTable`.
///
/// # Safety
/// `table` is null or a table of the requested version.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn zeGetMemProcAddrTable(
    version: ze_api_version_t,
    table: *mut ze_mem_dditable_t,
) -> ze_result_t {
    guard(|| {
        let t = check(version, table)?;
        t.pfnAllocShared = Some(memory::mem_alloc_shared);
        t.pfnAllocDevice = Some(memory::mem_alloc_device);
        t.pfnAllocHost = Some(memory::mem_alloc_host);
        t.pfnFree = Some(memory::mem_free);
        t.pfnGetAllocProperties = Some(memory::mem_get_alloc_properties);
        t.pfnGetAddressRange = Some(memory::mem_get_address_range);
        Ok(())
    })
}
