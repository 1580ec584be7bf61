//! The VM flags shared by firerunner and the controllers (SnapFaaS names,
//! each also in kebab case), and how a controller passes them on.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser};

use crate::control::RestoreRequest;
use crate::jail::{JailOptions, DEFAULT_JAIL_DIR, DEFAULT_UID_BASE, DEFAULT_UID_COUNT};
use crate::vmm::config::{
    BootConfig, Copies, NetConfig, RestoreConfig, RestoreMemory, Start, TapSource, VmConfig,
    DEFAULT_KERNEL_ARGS,
};
use crate::vmm::devices::virtio::net::NetError;
use crate::vmm::MAX_VCPUS;

/// The guest CID (`--id`) when none is given.
pub const DEFAULT_CID: u64 = 100;

/// VM flags that make no sense together: refused, never ignored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    #[error("--vcpu_count must be between 1 and {MAX_VCPUS}, got {0}")]
    VcpuCount(u64),
    #[error("--diff_dirs needs --load_dir (the base snapshot)")]
    DiffWithoutBase,
    #[error("--load_dir/--diff_dirs: empty snapshot directory in the list")]
    EmptyLayer,
    #[error("--copy_base needs --load_dir")]
    CopyBaseWithoutRestore,
    #[error("--copy_diff needs a diff layer (--diff_dirs, or --load_dir BASE,DIFF)")]
    CopyDiffWithoutDiff,
    #[error("--dump_ws and --load_ws need --load_dir (a snapshot to restore)")]
    WsWithoutRestore,
    #[error("--dump_ws and --load_ws cannot be combined: record the working set, then load it")]
    DumpAndLoadWs,
    #[error(
        "--dump_ws cannot be combined with --copy_base/--copy_diff: it records the pages the \
         request faults in, and copied pages never fault"
    )]
    DumpWsWithCopies,
    #[error(
        "--load_ws with --copy_base needs --copy_diff too: a copied base page would hide the \
         diff layer's version of it"
    )]
    LoadWsCopyBaseOnly,
    #[error("--dump_ws cannot be combined with --dump_dir")]
    DumpWsWithDumpDir,
    #[error(
        "--cpu_template cannot be used with --load_dir: a snapshot keeps the CPUID it was taken with"
    )]
    TemplateAtRestore,
    #[error("a shell restores a snapshot: `restore` needs at least one layer")]
    ShellWithoutLayers,
    #[error(
        "snapshot layer {0:?}: a layer path cannot hold a comma (layer lists are comma lists)"
    )]
    CommaInLayer(String),
    #[error("--network {0:?}: expected TAP/MAC (SnapFaaS), e.g. tap0/06:00:ac:10:00:02")]
    Network(String),
    #[error("{0}")]
    Mac(String),
    #[error("--mac needs --tap or --tap_fd")]
    MacWithoutTap,
}

