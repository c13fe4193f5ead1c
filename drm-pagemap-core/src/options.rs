//! Per-backend options: a versioned list of `backend.key = value` strings that a command line,
//! a C caller or a configuration file can carry, and that each backend reads with typed
//! getters ([`OptionReader`]).
//!
//! # Keys
//! A key names its backend and the knob: `cuda.vmm`, `sim.copy_latency` (lower-case ASCII
//! letters, digits, `_` and `-` on both sides of the first `.`). A backend reads the keys under
//! its own name and refuses any other key under its name ([`OptionError::UnknownKey`]) and any
//! value it cannot parse ([`OptionError::BadValue`]); nothing is ignored silently. Keys of
//! other backends are theirs to check (the facade's registry checks every built-in backend's
//! options before it opens any). Every backend accepts `NAME.disable` (a boolean): the
//! registry then reports the backend unavailable, and its `open` refuses.
//!
//! Each backend documents its keys on its config type (`SimConfig`, `CudaConfig`).
//!
//! # Values
//! One syntax for every backend:
//! - booleans: `1` / `0`, `true` / `false`, `yes` / `no`, `on` / `off` (any case);
//! - byte counts: a decimal integer with an optional binary suffix `K` / `KiB`, `M` / `MiB`,
//!   `G` / `GiB`, `T` / `TiB` (`2M` and `2MiB` are 2,097,152);
//! - durations: `0`, or a decimal integer with a unit `ns`, `us`, `ms` or `s` (`250us`);
//! - choices: one of the words the key lists;
//! - lists: comma-separated values (`0,0,1`).
//!
//! # Versions
//! The list carries the version of the key set and value syntax its writer knows
//! ([`BackendOptions::VERSION`], 1 today). A reader refuses a list of a newer version than its
//! own ([`OptionError::BadVersion`]) rather than misread it; a later version keeps reading
//! lists of earlier versions.
//!
//! # The environment
//! The library reads no environment variable except in explicit `from_env` constructors:
//! [`BackendConfig::from_env`](crate::BackendConfig::from_env) (which sets options from the
//! variables listed in [`ENV_OPTIONS`]) and the backends' `from_env` built on it. Each config's
//! `Default` is pure.

use std::fmt;
use std::time::Duration;

/// One option: `key` (`backend.name`) and its value, as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendOption {
    /// `backend.name`, e.g. `cuda.vmm`.
    pub key: String,
    /// The value as given, e.g. `0`.
    pub value: String,
}

/// A versioned list of per-backend options (see the [module docs](self) for keys, values and
/// versions). Setting a key again replaces its value (the last one given wins).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendOptions {
    version: u32,
    list: Vec<BackendOption>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions::new()
    }
}

/// Why an option list or one of its options was refused. Names the key (and the value).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// The key is not of the form `backend.name`, or the value cannot be carried (a NUL byte).
    #[error("option {key:?}: {reason}")]
    BadKey {
        /// The key as given.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No backend of that name knows the key (`known` lists what it knows).
    #[error("option {key}: unknown key ({known})")]
    UnknownKey {
        /// The key as given.
        key: String,
        /// What would have been understood, e.g. "cuda knows: vmm, kernel".
        known: String,
    },
    /// The backend knows the key but not the value.
    #[error("option {key}={value:?}: expected {expected}")]
    BadValue {
        /// The key.
        key: String,
        /// The value as given.
        value: String,
        /// What the key takes, e.g. "a boolean (1, 0, true, false, yes, no, on, off)".
        expected: String,
    },
    /// The list was written for a newer version of the options than this build reads.
    #[error("options version {version}: this build reads versions 1 to {supported}")]
    BadVersion {
        /// The list's version.
        version: u32,
        /// The newest version this build reads.
        supported: u32,
    },
}

