use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kubespan",
    version,
    about = "KubeSpan-compatible WireGuard mesh for Linux hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon: publish this node, discover peers, program WireGuard.
    Run(kubespan::daemon::cli::RunArgs),
    /// Delete this node from the discovery service (stopping the daemon first),
    /// so peers drop it at once instead of after the 30-minute TTL.
    Leave(kubespan::daemon::cli::LeaveArgs),
    /// Show the daemon's resources, as `talosctl get` does (identities,
    /// affiliates, members, kubespanidentities, kubespanpeerspecs,
    /// kubespanpeerstatuses, kubespanendpoints).
    Get(kubespan::api::cli::GetArgs),
    /// One screen that answers "is my mesh healthy".
    Status(kubespan::api::cli::StatusArgs),
    /// Run a discovery service (sidero.discovery.server.Cluster gRPC API).
    DiscoveryService(Box<kubespan::discovery::cli::Args>),
    /// Generate cluster credentials or an example configuration.
    #[command(subcommand)]
    Gen(Gen),
}

#[derive(Subcommand)]
enum Gen {
    /// Print a fresh cluster.id and cluster.secret (base64 of 32 random bytes each).
    Cluster,
    /// Print a commented example config with fresh cluster credentials.
    Config {
        /// Discovery service URL to put in the config.
        #[arg(long)]
        endpoint: Option<String>,
        /// Write to this file (mode 0600, must not exist) instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => kubespan::daemon::cli::run(args),
        Command::Leave(args) => kubespan::daemon::cli::leave(args),
        Command::Get(args) => kubespan::api::cli::get(args),
        Command::Status(args) => kubespan::api::cli::status(args),
        Command::DiscoveryService(args) => kubespan::discovery::cli::run(*args),
        Command::Gen(Gen::Cluster) => kubespan::generate::cluster().map(|s| print!("{s}")),
        Command::Gen(Gen::Config { endpoint, output }) => {
            kubespan::generate::config(endpoint.as_deref()).and_then(|s| match output {
                None => {
                    print!("{s}");
                    Ok(())
                }
                Some(path) => kubespan::generate::write_new_private(&path, &s),
            })
        }
    };
    if let Err(e) = result {
        eprintln!("error: {}", kubespan::util::error_chain(&e));
        std::process::exit(1);
    }
}
