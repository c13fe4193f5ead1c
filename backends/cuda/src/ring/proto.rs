//! The ring protocol over a [`RingBlock`], without any lifecycle: the producer's
//! [`Ring::publish`] (under the caller's lock: one producer at a time), the words both sides
//! read, and [`cpu_consumer`], a consumer on a CPU thread that follows the same steps as the
//! persistent kernel (`dpm_ring` in `kernels/pages.cu`), for tests.
//!
//! Protocol (seqs start at 1; the slot of seq `s` is `s % RING_SLOTS`):
//! 1. The producer writes seq `s` only when `s - done <= RING_SLOTS` (the slot's previous
//!    descriptor, `s - RING_SLOTS`, is complete): it never overwrites an unfinished slot.
//!    It writes the body, then the slot's `seq` word (release), then `head = s` (release;
//!    sequentially consistent, which also drains the CPU's store buffer toward the device).
//! 2. The consumer resumes at `done + 1` (read when an instance starts, so a new instance
//!    never repeats what an older one completed). When `head >= next` it reads the slot and
//!    takes it only if its `seq` word is `next` (re-reading a bounded number of times, then
//!    reporting `fault = next` and returning); it copies, makes the bytes visible, then
//!    publishes `done = next` (release).
//! 3. An instance of epoch `e` writes `alive = e` when it starts; when it has nothing to do
//!    and reads `stop >= e` it writes `exited = e` (after every `done`) and returns. It never
//!    returns with a published descriptor it has seen unfinished, except on a fault or when
//!    its lifetime bound runs out (then `exited = e` tells the producer, which relaunches).

use super::layout::{Desc, DescBody, Header, RING_SLOTS, RingBlock};
use std::sync::atomic::Ordering;

/// Why a descriptor was not published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Full {
    /// Every slot holds an unfinished descriptor.
    Full,
}

/// A ring in a block.
pub(crate) struct Ring {
    block: Box<dyn RingBlock>,
}

impl Ring {
    /// The ring of a fresh (zeroed) block: nothing published, nothing done, no instance.
    pub(crate) fn new(block: Box<dyn RingBlock>) -> Ring {
        Ring { block }
    }

    /// The control words.
    pub(crate) fn header(&self) -> &Header {
        // SAFETY: the block holds a Header at its start, 64-aligned, for as long as it lives
        // (RingBlock's contract); its fields are atomics, which other writers (the consumer,
        // another process's device) may change at any time.
        unsafe { &*(self.block.host() as *const Header) }
    }

    /// Slot `i`'s descriptor.
    fn slot(&self, i: usize) -> *mut Desc {
        debug_assert!(i < RING_SLOTS);
        // SAFETY: the slots follow the header inside the block (RING_BYTES covers them).
        unsafe {
            self.block
                .host()
                .add(std::mem::size_of::<Header>() + i * std::mem::size_of::<Desc>())
                as *mut Desc
        }
    }

    /// The consumer's address of the block (the kernel's parameter).
    pub(crate) fn device_addr(&self) -> u64 {
        self.block.device()
    }

    /// The consumer's address of the `done` word.
    pub(crate) fn done_device_addr(&self) -> u64 {
        self.block.device() + std::mem::offset_of!(Header, done) as u64
    }

    /// The newest completed seq.
    pub(crate) fn done(&self) -> u64 {
        self.header().done.load(Ordering::Acquire)
    }

    /// The newest published seq.
    pub(crate) fn head(&self) -> u64 {
        self.header().head.load(Ordering::Acquire)
    }

    /// Publishes `body` as seq `head + 1` (step 1), or refuses when every slot is busy.
    /// Returns the new seq. One producer at a time: the caller holds the ring's lock.
    pub(crate) fn publish(&self, body: &DescBody) -> Result<u64, Full> {
        let h = self.header();
        let head = h.head.load(Ordering::Relaxed);
        let seq = head + 1;
        if seq - self.done().min(head) > RING_SLOTS as u64 {
            return Err(Full::Full);
        }
        let d = self.slot((seq % RING_SLOTS as u64) as usize);
        // SAFETY: the slot's previous descriptor is complete (checked above), so no consumer
        // reads the body now (a consumer reads a slot only for a seq in (done, head]);
        // `body` lies in the block.
        unsafe { std::ptr::addr_of_mut!((*d).body).write(*body) };
        // SAFETY: as above; the seq word is atomic.
        unsafe { &(*d).seq }.store(seq, Ordering::Release);
        h.head.store(seq, Ordering::SeqCst);
        Ok(seq)
    }

