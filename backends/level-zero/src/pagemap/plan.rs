//! Planning a call: its entries as commands, physically contiguous runs merged.

use crate::CHUNK_BYTES;

/// One command: a copy of `len` bytes from `src` to `dst`, or a zero fill of `dst` when
/// `src` is `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Op {
    pub dst: u64,
    pub src: Option<u64>,
    pub len: u64,
}

/// Whether `[a, a + len)` stays in one [`CHUNK_BYTES`] window: every allocation of this
/// backend (host chunks, device chunks) starts at a multiple of [`CHUNK_BYTES`] and is at
/// most that long, so a range inside one window lies inside one allocation.
fn one_window(a: u64, len: u64) -> bool {
    len > 0 && a / CHUNK_BYTES == (a + len - 1) / CHUNK_BYTES
}

/// Appends `op` to `ops`, merging it into the last command when both sides continue it
/// within one allocation.
pub(crate) fn push(ops: &mut Vec<Op>, op: Op) {
    if let Some(last) = ops.last_mut() {
        let contiguous = last.dst + last.len == op.dst
            && match (last.src, op.src) {
                (Some(a), Some(b)) => a + last.len == b,
                (None, None) => true,
                _ => false,
            };
        let len = last.len + op.len;
        if contiguous && one_window(last.dst, len) && last.src.is_none_or(|s| one_window(s, len)) {
            last.len = len;
            return;
        }
    }
    ops.push(op);
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 4096;

    fn copies(pairs: &[(u64, u64)]) -> Vec<Op> {
        let mut ops = Vec::new();
        for &(d, s) in pairs {
            push(
                &mut ops,
                Op {
                    dst: d,
                    src: Some(s),
                    len: P,
                },
            );
        }
        ops
    }

    #[test]
    fn contiguous_entries_merge_into_runs() {
        let b = CHUNK_BYTES;
        // Two pages contiguous on both sides, then a gap on the source side.
        let ops = copies(&[(b, 2 * b), (b + P, 2 * b + P), (b + 2 * P, 2 * b + 5 * P)]);
        assert_eq!(
            ops,
            vec![
                Op {
                    dst: b,
                    src: Some(2 * b),
                    len: 2 * P
                },
                Op {
                    dst: b + 2 * P,
                    src: Some(2 * b + 5 * P),
                    len: P
                },
            ]
        );
        // Descending pages do not merge.
        assert_eq!(copies(&[(b + P, 2 * b + P), (b, 2 * b)]).len(), 2);
        // Fills merge with fills only.
        let mut ops = Vec::new();
        push(
            &mut ops,
            Op {
                dst: b,
                src: None,
                len: P,
            },
        );
        push(
            &mut ops,
            Op {
                dst: b + P,
                src: None,
                len: P,
            },
        );
        push(
            &mut ops,
            Op {
                dst: b + 2 * P,
                src: Some(3 * b),
                len: P,
            },
        );
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].len, 2 * P);
    }

    #[test]
    fn runs_never_cross_an_allocation_window() {
        let b = CHUNK_BYTES;
        // Adjacent addresses on either side of a window boundary belong to two allocations.
        let ops = copies(&[(b - P, 4 * b), (b, 4 * b + P)]);
        assert_eq!(ops.len(), 2, "destination crosses");
        let ops = copies(&[(5 * b, 2 * b - P), (5 * b + P, 2 * b)]);
        assert_eq!(ops.len(), 2, "source crosses");
        // A whole window is one run.
        let pairs: Vec<(u64, u64)> = (0..b / P).map(|i| (b + i * P, 3 * b + i * P)).collect();
        assert_eq!(copies(&pairs).len(), 1);
    }
}
