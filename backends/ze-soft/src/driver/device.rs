//! The driver, its devices and contexts, and their entries (`zeInit`, `zeDriver*`, `zeDevice*`,
//! `zeContext*`).

use std::ffi::{CStr, c_char, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use level_zero_sys::*;

use super::config::Config;
use super::handles::{Handle, Kind, resolve};
use super::{ZeResult, code, guard, write_out};
use crate::control::{CONTROL_EXTENSION, EXTENSION_NAME};

/// The API version the driver reports and implements.
pub(crate) const API_VERSION: ze_api_version_t = _ze_api_version_t::ZE_API_VERSION_1_4;

/// The driver object (one per process).
pub(crate) struct Driver;
impl Kind for Driver {
    const MAGIC: u64 = 0x5A45_5346_4452_0001;
}

/// One root device.
pub(crate) struct Device {
    /// Position in `zeDeviceGet`'s order.
    pub index: u32,
    /// Device memory in bytes.
    pub total: u64,
    /// Device memory allocated.
    pub used: AtomicU64,
    /// Lost by `OP_DEVICE_LOST`.
    pub lost: AtomicBool,
    /// Peer group.
    pub group: usize,
}
impl Kind for Device {
    const MAGIC: u64 = 0x5A45_5346_4456_0002;
}

impl Device {
    /// `DEVICE_LOST` once lost.
    pub fn check(&self) -> ZeResult {
        if self.lost.load(Ordering::Acquire) {
            Err(code::DEVICE_LOST)
        } else {
            Ok(())
        }
    }
    /// Whether this device's copy engines may touch `other`'s memory.
    pub fn is_peer(&self, other: &Device) -> bool {
        self.group == other.group
    }
}

/// A context: allocations and events belong to one.
pub(crate) struct Context {
    /// Unique id (never reused).
    pub id: u64,
}
impl Kind for Context {
    const MAGIC: u64 = 0x5A45_5346_4358_0003;
}

/// The driver's state after `zeInit`.
pub(crate) struct State {
    pub config: Config,
    pub driver: &'static Handle<Driver>,
    pub devices: Vec<&'static Handle<Device>>,
}

static STATE: OnceLock<State> = OnceLock::new();

/// The state, or `UNINITIALIZED` before `zeInit`.
pub(crate) fn state() -> ZeResult<&'static State> {
    STATE.get().ok_or(code::UNINITIALIZED)
}

/// The device by index.
pub(crate) fn device_by_index(index: u32) -> ZeResult<&'static Handle<Device>> {
    state()?
        .devices
        .get(index as usize)
        .copied()
        .ok_or(code::INVALID_ARGUMENT)
}

fn init_state() -> &'static State {
    STATE.get_or_init(|| {
        let config = Config::from_env();
        let devices = (0..config.devices)
            .map(|index| {
                Handle::create(Device {
                    index,
                    total: config.device_memory,
                    used: AtomicU64::new(0),
                    lost: AtomicBool::new(false),
                    group: config.peer_group[index as usize],
                })
            })
            .collect();
        State {
            config,
            driver: Handle::create(Driver),
            devices,
        }
    })
}

fn copy_name(dst: &mut [c_char], name: &str) {
    let n = name.len().min(dst.len() - 1);
    for (d, s) in dst.iter_mut().zip(name.bytes().take(n)) {
        *d = s as c_char;
    }
    dst[n] = 0;
}

/// Writes a `(count, array)` pair the Level Zero way: count 0 (or a null array) asks for the
/// total; otherwise up to `*count` items are written and `*count` is set to the number written.
///
/// # Safety
/// `count` is null or valid; `out` is null or valid for `*count` writes.
pub(crate) unsafe fn fill_array<T>(
    count: *mut u32,
    out: *mut T,
    total: u32,
    mut item: impl FnMut(u32, &mut T),
) -> ZeResult {
    if count.is_null() {
        return Err(code::INVALID_NULL_POINTER);
    }
    // SAFETY: non-null, valid per the caller's contract.
    let requested = unsafe { *count };
    if requested == 0 || out.is_null() {
        // SAFETY: as above.
        unsafe { *count = total };
        return Ok(());
    }
    let n = requested.min(total);
    for i in 0..n {
        // SAFETY: `i < *count`, so within the caller's array.
        item(i, unsafe { &mut *out.add(i as usize) });
    }
    // SAFETY: as above.
    unsafe { *count = n };
    Ok(())
}

