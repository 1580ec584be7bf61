//! firerunner: runs one microVM (see the README for flags and exit codes).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use snapvm::vmm::builder::{self, VmConfig, DEFAULT_KERNEL_ARGS};

/// Exit code for a configuration or start-up error.
const EXIT_CONFIG: u8 = 1;

#[derive(Parser, Debug)]
#[command(name = "firerunner", version, about = "Run one snapvm microVM")]
struct Args {
    /// Guest kernel: ELF vmlinux or bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Kernel command line (device announcements are appended).
    #[arg(long = "kernel_args", alias = "kernel-args")]
    kernel_args: Option<String>,
    /// Language runtime root disk, served read-only as /dev/vda.
    #[arg(long)]
    rootfs: PathBuf,
    /// Function disk, served read-only as /dev/vdb (empty disk if absent).
    #[arg(long)]
    appfs: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long = "mem_size", alias = "mem-size", default_value_t = 128)]
    mem_size: u64,
    /// Number of vCPUs.
    #[arg(long = "vcpu_count", alias = "vcpu-count", default_value_t = 1)]
    vcpu_count: u64,
    /// Write the guest console here instead of stdout.
    #[arg(long)]
    console: Option<PathBuf>,
    /// VM id, also the guest's vsock CID.
    #[arg(long, default_value_t = 100)]
    id: u64,
    /// Restore from a snapshot directory (BASE or BASE,DIFF).
    #[arg(long = "load_dir", alias = "load-dir")]
    load_dir: Option<String>,
    /// Diff snapshot layers to stack on --load_dir.
    #[arg(long = "diff_dirs", alias = "diff-dirs")]
    diff_dirs: Option<String>,
    /// Write a snapshot here at the guest's snapshot point, then exit.
    #[arg(long = "dump_dir", alias = "dump-dir")]
    dump_dir: Option<PathBuf>,
    /// Record the working set of the first request.
    #[arg(long = "dump_ws", alias = "dump-ws", num_args = 0..=1, default_missing_value = "")]
    dump_ws: Option<String>,
    /// Load the recorded working set eagerly at restore.
    #[arg(long = "load_ws", alias = "load-ws")]
    load_ws: bool,
    /// Copy the base snapshot's memory eagerly instead of mapping it.
    #[arg(long = "copy_base", alias = "copy-base")]
    copy_base: bool,
    /// Copy the diff snapshot's memory eagerly instead of mapping it.
    #[arg(long = "copy_diff", alias = "copy-diff")]
    copy_diff: bool,
    /// Accepted for SnapFaaS compatibility: firerunner always exits after
    /// writing a snapshot.
    #[arg(long = "force_exit", alias = "force-exit")]
    force_exit: bool,
}

impl Args {
    /// Flags whose feature has not landed yet: refuse rather than ignore.
    fn unsupported(&self) -> Option<&'static str> {
        [
            (self.load_dir.is_some(), "--load_dir"),
            (self.diff_dirs.is_some(), "--diff_dirs"),
            (self.dump_dir.is_some(), "--dump_dir"),
            (self.dump_ws.is_some(), "--dump_ws"),
            (self.load_ws, "--load_ws"),
            (self.copy_base, "--copy_base"),
            (self.copy_diff, "--copy_diff"),
        ]
        .into_iter()
        .find_map(|(set, name)| set.then_some(name))
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_micros()
        .init();
    let args = Args::parse();
    if let Some(flag) = args.unsupported() {
        eprintln!("firerunner: error: {flag} is not supported yet");
        return ExitCode::from(EXIT_CONFIG);
    }
    let config = VmConfig {
        kernel: args.kernel,
        kernel_args: args
            .kernel_args
            .unwrap_or_else(|| DEFAULT_KERNEL_ARGS.to_string()),
        rootfs: args.rootfs,
        appfs: args.appfs,
        mem_mib: args.mem_size,
        vcpus: args.vcpu_count,
        console: args.console,
    };
    match builder::run(&config, start) {
        Ok(exit) => {
            let code = exit.code();
            match &exit {
                snapvm::vmm::VmExit::Fatal(msg) => log::error!("VM failed: {msg}"),
                snapvm::vmm::VmExit::TripleFault(cpu) => {
                    log::error!("guest triple fault on vCPU {cpu}")
                }
                snapvm::vmm::VmExit::AppFailed => {
                    log::error!("the guest reported that the app failed to load")
                }
                other => log::info!("VM stopped: {other:?}"),
            }
            // Exit at once: vCPU threads may still be inside KVM_RUN.
            std::process::exit(code)
        }
        Err(e) => {
            eprintln!("firerunner: error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}