impl OptionError {
    /// The key the error is about (`None` for a version mismatch).
    pub fn key(&self) -> Option<&str> {
        match self {
            OptionError::BadKey { key, .. }
            | OptionError::UnknownKey { key, .. }
            | OptionError::BadValue { key, .. } => Some(key),
            OptionError::BadVersion { .. } => None,
        }
    }
}

impl From<OptionError> for crate::BackendError {
    /// A [`BackendErrorKind::BadConfig`](crate::BackendErrorKind::BadConfig) error whose
    /// message is the option error's.
    fn from(e: OptionError) -> Self {
        crate::BackendError::new(crate::BackendErrorKind::BadConfig, e.to_string())
    }
}

fn check_key(key: &str) -> Result<(), OptionError> {
    let bad = |reason: &str| OptionError::BadKey {
        key: key.into(),
        reason: reason.into(),
    };
    let (backend, name) = key
        .split_once('.')
        .ok_or_else(|| bad("not of the form BACKEND.NAME (e.g. cuda.vmm)"))?;
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    };
    if !ok(backend) || !ok(name) {
        return Err(bad(
            "BACKEND and NAME must be non-empty lower-case letters, digits, '_' or '-'",
        ));
    }
    Ok(())
}

impl BackendOptions {
    /// The version of the key set and value syntax this build reads and writes.
    pub const VERSION: u32 = 1;

    /// An empty list of the current [`VERSION`](Self::VERSION).
    pub fn new() -> BackendOptions {
        BackendOptions {
            version: Self::VERSION,
            list: Vec::new(),
        }
    }

    /// An empty list written against `version` (what a C caller's header says). Versions 0
    /// and newer than [`VERSION`](Self::VERSION) are refused.
    pub fn with_version(version: u32) -> Result<BackendOptions, OptionError> {
        if version == 0 || version > Self::VERSION {
            return Err(OptionError::BadVersion {
                version,
                supported: Self::VERSION,
            });
        }
        Ok(BackendOptions {
            version,
            list: Vec::new(),
        })
    }

    /// The version the list was written against.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Sets `key` (`backend.name`) to `value`, replacing an earlier value of the key. Refuses
    /// a key not of that form and a value with a NUL byte (a C string cannot carry it);
    /// whether the backend knows the key and the value is checked when it reads them.
    pub fn set(
        &mut self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<&mut BackendOptions, OptionError> {
        let (key, value) = (key.into(), value.into());
        check_key(&key)?;
        if value.contains('\0') {
            return Err(OptionError::BadKey {
                key,
                reason: "the value contains a NUL byte".into(),
            });
        }
        match self.list.iter_mut().find(|o| o.key == key) {
            Some(o) => o.value = value,
            None => self.list.push(BackendOption { key, value }),
        }
        Ok(self)
    }

    /// The same list with `key` set to `value` (builder form of [`set`](Self::set)).
    pub fn with(
        mut self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<BackendOptions, OptionError> {
        self.set(key, value)?;
        Ok(self)
    }

    /// Sets an option from `KEY=VALUE` text (a command line's `--option cuda.vmm=0`).
    pub fn parse_assignment(&mut self, text: &str) -> Result<&mut BackendOptions, OptionError> {
        let (key, value) = text.split_once('=').ok_or_else(|| OptionError::BadKey {
            key: text.into(),
            reason: "not of the form BACKEND.NAME=VALUE".into(),
        })?;
        self.set(key.trim(), value.trim())
    }

    /// Removes `key`; returns its value, if it was set.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let i = self.list.iter().position(|o| o.key == key)?;
        Some(self.list.remove(i).value)
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.list
            .iter()
            .find(|o| o.key == key)
            .map(|o| o.value.as_str())
    }

    /// Every option, in the order first set.
    pub fn iter(&self) -> impl Iterator<Item = &BackendOption> {
        self.list.iter()
    }

    /// Number of options.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether no option is set.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The backend names the keys mention, each once, in the order first set.
    pub fn backends(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for o in &self.list {
            let b = o.key.split_once('.').map_or(o.key.as_str(), |(b, _)| b);
            if !names.contains(&b) {
                names.push(b);
            }
        }
        names
    }

    /// Whether `backend.disable` is set to true (the key every backend accepts).
    pub fn disabled(&self, backend: &str) -> Result<bool, OptionError> {
        let key = format!("{backend}.disable");
        match self.get(&key) {
            None => Ok(false),
            Some(v) => parse_bool(&key, v),
        }
    }

    /// A reader of `backend`'s options; refuses a list of a newer version than this build's.
    pub fn reader<'a>(&'a self, backend: &'a str) -> Result<OptionReader<'a>, OptionError> {
        if self.version == 0 || self.version > Self::VERSION {
            return Err(OptionError::BadVersion {
                version: self.version,
                supported: Self::VERSION,
            });
        }
        Ok(OptionReader {
            options: self,
            backend,
            used: vec![false; self.list.len()],
            known: vec!["disable"],
        })
    }
}

impl fmt::Display for BackendOptions {
    /// `key=value` pairs separated by spaces.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, o) in self.list.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}={}", o.key, o.value)?;
        }
        Ok(())
    }
}