#[derive(Args, Clone, Debug)]
pub struct VmArgs {
    /// Guest kernel: ELF vmlinux or bzImage. Required (as in SnapFaaS) but
    /// not read with --load_dir: the snapshot holds the booted kernel.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Kernel command line (device announcements are appended).
    #[arg(long = "kernel_args", alias = "kernel-args")]
    pub kernel_args: Option<String>,
    /// Language runtime root disk, served read-only as /dev/vda.
    #[arg(long)]
    pub rootfs: PathBuf,
    /// Function disk, served read-only as /dev/vdb (an empty disk if absent).
    #[arg(long)]
    pub appfs: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long = "mem_size", alias = "mem-size", default_value_t = 128)]
    pub mem_size: u64,
    /// Number of vCPUs.
    #[arg(long = "vcpu_count", alias = "vcpu-count", default_value_t = 1)]
    pub vcpu_count: u64,
    /// VM id, also the guest's vsock CID.
    #[arg(long, default_value_t = DEFAULT_CID)]
    pub id: u64,
    /// Restore from a snapshot instead of booting: BASE, or BASE,DIFF[,DIFF]
    /// (layers bottom first). --mem_size, --vcpu_count and --rootfs must
    /// match the snapshot's; --appfs and --id may differ; --kernel and
    /// --kernel_args are not used.
    #[arg(long = "load_dir", alias = "load-dir")]
    pub load_dir: Option<String>,
    /// Diff snapshot layers to stack on --load_dir (comma list, bottom first).
    #[arg(long = "diff_dirs", alias = "diff-dirs")]
    pub diff_dirs: Option<String>,
    /// Write a snapshot to this directory at the guest's snapshot point
    /// (control port 124), then exit 0: a full snapshot of a booted VM, a
    /// diff layer (only the pages written since the restore) of a restored
    /// one. Missing parent directories are created; an existing snapshot
    /// there is replaced atomically.
    #[arg(long = "dump_dir", alias = "dump-dir")]
    pub dump_dir: Option<PathBuf>,
    /// Where the controller's `snapshot` commands write (DIR/NAME, a new
    /// directory each): snapshots taken on demand, wherever the vCPUs
    /// are. A restored VM then runs with dirty logging, so that its
    /// snapshot is a diff over its own layers. Needs a controller.
    #[arg(long = "snapshot_dir", alias = "snapshot-dir")]
    pub snapshot_dir: Option<PathBuf>,
    /// With --load_dir: record the guest pages touched from the restore
    /// until the controller says the first request is done, in first-touch
    /// order, and write them as `ws` + `ws.json` into DIR (default: the top
    /// snapshot layer). Needs a controller (singlevm, multivm).
    #[arg(long = "dump_ws", alias = "dump-ws", num_args = 0..=1, default_missing_value = "")]
    pub dump_ws: Option<String>,
    /// With --load_dir: load the working set recorded in the top layer
    /// eagerly at restore and serve every other page on first touch (with
    /// --copy_diff/--copy_base, those layers are copied in first).
    #[arg(long = "load_ws", alias = "load-ws")]
    pub load_ws: bool,
    /// With --load_dir: copy the base snapshot's memory into the VM up
    /// front instead of mapping it lazily (page by page on first touch).
    #[arg(long = "copy_base", alias = "copy-base")]
    pub copy_base: bool,
    /// Copy the diff layers' memory up front instead of mapping it lazily.
    #[arg(long = "copy_diff", alias = "copy-diff")]
    pub copy_diff: bool,
    /// CPU template (JSON): CPUID bits to set/clear and MSR overrides for
    /// every vCPU; see src/vmm/x86_64/cpu_template.rs.
    #[arg(long = "cpu_template", alias = "cpu-template")]
    pub cpu_template: Option<PathBuf>,
    /// Run firerunner without its per-thread seccomp filters (for
    /// debugging only). With them, a thread that makes a system call
    /// outside its allow-list ends firerunner with exit code 148 and one
    /// line on stderr naming the call and the thread.
    #[arg(long = "no_seccomp", alias = "no-seccomp")]
    pub no_seccomp: bool,
}

impl VmArgs {
    /// The snapshot layers to restore, bottom first: --load_dir's comma
    /// list, then --diff_dirs'. Empty to boot.
    pub fn layers(&self) -> Vec<PathBuf> {
        [&self.load_dir, &self.diff_dirs]
            .into_iter()
            .flatten()
            .flat_map(|list| list.split(','))
            .map(PathBuf::from)
            .collect()
    }

    /// Refuses flags that make no sense together, with the message to
    /// print: refused, never ignored. The one check of firerunner,
    /// singlevm and multivm (the same as [`VmArgs::vm_config`]'s).
    pub fn check(&self) -> Result<(), FlagError> {
        self.vm_config(None, None).map(drop)
    }

