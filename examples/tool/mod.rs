//! What the example tools (`migrate`, `svm-multi-device`) share: the command line through
//! clap with the tools' exit codes, the progress bar, the statistics table.

pub mod cli;
pub mod progress;
pub mod stats;