/// Reads one backend's options with typed getters: each getter names a key the backend knows
/// (without the `backend.` prefix) and returns `Ok(None)` when it is not set;
/// [`finish`](Self::finish) then refuses any key under the backend's name that no getter asked
/// for. `disable` is known to every reader.
#[derive(Debug)]
pub struct OptionReader<'a> {
    options: &'a BackendOptions,
    backend: &'a str,
    used: Vec<bool>,
    known: Vec<&'static str>,
}

const BOOL_VALUES: &str = "a boolean (1, 0, true, false, yes, no, on, off)";
const BYTES_VALUES: &str =
    "a byte count (a decimal integer, optionally with K, KiB, M, MiB, G, GiB, T or TiB)";
const DURATION_VALUES: &str = "a duration (0, or a decimal integer with ns, us, ms or s)";

fn bad_value(key: &str, value: &str, expected: impl Into<String>) -> OptionError {
    OptionError::BadValue {
        key: key.into(),
        value: value.into(),
        expected: expected.into(),
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool, OptionError> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(bad_value(key, v, BOOL_VALUES)),
    }
}

fn parse_bytes(key: &str, v: &str) -> Result<u64, OptionError> {
    let digits = v.bytes().take_while(u8::is_ascii_digit).count();
    let (n, suffix) = v.split_at(digits);
    let shift = match suffix {
        "" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        _ => return Err(bad_value(key, v, BYTES_VALUES)),
    };
    let n: u64 = n.parse().map_err(|_| bad_value(key, v, BYTES_VALUES))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| bad_value(key, v, "a byte count below 2^64"))
}

