//! Freed pages whose clear is still running.
//!
//! Pages cleared on free are not handed to the allocator at once: an allocation that got
//! them back would have to wait for their clear on the device before its first copy, and the
//! allocator, first fit, would give the pages freed last to the very next allocation (a range
//! evicted and faulted back in). They wait here, in the order their clears were queued on
//! the clear stream, until the clear is seen done; allocations take other free pages
//! meanwhile. When nothing else fits, an allocation takes them all at once, with the newest
//! clear as its pre-migrate fence. No driver calls here: the caller says how a fence stands.

use std::collections::VecDeque;

/// How the clear of a batch of freed pages stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cleared {
    /// Still queued or running.
    Pending,
    /// Done: the pages read as zeros.
    Clean,
    /// Failed: the pages may hold old data.
    Failed,
}

/// One release's pages of one size, and the fence of their clear.
#[derive(Debug)]
struct Batch<F> {
    starts: Vec<u64>,
    granules: u64,
    fence: F,
}

/// Batches of freed pages, oldest first, each waiting for its clear. Clears run in queue
/// order on one stream, so once a batch is seen done every older one is done too.
#[derive(Debug)]
pub(crate) struct Settling<F> {
    batches: VecDeque<Batch<F>>,
    granules: u64,
}

impl<F> Default for Settling<F> {
    fn default() -> Self {
        Settling {
            batches: VecDeque::new(),
            granules: 0,
        }
    }
}

impl<F> Settling<F> {
    /// Pages (starts in granules, `granules` each) whose clear `fence` was just queued.
    pub(crate) fn push(&mut self, starts: Vec<u64>, granules: u64, fence: F) {
        self.granules += starts.len() as u64 * granules;
        self.batches.push_back(Batch {
            starts,
            granules,
            fence,
        });
    }

    /// Granules waiting.
    pub(crate) fn granules(&self) -> u64 {
        self.granules
    }

    /// Hands every batch whose clear is done to `free(starts, granules, clean)`, oldest
    /// first, asking `status` about as few fences as it can (the newest first: if it is
    /// done, all are; else the oldest ones until one is pending).
    pub(crate) fn reap_done(
        &mut self,
        mut status: impl FnMut(&F) -> Cleared,
        mut free: impl FnMut(&[u64], u64, bool),
    ) {
        let newest = match self.batches.back() {
            None => return,
            Some(b) => status(&b.fence),
        };
        while let Some(b) = self.batches.front() {
            // Older clears ran before the newest; a failure is sticky for the context, so a
            // failed newest clear leaves every older batch in doubt as well.
            let s = match newest {
                Cleared::Pending => status(&b.fence),
                done => done,
            };
            if s == Cleared::Pending {
                break;
            }
            let b = self.batches.pop_front().expect("a front batch");
            self.granules -= b.starts.len() as u64 * b.granules;
            free(&b.starts, b.granules, s == Cleared::Clean);
        }
    }

    /// Hands every batch to `free(starts, granules)`, done or not, and returns the newest
    /// clear's fence (which orders after all the others): whoever gets these pages must be
    /// ordered after it. `None` when nothing was waiting.
    pub(crate) fn take_all(&mut self, mut free: impl FnMut(&[u64], u64)) -> Option<F> {
        let mut newest = None;
        while let Some(b) = self.batches.pop_front() {
            free(&b.starts, b.granules);
            newest = Some(b.fence);
        }
        self.granules = 0;
        newest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Fences are numbers; `done` is how many clears have finished (in queue order);
    /// `failed` marks the one that failed.
    fn status_of(done: usize, asked: &RefCell<Vec<usize>>) -> impl FnMut(&usize) -> Cleared {
        move |f: &usize| {
            asked.borrow_mut().push(*f);
            if *f < done {
                Cleared::Clean
            } else {
                Cleared::Pending
            }
        }
    }

    #[test]
    fn batches_come_back_in_queue_order_once_their_clear_is_done() {
        let mut s = Settling::default();
        s.push(vec![0, 1], 1, 0usize);
        s.push(vec![16], 16, 1);
        s.push(vec![4], 1, 2);
        assert_eq!(s.granules(), 2 + 16 + 1);
        let asked = RefCell::new(Vec::new());
        let mut freed = Vec::new();
        // Two of three clears done: the newest is asked first, then the oldest in order
        // until the pending one.
        s.reap_done(status_of(2, &asked), |st, g, clean| {
            freed.push((st.to_vec(), g, clean))
        });
        assert_eq!(*asked.borrow(), vec![2, 0, 1, 2]);
        assert_eq!(freed, vec![(vec![0, 1], 1, true), (vec![16], 16, true)]);
        assert_eq!(s.granules(), 1);
        // Nothing new done: one question, nothing freed.
        asked.borrow_mut().clear();
        freed.clear();
        s.reap_done(status_of(2, &asked), |st, g, clean| {
            freed.push((st.to_vec(), g, clean))
        });
        assert_eq!((asked.borrow().len(), freed.len()), (2, 0));
        // All done.
        s.reap_done(status_of(3, &asked), |st, g, clean| {
            freed.push((st.to_vec(), g, clean))
        });
        assert_eq!(freed, vec![(vec![4], 1, true)]);
        assert_eq!(s.granules(), 0);
    }

    #[test]
    fn when_the_newest_is_done_older_batches_are_not_asked_about() {
        let mut s = Settling::default();
        for f in 0..5usize {
            s.push(vec![f as u64], 1, f);
        }
        let asked = RefCell::new(Vec::new());
        let mut freed = Vec::new();
        s.reap_done(status_of(5, &asked), |st, _, _| freed.push(st[0]));
        assert_eq!(freed, vec![0, 1, 2, 3, 4]);
        assert_eq!(*asked.borrow(), vec![4]);
        assert_eq!(s.granules(), 0);
    }

    #[test]
    fn a_failed_newest_clear_frees_every_batch_as_dirty() {
        let mut s = Settling::default();
        s.push(vec![7], 1, 0usize);
        s.push(vec![8], 1, 1usize);
        let mut freed = Vec::new();
        s.reap_done(
            |&f| {
                if f == 1 {
                    Cleared::Failed
                } else {
                    Cleared::Clean
                }
            },
            |st, _, clean| freed.push((st[0], clean)),
        );
        assert_eq!(freed, vec![(7, false), (8, false)]);
    }

    #[test]
    fn take_all_frees_everything_and_returns_the_newest_fence() {
        let mut s = Settling::default();
        assert_eq!(s.take_all(|_, _| panic!("nothing waits")), None);
        s.push(vec![0], 1, 10usize);
        s.push(vec![1, 2], 1, 11);
        let mut freed = Vec::new();
        assert_eq!(s.take_all(|st, _| freed.extend_from_slice(st)), Some(11));
        assert_eq!(freed, vec![0, 1, 2]);
        assert_eq!(s.granules(), 0);
    }
}
