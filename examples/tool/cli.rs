//! The command line through clap, with the tools' exit codes: `--help` prints and exits 0; a
//! bad argument is one line `TOOL: MESSAGE` on stderr and exit 2 (clap's own report spans
//! several lines, which scripts reading the first line of stderr would cut).

use clap::Parser;
use clap::error::ErrorKind;
use std::process::ExitCode;

/// Exit code of a bad argument.
pub const BAD_ARGUMENTS: u8 = 2;

/// Parses the process's arguments into `T`, or returns the exit code to leave with after
/// printing the help (0) or the error as one line prefixed with `tool` (2).
pub fn parse<T: Parser>(tool: &str) -> Result<T, ExitCode> {
    T::try_parse().map_err(|e| match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // Nothing to do if stdout is gone (a closed pipe): the help was asked for.
            let _ = e.print();
            ExitCode::SUCCESS
        }
        _ => {
            bad_argument(tool, &one_line(&e));
            ExitCode::from(BAD_ARGUMENTS)
        }
    })
}

/// Prints `TOOL: MESSAGE` on stderr (a bad argument found after parsing).
pub fn bad_argument(tool: &str, message: &str) {
    eprintln!("{tool}: {message}");
}

/// clap's report in one line: the error, then its details (the possible values, a similar
/// flag's name), then where the usage is.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("bad arguments");
    let mut out = first.strip_prefix("error: ").unwrap_or(first).to_string();
    for detail in lines.filter(|l| l.starts_with("tip:") || l.starts_with('[')) {
        out.push_str(if detail.starts_with('[') { " " } else { "; " });
        out.push_str(detail);
    }
    out.push_str(" (see --help)");
    out
}
