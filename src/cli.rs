//! The VM flags shared by firerunner and the controllers (SnapFaaS names,
//! each also in kebab case), and how a controller passes them on.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Args;

use crate::vmm::builder::{VmConfig, DEFAULT_KERNEL_ARGS};

#[derive(Args, Clone, Debug)]
pub struct VmArgs {
    /// Guest kernel: ELF vmlinux or bzImage.
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
    #[arg(long, default_value_t = 100)]
    pub id: u64,
    /// Restore from a snapshot directory (BASE or BASE,DIFF).
    #[arg(long = "load_dir", alias = "load-dir")]
    pub load_dir: Option<String>,
    /// Diff snapshot layers to stack on --load_dir (comma list).
    #[arg(long = "diff_dirs", alias = "diff-dirs")]
    pub diff_dirs: Option<String>,
    /// Write a snapshot here at the guest's snapshot point, then exit.
    #[arg(long = "dump_dir", alias = "dump-dir")]
    pub dump_dir: Option<PathBuf>,
    /// Record the working set of the first request (into DIR, or the top layer).
    #[arg(long = "dump_ws", alias = "dump-ws", num_args = 0..=1, default_missing_value = "")]
    pub dump_ws: Option<String>,
    /// Load the recorded working set eagerly at restore.
    #[arg(long = "load_ws", alias = "load-ws")]
    pub load_ws: bool,
    /// Copy the base snapshot's memory eagerly instead of mapping it.
    #[arg(long = "copy_base", alias = "copy-base")]
    pub copy_base: bool,
    /// Copy the diff snapshot's memory eagerly instead of mapping it.
    #[arg(long = "copy_diff", alias = "copy-diff")]
    pub copy_diff: bool,
}

impl VmArgs {
    /// The first flag whose feature has not landed yet: refused, never ignored.
    pub fn unsupported(&self) -> Option<&'static str> {
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

    /// The VM these flags describe.
    pub fn vm_config(&self, console: Option<PathBuf>, vsock_uds: Option<PathBuf>) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone(),
            kernel_args: self
                .kernel_args
                .clone()
                .unwrap_or_else(|| DEFAULT_KERNEL_ARGS.to_string()),
            rootfs: self.rootfs.clone(),
            appfs: self.appfs.clone(),
            mem_mib: self.mem_size,
            vcpus: self.vcpu_count,
            cid: self.id,
            console,
            vsock_uds,
        }
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
        for (set, name) in [
            (self.load_ws, "--load_ws"),
            (self.copy_base, "--copy_base"),
            (self.copy_diff, "--copy_diff"),
        ] {
            if set {
                a.push(name.into());
            }
        }
        a
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
        assert_eq!(again.vm.unsupported(), Some("--copy_base"));
    }
}
