//! `fieldhandctl`, the operator CLI: a thin client of the operator API. `api` builds each
//! request and sends it (listings page by page), `fleet` has the machine, pool and
//! enrollment-token commands, `work` the scripts and the requests that start tasks,
//! `tasks` starts, lists and shows tasks, `watch` follows one to its end (bars on a
//! terminal, lines otherwise), and
//! `table` lays out tables that fit 80 columns. The connection settings are
//! `config::ctl`; the arguments are parsed in `src/bin/fieldhandctl.rs`.
//!
//! Exit codes: 0 when the command did what it said (with `--wait`: the task ended
//! `SUCCEEDED`); 1, 2, 3 when a waited-for task ended `FAILED`, `HALTED`, `CANCELLED`; 64
//! bad usage; 65 the controller refused the request (4xx); 66 an input file cannot be read;
//! 69 the controller cannot be reached (or answered 5xx); 74 output cannot be written; 76
//! the controller lacks a route this command needs ("upgrade it") or sent what this CLI
//! cannot decode; 78 a connection setting is missing or wrong.

pub mod api;
pub mod fleet;
pub mod table;
pub mod tasks;
pub mod watch;
pub mod work;

use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;

use serde_json::Value;

pub use api::{Api, TaskFilter};
pub use work::{parse_duration, PushArgs, RunArgs, StartTime};

use crate::config::ctl::CtlConfigError;
use crate::exit::Exit;
use crate::net::NetError;
use crate::proto::domain::TaskState;

/// The exit codes, as `--help` shows them.
pub const EXIT_CODES: &str = "\
Exit codes:
  0   done (with --wait or tasks watch: the task ended SUCCEEDED)
  1   the task ended FAILED
  2   the task ended HALTED (its gray batch reached the failure threshold)
  3   the task ended CANCELLED
  64  bad usage
  65  the controller refused the request (4xx: its message says why)
  66  an input file (--file) cannot be read
  69  the controller cannot be reached, or answered 5xx
  74  output cannot be written
  76  the controller lacks a route this command needs (upgrade it)
  78  a connection setting is missing or invalid (--url, --ca, --cert, --key)";

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(transparent)]
    Config(#[from] CtlConfigError),
    #[error("this controller has no {route}: upgrade it ({error})")]
    MissingRoute {
        route: &'static str,
        error: NetError,
    },
    #[error("{0}")]
    Api(NetError),
    #[error("cannot decode the answer to {route}: {reason}")]
    Decode { route: &'static str, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the output: {0}")]
    Write(std::io::Error),
    /// The controller answered, but nothing was started (e.g. no desktop could be rebuilt).
    #[error("{0}")]
    Refused(String),
}

impl CtlError {
    pub fn exit(&self) -> Exit {
        match self {
            CtlError::Config(_) => Exit::Config,
            CtlError::MissingRoute { .. } | CtlError::Decode { .. } => Exit::Protocol,
            CtlError::Api(e) => match e {
                NetError::Status { status, .. } if *status < 500 => Exit::DataErr,
                NetError::Status { .. }
                | NetError::Connect { .. }
                | NetError::Tls { .. }
                | NetError::Http { .. }
                | NetError::Timeout { .. }
                | NetError::Busy { .. } => Exit::Unavailable,
                NetError::BadUrl { .. } => Exit::Config,
                NetError::Decode { .. } => Exit::Protocol,
                NetError::Encode { .. } => Exit::Software,
            },
            CtlError::Read { .. } => Exit::NoInput,
            CtlError::Write(_) => Exit::IoErr,
            CtlError::Refused(_) => Exit::DataErr,
        }
    }
}

/// The exit code for a task that has ended.
pub fn exit_for(state: TaskState) -> Exit {
    match state {
        TaskState::Succeeded => Exit::Ok,
        TaskState::Failed => Exit::Failure,
        TaskState::Halted => Exit::Halted,
        TaskState::Cancelled => Exit::Cancelled,
        // Not an end: `follow` returns only terminal tasks.
        TaskState::Pending | TaskState::Running | TaskState::Cancelling => Exit::Software,
    }
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "table" => Ok(Format::Table),
            "json" => Ok(Format::Json),
            _ => Err(format!("{s:?}: expected table or json")),
        }
    }
}

/// How to print: the format, and whether the stream progress goes to is a terminal.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    pub format: Format,
    /// stdout is a terminal (progress goes there with `table`).
    pub stdout_tty: bool,
    /// stderr is a terminal (progress goes there with `json`, stdout carrying the JSON).
    pub stderr_tty: bool,
}

