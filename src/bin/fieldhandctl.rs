//! `fieldhandctl`: the operator CLI over the operator API. Parses arguments, resolves the
//! connection settings, builds the HTTPS client, and hands over to `fieldhand::ctl::run`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, CommandFactory, Parser, Subcommand};
use fieldhand::config::ctl::{CtlConfig, Flags};
use fieldhand::ctl::{self, Command, Format, PushArgs, RunArgs, StartTime, TaskFilter};
use fieldhand::exit::Exit;
use fieldhand::proto::api;
use fieldhand::proto::ctl::Amount;
use fieldhand::proto::domain::{LogoffPolicy, PostFinish, PreStart, TaskKind, TaskState};

/// One request's limit; a watch polls with many.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser)]
#[command(
    name = "fieldhandctl",
    version,
    about = "fieldhand operator CLI: machines, pools, scripts and tasks over the operator API",
    long_about = "fieldhand operator CLI: machines, pools, scripts and tasks over the operator API \
        (mutual TLS with an operator certificate from `fieldhand-controller pki issue --operator`).\n\n\
        Connection settings come from the flags, else FIELDHAND_URL, FIELDHAND_CA, FIELDHAND_CERT, \
        FIELDHAND_KEY, else the config file: --config PATH, else $FIELDHAND_CTL_CONFIG, else \
        ~/.config/fieldhand/ctl.toml (keys url, ca, cert, key).",
    after_help = ctl::EXIT_CODES
)]
struct Cli {
    /// The config file (default: $FIELDHAND_CTL_CONFIG, else ~/.config/fieldhand/ctl.toml).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "PATH"
    )]
    config: Option<PathBuf>,
    /// The controller, https://HOST[:PORT] [env FIELDHAND_URL; key url].
    #[arg(long, global = true, help_heading = "Global options")]
    url: Option<String>,
    /// The fleet CA certificate [env FIELDHAND_CA; key ca].
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "PATH"
    )]
    ca: Option<PathBuf>,
    /// The operator certificate [env FIELDHAND_CERT; key cert].
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "PATH"
    )]
    cert: Option<PathBuf>,
    /// The operator key [env FIELDHAND_KEY; key key].
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "PATH"
    )]
    key: Option<PathBuf>,
    /// How to print answers: tables (80 columns) or the controller's JSON.
    #[arg(long, global = true, help_heading = "Global options", default_value = "table", value_parser = one_of(&[Format::Table, Format::Json], |f| match f { Format::Table => "table", Format::Json => "json" }))]
    output: Format,
    #[command(subcommand)]
    cmd: Cmd,
}

/// A flag whose values are the wire texts of one of our enums.
fn one_of<T: Copy + Send + Sync + 'static>(
    all: &'static [T],
    text: fn(&T) -> &'static str,
) -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(all.iter().map(text)).map(move |s| {
        *all.iter()
            .find(|v| text(v) == s)
            .expect("clap accepts only the listed values")
    })
}

