//! `fieldhand-controller`: the controller daemon (`serve`), PKI bootstrap (`pki`) and the
//! end-to-end `quickstart`. Parses arguments, loads config, and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, CommandFactory, Parser, Subcommand};
use fieldhand::config::controller::{ControllerConfig, DEFAULT_PATH};
use fieldhand::exit::Exit;
use fieldhand::pki::Identity;

#[derive(Parser)]
#[command(
    name = "fieldhand-controller",
    version,
    about = "fieldhand controller, PKI bootstrap and quickstart"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the controller daemon.
    Serve {
        /// Controller configuration file.
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Bring the database to this build's schema and exit (also done by `serve` at start,
    /// under a lock, so running it first is optional: it lets an upgrade fail before any
    /// replica restarts).
    Migrate {
        /// Controller configuration file (its `database_url`).
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Write the man page and shell completions to DIR (for packaging).
    #[command(hide = true)]
    Generate {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Create the CA and certificates.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Start a PKI, a controller and local agents, run a gray-batch script execution, and print
    /// the per-machine results.
    Quickstart {
        /// Working directory (PKI, configs, state and logs).
        #[arg(long, default_value = "fieldhand-quickstart")]
        dir: PathBuf,
        /// How many local agents to start.
        #[arg(long, default_value_t = 3)]
        agents: u32,
        /// Stop everything after the result table; exit 0 only if the task succeeded.
        #[arg(long)]
        exit: bool,
    },
    /// Serve the rollout page to a browser on this machine: plain HTTP on a loopback
    /// address, forwarded to the controller with an operator's certificate. Prints the
    /// one-time URL to open.
    Ui {
        /// Loopback address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8480")]
        listen: std::net::SocketAddr,
        /// The controller, https://HOST[:PORT].
        #[arg(long)]
        url: String,
        /// The fleet's CA certificate.
        #[arg(long)]
        ca: PathBuf,
        /// The operator's certificate and key.
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create the payload signing key pair: DIR/signing-key.pem (for the controller's
    /// `signing_key`) and DIR/signing-key.pub (hex, for the agents' `payloads.trusted_keys`).
    SigningKey {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Create the root CA (DIR/ca.pem, DIR/ca-key.pem: keep this key offline), the issuing CA
    /// the controller signs enrollments with (DIR/issuing-ca.pem, DIR/issuing-ca-key.pem),
    /// and the controller's certificate (DIR/controller.pem, DIR/controller-key.pem).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Extra controller name (DNS name or IP address); repeatable.
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Issue a certificate for one agent (machine id) or one operator.
    #[command(group(ArgGroup::new("who").required(true).args(["agent", "operator", "metrics"])))]
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// Machine id of the agent: writes DIR/agents/ID.pem and DIR/agents/ID-key.pem.
        #[arg(long)]
        agent: Option<String>,
        /// Operator name: writes DIR/operators/NAME.pem and DIR/operators/NAME-key.pem.
        #[arg(long)]
        operator: Option<String>,
        /// A scraper that may read GET /metrics and nothing else (Prometheus): writes
        /// DIR/metrics/NAME.pem and DIR/metrics/NAME-key.pem.
        #[arg(long)]
        metrics: Option<String>,
        /// With --agent: the pool the machine joins when the controller first hears of it
        /// (without it, the machine is in no pool until an operator moves it).
        #[arg(long, requires = "agent")]
        pool: Option<String>,
        /// With --operator: also write DIR/operators/NAME.p12 (certificate, key and CA) for a
        /// browser to import; its password is printed once.
        #[arg(long, requires = "operator")]
        p12: bool,
    },
}

fn main() -> ExitCode {
    let cli: Cli = match fieldhand::exit::parse_args() {
        Ok(c) => c,
        Err(code) => return code.into(),
    };
    match cli.cmd {
        Cmd::Serve { config } => serve(config),
        Cmd::Migrate { config } => migrate(config),
        Cmd::Generate { dir } => generate(&dir),
        Cmd::Pki(cmd) => pki(cmd),
        Cmd::Quickstart { dir, agents, exit } => quickstart(dir, agents, exit),
        Cmd::Ui {
            listen,
            url,
            ca,
            cert,
            key,
        } => ui(fieldhand::uiproxy::Options {
            listen,
            url,
            ca,
            cert,
            key,
        }),
    }
}

fn fail(err: impl Into<anyhow::Error>, code: Exit) -> ExitCode {
    let err = err.into();
    fieldhand::daemon::report_fatal("fieldhand-controller", &format!("{err:#}"));
    code.into()
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(e, Exit::Software))
}

fn migrate(config: PathBuf) -> ExitCode {
    let cfg = match ControllerConfig::load(&config) {
        Ok(c) => c,
        Err(e) => return fail(e, Exit::Config),
    };
    fieldhand::daemon::init_logging(&[]);
    match fieldhand::controller::store::migrate_only(&cfg.database) {
        Ok(version) => {
            println!("{}: schema at version {version}", cfg.database);
            Exit::Ok.into()
        }
        Err(e) => fail(e, Exit::IoErr),
    }
}

fn serve(config: PathBuf) -> ExitCode {
    let cfg = match ControllerConfig::load(&config) {
        Ok(c) => c,
        Err(e) => return fail(e, Exit::Config),
    };
    fieldhand::daemon::init_logging(&[]);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(fieldhand::controller::serve(
        cfg,
        fieldhand::daemon::shutdown_signal(),
    )) {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            let code = e.exit();
            fail(e, code)
        }
    }
}

fn pki(cmd: PkiCmd) -> ExitCode {
    let res = match cmd {
        PkiCmd::SigningKey { dir } => fieldhand::pki::signing_key(&dir).map(|(key, public)| {
            println!("wrote {}", key.display());
            println!("wrote {}", public.display());
        }),
        PkiCmd::Init { dir, sans } => fieldhand::pki::init(&dir, &sans).map(|o| {
            for p in [
                o.ca_cert,
                o.ca_key,
                o.issuing_cert,
                o.issuing_key,
                o.cert,
                o.key,
            ] {
                println!("wrote {}", p.display());
            }
        }),
        PkiCmd::Issue {
            dir,
            agent,
            operator,
            metrics,
            pool,
            p12,
        } => {
            let who = match (agent, operator, metrics) {
                (Some(a), _, _) => Identity::agent(a),
                (None, Some(o), _) => Identity::operator(o),
                (None, None, Some(m)) => Identity {
                    role: fieldhand::pki::Role::Metrics,
                    name: m,
                },
                (None, None, None) => {
                    unreachable!("clap requires --agent, --operator or --metrics")
                }
            };
            fieldhand::pki::issue(&dir, &who, pool.as_deref()).and_then(|(cert, key)| {
                println!("wrote {}", cert.display());
                println!("wrote {}", key.display());
                if p12 {
                    let (path, password) = fieldhand::pki::export_p12(&dir, &who.name)?;
                    println!("wrote {}", path.display());
                    println!("PKCS#12 password (shown once, stored nowhere): {password}");
                }
                Ok(())
            })
        }
    };
    match res {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            let code = e.exit();
            fail(e, code)
        }
    }
}

fn ui(opts: fieldhand::uiproxy::Options) -> ExitCode {
    fieldhand::daemon::init_logging(&[]);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(fieldhand::uiproxy::run_until_signal(opts)) {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            let code = e.exit();
            fail(e, code)
        }
    }
}

fn quickstart(dir: PathBuf, agents: u32, exit: bool) -> ExitCode {
    fieldhand::daemon::init_logging(&[]);
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return fail(e, Exit::Software),
    };
    // The agent binary is installed (and built by cargo) next to the controller's.
    let agent_bin = me.with_file_name("fieldhand");
    let dir = if dir.is_absolute() {
        dir
    } else {
        std::env::current_dir().map(|c| c.join(&dir)).unwrap_or(dir)
    };
    let opts = fieldhand::controller::quickstart::Options {
        dir,
        agents,
        exit,
        controller_bin: me,
        agent_bin,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(fieldhand::controller::quickstart::run(
        opts,
        fieldhand::daemon::shutdown_signal(),
    )) {
        Ok(report) if report.task.state == fieldhand::proto::domain::TaskState::Succeeded => {
            Exit::Ok.into()
        }
        Ok(_) => Exit::Failure.into(),
        Err(e) => {
            let code = e.exit();
            fail(e, code)
        }
    }
}

fn generate(dir: &std::path::Path) -> ExitCode {
    fieldhand::manpages::run(Cli::command(), dir).into()
}