/// `zeInit`.
pub(crate) unsafe extern "C" fn ze_init(_flags: ze_init_flags_t) -> ze_result_t {
    guard(|| {
        init_state();
        Ok(())
    })
}

/// `zeDriverGet`.
pub(crate) unsafe extern "C" fn driver_get(
    count: *mut u32,
    out: *mut ze_driver_handle_t,
) -> ze_result_t {
    guard(|| {
        let s = state()?;
        // SAFETY: the application's count/array pair.
        unsafe {
            fill_array(count, out, 1, |_, d| {
                *d = ze_driver_handle_t(s.driver.raw())
            })
        }
    })
}

fn check_driver(d: ze_driver_handle_t) -> ZeResult {
    resolve!(Driver, d).map(|_| ())
}

/// `zeDriverGetApiVersion`.
pub(crate) unsafe extern "C" fn driver_get_api_version(
    d: ze_driver_handle_t,
    out: *mut ze_api_version_t,
) -> ze_result_t {
    guard(|| {
        check_driver(d)?;
        // SAFETY: the application's out-pointer.
        unsafe { write_out(out, API_VERSION) }
    })
}

/// `zeDriverGetProperties` (`pNext` chains are left alone).
pub(crate) unsafe extern "C" fn driver_get_properties(
    d: ze_driver_handle_t,
    out: *mut ze_driver_properties_t,
) -> ze_result_t {
    guard(|| {
        check_driver(d)?;
        if out.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        // SAFETY: non-null application pointer to a properties struct.
        let p = unsafe { &mut *out };
        p.uuid.id = *b"ze-soft-driver-1";
        p.driverVersion = 1;
        Ok(())
    })
}

/// `zeDriverGetIpcProperties`: no IPC.
pub(crate) unsafe extern "C" fn driver_get_ipc_properties(
    d: ze_driver_handle_t,
    out: *mut ze_driver_ipc_properties_t,
) -> ze_result_t {
    guard(|| {
        check_driver(d)?;
        if out.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        // SAFETY: non-null application pointer.
        unsafe { (*out).flags = 0 };
        Ok(())
    })
}

/// `zeDriverGetExtensionProperties`: the one extension `ZEX_soft_control`.
pub(crate) unsafe extern "C" fn driver_get_extension_properties(
    d: ze_driver_handle_t,
    count: *mut u32,
    out: *mut ze_driver_extension_properties_t,
) -> ze_result_t {
    guard(|| {
        check_driver(d)?;
        // SAFETY: the application's count/array pair.
        unsafe {
            fill_array(count, out, 1, |_, p| {
                copy_name(&mut p.name, EXTENSION_NAME);
                p.version = 1;
            })
        }
    })
}

/// `zeDriverGetExtensionFunctionAddress`: `zexSoftControl`.
pub(crate) unsafe extern "C" fn driver_get_extension_function_address(
    d: ze_driver_handle_t,
    name: *const c_char,
    out: *mut *mut c_void,
) -> ze_result_t {
    guard(|| {
        check_driver(d)?;
        if name.is_null() || out.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        // SAFETY: a NUL-terminated string from the application.
        let name = unsafe { CStr::from_ptr(name) };
        if name.to_bytes() != CONTROL_EXTENSION.as_bytes() {
            return Err(code::INVALID_ARGUMENT);
        }
        let entry: crate::control::SoftControlFn = super::control::ze_soft_control;
        // SAFETY: the application's out-pointer.
        unsafe { write_out(out, entry as *mut c_void) }
    })
}

/// `zeDeviceGet`.
pub(crate) unsafe extern "C" fn device_get(
    d: ze_driver_handle_t,
    count: *mut u32,
    out: *mut ze_device_handle_t,
) -> ze_result_t {
    guard(|| {
        check_driver(d)?;
        let s = state()?;
        // SAFETY: the application's count/array pair.
        unsafe {
            fill_array(count, out, s.devices.len() as u32, |i, h| {
                *h = ze_device_handle_t(s.devices[i as usize].raw())
            })
        }
    })
}