    /// The VM these flags describe, or why they describe none.
    pub fn vm_config(
        &self,
        console: Option<PathBuf>,
        vsock_uds: Option<PathBuf>,
    ) -> Result<VmConfig, FlagError> {
        let layers = self.layers();
        if self.vcpu_count == 0 || self.vcpu_count > u64::from(MAX_VCPUS) {
            return Err(FlagError::VcpuCount(self.vcpu_count));
        }
        if self.diff_dirs.is_some() && self.load_dir.is_none() {
            return Err(FlagError::DiffWithoutBase);
        }
        if layers.iter().any(|l| l.as_os_str().is_empty()) {
            return Err(FlagError::EmptyLayer);
        }
        if self.copy_base && layers.is_empty() {
            return Err(FlagError::CopyBaseWithoutRestore);
        }
        if self.copy_diff && layers.len() < 2 {
            return Err(FlagError::CopyDiffWithoutDiff);
        }
        if (self.dump_ws.is_some() || self.load_ws) && layers.is_empty() {
            return Err(FlagError::WsWithoutRestore);
        }
        if self.dump_ws.is_some() && self.load_ws {
            return Err(FlagError::DumpAndLoadWs);
        }
        if self.dump_ws.is_some() && (self.copy_base || self.copy_diff) {
            return Err(FlagError::DumpWsWithCopies);
        }
        if self.load_ws && self.copy_base && layers.len() > 1 && !self.copy_diff {
            return Err(FlagError::LoadWsCopyBaseOnly);
        }
        if self.dump_ws.is_some() && self.dump_dir.is_some() {
            return Err(FlagError::DumpWsWithDumpDir);
        }
        if self.cpu_template.is_some() && !layers.is_empty() {
            return Err(FlagError::TemplateAtRestore);
        }
        let start = if layers.is_empty() {
            Start::Boot(BootConfig {
                kernel: self.kernel.clone(),
                kernel_args: self
                    .kernel_args
                    .clone()
                    .unwrap_or_else(|| DEFAULT_KERNEL_ARGS.to_string()),
                cpu_template: self.cpu_template.clone(),
            })
        } else {
            let copies = Copies {
                base: self.copy_base,
                diffs: self.copy_diff,
            };
            let memory = match &self.dump_ws {
                Some(dir) => RestoreMemory::RecordWorkingSet {
                    into: match dir.as_str() {
                        "" => layers.last().cloned().unwrap_or_default(),
                        dir => PathBuf::from(dir),
                    },
                },
                None if self.load_ws => RestoreMemory::LoadWorkingSet(copies),
                None => RestoreMemory::Layers(copies),
            };
            Start::Restore(RestoreConfig { layers, memory })
        };
        Ok(VmConfig {
            rootfs: self.rootfs.clone(),
            appfs: self.appfs.clone(),
            mem_mib: self.mem_size,
            // Checked above: 1..=MAX_VCPUS.
            vcpus: self.vcpu_count as u8,
            cid: self.id,
            console,
            vsock_uds,
            dump_dir: self.dump_dir.clone(),
            snapshot_dir: self.snapshot_dir.clone(),
            net: None,
            start,
        })
    }

    /// The same flags as firerunner arguments.
    pub fn to_firerunner_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: OsString| {
            a.push(format!("--{name}").into());
            a.push(value);
        };
        flag("kernel", self.kernel.clone().into());
        if let Some(k) = &self.kernel_args {
            flag("kernel_args", k.into());
        }
        flag("rootfs", self.rootfs.clone().into());
        if let Some(t) = &self.cpu_template {
            flag("cpu_template", t.clone().into());
        }
        if let Some(p) = &self.appfs {
            flag("appfs", p.clone().into());
        }
        flag("mem_size", self.mem_size.to_string().into());
        flag("vcpu_count", self.vcpu_count.to_string().into());
        flag("id", self.id.to_string().into());
        if let Some(d) = &self.load_dir {
            flag("load_dir", d.into());
        }
        if let Some(d) = &self.diff_dirs {
            flag("diff_dirs", d.into());
        }
        if let Some(d) = &self.dump_dir {
            flag("dump_dir", d.clone().into());
        }
        if let Some(d) = &self.dump_ws {
            flag("dump_ws", d.into());
        }
        if let Some(d) = &self.snapshot_dir {
            flag("snapshot_dir", d.clone().into());
        }
        for (set, name) in [
            (self.load_ws, "--load_ws"),
            (self.copy_base, "--copy_base"),
            (self.copy_diff, "--copy_diff"),
            (self.no_seccomp, "--no_seccomp"),
        ] {
            if set {
                a.push(name.into());
            }
        }
        a
    }
}

