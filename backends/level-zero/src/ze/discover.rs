//! Discovery: `zeInit`, drivers, their root devices, device properties, copy queue groups,
//! peer access.

use super::{Device, Driver, Failure, ze_call};
use level_zero_sys::*;
use std::mem::MaybeUninit;

/// A plain C properties struct, zeroed, with its `stype` set by the caller.
fn zeroed<T>() -> T {
    // SAFETY: only used for the bindings' `#[repr(C)]` property structs: integers, integer
    // newtypes, arrays of them and raw pointers, for all of which all-zero bytes are valid.
    unsafe { MaybeUninit::<T>::zeroed().assume_init() }
}

/// `zeInit(ZE_INIT_FLAG_GPU_ONLY)`: loads the drivers (once per process; later calls return
/// the first result).
pub(crate) fn init(ze: &Loader) -> Result<(), Failure> {
    // SAFETY: zeInit takes flags by value; it may be called any number of times.
    unsafe { ze_call!(ze, zeInit(ze_init_flag_t::ZE_INIT_FLAG_GPU_ONLY.0)) }
}

/// Every driver.
pub(crate) fn drivers(ze: &Loader) -> Result<Vec<Driver>, Failure> {
    let mut n = 0u32;
    // SAFETY: a count query: the driver writes only `n`.
    unsafe { ze_call!(ze, zeDriverGet(&mut n, std::ptr::null_mut()))? };
    let mut raw = vec![ze_driver_handle_t(std::ptr::null_mut()); n as usize];
    // SAFETY: `raw` has room for `n` handles.
    unsafe { ze_call!(ze, zeDriverGet(&mut n, raw.as_mut_ptr()))? };
    raw.truncate(n as usize);
    Ok(raw.into_iter().map(Driver).collect())
}

/// The root devices of `driver`.
pub(crate) fn devices(ze: &Loader, driver: Driver) -> Result<Vec<Device>, Failure> {
    let mut n = 0u32;
    // SAFETY: a count query on a driver handle the loader gave out.
    unsafe { ze_call!(ze, zeDeviceGet(driver.0, &mut n, std::ptr::null_mut()))? };
    let mut raw = vec![ze_device_handle_t(std::ptr::null_mut()); n as usize];
    // SAFETY: `raw` has room for `n` handles.
    unsafe { ze_call!(ze, zeDeviceGet(driver.0, &mut n, raw.as_mut_ptr()))? };
    raw.truncate(n as usize);
    Ok(raw.into_iter().map(Device).collect())
}

/// What this backend needs to know of a device.
#[derive(Clone, Debug)]
pub(crate) struct DeviceFacts {
    /// Its name.
    pub name: String,
    /// Bytes of device memory (all its memory ordinals together).
    pub memory: u64,
    /// The ordinal of the queue group copies go to: a COPY-only group when there is one,
    /// else a group with COPY.
    pub copy_ordinal: u32,
    /// Whether that group is COPY-only (a copy engine, not a compute engine).
    pub copy_only: bool,
    /// Queues in that group.
    pub copy_queues: u32,
}

fn c_name(raw: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Properties, memory and copy queue group of `device`; `Ok(None)` for a device without a
/// queue group that copies.
pub(crate) fn facts(ze: &Loader, device: Device) -> Result<Option<DeviceFacts>, Failure> {
    let mut props: ze_device_properties_t = zeroed();
    props.stype = ze_structure_type_t::ZE_STRUCTURE_TYPE_DEVICE_PROPERTIES;
    // SAFETY: `props` is a properly typed struct with its stype set and no pNext chain.
    unsafe { ze_call!(ze, zeDeviceGetProperties(device.0, &mut props))? };

    let mut n = 0u32;
    // SAFETY: a count query.
    unsafe {
        ze_call!(
            ze,
            zeDeviceGetMemoryProperties(device.0, &mut n, std::ptr::null_mut())
        )?
    };
    let mut mems: Vec<ze_device_memory_properties_t> = (0..n)
        .map(|_| {
            let mut m: ze_device_memory_properties_t = zeroed();
            m.stype = ze_structure_type_t::ZE_STRUCTURE_TYPE_DEVICE_MEMORY_PROPERTIES;
            m
        })
        .collect();
    // SAFETY: `mems` holds `n` initialised structs with their stype set.
    unsafe {
        ze_call!(
            ze,
            zeDeviceGetMemoryProperties(device.0, &mut n, mems.as_mut_ptr())
        )?
    };
    mems.truncate(n as usize);
    let memory = mems.iter().map(|m| m.totalSize).sum();

    let mut n = 0u32;
    // SAFETY: a count query.
    unsafe {
        ze_call!(
            ze,
            zeDeviceGetCommandQueueGroupProperties(device.0, &mut n, std::ptr::null_mut())
        )?
    };
    let mut groups: Vec<ze_command_queue_group_properties_t> = (0..n)
        .map(|_| {
            let mut g: ze_command_queue_group_properties_t = zeroed();
            g.stype = ze_structure_type_t::ZE_STRUCTURE_TYPE_COMMAND_QUEUE_GROUP_PROPERTIES;
            g
        })
        .collect();
    // SAFETY: `groups` holds `n` initialised structs with their stype set.
    unsafe {
        ze_call!(
            ze,
            zeDeviceGetCommandQueueGroupProperties(device.0, &mut n, groups.as_mut_ptr())
        )?
    };
    groups.truncate(n as usize);
    let copy = ze_command_queue_group_property_flag_t::ZE_COMMAND_QUEUE_GROUP_PROPERTY_FLAG_COPY.0;
    let compute =
        ze_command_queue_group_property_flag_t::ZE_COMMAND_QUEUE_GROUP_PROPERTY_FLAG_COMPUTE.0;
    let pick = |only: bool| {
        groups.iter().position(|g| {
            g.flags & copy != 0 && g.numQueues > 0 && (!only || g.flags & compute == 0)
        })
    };
    let Some((ordinal, copy_only)) = pick(true)
        .map(|o| (o, true))
        .or_else(|| pick(false).map(|o| (o, false)))
    else {
        return Ok(None);
    };
    Ok(Some(DeviceFacts {
        name: c_name(&props.name),
        memory,
        copy_ordinal: ordinal as u32,
        copy_only,
        copy_queues: groups[ordinal].numQueues,
    }))
}

/// Whether `device` can access `peer`'s memory.
pub(crate) fn can_access_peer(ze: &Loader, device: Device, peer: Device) -> Result<bool, Failure> {
    let mut can: ze_bool_t = 0;
    // SAFETY: two device handles of the loader; the driver writes one ze_bool_t.
    unsafe { ze_call!(ze, zeDeviceCanAccessPeer(device.0, peer.0, &mut can))? };
    Ok(can != 0)
}

#[cfg_attr(not(feature = "testing"), allow(dead_code))]
/// The address of driver extension function `name` (NUL-terminated), if the driver has it.
pub(crate) fn extension_function(
    ze: &Loader,
    driver: Driver,
    name: &std::ffi::CStr,
) -> Result<*mut std::ffi::c_void, Failure> {
    let mut f: *mut std::ffi::c_void = std::ptr::null_mut();
    // SAFETY: `name` is NUL-terminated; the driver writes one pointer.
    unsafe {
        ze_call!(
            ze,
            zeDriverGetExtensionFunctionAddress(driver.0, name.as_ptr(), &mut f)
        )?
    };
    Ok(f)
}
