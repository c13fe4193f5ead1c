//! The page table of one range and its generation stamps, in fixed-size chunks allocated
//! when first written: memory follows what is populated, not the size of the range.
//!
//! A range of 2^32 - 1 pages of 4 KiB (a 16 TiB heap mirrored as one range) costs a
//! directory of 2^18 chunk pointers (4 MiB) until pages are written; each chunk of 2^14
//! entries (128 KiB) is allocated when a page in it is first written (populated, locked by
//! a migration). A chunk never written reads as holes through one shared static slice.
//!
//! Readers walk a span one chunk at a time ([`PageTable::slices`]): every hot loop stays a
//! loop over a contiguous slice, with one chunk lookup per 2^14 pages and no allocation.
//! The directories are sized with `try_reserve`, so a table that does not fit in memory is
//! an error ([`NoMemory`]) rather than an abort; [`PageTable::reserve`] allocates the
//! chunks of a span up front, fallibly, so the writes that follow (lock bits, a commit)
//! allocate nothing.

use crate::page::{PageEntry, Summary};

/// Entries per chunk, as a shift.
pub(crate) const CHUNK_SHIFT: u32 = 14;
/// Entries per chunk.
pub(crate) const CHUNK: usize = 1 << CHUNK_SHIFT;
const MASK: usize = CHUNK - 1;

/// What an unwritten chunk of pages reads as.
static HOLES: [PageEntry; CHUNK] = [PageEntry::HOLE; CHUNK];

/// Host memory for a table (its directory or a chunk) could not be allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NoMemory {
    /// The bytes asked for.
    pub bytes: u64,
}

/// The pieces of `first..first + count`, one per chunk: `(chunk, lo, hi)` with `lo..hi`
/// the part inside that chunk.
#[inline]
fn pieces(first: usize, count: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let end = first + count;
    let c0 = first >> CHUNK_SHIFT;
    let c1 = if count == 0 {
        c0
    } else {
        ((end - 1) >> CHUNK_SHIFT) + 1
    };
    (c0..c1).map(move |c| {
        let base = c << CHUNK_SHIFT;
        (c, first.max(base) - base, end.min(base + CHUNK) - base)
    })
}

/// `len` values of `T`, `fill` where never written, in chunks allocated on first write.
struct Chunked<T> {
    len: usize,
    fill: T,
    /// One entry per chunk; `None`: never written (every value is `fill`). The last chunk
    /// holds only the values up to `len`.
    dir: Vec<Option<Box<[T]>>>,
}

impl<T: Copy> Chunked<T> {
    fn new(len: usize, fill: T) -> Result<Chunked<T>, NoMemory> {
        let n = len.div_ceil(CHUNK);
        let mut dir = Vec::new();
        dir.try_reserve_exact(n).map_err(|_| NoMemory {
            bytes: (n as u64).saturating_mul(size_of::<Option<Box<[T]>>>() as u64),
        })?;
        dir.resize_with(n, || None);
        Ok(Chunked { len, fill, dir })
    }

    /// Values in chunk `c`.
    #[inline]
    fn chunk_len(&self, c: usize) -> usize {
        (self.len - (c << CHUNK_SHIFT)).min(CHUNK)
    }

    /// A chunk of `n` values `fill`, or [`NoMemory`].
    fn try_chunk(n: usize, fill: T) -> Result<Box<[T]>, NoMemory> {
        let mut v = Vec::new();
        v.try_reserve_exact(n).map_err(|_| NoMemory {
            bytes: (n * size_of::<T>()) as u64,
        })?;
        v.resize(n, fill);
        Ok(v.into_boxed_slice())
    }

    /// Allocates every chunk holding a value of `first..first + count`.
    fn reserve(&mut self, first: usize, count: usize) -> Result<(), NoMemory> {
        for (c, _, _) in pieces(first, count) {
            if self.dir[c].is_none() {
                self.dir[c] = Some(Self::try_chunk(self.chunk_len(c), self.fill)?);
            }
        }
        Ok(())
    }

    /// Chunk `c`, allocated if it was not (an allocation failure aborts here, as any
    /// `Vec` growth: callers that can fail call [`Chunked::reserve`] first).
    #[inline]
    fn chunk_mut(&mut self, c: usize) -> &mut [T] {
        let n = self.chunk_len(c);
        let fill = self.fill;
        self.dir[c].get_or_insert_with(|| vec![fill; n].into_boxed_slice())
    }

    #[inline]
    fn get(&self, i: usize) -> T {
        assert!(i < self.len, "index {i} past {}", self.len);
        match &self.dir[i >> CHUNK_SHIFT] {
            Some(c) => c[i & MASK],
            None => self.fill,
        }
    }