/// firerunner's whole command line: the VM flags and what a controller
/// adds. The jailer parses it too, to translate its paths into the jail.
#[derive(Parser, Clone, Debug)]
#[command(name = "firerunner", version, about = "Run one snapvm microVM")]
pub struct FirerunnerArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Write the guest console here instead of stdout.
    #[arg(long)]
    pub console: Option<PathBuf>,
    /// Base path of the vsock Unix sockets: guest connections to host port P
    /// reach `<PATH>_P`; host programs reach guest ports through `<PATH>`.
    #[arg(long = "vsock_uds", alias = "vsock-uds")]
    pub vsock_uds: Option<PathBuf>,
    /// Inherited socket of the control channel to a controller (see
    /// src/control.rs); set by singlevm and multivm.
    #[arg(long = "control_fd", alias = "control-fd")]
    pub control_fd: Option<i32>,
    /// Give the VM a virtio-net card (its fourth device) on this TAP
    /// interface, which must exist (`ip tuntap add NAME mode tap
    /// vnet_hdr`). A snapshot of such a VM restores only with --tap.
    #[arg(long, conflicts_with_all = ["network", "tap_fd"])]
    pub tap: Option<String>,
    /// Like --tap, on an inherited descriptor of a TAP opened (with
    /// IFF_TAP|IFF_NO_PI|IFF_VNET_HDR) by the controller, which may be an
    /// interface of another network namespace: how a jailed VM gets its
    /// network card.
    #[arg(long = "tap_fd", alias = "tap-fd", conflicts_with = "network")]
    pub tap_fd: Option<i32>,
    /// The guest's MAC address with --tap or --tap_fd (default
    /// 06:00:ac:10:00:02 at boot, the snapshot's at restore).
    #[arg(long, conflicts_with = "network")]
    pub mac: Option<String>,
    /// SnapFaaS's spelling of --tap TAP --mac MAC.
    #[arg(long)]
    pub network: Option<String>,
    /// Accepted for SnapFaaS compatibility: firerunner always exits after
    /// writing a snapshot.
    #[arg(long = "force_exit", alias = "force-exit")]
    pub force_exit: bool,
}

impl FirerunnerArgs {
    /// The VM these flags describe (see [`VmArgs::vm_config`]), with its
    /// network card.
    pub fn vm_config(&self) -> Result<VmConfig, FlagError> {
        let mut config = self
            .vm
            .vm_config(self.console.clone(), self.vsock_uds.clone())?;
        config.net = self.net_config()?;
        Ok(config)
    }

    /// The network card of `--tap [--mac]` or `--network TAP/MAC`.
    fn net_config(&self) -> Result<Option<NetConfig>, FlagError> {
        let (tap, mac) = match (&self.tap, self.tap_fd, &self.network) {
            (Some(tap), _, _) => (TapSource::Name(tap.clone()), self.mac.as_deref()),
            (None, Some(fd), _) => (TapSource::Fd(fd), self.mac.as_deref()),
            (None, None, Some(n)) => match n.split_once('/') {
                Some((tap, mac)) if !tap.is_empty() => (TapSource::Name(tap.to_owned()), Some(mac)),
                _ => return Err(FlagError::Network(n.clone())),
            },
            (None, None, None) if self.mac.is_some() => return Err(FlagError::MacWithoutTap),
            (None, None, None) => return Ok(None),
        };
        let mac = mac
            .map(|m| {
                m.parse()
                    .map_err(|e: NetError| FlagError::Mac(e.to_string()))
            })
            .transpose()?;
        Ok(Some(NetConfig { tap, mac }))
    }

    /// The same command line, without the program name.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a = self.vm.to_firerunner_args();
        push_paths(
            &mut a,
            [
                ("--console", &self.console),
                ("--vsock_uds", &self.vsock_uds),
            ],
        );
        push_paths(
            &mut a,
            [
                ("--tap", &self.tap),
                ("--mac", &self.mac),
                ("--network", &self.network),
            ],
        );
        for (name, fd) in [("--tap_fd", self.tap_fd), ("--control_fd", self.control_fd)] {
            if let Some(fd) = fd {
                a.push(name.into());
                a.push(fd.to_string().into());
            }
        }
        if self.force_exit {
            a.push("--force_exit".into());
        }
        a
    }
}

/// Appends `--name VALUE` for each value that is set.
fn push_paths<T: Clone + Into<OsString>, const N: usize>(
    a: &mut Vec<OsString>,
    paths: [(&str, &Option<T>); N],
) {
    for (name, path) in paths {
        if let Some(p) = path {
            a.push(name.into());
            a.push(p.clone().into());
        }
    }
}