fn parse_duration(key: &str, v: &str) -> Result<Duration, OptionError> {
    if v == "0" {
        return Ok(Duration::ZERO);
    }
    let digits = v.bytes().take_while(u8::is_ascii_digit).count();
    let (n, unit) = v.split_at(digits);
    let n: u64 = n.parse().map_err(|_| bad_value(key, v, DURATION_VALUES))?;
    match unit {
        "ns" => Ok(Duration::from_nanos(n)),
        "us" => Ok(Duration::from_micros(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        _ => Err(bad_value(key, v, DURATION_VALUES)),
    }
}

impl<'a> OptionReader<'a> {
    /// The backend whose options this reads.
    pub fn backend(&self) -> &str {
        self.backend
    }

    /// The full key and raw value of `name`, if set; marks the key as known and read.
    pub fn raw(&mut self, name: &'static str) -> Option<(String, &'a str)> {
        if !self.known.contains(&name) {
            self.known.push(name);
        }
        let key = format!("{}.{name}", self.backend);
        let options: &'a BackendOptions = self.options;
        let i = options.list.iter().position(|o| o.key == key)?;
        self.used[i] = true;
        Some((key, options.list[i].value.as_str()))
    }

    /// A boolean.
    pub fn bool(&mut self, name: &'static str) -> Result<Option<bool>, OptionError> {
        self.raw(name).map(|(k, v)| parse_bool(&k, v)).transpose()
    }

    /// A byte count.
    pub fn bytes(&mut self, name: &'static str) -> Result<Option<u64>, OptionError> {
        self.raw(name).map(|(k, v)| parse_bytes(&k, v)).transpose()
    }

    /// A duration.
    pub fn duration(&mut self, name: &'static str) -> Result<Option<Duration>, OptionError> {
        self.raw(name)
            .map(|(k, v)| parse_duration(&k, v))
            .transpose()
    }

    /// One of `choices` (matched exactly).
    pub fn choice<T: Copy>(
        &mut self,
        name: &'static str,
        choices: &[(&str, T)],
    ) -> Result<Option<T>, OptionError> {
        let Some((k, v)) = self.raw(name) else {
            return Ok(None);
        };
        match choices.iter().find(|(w, _)| *w == v) {
            Some((_, t)) => Ok(Some(*t)),
            None => {
                let words: Vec<&str> = choices.iter().map(|(w, _)| *w).collect();
                Err(bad_value(&k, v, format!("one of {}", words.join(", "))))
            }
        }
    }

    /// A comma-separated list of `u32` (empty items refused).
    pub fn u32_list(&mut self, name: &'static str) -> Result<Option<Vec<u32>>, OptionError> {
        let Some((k, v)) = self.raw(name) else {
            return Ok(None);
        };
        v.split(',')
            .map(|s| s.trim().parse::<u32>())
            .collect::<Result<Vec<u32>, _>>()
            .map(Some)
            .map_err(|_| bad_value(&k, v, "a comma-separated list of integers (0,0,1)"))
    }

    /// Refuses the first key under this backend's name that no getter asked for, naming the
    /// keys the backend knows, and a `disable` value that is not a boolean.
    pub fn finish(self) -> Result<(), OptionError> {
        self.options.disabled(self.backend)?;
        let prefix = format!("{}.", self.backend);
        for (o, used) in self.options.list.iter().zip(&self.used) {
            let name = o.key.strip_prefix(&prefix);
            if !used && name.is_some_and(|n| !self.known.contains(&n)) {
                return Err(OptionError::UnknownKey {
                    key: o.key.clone(),
                    known: format!("{} knows: {}", self.backend, self.known.join(", ")),
                });
            }
        }
        Ok(())
    }
}

/// What [`BackendConfig::from_env`](crate::BackendConfig::from_env) does with one
/// environment variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnvRule {
    /// The variable's value is the option's value (checked when the backend reads it).
    Value,
    /// `0` sets the option to `0`, any other value to `1` (the variable's historic meaning).
    OffIfZero,
    /// Set (to anything, also empty or `0`): the option is `1`.
    OnIfSet,
}

/// The environment variables [`BackendConfig::from_env`](crate::BackendConfig::from_env)
/// reads: (variable, option key, rule). Nothing else in the library reads the environment.
pub const ENV_OPTIONS: &[(&str, &str, EnvRule)] = &[
    (
        "DRM_PAGEMAP_CUDA_DMA_MIN_HOST",
        "cuda.dma_min_host",
        EnvRule::Value,
    ),
    (
        "DRM_PAGEMAP_CUDA_DMA_MIN_DEVICE",
        "cuda.dma_min_device",
        EnvRule::Value,
    ),
    ("DRM_PAGEMAP_CUDA_VMM", "cuda.vmm", EnvRule::OffIfZero),
    (
        "DRM_PAGEMAP_CUDA_CLEAR_ON_FREE",
        "cuda.clear_on_free",
        EnvRule::OffIfZero,
    ),
    ("DRM_PAGEMAP_CUDA_KERNEL", "cuda.kernel", EnvRule::Value),
    ("DRM_PAGEMAP_CUDA_DISABLE", "cuda.disable", EnvRule::OnIfSet),
];

/// The options the variables of [`ENV_OPTIONS`] set, looking each up with `var` (the
/// process environment for `from_env`; any map in tests).
pub fn options_from_vars(var: impl Fn(&str) -> Option<String>) -> BackendOptions {
    let mut options = BackendOptions::new();
    for &(name, key, rule) in ENV_OPTIONS {
        let Some(v) = var(name) else { continue };
        let value = match rule {
            EnvRule::Value => v.replace('\0', ""),
            EnvRule::OffIfZero => if v == "0" { "0" } else { "1" }.to_string(),
            EnvRule::OnIfSet => "1".to_string(),
        };
        // Keys in the table are well formed and the value has no NUL: cannot fail.
        let _ = options.set(key, value);
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BackendOptions {
        let mut o = BackendOptions::new();
        for (k, v) in pairs {
            o.set(*k, *v).unwrap();
        }
        o
    }

    #[test]
    fn keys_must_name_a_backend_and_a_knob() {
        let mut o = BackendOptions::new();
        for bad in ["vmm", ".vmm", "cuda.", "CUDA.vmm", "cuda.v m", ""] {
            let e = o.set(bad, "1").expect_err(bad);
            assert!(
                matches!(&e, OptionError::BadKey { key, .. } if key == bad),
                "{e}"
            );
            assert_eq!(e.key(), Some(bad));
        }
        assert!(matches!(
            o.set("cuda.kernel", "p\0tx"),
            Err(OptionError::BadKey { .. })
        ));
        o.set("cuda.vmm", "0")
            .unwrap()
            .set("sim.copy_latency", "1ms")
            .unwrap();
        o.set("cuda.vmm", "1").unwrap();
        assert_eq!(o.len(), 2, "setting again replaces");
        assert_eq!(o.get("cuda.vmm"), Some("1"));
        assert_eq!(o.backends(), ["cuda", "sim"]);
        assert_eq!(o.to_string(), "cuda.vmm=1 sim.copy_latency=1ms");
        assert_eq!(o.remove("cuda.vmm").as_deref(), Some("1"));
        assert_eq!(o.get("cuda.vmm"), None);
    }

    #[test]
    fn assignments_parse_from_command_line_text() {
        let mut o = BackendOptions::new();
        o.parse_assignment("cuda.kernel=ptx").unwrap();
        o.parse_assignment("sim.copy_latency = 2ms").unwrap();
        o.parse_assignment("cuda.kernel=").unwrap();
        assert_eq!(o.get("cuda.kernel"), Some(""));
        assert_eq!(o.get("sim.copy_latency"), Some("2ms"));
        let e = o.parse_assignment("cuda.vmm").unwrap_err();
        assert!(e.to_string().contains("BACKEND.NAME=VALUE"), "{e}");
    }

    #[test]
    fn typed_getters_parse_and_name_the_key_on_bad_values() {
        let o = opts(&[
            ("t.on", "YES"),
            ("t.off", "0"),
            ("t.b", "2MiB"),
            ("t.k", "64K"),
            ("t.d", "250us"),
            ("t.z", "0"),
            ("t.c", "ptx"),
            ("t.l", "0, 0,1"),
        ]);
        let mut r = o.reader("t").unwrap();
        assert_eq!(r.bool("on"), Ok(Some(true)));
        assert_eq!(r.bool("off"), Ok(Some(false)));
        assert_eq!(r.bool("missing"), Ok(None));
        assert_eq!(r.bytes("b"), Ok(Some(2 << 20)));
        assert_eq!(r.bytes("k"), Ok(Some(64 << 10)));
        assert_eq!(r.duration("d"), Ok(Some(Duration::from_micros(250))));
        assert_eq!(r.duration("z"), Ok(Some(Duration::ZERO)));
        assert_eq!(r.choice("c", &[("auto", 0), ("ptx", 1)]), Ok(Some(1)));
        assert_eq!(r.u32_list("l"), Ok(Some(vec![0, 0, 1])));
        r.finish().unwrap();

        for (value, get) in [
            ("maybe", "bool"),
            ("2X", "bytes"),
            ("-1", "bytes"),
            ("99999999999T", "bytes"),
            ("5", "duration"),
            ("1h", "duration"),
            ("cubin", "choice"),
            ("0,,1", "list"),
        ] {
            let o = opts(&[("t.x", value)]);
            let mut r = o.reader("t").unwrap();
            let e = match get {
                "bool" => r.bool("x").map(drop),
                "bytes" => r.bytes("x").map(drop),
                "duration" => r.duration("x").map(drop),
                "choice" => r.choice("x", &[("auto", ())]).map(drop),
                _ => r.u32_list("x").map(drop),
            }
            .expect_err(value);
            assert!(
                matches!(&e, OptionError::BadValue { key, value: v, .. } if key == "t.x" && v == value),
                "{e}"
            );
            assert!(e.to_string().starts_with("option t.x="), "{e}");
        }
    }

    #[test]
    fn unknown_keys_of_the_backend_are_refused_others_left_alone() {
        let o = opts(&[("t.known", "1"), ("t.typo", "1"), ("other.x", "y")]);
        let mut r = o.reader("t").unwrap();
        r.bool("known").unwrap();
        let e = r.finish().unwrap_err();
        assert_eq!(e.key(), Some("t.typo"));
        assert!(
            e.to_string().contains("t knows: disable, known"),
            "lists what it knows: {e}"
        );
        // `disable` is every backend's; another backend's keys are not this reader's business.
        let o = opts(&[("t.disable", "1"), ("other.x", "y")]);
        o.reader("t").unwrap().finish().unwrap();
        assert_eq!(o.disabled("t"), Ok(true));
        assert_eq!(o.disabled("other"), Ok(false));
        let o = opts(&[("t.disable", "sometimes")]);
        assert!(matches!(o.disabled("t"), Err(OptionError::BadValue { .. })));
        let e = o.reader("t").unwrap().finish().unwrap_err();
        assert_eq!(e.key(), Some("t.disable"));
    }

    #[test]
    fn versions_newer_than_this_build_are_refused() {
        assert_eq!(BackendOptions::new().version(), BackendOptions::VERSION);
        assert_eq!(BackendOptions::with_version(1).unwrap().version(), 1);
        for v in [0, BackendOptions::VERSION + 1] {
            let e = BackendOptions::with_version(v).unwrap_err();
            assert_eq!(
                e,
                OptionError::BadVersion {
                    version: v,
                    supported: BackendOptions::VERSION
                }
            );
            assert_eq!(e.key(), None);
        }
    }

    #[test]
    fn environment_variables_map_to_options_by_their_rules() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            options_from_vars(move |k| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            })
        };
        assert!(env(&[]).is_empty());
        let o = env(&[
            ("DRM_PAGEMAP_CUDA_DMA_MIN_HOST", "4096"),
            ("DRM_PAGEMAP_CUDA_DMA_MIN_DEVICE", "1M"),
            ("DRM_PAGEMAP_CUDA_VMM", "0"),
            ("DRM_PAGEMAP_CUDA_CLEAR_ON_FREE", "yes please"),
            ("DRM_PAGEMAP_CUDA_KERNEL", "ptx"),
            ("DRM_PAGEMAP_CUDA_DISABLE", "0"),
            ("DRM_PAGEMAP_UNRELATED", "x"),
        ]);
        assert_eq!(
            o.to_string(),
            "cuda.dma_min_host=4096 cuda.dma_min_device=1M cuda.vmm=0 cuda.clear_on_free=1 \
             cuda.kernel=ptx cuda.disable=1"
        );
    }
}