    /// The written pieces of `first..first + count` (`Some`), and the never-written ones
    /// as their length (`None`).
    #[inline]
    fn pieces(&self, first: usize, count: usize) -> impl Iterator<Item = (Option<&[T]>, usize)> {
        assert!(
            first.checked_add(count).is_some_and(|e| e <= self.len),
            "span {first}+{count} past {}",
            self.len
        );
        pieces(first, count)
            .map(|(c, lo, hi)| (self.dir[c].as_deref().map(|s| &s[lo..hi]), hi - lo))
    }

    /// The pieces of `first..first + count`, for writing (chunks are allocated).
    #[inline]
    fn pieces_mut(&mut self, first: usize, count: usize) -> impl Iterator<Item = &mut [T]> {
        assert!(
            first.checked_add(count).is_some_and(|e| e <= self.len),
            "span {first}+{count} past {}",
            self.len
        );
        let c0 = first >> CHUNK_SHIFT;
        let (len, fill) = (self.len, self.fill);
        let dir = &mut self.dir[c0..];
        dir.iter_mut()
            .zip(pieces(first, count))
            .map(move |(slot, (c, lo, hi))| {
                let n = (len - (c << CHUNK_SHIFT)).min(CHUNK);
                &mut slot.get_or_insert_with(|| vec![fill; n].into_boxed_slice())[lo..hi]
            })
    }

    /// Chunks allocated.
    #[cfg(test)]
    fn allocated(&self) -> usize {
        self.dir.iter().filter(|c| c.is_some()).count()
    }

    /// Heap bytes held: the directory and the chunks allocated.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.dir.capacity() * size_of::<Option<Box<[T]>>>()
            + self
                .dir
                .iter()
                .flatten()
                .map(|c| c.len() * size_of::<T>())
                .sum::<usize>()
    }
}

/// The page entries of one range: holes until written.
pub(crate) struct PageTable(Chunked<PageEntry>);

impl PageTable {
    /// A table of `len` holes (only the directory is allocated).
    pub(crate) fn new(len: usize) -> Result<PageTable, NoMemory> {
        Chunked::new(len, PageEntry::HOLE).map(PageTable)
    }

    /// Entries in the table.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.len
    }

    /// Entry `i`.
    #[inline]
    pub(crate) fn get(&self, i: usize) -> PageEntry {
        self.0.get(i)
    }

    /// Entry `i`, for writing (its chunk is allocated if it was not).
    #[inline]
    pub(crate) fn entry_mut(&mut self, i: usize) -> &mut PageEntry {
        assert!(i < self.0.len, "index {i} past {}", self.0.len);
        &mut self.0.chunk_mut(i >> CHUNK_SHIFT)[i & MASK]
    }

    /// Sets entry `i`.
    #[cfg(test)]
    pub(crate) fn set(&mut self, i: usize, e: PageEntry) {
        *self.entry_mut(i) = e;
    }

    /// Allocates the chunks of `first..first + count` (so that writing them allocates
    /// nothing), or says how much memory was missing.
    pub(crate) fn reserve(&mut self, first: usize, count: usize) -> Result<(), NoMemory> {
        self.0.reserve(first, count)
    }

    /// The entries `first..first + count`, in order, as one slice per chunk (a chunk never
    /// written is a slice of the shared all-hole chunk).
    #[inline]
    pub(crate) fn slices(&self, first: usize, count: usize) -> impl Iterator<Item = &[PageEntry]> {
        self.0
            .pieces(first, count)
            .map(|(s, n)| s.unwrap_or(&HOLES[..n]))
    }

    /// The entries `first..first + count`, in order, for writing: one slice per chunk
    /// (chunks are allocated where they were not; see [`PageTable::reserve`]).
    #[inline]
    pub(crate) fn slices_mut(
        &mut self,
        first: usize,
        count: usize,
    ) -> impl Iterator<Item = &mut [PageEntry]> {
        self.0.pieces_mut(first, count)
    }

    /// What the entries `first..first + count` hold (chunks never written are skipped).
    #[inline]
    pub(crate) fn summary(&self, first: usize, count: usize) -> Summary {
        self.0
            .pieces(first, count)
            .filter_map(|(s, _)| s)
            .fold(Summary::NONE, |a, s| a.union(Summary::of(s)))
    }

    /// What every entry holds (chunks never written are skipped).
    pub(crate) fn summary_all(&self) -> Summary {
        self.written()
            .fold(Summary::NONE, |a, (_, s)| a.union(Summary::of(s)))
    }

    /// Appends the entries `first..first + count` to `out`.
    pub(crate) fn copy_into(&self, first: usize, count: usize, out: &mut Vec<PageEntry>) {
        out.reserve(count);
        for s in self.slices(first, count) {
            out.extend_from_slice(s);
        }
    }

    /// The chunks ever written, with the index of their first entry (every other entry is
    /// a hole).
    pub(crate) fn written(&self) -> impl Iterator<Item = (usize, &[PageEntry])> {
        self.0
            .dir
            .iter()
            .enumerate()
            .filter_map(|(c, s)| s.as_deref().map(|s| (c << CHUNK_SHIFT, s)))
    }

    /// Chunks allocated.
    #[cfg(test)]
    pub(crate) fn allocated_chunks(&self) -> usize {
        self.0.allocated()
    }

    /// Heap bytes the table holds.
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        self.0.heap_bytes()
    }
}