#[derive(Subcommand)]
enum Cmd {
    /// Machines: list, show, move to a pool, decommission.
    #[command(subcommand)]
    Machines(MachinesCmd),
    /// Pools: list, show (members and provisioning status).
    #[command(subcommand)]
    Pools(PoolsCmd),
    /// Scripts: add, list, show.
    #[command(subcommand)]
    Scripts(ScriptsCmd),
    /// Run a command or scripts on a pool, in gray batches.
    #[command(after_help = ctl::EXIT_CODES)]
    Run(RunFlags),
    /// Push an image to a pool, now or at a start time.
    #[command(after_help = ctl::EXIT_CODES)]
    PushImage(PushFlags),
    /// Rebuild desktops onto an image (their current one by default).
    #[command(after_help = ctl::EXIT_CODES)]
    Rebuild {
        /// A desktop (machine id); repeatable, 1 to 20.
        #[arg(long = "desktop", required = true, num_args = 1.., value_name = "ID")]
        desktops: Vec<String>,
        /// The image (default: each desktop's current image).
        #[arg(long = "image", value_name = "ID")]
        image: Option<String>,
        /// `replace`: empty the data area.
        #[arg(long, value_parser = ["replace"])]
        operate_type: Option<String>,
        /// en-US, zh-HK, zh-CN or ja-JP.
        #[arg(long)]
        language: Option<String>,
        /// Follow the task to its end and exit by its state.
        #[arg(long)]
        wait: bool,
    },
    /// Stage a host's desired software.
    #[command(after_help = ctl::EXIT_CODES)]
    Stage {
        #[arg(long, value_name = "ID")]
        host: String,
        /// The minimum commit to stage (the newest is staged if newer).
        #[arg(long, value_name = "N")]
        commit: Option<String>,
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<i64>,
        #[arg(long)]
        wait: bool,
    },
    /// Tasks: list, show, watch, cancel, retry, resume.
    #[command(subcommand)]
    Tasks(TasksCmd),
    /// Enrollment tokens: create, list, remove.
    #[command(subcommand)]
    EnrollToken(TokenCmd),
    /// Serve the rollout page on loopback, forwarding to the controller with this
    /// operator's certificate (open the printed URL in any browser).
    Ui {
        /// Loopback address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8480")]
        listen: std::net::SocketAddr,
    },
    /// Write the man page and shell completions to DIR (for packaging).
    #[command(hide = true)]
    Generate {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum MachinesCmd {
    /// List machines.
    Ls {
        #[arg(long)]
        pool: Option<String>,
        #[arg(long, value_name = "true|false")]
        online: Option<bool>,
    },
    /// Show one machine: facts, certificate, images.
    Show { id: String },
    /// Move a machine to another pool.
    Move {
        id: String,
        #[arg(long)]
        pool: String,
    },
    /// Revoke a machine's certificate, cancel its unfinished work, take it out of its pool.
    Decommission { id: String },
}

#[derive(Subcommand)]
enum PoolsCmd {
    /// List pools.
    Ls,
    /// Show a pool: members and provisioning status (seed 001).
    Show { id: String },
}

#[derive(Subcommand)]
enum ScriptsCmd {
    /// Upload a script.
    Add {
        #[arg(long)]
        name: String,
        #[arg(long = "type", value_parser = ["sh", "bash", "python3"])]
        command_type: String,
        #[arg(long, value_name = "PATH")]
        file: PathBuf,
    },
    /// List scripts.
    Ls,
    /// Show a script with its content.
    Show { id: String },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["command", "script_ids"])))]
struct RunFlags {
    #[arg(long)]
    pool: String,
    /// An inline command.
    #[arg(long)]
    command: Option<String>,
    /// The inline command's interpreter (default sh).
    #[arg(long, requires = "command", value_parser = ["sh", "bash", "python3"])]
    command_type: Option<String>,
    /// Scripts to run, in order (from `scripts add`); repeatable.
    #[arg(long = "script-id", num_args = 1.., value_name = "ID")]
    script_ids: Vec<String>,
    /// The gray batch's size: N machines or N% of the pool.
    #[arg(long, value_name = "N|N%")]
    gray_count: Option<Amount>,
    /// Machines of the gray batch; repeatable.
    #[arg(long = "gray-desktop", num_args = 1.., value_name = "ID")]
    gray_desktops: Vec<String>,
    /// Failures in the gray batch that halt the task (default 1).
    #[arg(long, value_name = "N")]
    gray_fail_threshold: Option<u64>,
    /// Machines at work at once: N or N% of the pool.
    #[arg(long, value_name = "N|N%")]
    max_concurrency: Option<Amount>,
    /// Failures after which no more machines start: N or N%.
    #[arg(long, value_name = "N|N%")]
    max_errors: Option<Amount>,
    /// A step before the scripts.
    #[arg(long, value_parser = one_of(PreStart::ALL, |v| v.as_str()))]
    pre_start: Option<PreStart>,
    /// A power step after the scripts.
    #[arg(long, value_parser = one_of(PostFinish::ALL, |v| v.as_str()))]
    post_finish: Option<PostFinish>,
    /// Each script's time limit (default 60).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    /// How users are logged off before a power step.
    #[arg(long, value_parser = one_of(LogoffPolicy::ALL, |v| v.as_str()))]
    logoff_policy: Option<LogoffPolicy>,
    /// Under WAIT_FOR_LOGOFF: how long to wait for sessions to end (default 3600).
    #[arg(long, value_name = "SECONDS")]
    logoff_timeout: Option<u64>,
    /// Follow the task to its end and exit by its state.
    #[arg(long)]
    wait: bool,
}