/// `firerunner shell`: a VM of a given shape, built before anyone knows
/// which snapshot it will run (see src/vmm/shell.rs).
#[derive(Parser, Clone, Debug)]
#[command(
    name = "firerunner shell",
    about = "Build a VM shell (VM, vCPUs, memory slots) and restore the snapshot a `restore` \
             command names into it"
)]
pub struct ShellArgs {
    /// Guest memory in MiB: only snapshots of this size restore.
    #[arg(long = "mem_size", alias = "mem-size", default_value_t = 128)]
    pub mem_size: u64,
    /// Number of vCPUs: only snapshots with this many restore.
    #[arg(long = "vcpu_count", alias = "vcpu-count", default_value_t = 1)]
    pub vcpu_count: u64,
    /// As firerunner's: the memory slots then keep a dirty log.
    #[arg(long = "snapshot_dir", alias = "snapshot-dir")]
    pub snapshot_dir: Option<PathBuf>,
    /// As firerunner's.
    #[arg(long)]
    pub console: Option<PathBuf>,
    /// As firerunner's.
    #[arg(long = "vsock_uds", alias = "vsock-uds")]
    pub vsock_uds: Option<PathBuf>,
    /// The control channel the `restore` command comes on (required).
    #[arg(long = "control_fd", alias = "control-fd")]
    pub control_fd: i32,
    /// As firerunner's.
    #[arg(long = "no_seccomp", alias = "no-seccomp")]
    pub no_seccomp: bool,
}

impl ShellArgs {
    /// The same command line after `shell`.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "--mem_size".into(),
            self.mem_size.to_string().into(),
            "--vcpu_count".into(),
            self.vcpu_count.to_string().into(),
            "--control_fd".into(),
            self.control_fd.to_string().into(),
        ];
        push_paths(
            &mut a,
            [
                ("--snapshot_dir", &self.snapshot_dir),
                ("--console", &self.console),
                ("--vsock_uds", &self.vsock_uds),
            ],
        );
        if self.no_seccomp {
            a.push("--no_seccomp".into());
        }
        a
    }

    /// The VM a shell of this shape becomes for `r`: the same checks as
    /// firerunner's own flags ([`VmArgs::vm_config`]).
    pub fn vm_config(&self, r: &RestoreRequest) -> Result<VmConfig, FlagError> {
        if r.layers.is_empty() {
            return Err(FlagError::ShellWithoutLayers);
        }
        let layers: Vec<String> = r.layers.iter().map(|l| l.display().to_string()).collect();
        if let Some(l) = layers.iter().find(|l| l.contains(',')) {
            return Err(FlagError::CommaInLayer(l.clone()));
        }
        let args = VmArgs {
            kernel: PathBuf::new(),
            kernel_args: None,
            rootfs: r.rootfs.clone(),
            appfs: r.appfs.clone(),
            mem_size: self.mem_size,
            vcpu_count: self.vcpu_count,
            id: r.id.unwrap_or(DEFAULT_CID),
            load_dir: Some(layers.join(",")),
            diff_dirs: None,
            dump_dir: None,
            snapshot_dir: self.snapshot_dir.clone(),
            dump_ws: r.dump_ws.clone(),
            load_ws: r.load_ws,
            copy_base: r.copy_base,
            copy_diff: r.copy_diff,
            cpu_template: None,
            no_seccomp: self.no_seccomp,
        };
        args.vm_config(self.console.clone(), self.vsock_uds.clone())
    }
}

/// How singlevm and multivm jail the firerunners they start.
#[derive(Args, Clone, Debug)]
pub struct JailArgs {
    /// Run firerunner without the jail (for development: the VMM then has
    /// the controller's privileges). Without root there is no jail anyway.
    #[arg(long = "no_jail", alias = "no-jail")]
    pub no_jail: bool,
    /// First uid (and gid) of the range the jailed VMs run as, one each.
    #[arg(long = "jail_uid_base", alias = "jail-uid-base", default_value_t = DEFAULT_UID_BASE)]
    pub uid_base: u32,
    /// Size of the uid range: how many VMs can be jailed at once.
    #[arg(long = "jail_uid_count", alias = "jail-uid-count", default_value_t = DEFAULT_UID_COUNT)]
    pub uid_count: u32,
    /// Where the jails' directories are made.
    #[arg(long = "jail_dir", alias = "jail-dir", default_value = DEFAULT_JAIL_DIR)]
    pub jail_dir: PathBuf,
}

