//! `tunnelbot`: wiring only. Parse the command line, set up logging, load, bind, run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info};
use tunnelbot::store::StoreBackend;
use tunnelbot::{Config, Listeners, cli, descriptors, fdstore, keys, standby};

mod heap;

/// Config errors exit with EX_USAGE, as linkerd and sysexits do.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    version,
    about = "SSH reverse-tunnel broker for JupyterHub on HPC clusters"
)]
struct Args {
    /// TOML config; the embedded defaults when omitted.
    #[arg(long, short, global = true, env = "TUNNELBOT_CONFIG")]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve {
        /// Validate the config and exit.
        #[arg(long)]
        check: bool,
        /// Once ready, write {"ssh": ADDR, "admin": ADDR} here (for supervisors and tests).
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Validate the config and exit (exit code 64 when invalid).
    Check,
    /// Issue a tunnel for one JupyterHub user and server.
    Issue {
        /// JupyterHub user name.
        #[arg(long)]
        user: String,
        /// JupyterHub server name (empty for the default server).
        #[arg(long, default_value = "")]
        server: String,
        /// Lifetime, e.g. 8h or 90m.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Use this OpenSSH public key file instead of a generated key.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// "key" (a key for this tunnel alone) or "certificate" (any valid certificate of the
        /// site's CA for the user publishes it; no key is issued).
        #[arg(long, default_value = "key")]
        auth: tunnelbot::credentials::AuthKind,
        /// Write the generated private key (0600) here, and the known_hosts line beside it.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Print the API answer as JSON (includes the private key).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: Api,
    },
    /// List tunnels.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: Api,
    },
    /// Broker health and live tunnels (user, server, port, since, source, bytes, route).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: Api,
    },
    /// Revoke a tunnel: its job is disconnected and its port freed.
    Revoke {
        /// Tunnel id.
        id: String,
        #[command(flatten)]
        api: Api,
    },
    /// Renew a tunnel: expires TTL from now (default: its lifetime as issued); restarts its lease.
    Renew {
        /// Tunnel id.
        id: String,
        /// New lifetime from now: seconds, or e.g. 8h.
        #[arg(long, value_parser = cli::parse_ttl)]
        ttl: Option<Duration>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: Api,
    },
    /// Scoped admin API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Write a new token file into admin.tokens_dir (0640, readable by GROUP) and print its path.
    Create {
        /// What the token may do: spawner = issue, list, show, renew and revoke tunnels.
        #[arg(long, value_enum)]
        scope: TokenScope,
        /// The group (by name) that may read the token: the hub's.
        #[arg(long)]
        group: String,
        /// The file is spawner-NAME.token; default: the group's name. Replacing one revokes it.
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TokenScope {
    Spawner,
}

#[derive(clap::Args)]
struct Api {
    /// Admin API URL; from the config's admin.listen when omitted.
    #[arg(long, env = "TUNNELBOT_ADMIN_URL")]
    admin_url: Option<String>,
    /// Admin token file; <keys_dir>/admin.token when omitted.
    #[arg(long, env = "TUNNELBOT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            error!("invalid config: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::Serve { check: false, .. } = args.command {
        // Before the runtime exists, so its own descriptors come from the raised limit.
        let available = match descriptors::raise() {
            Ok(limit) => {
                info!(soft = limit.soft, hard = limit.hard, "RLIMIT_NOFILE");
                limit.soft
            }
            Err(e) => {
                error!("cannot read or raise RLIMIT_NOFILE: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = descriptors::check(&config, available) {
            error!("invalid config: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    heap::tune();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.runtime.worker_threads > 0 {
        builder.worker_threads(config.runtime.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tunnelbot: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(args.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Check | Command::Serve { check: true, .. } => {
            println!("config ok");
            Ok(())
        }
        Command::Serve {
            check: false,
            ready_file,
        } => serve(config, ready_file.as_deref()).await,
        Command::Issue {
            user,
            server,
            ttl,
            public_key,
            auth,
            key_file,
            json,
            api,
        } => {
            let client =
                cli::Client::new(&config, api.admin_url.as_deref(), api.token_file.as_deref())?;
            let public_key = match public_key {
                Some(p) => Some(
                    std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ),
                None => None,
            };
            let t = client.issue(&user, &server, ttl, public_key, auth).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?)
            } else {
                cli::print_issued(&t, key_file.as_deref())?
            }
            Ok(())
        }
        Command::List { json, api } => {
            let client =
                cli::Client::new(&config, api.admin_url.as_deref(), api.token_file.as_deref())?;
            let tunnels = client.list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tunnels)?)
            } else {
                cli::print_table(&tunnels)
            }
            Ok(())
        }
        Command::Status { json, api } => {
            let client =
                cli::Client::new(&config, api.admin_url.as_deref(), api.token_file.as_deref())?;
            let ready = client.ready().await?;
            let tunnels = client.list().await?;
            if json {
                let live: Vec<_> = tunnels.iter().filter(|t| t.state == "active").collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"ready": ready, "tunnels": live})
                    )?
                );
            } else {
                cli::print_status(ready, &tunnels);
            }
            Ok(())
        }
        Command::Revoke { id, api } => {
            let client =
                cli::Client::new(&config, api.admin_url.as_deref(), api.token_file.as_deref())?;
            client.revoke(&id).await?;
            println!("revoked {id}");
            Ok(())
        }
        Command::Renew { id, ttl, json, api } => {
            let client =
                cli::Client::new(&config, api.admin_url.as_deref(), api.token_file.as_deref())?;
            let t = client.renew(&id, ttl).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?)
            } else {
                println!("renewed {id} until {}", t.expires_at);
            }
            Ok(())
        }
        Command::Token(TokenCommand::Create {
            scope: TokenScope::Spawner,
            group,
            name,
        }) => cli::create_token(&config, &group, name.as_deref()),
    }
}