    /// Asks every instance of an epoch up to `epoch` to return once idle.
    pub(crate) fn request_stop(&self, epoch: u64) {
        self.header().stop.store(epoch, Ordering::SeqCst);
    }

    /// Gives the ring up from the CPU (its consumer does not answer): every instance is
    /// told to stop and `done` is forced to the end, so that device work waiting for `done`
    /// is not held forever, and an instance that starts late finds nothing to take. The
    /// fences of the unfinished copies have failed first.
    pub(crate) fn abandon(&self) {
        self.request_stop(u64::MAX);
        self.header().done.store(u64::MAX, Ordering::SeqCst);
    }
}

/// How a [`cpu_consumer`] instance ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum Exit {
    /// It read `stop >= epoch` with nothing to do.
    Stopped,
    /// Its lease ran out.
    Expired,
    /// A slot's seq word never matched (`fault` written).
    Fault(u64),
}

/// Re-reads of a slot's seq word before the consumer reports a fault.
pub(crate) const SEQ_RETRIES: u32 = 1 << 20;

/// One consumer instance of epoch `epoch` on the CPU, following step 2 and 3 of the
/// protocol: `copy` does a descriptor's copy. It returns once `lease` has passed (checked
/// before each descriptor, as the kernel does), busy or not; `None`: no lease.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn cpu_consumer(
    ring: &Ring,
    epoch: u64,
    lease: Option<std::time::Duration>,
    mut copy: impl FnMut(&DescBody),
) -> Exit {
    let h = ring.header();
    let start = std::time::Instant::now();
    h.alive.store(epoch, Ordering::SeqCst);
    // Saturating: an abandoned ring has `done` forced to the end (and `stop` too).
    let mut next = h.done.load(Ordering::Acquire).saturating_add(1);
    let exit = loop {
        if lease.is_some_and(|l| start.elapsed() >= l) {
            break Exit::Expired;
        }
        if h.head.load(Ordering::Acquire) >= next {
            let d = ring.slot((next % RING_SLOTS as u64) as usize);
            let mut tries = 0;
            // SAFETY: the slot lies in the block; its seq word is atomic.
            while unsafe { &(*d).seq }.load(Ordering::Acquire) != next {
                tries += 1;
                if tries == SEQ_RETRIES {
                    break;
                }
                std::hint::spin_loop();
            }
            if tries == SEQ_RETRIES {
                h.fault.store(next, Ordering::SeqCst);
                break Exit::Fault(next);
            }
            // SAFETY: the producer wrote the body before the seq word we acquired, and
            // writes it again only after `done` covers `next` (published below).
            let body = unsafe { std::ptr::addr_of!((*d).body).read() };
            copy(&body);
            h.done.store(next, Ordering::Release);
            next += 1;
            continue;
        }
        if h.stop.load(Ordering::Acquire) >= epoch {
            break Exit::Stopped;
        }
        std::thread::yield_now();
    };
    h.exited.store(epoch, Ordering::Release);
    exit
}

#[cfg(test)]
mod tests {
    use super::super::layout::{HeapBlock, RING_ENTRIES};
    use super::*;
    use std::sync::Arc;

    const MS: std::time::Duration = std::time::Duration::from_millis(20);

    fn ring() -> Arc<Ring> {
        Arc::new(Ring::new(Box::new(HeapBlock::new())))
    }

    fn body(tag: u64) -> DescBody {
        let mut b = DescBody::EMPTY;
        b.own_base = tag;
        b.n_entries = (tag % RING_ENTRIES as u64) as u32 + 1;
        for e in 0..b.n_entries as usize {
            b.addrs[e] = tag * 1000 + e as u64;
            b.pfns[e] = tag as u32 ^ e as u32;
        }
        b
    }

