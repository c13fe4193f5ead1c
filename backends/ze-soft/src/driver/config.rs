//! The driver's configuration, read from `ZE_SOFT_*` at `zeInit` (see the crate docs).

use std::time::Duration;

/// What `zeInit` read from the environment.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Number of root devices.
    pub devices: u32,
    /// Bytes of device memory per device.
    pub device_memory: u64,
    /// Peer group of each device (devices in one group can access each other).
    pub peer_group: Vec<usize>,
    /// Queues in the COPY-only group (ordinal 1).
    pub copy_engines: u32,
    /// Added to every command an engine runs.
    pub latency: Duration,
    /// Violations fail (true) or are logged and let through (false).
    pub strict: bool,
}

impl Config {
    /// Reads the environment; malformed values are reported on stderr and replaced by defaults.
    pub fn from_env() -> Self {
        let get = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let devices = get("ZE_SOFT_DEVICES")
            .and_then(|v| parse_or_warn("ZE_SOFT_DEVICES", &v, |s| s.parse::<u32>().ok()))
            .map(|n| n.clamp(1, 64))
            .unwrap_or(2);
        let device_memory = get("ZE_SOFT_DEVICE_MEMORY")
            .and_then(|v| parse_or_warn("ZE_SOFT_DEVICE_MEMORY", &v, parse_size))
            .unwrap_or(512 << 20);
        let copy_engines = get("ZE_SOFT_COPY_ENGINES")
            .and_then(|v| parse_or_warn("ZE_SOFT_COPY_ENGINES", &v, |s| s.parse::<u32>().ok()))
            .map(|n| n.clamp(1, 64))
            .unwrap_or(2);
        let latency = get("ZE_SOFT_COPY_LATENCY_US")
            .and_then(|v| parse_or_warn("ZE_SOFT_COPY_LATENCY_US", &v, |s| s.parse::<u64>().ok()))
            .map(|us| Duration::from_micros(us.min(10_000_000)))
            .unwrap_or(Duration::ZERO);
        let strict = get("ZE_SOFT_STRICT").is_none_or(|v| v.trim() != "0");
        let peer_group = get("ZE_SOFT_PEER_GROUPS")
            .and_then(|v| parse_or_warn("ZE_SOFT_PEER_GROUPS", &v, |s| parse_groups(s, devices)))
            .unwrap_or_else(|| vec![0; devices as usize]);
        Config {
            devices,
            device_memory,
            peer_group,
            copy_engines,
            latency,
            strict,
        }
    }
}

fn parse_or_warn<T>(name: &str, value: &str, parse: impl FnOnce(&str) -> Option<T>) -> Option<T> {
    let parsed = parse(value.trim());
    if parsed.is_none() {
        eprintln!("ze-soft: ignoring malformed {name}={value:?} (using the default)");
    }
    parsed
}

/// `123`, `64K`, `512M`, `2G` (binary multiples; a trailing `B`/`iB` is accepted).
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s
        .strip_suffix("iB")
        .or_else(|| s.strip_suffix('B'))
        .unwrap_or(s);
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 10),
        (i, 'm' | 'M') => (&s[..i], 20),
        (i, 'g' | 'G') => (&s[..i], 30),
        (i, 't' | 'T') => (&s[..i], 40),
        _ => (s, 0),
    };
    let n: u64 = digits.trim().parse().ok()?;
    n.checked_mul(1u64 << shift)
}

/// `0,1;2,3`: each `;`-separated group lists device indices; unlisted devices form groups of
/// their own. Indices out of range or listed twice make the whole value malformed.
pub(crate) fn parse_groups(s: &str, devices: u32) -> Option<Vec<usize>> {
    let mut group = vec![usize::MAX; devices as usize];
    let mut next = 0;
    for part in s.split(';').filter(|p| !p.trim().is_empty()) {
        for dev in part.split(',') {
            let dev: usize = dev.trim().parse().ok()?;
            if dev >= group.len() || group[dev] != usize::MAX {
                return None;
            }
            group[dev] = next;
        }
        next += 1;
    }
    for g in group.iter_mut().filter(|g| **g == usize::MAX) {
        *g = next;
        next += 1;
    }
    Some(group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes_and_reject_overflow() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999999999T"), None);
    }

    #[test]
    fn peer_groups_parse_and_reject_bad_indices() {
        assert_eq!(parse_groups("0,1;2,3", 4), Some(vec![0, 0, 1, 1]));
        assert_eq!(parse_groups("0,2", 4), Some(vec![0, 1, 0, 2]));
        assert_eq!(parse_groups("0,4", 4), None);
        assert_eq!(parse_groups("0;0", 4), None);
    }
}