/// Resolves a live (not lost) device.
pub(crate) fn live_device(h: ze_device_handle_t) -> ZeResult<&'static Handle<Device>> {
    let dev = resolve!(Device, h)?;
    dev.obj.check()?;
    Ok(dev)
}

/// `zeDeviceGetSubDevices`: none.
pub(crate) unsafe extern "C" fn device_get_sub_devices(
    h: ze_device_handle_t,
    count: *mut u32,
    _out: *mut ze_device_handle_t,
) -> ze_result_t {
    guard(|| {
        live_device(h)?;
        // SAFETY: the application's count pointer.
        unsafe { write_out(count, 0) }
    })
}

/// `zeDeviceGetProperties`.
pub(crate) unsafe extern "C" fn device_get_properties(
    h: ze_device_handle_t,
    out: *mut ze_device_properties_t,
) -> ze_result_t {
    guard(|| {
        let dev = live_device(h)?;
        if out.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        // SAFETY: non-null application pointer.
        let p = unsafe { &mut *out };
        p.type_ = _ze_device_type_t::ZE_DEVICE_TYPE_GPU;
        p.vendorId = 0x5E50;
        p.deviceId = 0x0001;
        p.flags = 0;
        p.subdeviceId = 0;
        p.coreClockRate = 1000;
        p.maxMemAllocSize = dev.obj.total;
        p.maxHardwareContexts = 64;
        p.maxCommandQueuePriority = 0;
        p.numThreadsPerEU = 1;
        p.physicalEUSimdWidth = 1;
        p.numEUsPerSubslice = 1;
        p.numSubslicesPerSlice = 1;
        p.numSlices = 1;
        p.timerResolution = 1;
        p.timestampValidBits = 64;
        p.kernelTimestampValidBits = 64;
        let mut uuid = *b"ze-soft-dev-\0\0\0\0";
        uuid[12..].copy_from_slice(&dev.obj.index.to_le_bytes());
        p.uuid.id = uuid;
        copy_name(&mut p.name, &format!("ze-soft device {}", dev.obj.index));
        Ok(())
    })
}

/// `zeDeviceGetComputeProperties` (minimal: no kernels).
pub(crate) unsafe extern "C" fn device_get_compute_properties(
    h: ze_device_handle_t,
    out: *mut ze_device_compute_properties_t,
) -> ze_result_t {
    guard(|| {
        live_device(h)?;
        if out.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        // SAFETY: non-null application pointer.
        let p = unsafe { &mut *out };
        p.maxTotalGroupSize = 1;
        p.maxGroupSizeX = 1;
        p.maxGroupSizeY = 1;
        p.maxGroupSizeZ = 1;
        p.maxGroupCountX = 1;
        p.maxGroupCountY = 1;
        p.maxGroupCountZ = 1;
        p.maxSharedLocalMemory = 0;
        p.numSubGroupSizes = 1;
        p.subGroupSizes = [1, 0, 0, 0, 0, 0, 0, 0];
        Ok(())
    })
}

/// The largest fill pattern.
pub(crate) const MAX_FILL_PATTERN: usize = 256;

/// `zeDeviceGetCommandQueueGroupProperties`: group 0 COMPUTE|COPY with one queue, group 1 COPY
/// with `ZE_SOFT_COPY_ENGINES` queues.
pub(crate) unsafe extern "C" fn device_get_command_queue_group_properties(
    h: ze_device_handle_t,
    count: *mut u32,
    out: *mut ze_command_queue_group_properties_t,
) -> ze_result_t {
    guard(|| {
        live_device(h)?;
        let copies = state()?.config.copy_engines;
        let compute =
            _ze_command_queue_group_property_flag_t::ZE_COMMAND_QUEUE_GROUP_PROPERTY_FLAG_COMPUTE.0;
        let copy =
            _ze_command_queue_group_property_flag_t::ZE_COMMAND_QUEUE_GROUP_PROPERTY_FLAG_COPY.0;
        // SAFETY: the application's count/array pair.
        unsafe {
            fill_array(count, out, 2, |i, p| {
                p.flags = if i == 0 { compute | copy } else { copy };
                p.maxMemoryFillPatternSize = MAX_FILL_PATTERN;
                p.numQueues = if i == 0 { 1 } else { copies };
            })
        }
    })
}

