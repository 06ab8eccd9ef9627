//! `fieldhand`: the agent daemon (`fieldhand agent`) and the local CLI (`fieldhand status`).
//! Parses arguments, loads config, and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use fieldhand::config::agent::{AgentConfig, DEFAULT_PATH, DEFAULT_SOCKET_PATH};
use fieldhand::exit::Exit;

#[derive(Parser)]
#[command(
    name = "fieldhand",
    version,
    about = "fieldhand fleet agent and local CLI"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent daemon.
    Agent {
        /// Agent configuration file.
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Prepare a golden image: remove this machine's certificate, key, instance id, state and
    /// outbox, so every clone enrolls as itself on first boot. Refuses while the agent runs;
    /// stops nothing by itself.
    Seal {
        /// Agent configuration file.
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Write the man page and shell completions to DIR (for packaging).
    #[command(hide = true)]
    Generate {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Show what the local agent is doing (works while the controller is down).
    Status {
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
        /// Print the agent's counters in the Prometheus text format instead.
        #[arg(long, conflicts_with = "json")]
        metrics: bool,
        /// Read the socket path from this agent config.
        #[arg(long, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The agent's status socket.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli: Cli = match fieldhand::exit::parse_args() {
        Ok(c) => c,
        Err(code) => return code.into(),
    };
    match cli.cmd {
        Cmd::Agent { config } => agent(config),
        Cmd::Seal { config } => seal(config),
        Cmd::Generate { dir } => generate(&dir),
        Cmd::Status {
            json,
            metrics,
            config,
            socket,
        } => status(json, metrics, config, socket),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("fieldhand: cannot start the runtime: {e}");
            Exit::Software.into()
        })
}

fn agent(config: PathBuf) -> ExitCode {
    let cfg = match AgentConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fieldhand: {e}");
            return Exit::Config.into();
        }
    };
    // The machine id tags every journald record; a bad certificate is reported by `run`.
    let fields: Vec<(&str, String)> = fieldhand::tls::identity_of_file(&cfg.tls.cert)
        .map(|id| id.name)
        .ok()
        .or_else(|| cfg.machine_id.clone())
        .map(|id| vec![("machine_id", id)])
        .unwrap_or_default();
    fieldhand::daemon::init_logging(&fields);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(fieldhand::agent::run(
        cfg,
        fieldhand::daemon::shutdown_signal(),
    )) {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            let err = anyhow::Error::new(e);
            fieldhand::daemon::report_fatal("fieldhand", &format!("{err:#}"));
            err.downcast_ref::<fieldhand::agent::AgentError>()
                .map_or(Exit::Software, |e| e.exit())
                .into()
        }
    }
}

fn seal(config: PathBuf) -> ExitCode {
    let cfg = match AgentConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fieldhand: {e}");
            return Exit::Config.into();
        }
    };
    match fieldhand::agent::seal(&cfg) {
        Ok(removed) => {
            for p in &removed {
                println!("removed {}", p.display());
            }
            println!(
                "sealed: this image carries no fieldhand identity; each clone enrolls as itself \
                 on first boot (with the enrollment token in the config)"
            );
            Exit::Ok.into()
        }
        Err(e) => {
            eprintln!("fieldhand: {e}");
            e.exit().into()
        }
    }
}

fn status(json: bool, metrics: bool, config: Option<PathBuf>, socket: Option<PathBuf>) -> ExitCode {
    let socket = match (socket, config) {
        (Some(s), _) => s,
        (None, Some(c)) => match AgentConfig::load(&c) {
            Ok(cfg) => cfg.socket_path,
            Err(e) => {
                eprintln!("fieldhand: {e}");
                return Exit::Config.into();
            }
        },
        (None, None) => PathBuf::from(DEFAULT_SOCKET_PATH),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    if metrics {
        return match rt.block_on(fieldhand::agent::status::query_metrics(
            &socket,
            Duration::from_secs(5),
        )) {
            Ok(text) => {
                print!("{text}");
                Exit::Ok.into()
            }
            Err(e) => {
                eprintln!("fieldhand: {e}");
                Exit::Unavailable.into()
            }
        };
    }
    match rt.block_on(fieldhand::agent::status::query(
        &socket,
        Duration::from_secs(5),
    )) {
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("fieldhand: {e}");
                        return Exit::Software.into();
                    }
                }
            } else {
                print!("{}", fieldhand::agent::status::render(&report));
            }
            Exit::Ok.into()
        }
        Err(e) => {
            eprintln!("fieldhand: {e}");
            Exit::Unavailable.into()
        }
    }
}

fn generate(dir: &std::path::Path) -> ExitCode {
    fieldhand::manpages::run(Cli::command(), dir).into()
}
