//! multivm: serve function invocations over HTTP from many microVMs within
//! a memory budget (see src/multivm/ for the config, API and scheduler).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use snapvm::cli::JailArgs;
use snapvm::launcher::beside_exe;
use snapvm::multivm::{self, Options};

#[derive(Parser, Debug)]
#[command(
    name = "multivm",
    version,
    about = "Serve functions over HTTP from many microVMs within a memory budget"
)]
struct Args {
    /// YAML config: the functions and their VMs (see resources/multivm/).
    #[arg(long)]
    config: PathBuf,
    /// Memory budget in MiB for all VMs together (guest memory plus the
    /// per-VM overhead of the config's `vm_overhead`).
    #[arg(long)]
    mem: u64,
    /// Where to serve HTTP: [ADDR:]PORT; a bare port is loopback only.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Seconds requests in progress may run on after SIGTERM/SIGINT.
    #[arg(
        long = "drain_timeout",
        alias = "drain-timeout",
        default_value_t = 30.0
    )]
    drain_timeout: f64,
    /// Directory with `basic-auth-user` and `basic-auth-password` (as
    /// OpenFaaS has them): the provider API under /system/ then requires
    /// HTTP basic authentication with them.
    #[arg(long = "basic_auth_dir", alias = "basic-auth-dir")]
    basic_auth_dir: Option<PathBuf>,
    /// Run every firerunner with --no_seccomp: without its per-thread
    /// seccomp filters (for debugging only).
    #[arg(long = "no_seccomp", alias = "no-seccomp")]
    no_seccomp: bool,
    /// This multivm is a node of a cluster whose balancer sends its 503s to
    /// another node (scripts/cluster.sh): a function's own 503 is then
    /// answered as 500 with `X-Function-Status: 503`, so that a 503 always
    /// means "refused before the function saw it".
    #[arg(long)]
    cluster: bool,
    #[command(flatten)]
    jail: JailArgs,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_micros()
        .init();
    let args = Args::parse();
    let Ok(drain_timeout) = Duration::try_from_secs_f64(args.drain_timeout) else {
        eprintln!("multivm: error: --drain_timeout must be a number of seconds");
        return ExitCode::from(2);
    };
    let opts = Options {
        config: args.config,
        mem_mib: args.mem,
        listen: args.listen,
        drain_timeout,
        default_firerunner: beside_exe("firerunner"),
        basic_auth_dir: args.basic_auth_dir,
        no_seccomp: args.no_seccomp,
        jail: args.jail,
        cluster: args.cluster,
    };
    match multivm::run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("multivm: error: {e}");
            ExitCode::from(1)
        }
    }
}