impl Out {
    pub fn text(&self, s: &str) -> Result<(), CtlError> {
        let mut o = std::io::stdout().lock();
        o.write_all(s.as_bytes())
            .and_then(|_| o.flush())
            .map_err(CtlError::Write)
    }

    pub fn json(&self, v: &Value) -> Result<(), CtlError> {
        let s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
        self.text(&format!("{s}\n"))
    }

    /// JSON as the controller sent it, or the table.
    pub fn either(&self, raw: &Value, table: impl FnOnce() -> String) -> Result<(), CtlError> {
        match self.format {
            Format::Json => self.json(raw),
            Format::Table => self.text(&table()),
        }
    }

    fn progress(&self) -> (watch::Stream, bool) {
        match self.format {
            Format::Table => (watch::Stream::Stdout, self.stdout_tty),
            Format::Json => (watch::Stream::Stderr, self.stderr_tty),
        }
    }
}

/// Every command, with its arguments already parsed.
#[derive(Debug, Clone)]
pub enum Command {
    MachinesLs {
        pool: Option<String>,
        online: Option<bool>,
    },
    MachinesShow {
        id: String,
    },
    MachinesMove {
        id: String,
        pool: String,
    },
    MachinesDecommission {
        id: String,
    },
    PoolsLs,
    PoolsShow {
        id: String,
    },
    ScriptsAdd {
        name: String,
        command_type: String,
        file: PathBuf,
    },
    ScriptsLs,
    ScriptsShow {
        id: String,
    },
    Run {
        args: RunArgs,
        wait: bool,
    },
    PushImage {
        args: PushArgs,
        wait: bool,
    },
    Rebuild {
        request: crate::proto::api::RebuildDesktops,
        wait: bool,
    },
    Stage {
        host: String,
        request: crate::proto::api::StageSoftware,
        wait: bool,
    },
    TasksLs {
        filter: TaskFilter,
        limit: Option<usize>,
    },
    TasksShow {
        id: String,
    },
    TasksWatch {
        id: String,
    },
    TasksCancel {
        id: String,
    },
    TasksRetry {
        id: String,
        wait: bool,
    },
    TasksResume {
        id: String,
        wait: bool,
    },
    TokenCreate {
        request: crate::proto::api::CreateEnrollmentToken,
    },
    TokenLs,
    TokenRm {
        id: String,
    },
}

/// Runs one command; the exit code says how it went (for a waited-for task, how it ended).
pub async fn run(api: &Api, cmd: Command, out: Out) -> Result<Exit, CtlError> {
    match cmd {
        Command::MachinesLs { pool, online } => fleet::machines_ls(api, pool, online, out).await,
        Command::MachinesShow { id } => fleet::machines_show(api, &id, out).await,
        Command::MachinesMove { id, pool } => fleet::machines_move(api, &id, &pool, out).await,
        Command::MachinesDecommission { id } => fleet::decommission(api, &id, out).await,
        Command::PoolsLs => fleet::pools_ls(api, out).await,
        Command::PoolsShow { id } => fleet::pools_show(api, &id, out).await,
        Command::ScriptsAdd {
            name,
            command_type,
            file,
        } => work::scripts_add(api, name, command_type, &file, out).await,
        Command::ScriptsLs => work::scripts_ls(api, out).await,
        Command::ScriptsShow { id } => work::scripts_show(api, &id, out).await,
        Command::Run { args, wait } => {
            let c = api::execute(&args.pool, &args.request());
            tasks::start(api, &c, wait, out).await
        }
        Command::PushImage { args, wait } => {
            let c = api::push_image(&args.pool, &args.request());
            tasks::start(api, &c, wait, out).await
        }
        Command::Rebuild { request, wait } => work::rebuild(api, &request, wait, out).await,
        Command::Stage {
            host,
            request,
            wait,
        } => tasks::start(api, &api::stage(&host, &request), wait, out).await,
        Command::TasksLs { filter, limit } => tasks::tasks_ls(api, &filter, limit, out).await,
        Command::TasksShow { id } => tasks::tasks_show(api, &api::task(&id), out).await,
        Command::TasksWatch { id } => tasks::finish(api, &id, out).await,
        Command::TasksCancel { id } => tasks::tasks_show(api, &api::cancel(&id), out).await,
        Command::TasksRetry { id, wait } => tasks::start(api, &api::retry(&id), wait, out).await,
        Command::TasksResume { id, wait } => tasks::resume(api, &id, wait, out).await,
        Command::TokenCreate { request } => fleet::token_create(api, &request, out).await,
        Command::TokenLs => fleet::token_ls(api, out).await,
        Command::TokenRm { id } => fleet::token_rm(api, &id, out).await,
    }
}
