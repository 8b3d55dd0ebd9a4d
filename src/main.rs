//! `serviceradar-agent`: the edge agent, and the tools around it (a gateway
//! speaking the same contract, a dev PKI, a demo, a benchmark).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use serviceradar_agent::config::bootstrap::Bootstrap;
use serviceradar_agent::sources::faker::server as faker_server;
use serviceradar_agent::{bench, check, demo, gateway, pki, tls};

#[derive(Parser)]
#[command(
    name = "serviceradar-agent",
    version,
    about = "Edge discovery agent for ServiceRadar: enrols with an agent-gateway over mTLS, runs the integration sources it is assigned and streams discovered devices back.",
    after_help = "Examples:\n  serviceradar-agent --config /etc/serviceradar/agent.json   run the agent\n  serviceradar-agent demo                                     gateway + agent + 10,000 Faker devices on loopback\n  serviceradar-agent certs --out certs --agent agent-edge-01  dev PKI\n  serviceradar-agent check-config agent.json                  validate a bootstrap file and its certificates\n  serviceradar-agent faker --devices 100000                   a fake Armis API on http://127.0.0.1:8080"
)]
struct Cli {
    /// Bootstrap file (agent.json, the onboarding bundle's format). Runs the agent.
    #[arg(long, short, value_name = "AGENT_JSON")]
    config: Option<PathBuf>,

    /// Log filter (e.g. info, debug, serviceradar_agent=debug). RUST_LOG takes precedence.
    #[arg(long, env = "LOG_LEVEL", global = true)]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Option<Command>,
}

/// Shown after `gateway --help`.
const GATEWAY_HELP: &str = "Administration commands open the database named in the gateway config \
directly; they are safe while the gateway runs (SQLite WAL). A running gateway picks their \
changes up within about 2 seconds and pushes the new config to connected agents.\n\n\
Examples:\n  \
serviceradar-agent gateway --config gateway.json tenant add acme --name \"Acme Corp\"\n  \
serviceradar-agent gateway --config gateway.json onboard-agent --tenant acme --agent edge-7 --partition site-b --out bundle\n  \
serviceradar-agent gateway --config gateway.json agent list --tenant acme\n  \
serviceradar-agent gateway --config gateway.json source add --tenant acme --name \"Acme Faker\" --type faker --agent edge-7 --credential total_devices=2000\n  \
serviceradar-agent gateway --config gateway.json source list";

#[derive(Subcommand)]
enum Command {
    /// Run the agent-gateway (mTLS gRPC server, config per agent, SQLite ingestion),
    /// or administer it (tenants, agents, sources, onboarding bundles).
    #[command(after_help = GATEWAY_HELP)]
    Gateway {
        /// Gateway config file (JSON).
        #[arg(long, short)]
        config: PathBuf,
        /// Administration against the gateway's database instead of running
        /// the gateway.
        #[command(subcommand)]
        admin: Option<gateway::cli::Admin>,
    },
    /// Start a gateway and an agent on loopback mTLS and sync Faker devices.
    Demo(demo::DemoArgs),
    /// Create a development PKI: CA, gateway server certificate, agent client certificates.
    Certs(CertsArgs),
    /// Validate a bootstrap file and the certificates it names.
    CheckConfig {
        /// The bootstrap file (agent.json).
        file: PathBuf,
    },
    /// Benchmark the agent pipeline against a validate-only loopback gateway.
    Bench(bench::BenchArgs),
    /// Benchmark device identity reconciliation (DIRE) on SQLite.
    BenchDire(bench::dire::DireBenchArgs),
    /// Serve the Armis API from the deterministic Faker generator.
    Faker(faker_server::FakerArgs),
    /// Internal: the agent side of one benchmark run (spawned by `bench`).
    #[command(hide = true)]
    BenchAgent(bench::BenchAgentArgs),
}

#[derive(Args)]
struct CertsArgs {
    /// Output directory (an existing CA there is reused).
    #[arg(long, default_value = "certs")]
    out: PathBuf,
    /// Agent client certificate to issue, as ID or ID:PARTITION (repeatable).
    #[arg(long = "agent", value_name = "ID[:PARTITION]")]
    agents: Vec<String>,
    /// DNS name or IP for the gateway server certificate (repeatable; default localhost and 127.0.0.1).
    #[arg(long = "gateway-name")]
    gateway_names: Vec<String>,
}

