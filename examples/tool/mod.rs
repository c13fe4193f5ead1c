//! What the example tools (`migrate`, `svm-multi-device`) share: the command line through
//! clap with the tools' exit codes, the progress bar, the statistics table, `--pointers`.

pub mod cli;
pub mod pointers;
pub mod progress;
pub mod stats;