/// Per block of addresses, the stamp of its last change; blocks never changed carry the
/// range's creation stamp without storing it.
pub(crate) struct Stamps(Chunked<u64>);

impl Stamps {
    /// `blocks` blocks stamped `created` (only the directory is allocated).
    pub(crate) fn new(blocks: usize, created: u64) -> Result<Stamps, NoMemory> {
        Chunked::new(blocks, created).map(Stamps)
    }

    /// The newest stamp of `blocks`.
    pub(crate) fn max(&self, blocks: std::ops::RangeInclusive<usize>) -> u64 {
        let (first, count) = (*blocks.start(), blocks.end() + 1 - blocks.start());
        let created = self.0.fill;
        self.0
            .pieces(first, count)
            .map(|(s, _)| s.map_or(created, |s| s.iter().copied().fold(created, u64::max)))
            .fold(created, u64::max)
    }

    /// Stamps `blocks` with `stamp`.
    pub(crate) fn fill(&mut self, blocks: std::ops::RangeInclusive<usize>, stamp: u64) {
        let (first, count) = (*blocks.start(), blocks.end() + 1 - blocks.start());
        for s in self.0.pieces_mut(first, count) {
            s.fill(stamp);
        }
    }

    /// Allocates the chunks of `blocks` (so that stamping them allocates nothing).
    pub(crate) fn reserve(
        &mut self,
        blocks: std::ops::RangeInclusive<usize>,
    ) -> Result<(), NoMemory> {
        let (first, count) = (*blocks.start(), blocks.end() + 1 - blocks.start());
        self.0.reserve(first, count)
    }

    /// Chunks allocated.
    #[cfg(test)]
    pub(crate) fn allocated_chunks(&self) -> usize {
        self.0.allocated()
    }

    /// Heap bytes held.
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        self.0.heap_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{HostFrame, PagemapId};

    fn sys(i: usize) -> PageEntry {
        PageEntry::system(HostFrame(i as u64 + 1))
    }

    /// Every entry of `t` through `slices`, checked against `get`.
    fn all(t: &PageTable) -> Vec<PageEntry> {
        let mut v = Vec::new();
        t.copy_into(0, t.len(), &mut v);
        assert_eq!(v.len(), t.len());
        for (i, e) in v.iter().enumerate().step_by(997) {
            assert_eq!(t.get(i), *e);
        }
        v
    }

    #[test]
    fn pieces_split_at_chunk_boundaries() {
        let p: Vec<_> = pieces(CHUNK - 2, 5).collect();
        assert_eq!(p, vec![(0, CHUNK - 2, CHUNK), (1, 0, 3)]);
        let p: Vec<_> = pieces(CHUNK, CHUNK).collect();
        assert_eq!(p, vec![(1, 0, CHUNK)]);
        let p: Vec<_> = pieces(1, 3 * CHUNK).collect();
        assert_eq!(p.len(), 4);
        assert_eq!(p[0], (0, 1, CHUNK));
        assert_eq!(p[3], (3, 0, 1));
        assert_eq!(pieces(7, 0).count(), 0);
    }

    #[test]
    fn a_new_table_is_holes_and_allocates_only_its_directory() {
        let t = PageTable::new(u32::MAX as usize).unwrap();
        assert_eq!(t.allocated_chunks(), 0);
        // 2^18 chunk pointers of 16 bytes.
        assert!(t.heap_bytes() <= 4 << 20, "{}", t.heap_bytes());
        assert_eq!(t.get(0), PageEntry::HOLE);
        assert_eq!(t.get(u32::MAX as usize - 1), PageEntry::HOLE);
        let s = t.summary(0, u32::MAX as usize);
        assert!(!s.any_locked() && !s.any_device());
        let n: usize = t.slices(5, 3 * CHUNK).map(|s| s.len()).sum();
        assert_eq!(n, 3 * CHUNK);
        assert!(
            t.slices(5, 3 * CHUNK)
                .all(|s| s.iter().all(|&e| e == PageEntry::HOLE))
        );
        assert_eq!(t.written().count(), 0);
        assert_eq!(t.allocated_chunks(), 0, "reading allocates nothing");
    }