    #[test]
    fn a_full_ring_refuses_and_never_overwrites_an_unfinished_slot() {
        let r = ring();
        for s in 1..=RING_SLOTS as u64 {
            assert_eq!(r.publish(&body(s)), Ok(s));
        }
        assert_eq!(r.publish(&body(999)), Err(Full::Full));
        assert_eq!(r.head(), RING_SLOTS as u64, "nothing published when full");
        // The consumer finishes one: exactly one slot frees, and the first slot is reused.
        r.header().done.store(1, Ordering::Release);
        assert_eq!(r.publish(&body(65)), Ok(65));
        assert_eq!(r.publish(&body(66)), Err(Full::Full));
        // Slot 2's descriptor (seq 2) is untouched.
        let d = r.slot(2);
        // SAFETY: test: no consumer runs.
        let (seq, b) = unsafe { ((*d).seq.load(Ordering::Acquire), (*d).body) };
        assert_eq!((seq, b.own_base), (2, 2));
    }

    #[test]
    fn a_consumer_takes_each_descriptor_once_in_order_across_many_wraps() {
        let r = ring();
        let n = RING_SLOTS as u64 * 50 + 7;
        let c = r.clone();
        let t = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let e = cpu_consumer(&c, 1, None, |b| seen.push(*b));
            (e, seen)
        });
        let mut s = 1;
        while s <= n {
            match r.publish(&body(s)) {
                Ok(got) => {
                    assert_eq!(got, s);
                    s += 1;
                }
                Err(Full::Full) => std::thread::yield_now(),
            }
        }
        while r.done() < n {
            std::thread::yield_now();
        }
        r.request_stop(1);
        let (e, seen) = t.join().unwrap();
        assert_eq!(e, Exit::Stopped);
        assert_eq!(seen.len() as u64, n);
        for (i, b) in seen.iter().enumerate() {
            let want = body(i as u64 + 1);
            assert_eq!(b.own_base, want.own_base);
            assert_eq!(b.n_entries, want.n_entries);
            assert_eq!(b.addrs, want.addrs);
            assert_eq!(b.pfns, want.pfns);
        }
        assert_eq!(r.header().exited.load(Ordering::Acquire), 1);
        assert_eq!(r.header().alive.load(Ordering::Acquire), 1);
    }

    #[test]
    fn a_stale_slot_is_not_taken_for_a_new_seq() {
        let r = ring();
        // Head says 1, but slot 1 still holds nothing (seq word 0): a torn publication.
        r.header().head.store(1, Ordering::SeqCst);
        let e = cpu_consumer(&r, 1, None, |_| panic!("took a stale slot"));
        assert_eq!(e, Exit::Fault(1));
        assert_eq!(r.header().fault.load(Ordering::Acquire), 1);
        assert_eq!(r.done(), 0);
        assert_eq!(r.header().exited.load(Ordering::Acquire), 1);
    }

    #[test]
    fn a_new_instance_resumes_after_what_the_last_one_completed() {
        let r = ring();
        for s in 1..=3 {
            r.publish(&body(s)).unwrap();
        }
        // Instance 1 expires after completing the three.
        let mut n = 0;
        assert_eq!(cpu_consumer(&r, 1, Some(MS), |_| n += 1), Exit::Expired);
        assert_eq!((n, r.done()), (3, 3));
        r.publish(&body(4)).unwrap();
        r.request_stop(1);
        // Instance 2 ignores stop = 1, copies only seq 4, then expires.
        let mut got = Vec::new();
        assert_eq!(
            cpu_consumer(&r, 2, Some(MS), |b| got.push(b.own_base)),
            Exit::Expired
        );
        assert_eq!(got, vec![4]);
        r.request_stop(2);
        assert_eq!(
            cpu_consumer(&r, 3, Some(MS), |_| {}),
            Exit::Expired,
            "stop >= e only"
        );
        assert_eq!(
            cpu_consumer(&r, 2, None, |_| panic!("nothing left")),
            Exit::Stopped
        );
    }
}
