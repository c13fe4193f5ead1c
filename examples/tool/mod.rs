//! What the example tools (`migrate`, `svm-multi-device`) share: the command line through
//! clap with the tools' exit codes, and the progress bar.

pub mod cli;
pub mod progress;