async fn serve(config: Config, ready_file: Option<&Path>) -> anyhow::Result<()> {
    // Under systemd, tunnel listeners kept in its descriptor store across the restart.
    let fds = Arc::new(fdstore::FdStore::from_env(
        config.tunnels.bind_address,
        config.tunnels.ports,
    ));
    if config.store.backend == StoreBackend::Redb {
        let listeners = Listeners::bind(&config).await?;
        let ssh = listeners.ssh_addr()?;
        let store = redb(&config)?;
        let broker = tunnelbot::open_with_store(config, ssh, fds, store).await?;
        announce(&listeners, ready_file)?;
        return tunnelbot::run(broker, listeners, tunnelbot::shutdown::signal()).await;
    }
    // One of a pair: nothing is bound until this broker holds the lease.
    let id = config.store.broker_id(config.ssh.listen);
    let mut lease = standby::Lease::new(&config.store, id)?;
    let Some((fence, taken)) =
        standby::acquire(&mut lease, &fds, tunnelbot::shutdown::signal()).await
    else {
        return Ok(());
    };
    let holding =
        standby::Holding::start(lease, fence.clone(), taken, config.store.renew_interval());
    let store = Arc::new(tunnelbot::store::RedisStore::new(&config.store, fence)?);
    let listeners = Listeners::bind(&config).await?;
    let ssh = listeners.ssh_addr()?;
    let broker = tunnelbot::open_with_store(config, ssh, Arc::clone(&fds), store).await?;
    announce(&listeners, ready_file)?;
    let shutdown = tunnelbot::shutdown::signal();
    match standby::serve(broker, listeners, holding, fds, shutdown).await? {
        standby::Ended::Stopped => Ok(()),
        // At once: exiting closes every socket before the lease can lapse.
        standby::Ended::LeaseLost(_) => std::process::exit(standby::EXIT_LEASE_LOST.into()),
    }
}

fn redb(config: &Config) -> anyhow::Result<Arc<dyn tunnelbot::store::Store>> {
    Ok(Arc::new(tunnelbot::store::RedbStore::open(
        &config.state_dir,
    )?))
}

/// Logs the bound addresses and writes the ready file.
fn announce(listeners: &Listeners, ready_file: Option<&Path>) -> anyhow::Result<()> {
    let (ssh, admin) = (listeners.ssh_addr()?, listeners.admin_addr()?);
    info!(%ssh, %admin, "listening");
    if let Some(path) = ready_file {
        let body = serde_json::json!({"ssh": ssh.to_string(), "admin": admin.to_string()});
        keys::write_private_file(path, body.to_string().as_bytes())?;
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,russh=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
