//! The layout language of the `migrate` tool and the tests: one character per page.
//!
//! `s` a system page, `.` an unpopulated page, `0`-`9` a page in pagemap k. `x*n` repeats
//! `x` n times; items join with commas: `s*1000,1*500,.,2*7`. An item may also be a plain
//! run of characters: `ss00s11s0`.
//!
//! [`of`] reads the layout of a range of an [`AddressSpace`], [`page`] the layout character
//! of one [`PageLocation`].

use drm_pagemap_core::{AddressSpace, PageLocation, Result, VaRange};
use std::fmt;

/// Where one page of a layout lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayoutPage {
    /// Not populated.
    Hole,
    /// In system memory.
    System,
    /// In pagemap k.
    Device(u8),
}

impl LayoutPage {
    /// The layout character.
    pub fn to_char(self) -> char {
        match self {
            LayoutPage::Hole => '.',
            LayoutPage::System => 's',
            LayoutPage::Device(k) if k < 10 => (b'0' + k) as char,
            LayoutPage::Device(_) => '?',
        }
    }

    fn from_char(c: char) -> Option<LayoutPage> {
        match c {
            '.' => Some(LayoutPage::Hole),
            's' => Some(LayoutPage::System),
            '0'..='9' => Some(LayoutPage::Device(c as u8 - b'0')),
            _ => None,
        }
    }
}

/// The layout character of a page at `location`: a hole, a system page, or a page in the
/// location's pagemap (pagemaps 10 and up print as `?`).
pub fn page(location: PageLocation) -> LayoutPage {
    match location {
        PageLocation::Unpopulated => LayoutPage::Hole,
        PageLocation::System => LayoutPage::System,
        PageLocation::Device { pagemap, .. } => LayoutPage::Device(pagemap.0),
    }
}

/// The layout of `range` (page aligned) in `mm`: [`AddressSpace::locations`] through
/// [`page`]. Fails as [`AddressSpace::locations`] does.
pub fn of(mm: &AddressSpace, range: VaRange) -> Result<Vec<LayoutPage>> {
    Ok(mm.locations(range)?.into_iter().map(page).collect())
}

/// Why a layout string was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The string describes no page.
    #[error("layout is empty")]
    Empty,
    /// A character that is not `s`, `.`, or a digit.
    #[error("layout item {item:?}: {ch:?} is not a page (use s, ., or 0-9)")]
    BadChar {
        /// The item.
        item: String,
        /// The character.
        ch: char,
    },
    /// A repeat count that is not a positive number.
    #[error("layout item {item:?}: repeat count must be a positive number")]
    BadCount {
        /// The item.
        item: String,
    },
    /// More pages than allowed.
    #[error("layout has more than {max} pages")]
    TooLong {
        /// The limit.
        max: usize,
    },
}

/// Most pages a layout may describe (keeps a typo from asking for terabytes).
pub const MAX_LAYOUT_PAGES: usize = 1 << 26;

/// Parses a layout string.
pub fn parse(text: &str) -> Result<Vec<LayoutPage>, LayoutError> {
    let mut pages = Vec::new();
    for item in text.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        if let Some((what, count)) = item.split_once('*') {
            let mut chars = what.chars();
            let (Some(c), None) = (chars.next(), chars.next()) else {
                return Err(LayoutError::BadCount { item: item.into() });
            };
            let page = LayoutPage::from_char(c).ok_or_else(|| LayoutError::BadChar {
                item: item.into(),
                ch: c,
            })?;
            let n: usize = count
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| LayoutError::BadCount { item: item.into() })?;
            if pages.len() + n > MAX_LAYOUT_PAGES {
                return Err(LayoutError::TooLong {
                    max: MAX_LAYOUT_PAGES,
                });
            }
            pages.resize(pages.len() + n, page);
        } else {
            for c in item.chars() {
                let page = LayoutPage::from_char(c).ok_or_else(|| LayoutError::BadChar {
                    item: item.into(),
                    ch: c,
                })?;
                if pages.len() >= MAX_LAYOUT_PAGES {
                    return Err(LayoutError::TooLong {
                        max: MAX_LAYOUT_PAGES,
                    });
                }
                pages.push(page);
            }
        }
    }
    if pages.is_empty() {
        return Err(LayoutError::Empty);
    }
    Ok(pages)
}

/// Formats pages compactly: runs of 4 or more become `x*n`, shorter runs stay literal.
pub fn format(pages: &[LayoutPage]) -> String {
    struct Out(Vec<String>, String);
    let mut out = Out(Vec::new(), String::new());
    let mut i = 0;
    while i < pages.len() {
        let mut j = i + 1;
        while j < pages.len() && pages[j] == pages[i] {
            j += 1;
        }
        let c = pages[i].to_char();
        if j - i >= 4 {
            if !out.1.is_empty() {
                out.0.push(std::mem::take(&mut out.1));
            }
            out.0.push(format!("{c}*{}", j - i));
        } else {
            out.1.extend(std::iter::repeat_n(c, j - i));
        }
        i = j;
    }
    if !out.1.is_empty() {
        out.0.push(out.1);
    }
    out.0.join(",")
}

/// A layout as text, for `Display`.
pub struct Layout<'a>(pub &'a [LayoutPage]);

impl fmt::Display for Layout<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_items_and_repeats() {
        let p = parse("s*3,1*2,.,2*1").unwrap();
        assert_eq!(p.len(), 7);
        assert_eq!(p[0], LayoutPage::System);
        assert_eq!(p[3], LayoutPage::Device(1));
        assert_eq!(p[5], LayoutPage::Hole);
        assert_eq!(p[6], LayoutPage::Device(2));
        assert_eq!(parse("ss00s11s0").unwrap().len(), 9);
    }

    #[test]
    fn refuses_bad_text() {
        assert_eq!(parse(""), Err(LayoutError::Empty));
        assert!(matches!(
            parse("sx"),
            Err(LayoutError::BadChar { ch: 'x', .. })
        ));
        assert!(matches!(parse("s*0"), Err(LayoutError::BadCount { .. })));
        assert!(matches!(parse("s*-1"), Err(LayoutError::BadCount { .. })));
        assert!(matches!(parse("ss*2"), Err(LayoutError::BadCount { .. })));
        assert!(matches!(
            parse("s*99999999999"),
            Err(LayoutError::TooLong { .. })
        ));
    }

    #[test]
    fn format_round_trips() {
        for text in ["ss00s11s0", "s*1000,1*500,.,2*7", "....", "0"] {
            let p = parse(text).unwrap();
            assert_eq!(parse(&format(&p)).unwrap(), p);
        }
        assert_eq!(format(&parse("s*5,0,0").unwrap()), "s*5,00");
    }
}
