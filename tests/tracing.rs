//! The `tracing` spans and events of one migration and of one rollback (sim), of a Level
//! Zero submission and fence wait (the software driver), and of the plug-in host adapter
//! (a copy call, an allocation, a rejected shared object): a subscriber that records every
//! span's name, level, target and fields (also those recorded later) and every event's
//! message, level, target and fields. (CUDA's `submit` and `fence_wait` spans have the same
//! shape; they need a GPU.)

mod common;

use common::{Options, build};
use drm_pagemap::{MigrateDetails, PageSize, PagemapId};
use drm_pagemap_testkit::inject::{FaultInjector, FaultSite};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

type Fields = BTreeMap<String, String>;

/// What the subscriber saw: spans in the order they were created (name, fields), events
/// (message, fields, the name of the span they happened in).
#[derive(Default)]
struct Seen {
    spans: Vec<(u64, String, Fields)>,
    events: Vec<(String, Fields, Option<String>)>,
}

struct Recorder(Arc<Mutex<Seen>>);

struct Collect<'a>(&'a mut Fields);

impl Visit for Collect<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut f = Fields::new();
        attrs.record(&mut Collect(&mut f));
        f.insert("@level".into(), attrs.metadata().level().to_string());
        f.insert("@target".into(), attrs.metadata().target().to_string());
        let name = attrs.metadata().name().to_string();
        self.0.lock().unwrap().spans.push((id.into_u64(), name, f));
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut seen = self.0.lock().unwrap();
        if let Some(s) = seen.spans.iter_mut().rev().find(|s| s.0 == id.into_u64()) {
            values.record(&mut Collect(&mut s.2));
        }
    }
    fn on_event(&self, event: &Event<'_>, cx: Context<'_, S>) {
        let mut f = Fields::new();
        event.record(&mut Collect(&mut f));
        let msg = f.remove("message").unwrap_or_default();
        f.insert("@level".into(), event.metadata().level().to_string());
        f.insert("@target".into(), event.metadata().target().to_string());
        let within = cx.event_span(event).map(|s| s.name().to_string());
        self.0.lock().unwrap().events.push((msg, f, within));
    }
}

fn capture(f: impl FnOnce()) -> Seen {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sub = tracing_subscriber::registry().with(Recorder(seen.clone()));
    tracing::subscriber::with_default(sub, f);
    Arc::try_unwrap(seen)
        .ok()
        .expect("subscriber dropped")
        .into_inner()
        .unwrap()
}

fn span<'a>(seen: &'a Seen, name: &str) -> &'a Fields {
    &seen
        .spans
        .iter()
        .find(|s| s.1 == name)
        .unwrap_or_else(|| {
            let names: Vec<_> = seen.spans.iter().map(|s| &s.1).collect();
            panic!("no span {name} in {names:?}")
        })
        .2
}

#[test]
fn one_migration_traces_every_phase_with_its_fields() {
    let rig = build("ss1s", 2, PageSize::Size4K, Options::on("sim"));
    let range = rig.range;
    let mm = rig.mm.clone();
    let seen = capture(|| {
        mm.migrate(range, PagemapId(0), &MigrateDetails::default())
            .expect("migrate");
    });
    let names: Vec<&str> = seen.spans.iter().map(|s| s.1.as_str()).collect();
    // Each call is mapped just before it is issued: a map span per call inside the issue
    // span.
    assert_eq!(
        names,
        [
            "migrate", "collect", "plan", "issue", "map", "map", "wait", "commit"
        ],
        "phases in order"
    );
    let mapped: Vec<&str> = seen
        .spans
        .iter()
        .filter(|s| s.1 == "map")
        .map(|s| s.2["executor"].as_str())
        .collect();
    assert_eq!(mapped.len(), 2, "one map span per call");
    assert!(mapped.contains(&"0") && mapped.contains(&"1"), "{mapped:?}");
    let m = span(&seen, "migrate");
    assert_eq!(m["range"], range.to_string());
    assert_eq!(m["pages"], "4");
    assert_eq!(m["bytes"], "16384");
    assert_eq!(m["calls"], "2");
    assert_eq!(m["outcome"], "migrated");
    assert!(m["target"].contains("Fresh"), "{m:?}");
    assert_eq!(span(&seen, "issue")["pagemap"], "0");
    assert_eq!(span(&seen, "wait")["copies"], "2");
    // One event per copy call, inside the issue span: executor, op, pages, bytes.
    let issued: Vec<&Fields> = seen
        .events
        .iter()
        .filter(|e| e.0 == "copy issued")
        .inspect(|e| assert_eq!(e.2.as_deref(), Some("issue")))
        .map(|e| &e.1)
        .collect();
    assert_eq!(issued.len(), 2, "{:?}", seen.events);
    let by_exec = |x: &str| issued.iter().find(|f| f["executor"] == x).expect("call");
    assert_eq!(by_exec("0")["op"], "ToDevmem");
    assert_eq!(by_exec("0")["pages"], "3");
    assert_eq!(by_exec("0")["bytes"], "12288");
    assert_eq!(by_exec("1")["op"], "ToRam");
    assert_eq!(by_exec("1")["pages"], "1");
    assert!(
        seen.events.iter().any(|e| e.0 == "release"),
        "pagemap 1's allocation released: {:?}",
        seen.events
    );
    rig.finish();
}

