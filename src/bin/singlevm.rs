//! singlevm: run one function VM and answer JSON requests from stdin
//! (see src/singlevm.rs for the exact contract).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use snapvm::cli::{JailArgs, VmArgs};
use snapvm::launcher::beside_exe;
use snapvm::multivm::config::DEFAULT_VM_OVERHEAD_MIB;
use snapvm::singlevm::{self, Launch, Options};

#[derive(Parser, Debug)]
#[command(
    name = "singlevm",
    version,
    about = "Serve JSON requests from stdin with one microVM"
)]
struct Args {
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    jail: JailArgs,
    /// firerunner binary (default: next to singlevm).
    #[arg(long)]
    firerunner: Option<PathBuf>,
    /// Keep the guest console in this file.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Seconds to wait for the guest agent to connect.
    #[arg(long = "boot_timeout", alias = "boot-timeout", default_value_t = 60.0)]
    boot_timeout: f64,
    /// Seconds a request may run before its VM is killed (default: no limit).
    #[arg(long = "request_timeout", alias = "request-timeout")]
    request_timeout: Option<f64>,
    /// Wait for firerunner to exit instead of for the guest (snapshot runs;
    /// at most --boot_timeout, and with --dump_dir the snapshot must be
    /// written).
    #[arg(long = "force_exit", alias = "force-exit")]
    force_exit: bool,
    /// Give the VM a network: a virtio-net card in a network namespace of
    /// its own, NATed to the outside, unable to reach this host's own
    /// addresses (src/network.rs; as root, jailed). A boot gets the
    /// guest's address on its kernel command line.
    #[arg(long)]
    net: bool,
}

fn seconds(name: &str, v: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("--{name} must be a positive number of seconds, got {v}"))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_micros()
        .init();
    let args = Args::parse();
    let timeouts = seconds("boot_timeout", args.boot_timeout).and_then(|b| {
        let r = args
            .request_timeout
            .map(|r| seconds("request_timeout", r))
            .transpose()?;
        Ok((b, r))
    });
    let (boot_timeout, request_timeout) = match timeouts {
        Ok(t) => t,
        Err(e) => {
            eprintln!("singlevm: error: {e}");
            return ExitCode::from(2);
        }
    };
    // The same check firerunner makes, before anything is spawned.
    if let Err(e) = args.vm.check() {
        eprintln!("singlevm: error: {e}");
        return ExitCode::from(1);
    }
    let mut vm = args.vm;
    if args.net {
        if let Err(e) = snapvm::network::install_host_rules() {
            eprintln!("singlevm: error: {e}");
            return ExitCode::from(1);
        }
        if vm.load_dir.is_none() {
            vm.kernel_args = Some(snapvm::network::with_kernel_arg(vm.kernel_args.as_deref()));
        }
    }
    let opts = Options {
        launch: Launch {
            firerunner: args.firerunner.unwrap_or_else(|| beside_exe("firerunner")),
            vm_args: vm.to_firerunner_args(),
            console: args.console,
            jail: args
                .jail
                .options(beside_exe("jailer"), DEFAULT_VM_OVERHEAD_MIB),
            network: args.net,
        },
        boot_timeout,
        request_timeout,
        force_exit: args.force_exit,
        dump_dir: vm.dump_dir.is_some(),
        dump_ws: vm.dump_ws.is_some(),
    };
    let stdin = std::io::stdin().lock();
    let stdout = std::io::stdout().lock();
    match singlevm::run(&opts, stdin, stdout) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("singlevm: error: {e}");
            ExitCode::from(1)
        }
    }
}