impl JailArgs {
    /// The jail to use, none with --no_jail or without root. `overhead` is
    /// the MiB a VM's cgroup allows on top of its guest memory.
    pub fn options(&self, jailer: PathBuf, vm_overhead_mib: u64) -> Option<JailOptions> {
        if self.no_jail {
            return None;
        }
        if !nix::unistd::geteuid().is_root() {
            log::info!("not running as root: firerunner runs without the jail");
            return None;
        }
        Some(JailOptions {
            jailer,
            base: self.jail_dir.clone(),
            uid_base: self.uid_base,
            uid_count: self.uid_count.max(1),
            vm_overhead_mib,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        vm: VmArgs,
    }

    #[test]
    fn snake_and_kebab_spellings_round_trip_through_firerunner_args() {
        let t = T::parse_from([
            "x",
            "--kernel",
            "k",
            "--rootfs",
            "r",
            "--mem-size",
            "256",
            "--vcpu_count",
            "2",
            "--kernel-args",
            "a b",
            "--copy_base",
        ]);
        assert_eq!((t.vm.mem_size, t.vm.vcpu_count), (256, 2));
        let mut argv: Vec<OsString> = vec!["x".into()];
        argv.extend(t.vm.to_firerunner_args());
        let again = T::parse_from(argv);
        assert_eq!(again.vm.kernel_args.as_deref(), Some("a b"));
        assert!(again.vm.copy_base);
        assert_eq!(again.vm.mem_size, 256);
        assert_eq!(
            again.vm.check().unwrap_err().to_string(),
            "--copy_base needs --load_dir"
        );
        let parse = |extra: &[&str]| {
            let mut argv = vec!["x", "--kernel", "k", "--rootfs", "r"];
            argv.extend_from_slice(extra);
            T::parse_from(argv).vm
        };
        let layers = |v: &VmArgs| match v.vm_config(None, None).unwrap().start {
            Start::Restore(r) => r.layers,
            Start::Boot(_) => Vec::new(),
        };
        let t = parse(&["--load_dir", "a"]);
        assert_eq!((t.check(), layers(&t)), (Ok(()), vec![PathBuf::from("a")]));
        let both = [PathBuf::from("a"), PathBuf::from("b"), PathBuf::from("c")];
        let t = parse(&["--load_dir", "a,b", "--diff_dirs", "c", "--copy_diff"]);
        assert_eq!((t.check(), layers(&t)), (Ok(()), both.to_vec()));
        let t = parse(&["--load_dir", "a", "--diff_dirs", "b,c"]);
        assert_eq!(layers(&t), both.to_vec());
        assert!(parse(&["--diff_dirs", "b"]).check().is_err());
        assert!(parse(&["--load_dir", "a", "--copy_diff"]).check().is_err());
        assert!(parse(&["--load_dir", "a,,b"]).check().is_err());
        let ws = |extra: &[&str]| match parse(extra).vm_config(None, None).unwrap().start {
            Start::Restore(RestoreConfig {
                memory: RestoreMemory::RecordWorkingSet { into },
                ..
            }) => Some(into),
            _ => None,
        };
        assert_eq!(
            ws(&["--load_dir", "a,b", "--dump_ws"]),
            Some(PathBuf::from("b"))
        );
        assert_eq!(
            ws(&["--load_dir", "a", "--dump_ws", "d"]),
            Some(PathBuf::from("d"))
        );
        assert!(parse(&["--dump_ws"]).check().is_err());
        assert!(parse(&["--load_dir", "a", "--dump_ws", "--copy_base"])
            .check()
            .is_err());
        assert!(parse(&["--load_dir", "a,b", "--load_ws", "--copy_base"])
            .check()
            .is_err());
        let both = [
            "--load_dir",
            "a,b",
            "--load_ws",
            "--copy_base",
            "--copy_diff",
        ];
        assert_eq!(parse(&both).check(), Ok(()));
        assert_eq!(
            parse(&["--load_dir", "a", "--load_ws", "--copy_base"]).check(),
            Ok(())
        );
        assert!(parse(&["--load_dir", "a", "--load_ws", "--dump_ws"])
            .check()
            .is_err());
        assert_eq!(parse(&["--load_dir", "a,b", "--load_ws"]).check(), Ok(()));
    }

    #[test]
    fn cpu_template_reaches_firerunner_and_the_vm_config() {
        let t = T::parse_from([
            "x",
            "--kernel",
            "k",
            "--rootfs",
            "r",
            "--cpu-template",
            "t.json",
        ]);
        let mut argv: Vec<OsString> = vec!["x".into()];
        argv.extend(t.vm.to_firerunner_args());
        let again = T::parse_from(argv);
        let Start::Boot(boot) = again.vm.vm_config(None, None).unwrap().start else {
            panic!("a boot config");
        };
        assert_eq!(boot.cpu_template, Some(PathBuf::from("t.json")));
    }
}
