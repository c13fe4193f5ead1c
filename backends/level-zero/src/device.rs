//! One root device: its handle, its context and events (shared with the devices of its
//! driver), what discovery learnt of it.

use crate::events::Events;
use crate::ze::Device;
use crate::ze::discover::DeviceFacts;
use crate::ze::objects::Context;
use drm_pagemap_core::DeviceId;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

pub(crate) struct ZeDevice {
    pub id: DeviceId,
    pub handle: Device,
    /// Index of its driver in discovery order.
    pub driver: usize,
    pub ctx: Arc<Context>,
    pub events: Arc<Events>,
    pub facts: DeviceFacts,
    next_queue: AtomicU32,
}

impl ZeDevice {
    pub(crate) fn new(
        id: DeviceId,
        handle: Device,
        driver: usize,
        ctx: Arc<Context>,
        events: Arc<Events>,
        facts: DeviceFacts,
    ) -> ZeDevice {
        ZeDevice {
            id,
            handle,
            driver,
            ctx,
            events,
            facts,
            next_queue: AtomicU32::new(0),
        }
    }

    /// The copy queue the next pagemap of this device uses (round robin over the group).
    pub(crate) fn next_queue(&self) -> u32 {
        self.next_queue.fetch_add(1, Ordering::Relaxed) % self.facts.copy_queues.max(1)
    }
}