#[test]
fn one_rollback_traces_its_failure() {
    let inj = FaultInjector::new();
    let rig = build("ssss", 1, PageSize::Size4K, Options::on("sim").faults(&inj));
    let range = rig.range;
    let mm = rig.mm.clone();
    inj.fail_nth(FaultSite::FenceError, 1);
    let seen = capture(|| {
        mm.migrate(range, PagemapId(0), &MigrateDetails::default())
            .expect_err("fence error");
    });
    let m = span(&seen, "migrate");
    assert_eq!(m["outcome"], "failed");
    assert!(!seen.spans.iter().any(|s| s.1 == "commit"), "no commit");
    let rb = seen
        .events
        .iter()
        .find(|e| e.0 == "transaction rolled back")
        .unwrap_or_else(|| panic!("no rollback event: {:?}", seen.events));
    assert_eq!(rb.1["outcome"], "rollback");
    assert_eq!(rb.1["pagemap"], "0");
    assert_eq!(rb.1["copies"], "1");
    assert_eq!(rb.1["parked"], "false");
    assert_eq!(rb.1["range"], range.to_string());
    let failed = seen
        .events
        .iter()
        .find(|e| e.0 == "copy fence failed")
        .expect("fence event");
    assert_eq!(failed.2.as_deref(), Some("wait"));
    assert!(
        seen.events
            .iter()
            .any(|e| e.0 == "migration failed" && e.1["error"].contains("injected")),
        "{:?}",
        seen.events
    );
    rig.finish();
}

#[test]
fn eviction_and_cpu_fault_are_traced() {
    let rig = build("0000", 1, PageSize::Size4K, Options::on("sim"));
    let mm = rig.mm.clone();
    let alloc = rig.alloc_of(0);
    let seen = capture(|| {
        mm.evict_to_ram(alloc).expect("evict");
    });
    let e = span(&seen, "evict");
    assert_eq!(e["pages"], "4");
    assert_eq!(e["outcome"], "evicted");
    assert_eq!(span(&seen, "wait")["copies"], "1");
    mm.migrate(rig.range, PagemapId(0), &MigrateDetails::default())
        .expect("back");
    let mut buf = [0u8; 8];
    let seen = capture(|| mm.read(rig.range.start, &mut buf).expect("read"));
    let f = span(&seen, "cpu_fault");
    assert_eq!(f["fault_va"], rig.range.start.to_string());
    assert!(
        seen.events
            .iter()
            .any(|e| e.0 == "cpu fault done" && e.1["pages"] == "4")
    );
    rig.finish();
}

/// The spans named `name` whose field `key` is `value`.
fn spans_with<'a>(seen: &'a Seen, name: &str, key: &str, value: &str) -> Vec<&'a Fields> {
    seen.spans
        .iter()
        .filter(|s| s.1 == name && s.2.get(key).is_some_and(|v| v == value))
        .map(|s| &s.2)
        .collect()
}

