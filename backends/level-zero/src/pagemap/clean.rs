//! Which granules of a pagemap are known to hold zeros (cleared on free), one bit each.
//! Fresh device memory is not known clean: every bit starts clear.

pub(crate) struct CleanMap {
    bits: Vec<u64>,
}

impl CleanMap {
    pub(crate) fn new(granules: u64) -> CleanMap {
        CleanMap {
            bits: vec![0; granules.div_ceil(64) as usize],
        }
    }

    fn get(&self, i: u64) -> bool {
        self.bits
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set(&mut self, i: u64, clean: bool) {
        if let Some(w) = self.bits.get_mut((i / 64) as usize) {
            if clean {
                *w |= 1 << (i % 64);
            } else {
                *w &= !(1 << (i % 64));
            }
        }
    }

    /// Marks the pages (first granules `starts`, `g` granules each) clean or not.
    pub(crate) fn set_pages(&mut self, starts: &[u64], g: u64, clean: bool) {
        for &s in starts {
            for i in s..s + g {
                self.set(i, clean);
            }
        }
    }

    /// Whether every granule of the page at `start` (`g` granules) is clean.
    pub(crate) fn page_clean(&self, start: u64, g: u64) -> bool {
        (start..start + g).all(|i| self.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_dirty_until_marked_clean() {
        let mut m = CleanMap::new(1000);
        assert!(!m.page_clean(0, 1) && !m.page_clean(512, 16));
        m.set_pages(&[512, 528], 16, true);
        assert!(m.page_clean(512, 16) && m.page_clean(528, 16) && m.page_clean(520, 4));
        // A larger page over them is clean only when all of its granules are.
        assert!(!m.page_clean(512, 32 + 1));
        m.set_pages(&[520], 1, false);
        assert!(!m.page_clean(512, 16) && m.page_clean(528, 16));
        // Out of range: never clean, never a panic.
        m.set_pages(&[u64::MAX / 2], 2, true);
        assert!(!m.page_clean(999, 2) && !m.page_clean(u64::MAX / 2, 1));
    }
}