    #[test]
    fn writes_allocate_only_their_chunks() {
        let len = 5 * CHUNK + 123;
        let mut t = PageTable::new(len).unwrap();
        let mut model = vec![PageEntry::HOLE; len];
        for i in [0, CHUNK - 1, CHUNK, 3 * CHUNK + 7, len - 1] {
            t.set(i, sys(i));
            model[i] = sys(i);
        }
        // Chunks 0, 1, 3 and the short last one (5).
        assert_eq!(t.allocated_chunks(), 4);
        assert_eq!(all(&t), model);
        let written: Vec<usize> = t.written().map(|(at, _)| at).collect();
        assert_eq!(written, vec![0, CHUNK, 3 * CHUNK, 5 * CHUNK]);
        assert_eq!(
            t.written().last().unwrap().1.len(),
            123,
            "the last chunk is short"
        );
        // A span crossing chunks, one never written (2), for writing.
        let (first, count) = (CHUNK - 3, 2 * CHUNK + 10);
        let mut k = 0;
        for s in t.slices_mut(first, count) {
            for e in s {
                *e = PageEntry::device(PagemapId(3), 9, k);
                k += 1;
            }
        }
        for (k, i) in (first..first + count).enumerate() {
            model[i] = PageEntry::device(PagemapId(3), 9, k as u32);
        }
        assert_eq!(t.allocated_chunks(), 5);
        assert_eq!(all(&t), model);
        let s = t.summary(first, count);
        assert!(s.any_device() && !s.any_locked());
        assert!(!t.summary(4 * CHUNK, CHUNK).any_device());
        // Lock bits on one entry show in spans holding it, and nowhere else.
        let e = t.entry_mut(3 * CHUNK + 7);
        *e = e.locked();
        assert!(t.summary(3 * CHUNK, 8).any_locked());
        assert!(t.summary_all().any_locked());
        assert!(!t.summary(3 * CHUNK + 8, 100).any_locked());
        assert!(!t.summary(0, 3 * CHUNK + 7).any_locked());
    }

    #[test]
    fn reserve_allocates_a_span_up_front() {
        let mut t = PageTable::new(10 * CHUNK).unwrap();
        t.reserve(2 * CHUNK - 1, CHUNK + 2).unwrap();
        assert_eq!(t.allocated_chunks(), 3);
        // Reserved chunks still read as holes.
        assert!(
            t.slices(0, 10 * CHUNK)
                .all(|s| s.iter().all(|&e| e == PageEntry::HOLE))
        );
        t.reserve(2 * CHUNK, 1).unwrap();
        assert_eq!(t.allocated_chunks(), 3);
        assert_eq!(t.reserve(0, 0), Ok(()));
        assert_eq!(t.allocated_chunks(), 3);
    }

    #[test]
    fn tiny_tables_allocate_tiny_chunks() {
        let mut t = PageTable::new(4).unwrap();
        t.set(3, sys(3));
        assert_eq!(t.heap_bytes(), 16 + 4 * 8);
        assert_eq!(all(&t)[3], sys(3));
    }

    #[test]
    // Miri stops on an allocation this large instead of failing it.
    #[cfg_attr(miri, ignore)]
    fn a_directory_too_large_is_an_error_not_an_abort() {
        assert!(PageTable::new(usize::MAX).is_err());
        assert!(Stamps::new(usize::MAX / 2, 1).is_err());
    }

    #[test]
    fn stamps_default_to_the_creation_stamp() {
        let blocks = 3 * CHUNK + 5;
        let mut s = Stamps::new(blocks, 7).unwrap();
        assert_eq!(s.max(0..=blocks - 1), 7);
        assert_eq!(s.allocated_chunks(), 0);
        s.fill(CHUNK - 1..=CHUNK, 9);
        assert_eq!(s.allocated_chunks(), 2);
        assert_eq!(s.max(0..=CHUNK - 2), 7);
        assert_eq!(s.max(0..=CHUNK - 1), 9);
        assert_eq!(s.max(CHUNK..=CHUNK), 9);
        assert_eq!(s.max(CHUNK + 1..=blocks - 1), 7);
        assert_eq!(s.max(0..=blocks - 1), 9);
        s.fill(blocks - 1..=blocks - 1, 11);
        assert_eq!(s.max(blocks - 1..=blocks - 1), 11);
        assert_eq!(s.max(2 * CHUNK..=blocks - 2), 7);
        assert_eq!(s.allocated_chunks(), 3);
        s.reserve(2 * CHUNK..=2 * CHUNK).unwrap();
        assert_eq!(s.allocated_chunks(), 4);
        assert_eq!(
            s.max(2 * CHUNK..=blocks - 2),
            7,
            "reserved blocks keep the default"
        );
        let big = Stamps::new(1 << 23, 1).unwrap();
        assert!(big.heap_bytes() <= 16 * (1 << 9));
    }
}