/// Queues in group `ordinal`, or `None` for an unknown ordinal.
pub(crate) fn queues_in_group(ordinal: u32) -> ZeResult<Option<u32>> {
    Ok(match ordinal {
        0 => Some(1),
        1 => Some(state()?.config.copy_engines),
        _ => None,
    })
}

/// `zeDeviceGetMemoryProperties`: one entry.
pub(crate) unsafe extern "C" fn device_get_memory_properties(
    h: ze_device_handle_t,
    count: *mut u32,
    out: *mut ze_device_memory_properties_t,
) -> ze_result_t {
    guard(|| {
        let dev = live_device(h)?;
        // SAFETY: the application's count/array pair.
        unsafe {
            fill_array(count, out, 1, |_, p| {
                p.flags = 0;
                p.maxClockRate = 1000;
                p.maxBusWidth = 64;
                p.totalSize = dev.obj.total;
                copy_name(&mut p.name, "ze-soft host-backed memory");
            })
        }
    })
}

/// `zeDeviceGetP2PProperties`: ACCESS between devices of one peer group.
pub(crate) unsafe extern "C" fn device_get_p2p_properties(
    h: ze_device_handle_t,
    peer: ze_device_handle_t,
    out: *mut ze_device_p2p_properties_t,
) -> ze_result_t {
    guard(|| {
        let dev = live_device(h)?;
        let peer = live_device(peer)?;
        if out.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        let access = _ze_device_p2p_property_flag_t::ZE_DEVICE_P2P_PROPERTY_FLAG_ACCESS.0;
        // SAFETY: non-null application pointer.
        unsafe {
            (*out).flags = if dev.obj.is_peer(&peer.obj) {
                access
            } else {
                0
            }
        };
        Ok(())
    })
}

/// `zeDeviceCanAccessPeer`.
pub(crate) unsafe extern "C" fn device_can_access_peer(
    h: ze_device_handle_t,
    peer: ze_device_handle_t,
    out: *mut ze_bool_t,
) -> ze_result_t {
    guard(|| {
        let dev = live_device(h)?;
        let peer = live_device(peer)?;
        // SAFETY: the application's out-pointer.
        unsafe { write_out(out, dev.obj.is_peer(&peer.obj) as ze_bool_t) }
    })
}

/// `zeDeviceGetStatus`.
pub(crate) unsafe extern "C" fn device_get_status(h: ze_device_handle_t) -> ze_result_t {
    guard(|| live_device(h).map(|_| ()))
}

static NEXT_CONTEXT: AtomicU64 = AtomicU64::new(1);

/// `zeContextCreate`.
pub(crate) unsafe extern "C" fn context_create(
    d: ze_driver_handle_t,
    desc: *const ze_context_desc_t,
    out: *mut ze_context_handle_t,
) -> ze_result_t {
    guard(|| {
        check_driver(d)?;
        if desc.is_null() || out.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        let ctx = Handle::create(Context {
            id: NEXT_CONTEXT.fetch_add(1, Ordering::Relaxed),
        });
        // SAFETY: non-null application out-pointer.
        unsafe { write_out(out, ze_context_handle_t(ctx.raw())) }
    })
}

/// `zeContextDestroy`.
pub(crate) unsafe extern "C" fn context_destroy(h: ze_context_handle_t) -> ze_result_t {
    guard(|| resolve!(Context, h)?.destroy())
}

/// `zeContextGetStatus`.
pub(crate) unsafe extern "C" fn context_get_status(h: ze_context_handle_t) -> ze_result_t {
    guard(|| {
        resolve!(Context, h)?;
        if state()?
            .devices
            .iter()
            .any(|d| d.obj.lost.load(Ordering::Acquire))
        {
            return Err(code::DEVICE_LOST);
        }
        Ok(())
    })
}