/// Level Zero (the software driver through the real loader): the copy's submission is a
/// `submit` span with its pagemap, device, op, pages, bytes, runs, list kind and outcome;
/// the engine's wait for its fence a `fence_wait` span that signalled.
#[test]
fn level_zero_submission_and_wait_are_traced() {
    if !common::backends().contains(&"level-zero") {
        return; // `skipped:` said once by `backends`.
    }
    let rig = build("ssss", 1, PageSize::Size4K, Options::on("level-zero"));
    let (range, mm) = (rig.range, rig.mm.clone());
    let seen = capture(|| {
        mm.migrate(range, PagemapId(0), &MigrateDetails::default())
            .expect("migrate");
    });
    let copies = spans_with(&seen, "submit", "op", "copy_to_devmem");
    assert_eq!(copies.len(), 1, "{:?}", seen.spans);
    let s = copies[0];
    assert_eq!(s["pagemap"], "0");
    assert_eq!(s["device"], "0");
    assert_eq!(s["pages"], "4");
    assert_eq!(s["bytes"], "16384");
    assert!(s["runs"].parse::<u32>().unwrap() >= 1, "{s:?}");
    assert!(
        ["regular", "immediate"].contains(&s["list"].as_str()),
        "{s:?}"
    );
    assert_eq!(s["outcome"], "queued");
    assert_eq!(
        (s["@level"].as_str(), s["@target"].as_str()),
        ("DEBUG", "drm_pagemap::level_zero")
    );
    assert!(
        !spans_with(&seen, "fence_wait", "outcome", "signaled").is_empty(),
        "{:?}",
        seen.spans
    );
    rig.finish();
}

/// A plug-in through the host adapter: each copy call into it is a `submit` span (plugin,
/// pagemap, device, op, pages, bytes, outcome), each allocation an event; a shared object
/// that is not a plug-in is rejected with a `warn` event that gives the path and reason.
#[cfg(all(feature = "plugins", target_os = "linux"))]
#[test]
fn plugin_calls_and_rejections_are_traced() {
    use common::plugins;
    plugins::load_all();
    let rig = build("ssss", 1, PageSize::Size4K, Options::on("hostmem"));
    let (range, mm) = (rig.range, rig.mm.clone());
    let seen = capture(|| {
        mm.migrate(range, PagemapId(0), &MigrateDetails::default())
            .expect("migrate");
    });
    let copies = spans_with(&seen, "submit", "op", "copy_to_devmem");
    assert_eq!(copies.len(), 1, "{:?}", seen.spans);
    let s = copies[0];
    assert_eq!(s["plugin"], "hostmem");
    assert_eq!(s["pagemap"], "0");
    assert_eq!(s["pages"], "4");
    assert_eq!(s["bytes"], "16384");
    assert_eq!(s["outcome"], "queued");
    assert!(s.contains_key("device"), "{s:?}");
    assert_eq!(
        (s["@level"].as_str(), s["@target"].as_str()),
        ("DEBUG", "drm_pagemap::plugin")
    );
    let alloc = seen
        .events
        .iter()
        .find(|e| e.0 == "allocate")
        .unwrap_or_else(|| panic!("no allocate event: {:?}", seen.events));
    assert_eq!(alloc.1["pages"], "4");
    assert_eq!(alloc.1["outcome"], "allocated");
    rig.finish();
    let broken = plugins::c_plugin(
        "trace-noentry",
        "noentry3",
        &[("DPP_TEST_NO_ENTRY", "1"), ("DPP_NAME", "\"noentry3\"")],
    );
    let seen = capture(|| {
        assert!(drm_pagemap::plugins::load(&broken).is_err());
    });
    let w = seen
        .events
        .iter()
        .find(|e| e.0 == "plug-in rejected")
        .unwrap_or_else(|| panic!("no rejection event: {:?}", seen.events));
    assert_eq!(w.1["path"], broken.display().to_string());
    assert!(w.1["reason"].contains("not a plug-in"), "{:?}", w.1);
    assert_eq!(w.1["outcome"], "rejected");
    assert_eq!(w.1["@level"], "WARN");
}
