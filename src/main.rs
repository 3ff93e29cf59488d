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
    /// Run a discovery service (sidero.discovery.server.Cluster gRPC API).
    DiscoveryService(kubespan::discovery::cli::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::DiscoveryService(args) => kubespan::discovery::cli::run(args),
    }
}