#[derive(Args)]
struct PushFlags {
    #[arg(long)]
    pool: String,
    #[arg(long = "image", value_name = "ID")]
    image: String,
    /// When to apply: RFC 3339 or epoch milliseconds (default: now).
    #[arg(long, value_name = "TIME")]
    start_time: Option<StartTime>,
    #[arg(long, value_parser = one_of(LogoffPolicy::ALL, |v| v.as_str()))]
    logoff_policy: Option<LogoffPolicy>,
    /// Apply on one machine first and stop if it fails (default true).
    #[arg(long, value_name = "true|false")]
    stop_on_first_error: Option<bool>,
    /// A selective push: only these machines; repeatable.
    #[arg(long = "machine", num_args = 1.., value_name = "ID")]
    machines: Vec<String>,
    #[arg(long, value_name = "N")]
    cpus: Option<i64>,
    #[arg(long, value_name = "N")]
    cores_per_socket: Option<i64>,
    #[arg(long, value_name = "MB")]
    ram_mb: Option<i64>,
    #[arg(long, value_name = "true|false")]
    add_virtual_tpm: Option<bool>,
    /// The limit for staging and for each hook run (default 3600).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<i64>,
    #[arg(long)]
    wait: bool,
}

#[derive(Subcommand)]
enum TasksCmd {
    /// List tasks, newest first.
    Ls {
        #[arg(long)]
        pool: Option<String>,
        #[arg(long, value_parser = one_of(TaskState::ALL, |v| v.as_str()))]
        state: Option<TaskState>,
        #[arg(long, value_parser = one_of(TaskKind::ALL, |v| v.as_str()))]
        kind: Option<TaskKind>,
        /// Only tasks created after this RFC 3339 time.
        #[arg(long, value_name = "TIME")]
        created_after: Option<String>,
        /// At most N tasks.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Show a task: batches and one row per machine.
    Show { id: String },
    /// Follow a task to its end; exits by its state.
    #[command(after_help = ctl::EXIT_CODES)]
    Watch { id: String },
    /// Cancel a task.
    Cancel { id: String },
    /// Start a new task that runs a finished one again.
    #[command(after_help = ctl::EXIT_CODES)]
    Retry {
        id: String,
        #[arg(long)]
        wait: bool,
    },
    /// Resume a halted task (the rest of the pool runs).
    #[command(after_help = ctl::EXIT_CODES)]
    Resume {
        id: String,
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token for a pool; prints the secret once.
    Create {
        #[arg(long)]
        pool: String,
        /// How many machines may enroll with it (default: any number).
        #[arg(long, value_name = "N")]
        uses: Option<i64>,
        /// Lifetime: seconds, or with s, m, h, d (default 1d).
        #[arg(long, value_name = "DURATION", value_parser = ctl::parse_duration)]
        expires_in: Option<u64>,
    },
    /// List tokens (never the secrets).
    Ls,
    /// End a token.
    Rm { id: String },
}

/// The rollout page's loopback forwarder (`uiproxy`), with the settings every command uses.
fn ui(opts: fieldhand::uiproxy::Options) -> ExitCode {
    fieldhand::daemon::init_logging(&[]);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(e, Exit::Software),
    };
    match rt.block_on(fieldhand::uiproxy::run_until_signal(opts)) {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            let code = e.exit();
            fail(e, code)
        }
    }
}

