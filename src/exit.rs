//! Process exit codes, after sysexits(3), so scripts and systemd can tell failures apart.

/// Why a binary stopped. `main` maps its error to one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok,
    /// The command ran but its job failed (e.g. the quickstart task did not succeed).
    Failure,
    /// `fieldhandctl`: the task ended `HALTED` (its gray batch reached the threshold).
    Halted,
    /// `fieldhandctl`: the task ended `CANCELLED`.
    Cancelled,
    /// Bad flags or arguments (EX_USAGE).
    Usage,
    /// Input data was wrong (EX_DATAERR).
    DataErr,
    /// An input file could not be read (EX_NOINPUT).
    NoInput,
    /// A peer could not be reached (EX_UNAVAILABLE).
    Unavailable,
    /// A bug or an unexpected internal error (EX_SOFTWARE).
    Software,
    /// A file could not be created or written (EX_CANTCREAT).
    CantCreate,
    /// An I/O error (EX_IOERR).
    IoErr,
    /// The peer does not speak our protocol: e.g. a controller without a route this
    /// command needs, or an answer that does not decode (EX_PROTOCOL).
    Protocol,
    /// Try again later: e.g. another agent holds the state directory (EX_TEMPFAIL).
    TempFail,
    /// Configuration is missing or invalid (EX_CONFIG).
    Config,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Failure => 1,
            Exit::Halted => 2,
            Exit::Cancelled => 3,
            Exit::Usage => 64,
            Exit::DataErr => 65,
            Exit::NoInput => 66,
            Exit::Unavailable => 69,
            Exit::Software => 70,
            Exit::CantCreate => 73,
            Exit::IoErr => 74,
            Exit::TempFail => 75,
            Exit::Protocol => 76,
            Exit::Config => 78,
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e.code())
    }
}

/// Parses the command line; `--help`/`--version` map to `Ok` and bad flags to `Usage`,
/// after clap has printed its message.
pub fn parse_args<P: clap::Parser>() -> Result<P, Exit> {
    P::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            Exit::Usage
        } else {
            Exit::Ok
        }
    })
}
