//! An extent allocator over 4 KiB granules: the building block backends use to carve device
//! memory (and pools of host frames) into pages. Shared by the CUDA backend and the simulator.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Hands out aligned runs of granules from `[0, total)`. First fit; frees merge neighbours.
#[derive(Debug)]
pub struct ExtentAllocator {
    inner: Mutex<Extents>,
}

#[derive(Debug)]
struct Extents {
    /// Free extents: start -> length, in granules; never adjacent (merged on free).
    free: BTreeMap<u64, u64>,
    free_granules: u64,
    total: u64,
}

impl ExtentAllocator {
    /// An allocator of `total` granules, all free.
    pub fn new(total: u64) -> ExtentAllocator {
        let mut free = BTreeMap::new();
        if total > 0 {
            free.insert(0, total);
        }
        ExtentAllocator {
            inner: Mutex::new(Extents {
                free,
                free_granules: total,
                total,
            }),
        }
    }

    /// Total granules managed.
    pub fn total(&self) -> u64 {
        self.lock().total
    }

    /// Granules not allocated.
    pub fn free_granules(&self) -> u64 {
        self.lock().free_granules
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Extents> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One run of `len` granules starting at a multiple of `align`, or `None`.
    pub fn alloc(&self, len: u64, align: u64) -> Option<u64> {
        self.lock().alloc(len, align)
    }

    /// `count` pages of `page` granules each, appended to `out` as page starts: one contiguous
    /// run when one fits, else page by page. All or nothing; `false` (nothing appended) also
    /// when the request cannot fit whatever is free.
    pub fn alloc_pages(&self, count: usize, page: u64, out: &mut Vec<u64>) -> bool {
        let mut ex = self.lock();
        let need = match (count as u64).checked_mul(page) {
            Some(n) if n <= ex.free_granules => n,
            _ => return false,
        };
        if out.try_reserve(count).is_err() {
            return false;
        }
        if let Some(start) = ex.alloc(need, page) {
            out.extend((0..count as u64).map(|i| start + i * page));
            return true;
        }
        let mark = out.len();
        for _ in 0..count {
            match ex.alloc(page, page) {
                Some(s) => out.push(s),
                None => {
                    for &s in &out[mark..] {
                        ex.free(s, page);
                    }
                    out.truncate(mark);
                    return false;
                }
            }
        }
        true
    }

    /// Frames for `out` (pages of `page_size`) from memory reached in chunks of `chunk`
    /// granules that are backed on first use: `back(i)` runs for each chunk index the pages
    /// land in (a host memory pool's allocation of chunk `i`; it must be cheap when the chunk
    /// is already backed). All or nothing: `Ok(false)` when the pages do not fit what is
    /// free; `Err` when `back` failed, with every page given back.
    pub fn alloc_frames_backed<E>(
        &self,
        page_size: crate::PageSize,
        chunk: u64,
        out: &mut [crate::HostFrame],
        mut back: impl FnMut(usize) -> Result<(), E>,
    ) -> Result<bool, E> {
        let page = page_size.granules();
        // Not sized from `out.len()` up front: an absurd count is "does not fit", not an abort.
        let mut starts = Vec::new();
        if !self.alloc_pages(out.len(), page, &mut starts) {
            return Ok(false);
        }
        let mut last = None;
        for &s in &starts {
            let idx = (s / chunk.max(1)) as usize;
            if last != Some(idx) {
                if let Err(e) = back(idx) {
                    self.free_pages(&starts, page);
                    return Err(e);
                }
                last = Some(idx);
            }
        }
        for (o, s) in out.iter_mut().zip(starts) {
            *o = crate::HostFrame(s);
        }
        Ok(true)
    }

    /// Returns `len` granules at `start`.
    pub fn free(&self, start: u64, len: u64) {
        self.lock().free(start, len)
    }

    /// Returns pages of `page` granules, merging runs of consecutive starts.
    pub fn free_pages(&self, starts: &[u64], page: u64) {
        self.free_page_iter(starts.iter().copied(), page)
    }

    /// [`ExtentAllocator::free_pages`] over any sequence of page starts (no list built).
    pub fn free_page_iter(&self, starts: impl IntoIterator<Item = u64>, page: u64) {
        let mut ex = self.lock();
        let mut run: Option<(u64, u64)> = None;
        for s in starts {
            run = match run {
                Some((a, n)) if a + n * page == s => Some((a, n + 1)),
                Some((a, n)) => {
                    ex.free(a, n * page);
                    Some((s, 1))
                }
                None => Some((s, 1)),
            };
        }
        if let Some((a, n)) = run {
            ex.free(a, n * page);
        }
    }
}

impl Extents {
    fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        if len == 0 || len > self.free_granules {
            return None;
        }
        let align = align.max(1);
        let (start, elen, at) = self.free.iter().find_map(|(&s, &l)| {
            let at = s.div_ceil(align).checked_mul(align)?;
            (at.checked_add(len)? <= s + l).then_some((s, l, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        if at + len < start + elen {
            self.free.insert(at + len, start + elen - at - len);
        }
        self.free_granules -= len;
        Some(at)
    }

    fn free(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut s = start;
        let mut l = len;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back()
            && ps + pl == start
        {
            self.free.remove(&ps);
            s = ps;
            l += pl;
        }
        if let Some(&nl) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            l += nl;
        }
        self.free.insert(s, l);
        self.free_granules += len;
    }
}

#[cfg(test)]
mod tests {
    use super::ExtentAllocator;
    use crate::{HostFrame, PageSize};

    #[test]
    fn backed_frames_back_each_chunk_once_and_give_everything_back_on_failure() {
        // 4 chunks of 16 granules (64 KiB each).
        let a = ExtentAllocator::new(64);
        let mut backed = Vec::new();
        let mut out = [HostFrame(u64::MAX); 20];
        let r: Result<bool, ()> = a.alloc_frames_backed(PageSize::Size4K, 16, &mut out, |i| {
            backed.push(i);
            Ok(())
        });
        assert_eq!(r, Ok(true));
        assert_eq!(
            backed,
            vec![0, 1],
            "one call per chunk the 20 pages land in"
        );
        assert_eq!(out[19], HostFrame(19));
        assert_eq!(a.free_granules(), 44);
        // A failing chunk: nothing kept, the error returned.
        let mut out = [HostFrame(u64::MAX); 30];
        let r = a.alloc_frames_backed(PageSize::Size4K, 16, &mut out, |i| {
            if i == 3 { Err(i) } else { Ok(()) }
        });
        assert_eq!(r, Err(3));
        assert_eq!(a.free_granules(), 44);
        // Too many pages: does not fit, nothing backed.
        let mut out = vec![HostFrame(0); 45];
        let r: Result<bool, ()> =
            a.alloc_frames_backed(PageSize::Size4K, 16, &mut out, |_| panic!("backed"));
        assert_eq!(r, Ok(false));
        assert_eq!(a.free_granules(), 44);
    }
}
