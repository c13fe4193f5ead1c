//! A progress bar on stderr (indicatif), drawn only when both stdout and stderr are a
//! terminal and output is for a person (not `--json`); otherwise hidden and free.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// Phases of a run, each from 0 to its total.
#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar when `wanted` and stdout and stderr are terminals, else a hidden one.
    pub fn new(wanted: bool) -> Progress {
        let shown = wanted && std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
        if !shown {
            return Progress {
                bar: ProgressBar::hidden(),
            };
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{msg:<12} [{bar:40}] {percent:>3}% {elapsed:>4}")
        {
            bar.set_style(style.progress_chars("#>."));
        }
        Progress { bar }
    }

    /// Starts `phase` of `total` steps.
    pub fn phase(&self, phase: &'static str, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(0);
        self.bar.set_message(phase);
    }

    /// Sets how far the current phase is.
    pub fn set(&self, done: u64) {
        self.bar.set_position(done);
    }

    /// Advances the current phase by `n` steps (from any thread).
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Removes the bar before the results are printed.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