fn init_logging(cli_level: Option<&str>, config_level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| cli_level.map(str::to_owned))
        .or_else(|| config_level.map(str::to_owned))
        .unwrap_or_else(|| "info".to_owned());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    tls::install_crypto_provider();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Fault injection for tests of the real binary: `FAILPOINTS` holds
/// `name=action` pairs separated by `;` (actions as in the `fail` crate,
/// e.g. `uploader-start=return`). Unset, nothing is injected.
fn configure_failpoints() -> anyhow::Result<()> {
    let Ok(spec) = std::env::var("FAILPOINTS") else {
        return Ok(());
    };
    for pair in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, action) = pair
            .split_once('=')
            .with_context(|| format!("FAILPOINTS: {pair:?} is not name=action"))?;
        fail::cfg(name.trim(), action.trim())
            .map_err(|e| anyhow::anyhow!("FAILPOINTS: {pair:?}: {e}"))?;
        eprintln!("warning: failpoint {name} set to {action} (FAILPOINTS)");
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let level = cli.log_level.as_deref();
    match cli.command {
        None => {
            let Some(path) = cli.config else {
                anyhow::bail!("nothing to do: pass --config <agent.json> to run the agent, or a subcommand (see --help)");
            };
            serviceradar_agent::agent::pin_malloc_mmap_threshold();
            configure_failpoints()?;
            let bootstrap = Bootstrap::load(&path)?;
            init_logging(level, bootstrap.log_level.as_deref());
            serviceradar_agent::agent::run(bootstrap)
        }
        Some(Command::Gateway { config, admin }) => {
            init_logging(level, None);
            let runtime = tokio::runtime::Runtime::new().context("starting the gateway runtime")?;
            match admin {
                None => runtime.block_on(gateway::run_from_file(&config))?,
                Some(admin) => runtime.block_on(gateway::cli::admin(&config, admin))?,
            }
            Ok(0)
        }
        Some(Command::Demo(args)) => {
            init_logging(Some(level.unwrap_or("warn")), None);
            demo::run(args)
        }
        Some(Command::Certs(args)) => {
            init_logging(level, None);
            certs(args)
        }
        Some(Command::CheckConfig { file }) => {
            let findings = check::check_bootstrap(&file);
            for f in &findings {
                println!("{f}");
            }
            Ok(if findings.iter().any(check::Finding::is_error) {
                1
            } else {
                0
            })
        }
        Some(Command::Bench(args)) => {
            init_logging(Some(level.unwrap_or("warn")), None);
            bench::run(args)
        }
        Some(Command::BenchDire(args)) => {
            init_logging(Some(level.unwrap_or("warn")), None);
            bench::dire::run(args)
        }
        Some(Command::Faker(args)) => {
            init_logging(level, None);
            faker_server::run_from_cli(args)?;
            Ok(0)
        }
        Some(Command::BenchAgent(args)) => {
            serviceradar_agent::agent::pin_malloc_mmap_threshold();
            init_logging(Some(level.unwrap_or("warn")), None);
            bench::run_agent(args)
        }
    }
}

fn certs(args: CertsArgs) -> anyhow::Result<i32> {
    let names = if args.gateway_names.is_empty() {
        vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
    } else {
        args.gateway_names
    };
    let agents: Vec<(String, String)> = args
        .agents
        .iter()
        .map(|a| match a.split_once(':') {
            Some((id, partition)) => (id.to_owned(), partition.to_owned()),
            None => (a.clone(), "default".to_owned()),
        })
        .collect();
    let layout = pki::create_dev_pki(&args.out, &names, &agents)?;
    println!("CA:       {}", layout.ca_cert().display());
    let gw = layout.gateway();
    println!(
        "gateway:  {} / {} ({})",
        gw.cert_file.display(),
        gw.key_file.display(),
        names.join(", ")
    );
    for (id, partition) in &agents {
        let files = layout.agent(id);
        println!(
            "agent:    {} / {} (CN {id}.{partition}.serviceradar)",
            files.cert_file.display(),
            files.key_file.display()
        );
    }
    Ok(0)
}