fn command(cmd: Cmd) -> Command {
    match cmd {
        Cmd::Machines(MachinesCmd::Ls { pool, online }) => Command::MachinesLs { pool, online },
        Cmd::Machines(MachinesCmd::Show { id }) => Command::MachinesShow { id },
        Cmd::Machines(MachinesCmd::Move { id, pool }) => Command::MachinesMove { id, pool },
        Cmd::Machines(MachinesCmd::Decommission { id }) => Command::MachinesDecommission { id },
        Cmd::Pools(PoolsCmd::Ls) => Command::PoolsLs,
        Cmd::Pools(PoolsCmd::Show { id }) => Command::PoolsShow { id },
        Cmd::Scripts(ScriptsCmd::Add {
            name,
            command_type,
            file,
        }) => Command::ScriptsAdd {
            name,
            command_type,
            file,
        },
        Cmd::Scripts(ScriptsCmd::Ls) => Command::ScriptsLs,
        Cmd::Scripts(ScriptsCmd::Show { id }) => Command::ScriptsShow { id },
        Cmd::Run(f) => Command::Run {
            wait: f.wait,
            args: RunArgs {
                pool: f.pool,
                command: f.command,
                command_type: f.command_type,
                script_ids: f.script_ids,
                gray_count: f.gray_count,
                gray_desktops: f.gray_desktops,
                gray_fail_threshold: f.gray_fail_threshold,
                max_concurrency: f.max_concurrency,
                max_errors: f.max_errors,
                pre_start: f.pre_start,
                post_finish: f.post_finish,
                timeout_seconds: f.timeout,
                logoff_policy: f.logoff_policy,
                logoff_timeout_seconds: f.logoff_timeout,
            },
        },
        Cmd::PushImage(f) => Command::PushImage {
            wait: f.wait,
            args: PushArgs {
                pool: f.pool,
                image_id: f.image,
                start_time: f.start_time,
                logoff_policy: f.logoff_policy,
                stop_on_first_error: f.stop_on_first_error,
                machine_ids: f.machines,
                cpus: f.cpus,
                cores_per_socket: f.cores_per_socket,
                ram_mb: f.ram_mb,
                add_virtual_tpm: f.add_virtual_tpm,
                timeout_seconds: f.timeout,
            },
        },
        Cmd::Rebuild {
            desktops,
            image,
            operate_type,
            language,
            wait,
        } => Command::Rebuild {
            wait,
            request: api::RebuildDesktops {
                desktop_ids: desktops,
                image_id: image,
                operate_type,
                language,
            },
        },
        Cmd::Stage {
            host,
            commit,
            timeout,
            wait,
        } => Command::Stage {
            host,
            wait,
            request: api::StageSoftware {
                commit,
                timeout_seconds: timeout,
            },
        },
        Cmd::Tasks(TasksCmd::Ls {
            pool,
            state,
            kind,
            created_after,
            limit,
        }) => Command::TasksLs {
            limit,
            filter: TaskFilter {
                pool_id: pool,
                state,
                kind,
                created_after,
            },
        },
        Cmd::Tasks(TasksCmd::Show { id }) => Command::TasksShow { id },
        Cmd::Tasks(TasksCmd::Watch { id }) => Command::TasksWatch { id },
        Cmd::Tasks(TasksCmd::Cancel { id }) => Command::TasksCancel { id },
        Cmd::Tasks(TasksCmd::Retry { id, wait }) => Command::TasksRetry { id, wait },
        Cmd::Tasks(TasksCmd::Resume { id, wait }) => Command::TasksResume { id, wait },
        Cmd::EnrollToken(TokenCmd::Create {
            pool,
            uses,
            expires_in,
        }) => Command::TokenCreate {
            request: api::CreateEnrollmentToken {
                pool_id: pool,
                uses,
                expires_in_seconds: expires_in.map(|s| s.min(i64::MAX as u64) as i64),
            },
        },
        Cmd::EnrollToken(TokenCmd::Ls) => Command::TokenLs,
        Cmd::EnrollToken(TokenCmd::Rm { id }) => Command::TokenRm { id },
        Cmd::Generate { .. } | Cmd::Ui { .. } => unreachable!("handled before connecting"),
    }
}

fn fail(e: impl std::fmt::Display, code: Exit) -> ExitCode {
    eprintln!("fieldhandctl: {e}");
    code.into()
}

fn main() -> ExitCode {
    let cli: Cli = match fieldhand::exit::parse_args() {
        Ok(c) => c,
        Err(code) => return code.into(),
    };
    if let Cmd::Generate { dir } = &cli.cmd {
        return fieldhand::manpages::run(Cli::command(), dir).into();
    }
    let flags = Flags {
        config: cli.config,
        url: cli.url,
        ca: cli.ca,
        cert: cli.cert,
        key: cli.key,
    };
    let cfg = match CtlConfig::resolve(flags, &|k| std::env::var_os(k)) {
        Ok(c) => c,
        Err(e) => return fail(e, Exit::Config),
    };
    if let Cmd::Ui { listen } = cli.cmd {
        return ui(fieldhand::uiproxy::Options {
            listen,
            url: cfg.url,
            ca: cfg.tls.ca,
            cert: cfg.tls.cert,
            key: cfg.tls.key,
        });
    }
    let tls = match fieldhand::tls::client_config(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key) {
        Ok(t) => t,
        Err(e) => return fail(e, Exit::Config),
    };
    let http = match fieldhand::net::client::HttpsClient::new(&cfg.url, tls) {
        Ok(h) => h,
        Err(e) => return fail(e, Exit::Config),
    };
    let api = ctl::Api::new(http, REQUEST_TIMEOUT);
    let out = ctl::Out {
        format: cli.output,
        stdout_tty: std::io::stdout().is_terminal(),
        stderr_tty: std::io::stderr().is_terminal(),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(e, Exit::Software),
    };
    match rt.block_on(ctl::run(&api, command(cli.cmd), out)) {
        Ok(code) => code.into(),
        Err(e) => {
            let code = e.exit();
            fail(e, code)
        }
    }
}
