//! Which free granules of a pagemap may still hold old data.
//!
//! New device pages must read as zeros. Clearing them when they are allocated puts a clear
//! kernel in front of every migration's copies (on the fault path, the clear is a kernel
//! launch and a few microseconds of GPU time before the first byte moves). So the backend
//! clears pages when they are **freed** and when arena memory is first mapped, off the
//! fault path and on a stream of their own (freed pages wait in [`crate::settle`] until
//! their clear is done), and an allocation of clean pages queues nothing. A page whose
//! clear could not be queued (a driver error, or clearing on free switched off) is marked
//! dirty here and is cleared when it is allocated again, as before. No driver calls here.

/// One bit per granule of the arena: set = the granule may hold old data (only meaningful
/// while the granule is free; allocation reads it, release writes it).
#[derive(Clone, Debug)]
pub(crate) struct CleanMap {
    dirty: Vec<u64>,
    granules: u64,
}

impl CleanMap {
    /// A map of `granules` granules, all dirty (memory nobody has cleared).
    pub(crate) fn new(granules: u64) -> CleanMap {
        let words = granules.div_ceil(64) as usize;
        CleanMap {
            dirty: vec![u64::MAX; words],
            granules,
        }
    }

    /// Marks `[start, start + len)` dirty or clean (clipped to the map).
    pub(crate) fn set(&mut self, start: u64, len: u64, dirty: bool) {
        for (w, mask) in self.words(start, len) {
            if dirty {
                self.dirty[w] |= mask;
            } else {
                self.dirty[w] &= !mask;
            }
        }
    }

    /// Whether any granule of `[start, start + len)` is dirty.
    pub(crate) fn any_dirty(&self, start: u64, len: u64) -> bool {
        self.words(start, len)
            .any(|(w, mask)| self.dirty[w] & mask != 0)
    }

    /// The words and bit masks covering `[start, start + len)` (clipped to the map).
    fn words(&self, start: u64, len: u64) -> impl Iterator<Item = (usize, u64)> + use<> {
        let end = start.saturating_add(len).min(self.granules);
        let mut g = start;
        std::iter::from_fn(move || {
            if g >= end {
                return None;
            }
            let (w, b) = ((g / 64) as usize, g % 64);
            let n = (64 - b).min(end - g);
            g += n;
            Some((
                w,
                if n == 64 {
                    u64::MAX
                } else {
                    ((1u64 << n) - 1) << b
                },
            ))
        })
    }

    /// Of the pages starting at `starts` (each `page` granules), appends those with a dirty
    /// granule to `out`.
    pub(crate) fn dirty_pages(&self, starts: &[u64], page: u64, out: &mut Vec<u64>) {
        // Runs of touching pages are checked a word at a time; only a dirty run page by page.
        for (first, len) in runs(starts, page) {
            let run = &starts[first..first + len];
            if self.any_dirty(run[0], len as u64 * page) {
                out.extend(run.iter().copied().filter(|&s| self.any_dirty(s, page)));
            }
        }
    }

    /// Marks every page of `starts` (each `page` granules) dirty or clean.
    pub(crate) fn set_pages(&mut self, starts: &[u64], page: u64, dirty: bool) {
        for (first, len) in runs(starts, page) {
            self.set(starts[first], len as u64 * page, dirty);
        }
    }
}

/// Runs `(first index, pages)` of `starts` whose pages touch (each `page` granules).
fn runs(starts: &[u64], page: u64) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= starts.len() {
            return None;
        }
        let first = i;
        i += 1;
        while i < starts.len() && starts[i] == starts[i - 1] + page {
            i += 1;
        }
        Some((first, i - first))
    })
}

/// Pages (starts in granules, each `page` granules) merged into extents `(start, granules)`
/// where consecutive pages touch; the order of `starts` is kept.
pub(crate) fn extents(starts: &[u64], page: u64) -> Vec<(u64, u64)> {
    runs(starts, page)
        .map(|(first, len)| (starts[first], len as u64 * page))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_map_is_all_dirty_and_ranges_flip_bit_exactly() {
        let mut m = CleanMap::new(300);
        assert!(m.any_dirty(0, 1) && m.any_dirty(299, 1));
        m.set(0, 300, false);
        assert!(!m.any_dirty(0, 300));
        // Across word boundaries, and at the ends of a range only.
        m.set(60, 10, true);
        assert!(!m.any_dirty(0, 60));
        assert!(m.any_dirty(60, 1) && m.any_dirty(69, 1));
        assert!(!m.any_dirty(70, 230));
        m.set(63, 2, false);
        assert!(m.any_dirty(62, 1) && !m.any_dirty(63, 2) && m.any_dirty(65, 1));
        // A whole word.
        m.set(128, 64, true);
        assert!(!m.any_dirty(127, 1) && m.any_dirty(128, 1) && m.any_dirty(191, 1));
        assert!(!m.any_dirty(192, 100));
        // Past the end: clipped, no panic.
        m.set(290, 100, true);
        assert!(m.any_dirty(299, 5));
    }

    #[test]
    fn dirty_pages_picks_pages_with_any_dirty_granule() {
        let mut m = CleanMap::new(16 * 8);
        m.set(0, 128, false);
        // One granule of the third 16-granule page.
        m.set(32 + 7, 1, true);
        let mut out = Vec::new();
        m.dirty_pages(&[0, 16, 32, 48, 112], 16, &mut out);
        assert_eq!(out, vec![32]);
        m.set_pages(&[32], 16, false);
        m.set_pages(&[0, 112], 16, true);
        out.clear();
        m.dirty_pages(&[0, 16, 32, 48, 112], 16, &mut out);
        assert_eq!(out, vec![0, 112]);
    }

    #[test]
    fn extents_merge_touching_pages_in_order() {
        assert_eq!(extents(&[], 1), vec![]);
        assert_eq!(
            extents(&[4, 5, 6, 9, 10, 2], 1),
            vec![(4, 3), (9, 2), (2, 1)]
        );
        assert_eq!(extents(&[0, 16, 48], 16), vec![(0, 32), (48, 16)]);
    }
}
