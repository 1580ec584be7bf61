//! The multivm YAML configuration: the SnapFaaS controller schema plus the
//! keys a memory-budgeted scheduler needs, resolved and checked at startup.
//!
//! ```yaml
//! firerunner_path: ./firerunner        # default: next to the multivm binary
//! kernel_path: vmlinux                 # default kernel of every function
//! kernel_args: "console=ttyS0"         # alias kernel_boot_args
//! runtimefs_dir: images/rootfs         # base of relative `runtimefs` paths
//! appfs_dir: images/appfs              # base of relative `appfs` paths
//! snapshot_dir: snapshots              # base of relative `load_dir` entries
//! allow_network: false                 # let `network: true` functions have one
//! boot_timeout: 30s                    # launch (boot or restore) deadline
//! vm_overhead: 8                       # MiB accounted per VM on top of `memory`
//! jail: true                           # jail each VM (as root); false = --no_jail
//! shells:                              # VM shells kept ready per shape, for restores
//!   - memory: 128                      # MiB: functions with this memory and vcpus
//!     vcpus: 1                         #   that restore (load_dir) use them
//!     count: 2                         # each counted as vm_overhead MiB of the budget
//! hibernate:                           # where keep_state functions' idle VMs go
//!   dir: /var/lib/snapvm/hibernate     # required; multivm's alone (swept at start)
//!   disk: 4096                         # MiB of layers kept; the oldest go first
//! functions:
//!   hello:
//!     runtimefs: python3.ext4          # required
//!     appfs: hello.ext2
//!     vcpus: 1                         # default 1
//!     memory: 128                      # MiB, default 128
//!     concurrency_limit: 4             # VMs of this function at once; default: the budget
//!     load_dir: base/python,diff/hello # restore instead of boot (BASE[,DIFF...])
//!     copy_base: false
//!     copy_diff: false
//!     load_ws: false
//!     kernel: other-vmlinux            # per-function kernel
//!     cmdline: "quiet"                 # per-function kernel command line
//!     network: false                   # a network card in a namespace of its own, NAT
//!                                      #   to the outside (src/network.rs; needs
//!                                      #   allow_network and the jail)
//!     keep_state: false                # hibernate idle VMs instead of stopping them,
//!                                      #   and wake them on the next request
//!                                      #   (src/multivm/hibernate.rs; needs `hibernate`)
//!     min_idle: 0                      # pre-warmed idle VMs
//!     idle_timeout: 5m                 # idle VMs beyond min_idle are stopped after this
//!     request_timeout: 30s             # queue wait limit, and run limit (kills the VM)
//!     max_queue: 64                    # requests waiting for a VM; more get 503
//! deploy:                              # functions deployed through /system/functions
//!   state_dir: /var/lib/snapvm         # required: deployments and built images
//!   image_dir: images/apps             # a deployment's `image` is a path under it; default appfs_dir
//!   mkappfs: appfs/mkappfs             # builds an appfs from an `image` directory
//!   default_runtime: python3           # when a deployment names none
//!   runtimes:
//!     python3:
//!       runtimefs: python3.ext4        # required, under runtimefs_dir
//!       kernel: vmlinux                # default kernel_path
//!       cmdline: "quiet"               # default kernel_args
//!       memory: 128                    # MiB; default 128 (limits.memory overrides)
//!       vcpus: 1
//!       snapshot: python3/base         # a language snapshot under snapshot_dir:
//!                                      # preparation writes a diff layer, VMs restore
//! ```
//!
//! `functions` may be empty when there is a `deploy` section.
//!
//! Durations are seconds (a number) or a string with a unit: `250ms`,
//! `30s`, `5m`, `1h`. Relative paths are resolved against the directory of
//! the configuration file (or against `*_dir` for the keys above).
//! Unknown keys, missing files and sizes that cannot work are startup
//! errors naming the file, line and key.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::control::RestoreRequest;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use crate::cli::{VmArgs, DEFAULT_CID};
use crate::network;
use crate::vmm::MAX_VCPUS;

/// MiB accounted per VM for firerunner itself (VMM heap, thread stacks,
/// device buffers, its share of the binary) and the kernel's KVM
/// structures (vCPU state, page tables), on top of the guest's `memory`.
/// Measured here: an idle testguest firerunner has an RSS of 3.7 MiB
/// whatever its guest size (0.8 MiB anonymous, 2.9 MiB file-backed and
/// mostly shared between VMs); 8 MiB leaves room for the kernel side and
/// for busier devices.
pub const DEFAULT_VM_OVERHEAD_MIB: u64 = 8;
const DEFAULT_MEMORY_MIB: u64 = 128;
const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_QUEUE: u64 = 64;
/// Smallest guest that can hold a kernel and an agent.
pub const MIN_MEMORY_MIB: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        file: String,
        line: u64,
        column: u64,
        message: String,
    },
    #[error("{file}:{line}: {key}: {message}")]
    Invalid {
        file: String,
        line: u64,
        key: String,
        message: String,
    },
}

/// A duration as written in the config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Seconds(pub Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Seconds;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a duration: seconds, or a string like \"250ms\", \"30s\", \"5m\", \"1h\"",
                )
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seconds, E> {
                Ok(Seconds(Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seconds, E> {
                u64::try_from(v)
                    .map(|s| Seconds(Duration::from_secs(s)))
                    .map_err(|_| E::custom(format!("a duration cannot be negative, got {v}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Seconds, E> {
                Duration::try_from_secs_f64(v)
                    .map(Seconds)
                    .map_err(|_| E::custom(format!("not a valid number of seconds: {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Seconds, E> {
                parse_duration(v).map(Seconds).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `250ms`, `30s`, `1.5m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {text:?} (use ms, s, m or h)"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("not a duration: {text:?} (e.g. \"250ms\", \"30s\", \"5m\")"))?;
    Duration::try_from_secs_f64(n * scale).map_err(|_| format!("duration out of range: {text:?}"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    allow_network: Option<Spanned<bool>>,
    firerunner_path: Option<Spanned<String>>,
    kernel_path: Option<Spanned<String>>,
    #[serde(alias = "kernel_boot_args")]
    kernel_args: Option<Spanned<String>>,
    runtimefs_dir: Option<Spanned<String>>,
    appfs_dir: Option<Spanned<String>>,
    snapshot_dir: Option<Spanned<String>>,
    boot_timeout: Option<Spanned<Seconds>>,
    vm_overhead: Option<Spanned<u64>>,
    jail: Option<Spanned<bool>>,
    shells: Option<Spanned<Vec<Spanned<RawShells>>>>,
    hibernate: Option<Spanned<RawHibernate>>,
    #[serde(default)]
    functions: Option<Spanned<BTreeMap<String, Spanned<RawFunction>>>>,
    deploy: Option<Spanned<RawDeploy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShells {
    memory: Spanned<u64>,
    vcpus: Option<Spanned<u64>>,
    count: Spanned<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHibernate {
    dir: Spanned<String>,
    disk: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeploy {
    state_dir: Spanned<String>,
    image_dir: Option<Spanned<String>>,
    mkappfs: Option<Spanned<String>>,
    default_runtime: Option<Spanned<String>>,
    #[serde(default)]
    runtimes: BTreeMap<String, Spanned<RawRuntime>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    runtimefs: Spanned<String>,
    kernel: Option<Spanned<String>>,
    cmdline: Option<Spanned<String>>,
    memory: Option<Spanned<u64>>,
    vcpus: Option<Spanned<u64>>,
    snapshot: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    network: Option<Spanned<bool>>,
    keep_state: Option<Spanned<bool>>,
    runtimefs: Spanned<String>,
    appfs: Option<Spanned<String>>,
    vcpus: Option<Spanned<u64>>,
    memory: Option<Spanned<u64>>,
    concurrency_limit: Option<Spanned<u64>>,
    load_dir: Option<Spanned<String>>,
    copy_base: Option<Spanned<bool>>,
    copy_diff: Option<Spanned<bool>>,
    load_ws: Option<Spanned<bool>>,
    kernel: Option<Spanned<String>>,
    cmdline: Option<Spanned<String>>,
    min_idle: Option<Spanned<u64>>,
    idle_timeout: Option<Spanned<Seconds>>,
    request_timeout: Option<Spanned<Seconds>>,
    max_queue: Option<Spanned<u64>>,
}

/// How a function's VMs start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchKind {
    Boot,
    Restore,
    /// A restore into a ready VM shell.
    Shell,
    /// A restore of a hibernated VM (src/multivm/hibernate.rs).
    Wake,
}

impl LaunchKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LaunchKind::Boot => "boot",
            LaunchKind::Restore => "restore",
            LaunchKind::Shell => "shell",
            LaunchKind::Wake => "wake",
        }
    }
}

/// One function, every path absolute and checked.
#[derive(Clone, Debug)]
pub struct Function {
    pub name: String,
    pub kernel: PathBuf,
    pub cmdline: Option<String>,
    pub rootfs: PathBuf,
    pub appfs: Option<PathBuf>,
    pub vcpus: u64,
    pub memory_mib: u64,
    /// Most VMs of this function at once (launching, idle or busy).
    pub concurrency_limit: usize,
    /// Snapshot layers to restore from, comma-separated absolute paths.
    pub load_dir: Option<String>,
    pub copy_base: bool,
    pub copy_diff: bool,
    pub load_ws: bool,
    /// A network card in a namespace of its own (src/network.rs).
    pub network: bool,
    /// Idle VMs are hibernated rather than stopped (src/multivm/hibernate.rs).
    pub keep_state: bool,
    pub min_idle: usize,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub max_queue: usize,
}

impl Function {
    pub fn launch_kind(&self) -> LaunchKind {
        if self.load_dir.is_some() {
            LaunchKind::Restore
        } else {
            LaunchKind::Boot
        }
    }

    /// Whether VMs of `self` and `other` are the same VM: everything but
    /// the scheduling settings (limits, timeouts, queue, min_idle) agrees.
    pub fn same_vm(&self, other: &Function) -> bool {
        self.kernel == other.kernel
            && self.cmdline == other.cmdline
            && self.rootfs == other.rootfs
            && self.appfs == other.appfs
            && self.vcpus == other.vcpus
            && self.memory_mib == other.memory_mib
            && self.load_dir == other.load_dir
            && (
                self.copy_base,
                self.copy_diff,
                self.load_ws,
                self.network,
                self.keep_state,
            ) == (
                other.copy_base,
                other.copy_diff,
                other.load_ws,
                other.network,
                other.keep_state,
            )
    }

    /// What a VM shell of this function's shape restores for one of its
    /// VMs; none for a function that boots, has a network (shells have no
    /// network card) or keeps its state (shells keep no dirty log).
    pub fn restore_request(&self) -> Option<RestoreRequest> {
        if self.network || self.keep_state {
            return None;
        }
        self.load_dir.as_ref()?;
        Some(RestoreRequest {
            rootfs: self.rootfs.clone(),
            appfs: self.appfs.clone(),
            layers: self.layers(),
            id: None,
            copy_base: self.copy_base,
            copy_diff: self.copy_diff,
            load_ws: self.load_ws,
            dump_ws: None,
        })
    }

    /// The function's snapshot layers, bottom first (none when it boots).
    pub fn layers(&self) -> Vec<PathBuf> {
        self.vm_args(false).layers()
    }

    /// Whether firerunner would accept this function's VM flags.
    pub fn check(&self) -> Result<(), String> {
        self.vm_args(false).check().map_err(|e| e.to_string())
    }

    /// The firerunner flags of one VM of this function, spelt by the
    /// VmArgs of src/cli.rs (the launcher adds the vsock, console and
    /// control ones); `no_seccomp` as multivm was told.
    pub fn firerunner_args(&self, no_seccomp: bool) -> Vec<OsString> {
        self.vm_args(no_seccomp).to_firerunner_args()
    }

    /// The firerunner flags of a VM of a `keep_state` function: it writes
    /// its hibernation layer in `snapshot_dir` (and so keeps a dirty log),
    /// and restores `chain`, a hibernated VM's layers, on top of the
    /// function's own (without the function's working set, which belongs
    /// to its own top layer).
    pub fn kept_args(
        &self,
        no_seccomp: bool,
        snapshot_dir: &Path,
        chain: &[PathBuf],
    ) -> Vec<OsString> {
        let mut a = self.vm_args(no_seccomp);
        a.snapshot_dir = Some(snapshot_dir.to_path_buf());
        if !chain.is_empty() {
            let own = a.layers();
            let dirs: Vec<String> = own
                .iter()
                .chain(chain)
                .map(|d| d.display().to_string())
                .collect();
            a.load_dir = Some(dirs.join(","));
            a.load_ws = false;
        }
        a.to_firerunner_args()
    }

    /// The VM flags of this function, as firerunner would parse them; a
    /// networked one that boots gets its address on the kernel command
    /// line (a restored one has it in its snapshot).
    fn vm_args(&self, no_seccomp: bool) -> VmArgs {
        let mut kernel_args = self.cmdline.clone();
        if self.network && self.load_dir.is_none() {
            kernel_args = Some(network::with_kernel_arg(kernel_args.as_deref()));
        }
        VmArgs {
            kernel: self.kernel.clone(),
            kernel_args,
            rootfs: self.rootfs.clone(),
            appfs: self.appfs.clone(),
            mem_size: self.memory_mib,
            vcpu_count: self.vcpus,
            id: DEFAULT_CID,
            load_dir: self.load_dir.clone(),
            diff_dirs: None,
            dump_dir: None,
            dump_ws: None,
            snapshot_dir: None,
            load_ws: self.load_ws,
            copy_base: self.copy_base,
            copy_diff: self.copy_diff,
            cpu_template: None,
            no_seccomp,
        }
    }
}

/// The whole configuration, ready to run.
#[derive(Clone, Debug)]
pub struct Config {
    pub firerunner: PathBuf,
    pub boot_timeout: Duration,
    /// MiB accounted per VM on top of its guest memory; also what a
    /// jailed VM's cgroup allows on top of it.
    pub vm_overhead_mib: u64,
    /// Whether VMs are jailed (when multivm runs as root and without
    /// --no_jail).
    pub jail: bool,
    /// Sorted by name.
    pub functions: Vec<Function>,
    /// Deploying functions at run time (the provider API), if configured.
    pub deploy: Option<DeployConfig>,
    /// Run every firerunner with `--no_seccomp` (multivm's own flag).
    pub no_seccomp: bool,
    /// VM shells kept ready, per shape.
    pub shells: Vec<ShellShape>,
    /// Where hibernated VMs go, if configured.
    pub hibernate: Option<HibernateConfig>,
}

/// The `hibernate` section (src/multivm/hibernate.rs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HibernateConfig {
    pub dir: PathBuf,
    pub disk_mib: u64,
}

/// Default `hibernate.disk`, MiB.
pub const DEFAULT_HIBERNATE_DISK_MIB: u64 = 4096;

/// `count` shells of `memory_mib` and `vcpus` kept ready (src/multivm/shells.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShellShape {
    pub memory_mib: u64,
    pub vcpus: u64,
    pub count: usize,
}

impl Config {
    /// What the shells are counted at in the budget: `vm_overhead` each
    /// (their process and KVM's memory for them; their guest memory is
    /// never touched until they become VMs, which are counted as VMs).
    pub fn shells_mib(&self) -> u64 {
        self.shells
            .iter()
            .map(|s| s.count as u64 * self.vm_overhead_mib)
            .sum()
    }

    /// The part of a `budget_mib` budget left for VMs.
    pub fn vm_budget_mib(&self, budget_mib: u64) -> u64 {
        budget_mib.saturating_sub(self.shells_mib())
    }
}

/// The `deploy` section: where deployments live and what they run on.
#[derive(Clone, Debug)]
pub struct DeployConfig {
    pub state_dir: PathBuf,
    pub image_dir: PathBuf,
    pub mkappfs: Option<PathBuf>,
    pub default_runtime: Option<String>,
    pub runtimes: BTreeMap<String, Runtime>,
}

/// A runtime a deployment can name: what its VMs boot, absolute paths.
#[derive(Clone, Debug)]
pub struct Runtime {
    pub kernel: PathBuf,
    pub cmdline: Option<String>,
    pub rootfs: PathBuf,
    pub memory_mib: u64,
    pub vcpus: u64,
    /// Language snapshot to restore from (and to write diff layers on).
    pub snapshot: Option<PathBuf>,
}

/// A function name: 1 to 63 letters, digits, '_', '-' or '.', starting
/// with a letter or a digit (so never `.` or `..`: names are URL path
/// segments and file names).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err("a function name is 1 to 63 letters, digits, '_', '-' and '.', starting with a letter or digit".to_string())
    }
}

impl Config {
    /// Reads, resolves and checks `path` against a `budget_mib` memory budget.
    pub fn load(
        path: &Path,
        budget_mib: u64,
        default_firerunner: PathBuf,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::parse(
            &text,
            &path.display().to_string(),
            &base,
            budget_mib,
            default_firerunner,
        )
    }

    /// Parses `text` (named `file` in errors); relative paths resolve against `base`.
    pub fn parse(
        text: &str,
        file: &str,
        base: &Path,
        budget_mib: u64,
        default_firerunner: PathBuf,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_saphyr::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            let mut message = plain_message(&e);
            if message.starts_with("invalid u64") || message.starts_with("invalid i64") {
                message = "expected a whole number".to_string();
            }
            let mut path = key_path(text, line);
            if message.starts_with("missing field") {
                path.pop();
            }
            if !path.is_empty() {
                message = format!("{}: {message}", path.join("."));
            }
            ConfigError::Syntax {
                file: file.to_string(),
                line,
                column,
                message,
            }
        })?;
        Resolver { file, base }.resolve(raw, budget_mib, default_firerunner)
    }
}

/// serde-saphyr's message without its source snippet and position suffix.
fn plain_message(e: &serde_saphyr::Error) -> String {
    let msg = e.without_snippet().to_string();
    let first = msg.lines().next().unwrap_or_default().trim().to_string();
    match first.rfind(" at line ") {
        Some(i) => first[..i].to_string(),
        None => first,
    }
}

/// The dotted key path of the block-style YAML key on `line` (1-based),
/// found through the indentation of the lines above; empty if none.
fn key_path(text: &str, line: u64) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let Some(idx) = usize::try_from(line).ok().and_then(|l| l.checked_sub(1)) else {
        return Vec::new();
    };
    let key_of = |l: &str| -> Option<(usize, String)> {
        let t = l.trim_start();
        if t.is_empty() || t.starts_with('#') {
            return None;
        }
        let (k, _) = t.split_once(':')?;
        let k = k.trim().trim_matches(|c| c == '"' || c == '\'');
        (!k.is_empty() && !k.contains(['{', '[', ' '])).then(|| (l.len() - t.len(), k.to_string()))
    };
    let Some((mut indent, key)) = lines.get(idx).and_then(|l| key_of(l)) else {
        return Vec::new();
    };
    let mut path = vec![key];
    for l in lines[..idx].iter().rev() {
        if indent == 0 {
            break;
        }
        if let Some((i, k)) = key_of(l) {
            if i < indent {
                path.push(k);
                indent = i;
            }
        }
    }
    path.reverse();
    path
}

struct Resolver<'a> {
    file: &'a str,
    base: &'a Path,
}

impl Resolver<'_> {
    fn err<T>(&self, at: &Spanned<T>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            line: at.referenced.line().max(1),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn dir(&self, d: &Option<Spanned<String>>, key: &str) -> Result<PathBuf, ConfigError> {
        match d {
            None => Ok(self.base.to_path_buf()),
            Some(s) => {
                let p = self.base.join(&s.value);
                if p.is_dir() {
                    Ok(p)
                } else {
                    Err(self.err(s, key, format!("{} is not a directory", p.display())))
                }
            }
        }
    }

    /// `s` under `dir`, which must exist as a file.
    fn file_in(&self, dir: &Path, s: &Spanned<String>, key: &str) -> Result<PathBuf, ConfigError> {
        if s.value.trim().is_empty() {
            return Err(self.err(s, key, "must not be empty"));
        }
        let p = dir.join(&s.value);
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => Ok(absolute(&p)),
            Ok(_) => Err(self.err(s, key, format!("{} is not a file", p.display()))),
            Err(e) => Err(self.err(s, key, format!("{}: {e}", p.display()))),
        }
    }

    fn resolve(
        &self,
        raw: RawConfig,
        budget_mib: u64,
        default_firerunner: PathBuf,
    ) -> Result<Config, ConfigError> {
        let allow_network = raw.allow_network.as_ref().is_some_and(|n| n.value);
        let jail = raw.jail.as_ref().is_none_or(|j| j.value);
        let firerunner = match &raw.firerunner_path {
            Some(s) => self.file_in(self.base, s, "firerunner_path")?,
            None => default_firerunner,
        };
        let kernel = raw
            .kernel_path
            .as_ref()
            .map(|s| self.file_in(self.base, s, "kernel_path"))
            .transpose()?;
        let runtimefs_dir = self.dir(&raw.runtimefs_dir, "runtimefs_dir")?;
        let appfs_dir = self.dir(&raw.appfs_dir, "appfs_dir")?;
        let snapshot_dir = self.dir(&raw.snapshot_dir, "snapshot_dir")?;
        let boot_timeout = match &raw.boot_timeout {
            Some(s) if s.value.0.is_zero() => {
                return Err(self.err(s, "boot_timeout", "must be longer than zero"))
            }
            Some(s) => s.value.0,
            None => DEFAULT_BOOT_TIMEOUT,
        };
        let vm_overhead_mib = raw
            .vm_overhead
            .as_ref()
            .map_or(DEFAULT_VM_OVERHEAD_MIB, |s| s.value);
        let mut shells = Vec::new();
        for (i, sh) in raw.shells.iter().flat_map(|s| s.value.iter()).enumerate() {
            let key = |k: &str| format!("shells[{i}].{k}");
            let sv = &sh.value;
            if sv.memory.value < MIN_MEMORY_MIB {
                let m = format!("a VM needs at least {MIN_MEMORY_MIB} MiB");
                return Err(self.err(&sv.memory, &key("memory"), m));
            }
            let vcpus = match &sv.vcpus {
                Some(v) if !(1..=u64::from(crate::vmm::MAX_VCPUS)).contains(&v.value) => {
                    let m = format!("must be between 1 and {}", crate::vmm::MAX_VCPUS);
                    return Err(self.err(v, &key("vcpus"), m));
                }
                Some(v) => v.value,
                None => 1,
            };
            if sv.count.value == 0 {
                return Err(self.err(&sv.count, &key("count"), "must be at least 1"));
            }
            shells.push(ShellShape {
                memory_mib: sv.memory.value,
                vcpus,
                count: usize::try_from(sv.count.value).unwrap_or(usize::MAX),
            });
        }
        let shells_mib: u64 = shells
            .iter()
            .map(|s| (s.count as u64).saturating_mul(vm_overhead_mib))
            .sum();
        if let Some(at) = raw.shells.as_ref().filter(|_| shells_mib >= budget_mib) {
            return Err(self.err(
                at,
                "shells",
                format!("{shells_mib} MiB of shells leave nothing of the --mem budget of {budget_mib} MiB for VMs"),
            ));
        }
        // Functions are checked against what the shells leave.
        let budget_mib = budget_mib - shells_mib;
        let hibernate = match &raw.hibernate {
            None => None,
            Some(h) => {
                let hv = &h.value;
                if hv.dir.value.trim().is_empty() {
                    return Err(self.err(&hv.dir, "hibernate.dir", "must not be empty"));
                }
                let disk_mib = match &hv.disk {
                    Some(d) if d.value == 0 => {
                        return Err(self.err(d, "hibernate.disk", "must be at least 1 MiB"))
                    }
                    Some(d) => d.value,
                    None => DEFAULT_HIBERNATE_DISK_MIB,
                };
                Some(HibernateConfig {
                    dir: absolute(&self.base.join(&hv.dir.value)),
                    disk_mib,
                })
            }
        };
        let deploy = raw
            .deploy
            .as_ref()
            .map(|d| {
                self.deploy(
                    d,
                    kernel.as_ref(),
                    raw.kernel_args.as_ref(),
                    [&runtimefs_dir, &appfs_dir, &snapshot_dir],
                )
            })
            .transpose()?;
        let empty = Spanned::new(BTreeMap::new(), Location::UNKNOWN, Location::UNKNOWN);
        let raw_functions = raw.functions.as_ref().unwrap_or(&empty);
        if raw_functions.value.is_empty() && deploy.is_none() {
            return Err(self.err(
                raw_functions,
                "functions",
                "no function is configured (and no deploy section to add some at run time)",
            ));
        }
        let mut functions = Vec::new();
        for (name, f) in &raw_functions.value {
            let key = |k: &str| format!("functions.{name}.{k}");
            if let Err(message) = check_name(name) {
                return Err(self.err(f, &format!("functions.{name}"), message));
            }
            let fv = &f.value;
            let network = match &fv.network {
                Some(n) if n.value && !allow_network => {
                    return Err(self.err(
                        n,
                        &key("network"),
                        "functions get a network only with `allow_network: true` at the top",
                    ))
                }
                Some(n) if n.value && !jail => {
                    return Err(self.err(
                        n,
                        &key("network"),
                        "a VM's network namespace belongs to its jail: it needs `jail: true`",
                    ))
                }
                n => n.as_ref().is_some_and(|n| n.value),
            };
            let keep_state = match &fv.keep_state {
                Some(k) if k.value && hibernate.is_none() => {
                    return Err(self.err(
                        k,
                        &key("keep_state"),
                        "hibernated VMs need a place: add a `hibernate` section with its `dir`",
                    ))
                }
                k => k.as_ref().is_some_and(|k| k.value),
            };
            let kernel = match (&fv.kernel, &kernel) {
                (Some(s), _) => self.file_in(self.base, s, &key("kernel"))?,
                (None, Some(k)) => k.clone(),
                (None, None) => {
                    return Err(self.err(
                        f,
                        &key("kernel"),
                        "no kernel: set kernel_path at the top or kernel in the function",
                    ))
                }
            };
            let cmdline = fv
                .cmdline
                .as_ref()
                .or(raw.kernel_args.as_ref())
                .map(|s| s.value.clone());
            let rootfs = self.file_in(&runtimefs_dir, &fv.runtimefs, &key("runtimefs"))?;
            let appfs = fv
                .appfs
                .as_ref()
                .map(|s| self.file_in(&appfs_dir, s, &key("appfs")))
                .transpose()?;
            let vcpus = fv.vcpus.as_ref().map_or(Ok(1), |s| {
                if s.value == 0 || s.value > u64::from(MAX_VCPUS) {
                    Err(self.err(
                        s,
                        &key("vcpus"),
                        format!("must be between 1 and {MAX_VCPUS}, got {}", s.value),
                    ))
                } else {
                    Ok(s.value)
                }
            })?;
            let memory_mib = match &fv.memory {
                None => DEFAULT_MEMORY_MIB,
                Some(s) if s.value < MIN_MEMORY_MIB => {
                    return Err(self.err(
                        s,
                        &key("memory"),
                        format!(
                            "{} MiB is too small; a VM needs at least {MIN_MEMORY_MIB} MiB",
                            s.value
                        ),
                    ))
                }
                Some(s) => s.value,
            };
            let footprint = memory_mib.saturating_add(vm_overhead_mib);
            if footprint > budget_mib {
                let message = format!(
                    "{memory_mib} MiB plus {vm_overhead_mib} MiB of VMM overhead does not fit in the --mem budget of {budget_mib} MiB"
                );
                return Err(match &fv.memory {
                    Some(s) => self.err(s, &key("memory"), message),
                    None => self.err(f, &key("memory"), message),
                });
            }
            let concurrency_limit = match &fv.concurrency_limit {
                Some(s) if s.value == 0 => {
                    return Err(self.err(s, &key("concurrency_limit"), "must be at least 1"))
                }
                Some(s) => usize::try_from(s.value).unwrap_or(usize::MAX),
                None => usize::try_from(budget_mib / footprint.max(1))
                    .unwrap_or(usize::MAX)
                    .max(1),
            };
            let min_idle = fv.min_idle.as_ref().map_or(Ok(0), |s| {
                let n = usize::try_from(s.value).unwrap_or(usize::MAX);
                if n > concurrency_limit {
                    Err(self.err(s, &key("min_idle"), format!("{n} exceeds concurrency_limit {concurrency_limit}")))
                } else if s.value.saturating_mul(footprint) > budget_mib {
                    Err(self.err(
                        s,
                        &key("min_idle"),
                        format!("{n} VMs of {footprint} MiB do not fit in the --mem budget of {budget_mib} MiB"),
                    ))
                } else {
                    Ok(n)
                }
            })?;
            let positive = |s: &Option<Spanned<Seconds>>, k: &str, default: Duration| match s {
                Some(s) if s.value.0.is_zero() => {
                    Err(self.err(s, &key(k), "must be longer than zero"))
                }
                Some(s) => Ok(s.value.0),
                None => Ok(default),
            };
            let idle_timeout = positive(&fv.idle_timeout, "idle_timeout", DEFAULT_IDLE_TIMEOUT)?;
            let request_timeout = positive(
                &fv.request_timeout,
                "request_timeout",
                DEFAULT_REQUEST_TIMEOUT,
            )?;
            let max_queue = fv.max_queue.as_ref().map_or(DEFAULT_MAX_QUEUE, |s| s.value);
            let max_queue = usize::try_from(max_queue).unwrap_or(usize::MAX);
            let load_dir = match &fv.load_dir {
                None => None,
                Some(s) => {
                    let mut dirs = Vec::new();
                    for part in s.value.split(',').map(str::trim) {
                        if part.is_empty() {
                            return Err(self.err(
                                s,
                                &key("load_dir"),
                                "empty entry in the comma list",
                            ));
                        }
                        let p = snapshot_dir.join(part);
                        if !p.is_dir() {
                            return Err(self.err(
                                s,
                                &key("load_dir"),
                                format!("snapshot directory {} does not exist", p.display()),
                            ));
                        }
                        dirs.push(absolute(&p).display().to_string());
                    }
                    Some(dirs.join(","))
                }
            };
            let flag = |b: &Option<Spanned<bool>>| b.as_ref().is_some_and(|s| s.value);
            for (b, k) in [
                (&fv.copy_base, "copy_base"),
                (&fv.copy_diff, "copy_diff"),
                (&fv.load_ws, "load_ws"),
            ] {
                if let Some(s) = b {
                    if s.value && load_dir.is_none() {
                        return Err(self.err(
                            s,
                            &key(k),
                            "only applies to a restore: set load_dir",
                        ));
                    }
                }
            }
            let function = Function {
                name: name.clone(),
                kernel,
                cmdline,
                rootfs,
                appfs,
                vcpus,
                memory_mib,
                concurrency_limit,
                load_dir,
                copy_base: flag(&fv.copy_base),
                copy_diff: flag(&fv.copy_diff),
                load_ws: flag(&fv.load_ws),
                network,
                keep_state,
                min_idle,
                idle_timeout,
                request_timeout,
                max_queue,
            };
            // The one check of the VM flags firerunner and singlevm make.
            if let Err(e) = function.check() {
                return Err(self.err(f, &format!("functions.{name}"), e));
            }
            functions.push(function);
        }
        let warm: u64 = functions
            .iter()
            .map(|f| f.min_idle as u64 * (f.memory_mib + vm_overhead_mib))
            .sum();
        if warm > budget_mib {
            return Err(self.err(
                raw_functions,
                "functions",
                format!("the min_idle VMs together need {warm} MiB, more than the --mem budget of {budget_mib} MiB"),
            ));
        }
        Ok(Config {
            firerunner,
            boot_timeout,
            vm_overhead_mib,
            jail,
            functions,
            deploy,
            no_seccomp: false,
            shells,
            hibernate,
        })
    }

    /// The `deploy` section; `dirs` are runtimefs_dir, appfs_dir and
    /// snapshot_dir.
    fn deploy(
        &self,
        d: &Spanned<RawDeploy>,
        kernel: Option<&PathBuf>,
        kernel_args: Option<&Spanned<String>>,
        [runtimefs_dir, appfs_dir, snapshot_dir]: [&PathBuf; 3],
    ) -> Result<DeployConfig, ConfigError> {
        let d = &d.value;
        if d.state_dir.value.trim().is_empty() {
            return Err(self.err(&d.state_dir, "deploy.state_dir", "must not be empty"));
        }
        let state_dir = absolute(&self.base.join(&d.state_dir.value));
        let image_dir = match &d.image_dir {
            Some(_) => absolute(&self.dir(&d.image_dir, "deploy.image_dir")?),
            None => absolute(appfs_dir),
        };
        let mkappfs = d
            .mkappfs
            .as_ref()
            .map(|s| self.file_in(self.base, s, "deploy.mkappfs"))
            .transpose()?;
        let mut runtimes = BTreeMap::new();
        for (name, r) in &d.runtimes {
            let key = |k: &str| format!("deploy.runtimes.{name}.{k}");
            let rv = &r.value;
            let kernel = match (&rv.kernel, kernel) {
                (Some(s), _) => self.file_in(self.base, s, &key("kernel"))?,
                (None, Some(k)) => k.clone(),
                (None, None) => {
                    return Err(self.err(
                        r,
                        &key("kernel"),
                        "no kernel: set kernel_path at the top or kernel in the runtime",
                    ))
                }
            };
            let memory_mib = match &rv.memory {
                Some(s) if s.value < MIN_MEMORY_MIB => {
                    return Err(self.err(
                        s,
                        &key("memory"),
                        format!("a VM needs at least {MIN_MEMORY_MIB} MiB"),
                    ))
                }
                Some(s) => s.value,
                None => DEFAULT_MEMORY_MIB,
            };
            let vcpus = match &rv.vcpus {
                Some(s) if s.value == 0 || s.value > u64::from(MAX_VCPUS) => {
                    return Err(self.err(
                        s,
                        &key("vcpus"),
                        format!("must be between 1 and {MAX_VCPUS}"),
                    ))
                }
                Some(s) => s.value,
                None => 1,
            };
            let snapshot = match &rv.snapshot {
                Some(s) => {
                    let p = snapshot_dir.join(&s.value);
                    if !p.is_dir() {
                        return Err(self.err(
                            s,
                            &key("snapshot"),
                            format!("snapshot directory {} does not exist", p.display()),
                        ));
                    }
                    Some(absolute(&p))
                }
                None => None,
            };
            runtimes.insert(
                name.clone(),
                Runtime {
                    kernel,
                    cmdline: rv.cmdline.as_ref().or(kernel_args).map(|s| s.value.clone()),
                    rootfs: self.file_in(runtimefs_dir, &rv.runtimefs, &key("runtimefs"))?,
                    memory_mib,
                    vcpus,
                    snapshot,
                },
            );
        }
        if let Some(s) = &d.default_runtime {
            if !runtimes.contains_key(&s.value) {
                return Err(self.err(
                    s,
                    "deploy.default_runtime",
                    format!("no runtime {:?} under deploy.runtimes", s.value),
                ));
            }
        }
        Ok(DeployConfig {
            state_dir,
            image_dir,
            mkappfs,
            default_runtime: d.default_runtime.as_ref().map(|s| s.value.clone()),
            runtimes,
        })
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A directory with a kernel, a rootfs, an appfs and a snapshot dir.
    fn fixture(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("multivm-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("snap/base")).unwrap();
        for f in ["vmlinux", "rootfs.img", "app.img", "firerunner"] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        Dir(d)
    }

    fn parse(d: &Dir, yaml: &str, budget: u64) -> Result<Config, ConfigError> {
        Config::parse(
            yaml,
            "f.yaml",
            &d.0,
            budget,
            PathBuf::from("/default/firerunner"),
        )
    }

    fn invalid(r: Result<Config, ConfigError>) -> (u64, String, String) {
        match r {
            Err(ConfigError::Invalid {
                line, key, message, ..
            }) => (line, key, message),
            Err(e) => panic!("expected an invalid-value error, got {e}"),
            Ok(_) => panic!("expected an error"),
        }
    }

    fn syntax(r: Result<Config, ConfigError>) -> (u64, String) {
        match r {
            Err(ConfigError::Syntax { line, message, .. }) => (line, message),
            Err(e) => panic!("expected a syntax error, got {e}"),
            Ok(_) => panic!("expected an error"),
        }
    }

    const GOOD: &str = "\
kernel_path: vmlinux
kernel_args: console=ttyS0
snapshot_dir: snap
functions:
  hello:
    runtimefs: rootfs.img
    appfs: app.img
    memory: 64
    concurrency_limit: 3
    min_idle: 1
    idle_timeout: 250ms
    request_timeout: 2.5
  restored:
    runtimefs: rootfs.img
    load_dir: base
    copy_base: true
    cmdline: quiet
    max_queue: 0
";

    #[test]
    fn shells_are_kept_per_shape_and_set_aside_from_the_budget() {
        let d = fixture("shells");
        let yaml = format!("shells:\n  - memory: 64\n    count: 2\n  - memory: 128\n    vcpus: 2\n    count: 1\n{GOOD}");
        let c = parse(&d, &yaml, 1024).unwrap();
        let shape = |memory_mib, vcpus, count| ShellShape {
            memory_mib,
            vcpus,
            count,
        };
        assert_eq!(c.shells, vec![shape(64, 1, 2), shape(128, 2, 1)]);
        assert_eq!(c.shells_mib(), 3 * DEFAULT_VM_OVERHEAD_MIB);
        assert_eq!(c.vm_budget_mib(1024), 1024 - 3 * DEFAULT_VM_OVERHEAD_MIB);
        let restored = c.functions.iter().find(|f| f.name == "restored").unwrap();
        let r = restored.restore_request().unwrap();
        assert_eq!(r.layers, vec![d.0.join("snap/base")]);
        assert!(r.copy_base && !r.load_ws && r.dump_ws.is_none());
        assert!(c.functions[0].restore_request().is_none(), "hello boots");

        for (shells, key, says) in [
            (
                "  - memory: 64\n    count: 0\n",
                "shells[0].count",
                "at least 1",
            ),
            (
                "  - memory: 1\n    count: 1\n",
                "shells[0].memory",
                "at least",
            ),
            (
                "  - memory: 64\n    vcpus: 0\n    count: 1\n",
                "shells[0].vcpus",
                "between 1",
            ),
            (
                "  - memory: 64\n    count: 200\n",
                "shells",
                "nothing of the --mem budget",
            ),
        ] {
            let (_, k, m) = invalid(parse(&d, &format!("shells:\n{shells}{GOOD}"), 1024));
            assert_eq!(k, key, "{m}");
            assert!(m.contains(says), "{m}");
        }
        // The min_idle VM of `hello` (64 + 8 MiB) no longer fits beside the shells.
        let (_, k, _) = invalid(parse(
            &d,
            &format!("shells:\n  - memory: 64\n    count: 2\n{GOOD}"),
            80,
        ));
        assert!(k.starts_with("functions"), "{k}");
    }

    #[test]
    fn a_good_config_resolves_paths_and_defaults() {
        let d = fixture("good");
        let c = parse(&d, GOOD, 1024).unwrap();
        assert_eq!(c.firerunner, PathBuf::from("/default/firerunner"));
        assert_eq!(c.vm_overhead_mib, DEFAULT_VM_OVERHEAD_MIB);
        assert_eq!(c.boot_timeout, DEFAULT_BOOT_TIMEOUT);
        assert!(c.jail, "VMs are jailed unless the config says otherwise");
        let unjailed = parse(&d, &format!("jail: false\n{GOOD}"), 1024).unwrap();
        assert!(!unjailed.jail);
        let h = &c.functions[0];
        assert_eq!(h.name, "hello");
        assert!(h.kernel.is_absolute() && h.kernel.ends_with("vmlinux"));
        assert!(h.appfs.as_ref().unwrap().ends_with("app.img"));
        assert_eq!(h.cmdline.as_deref(), Some("console=ttyS0"));
        assert_eq!((h.memory_mib, h.concurrency_limit, h.min_idle), (64, 3, 1));
        assert_eq!(h.idle_timeout, Duration::from_millis(250));
        assert_eq!(h.request_timeout, Duration::from_millis(2500));
        assert_eq!(h.launch_kind(), LaunchKind::Boot);
        let r = &c.functions[1];
        assert_eq!(r.launch_kind(), LaunchKind::Restore);
        assert!(r.load_dir.as_ref().unwrap().ends_with("snap/base"));
        assert_eq!(r.cmdline.as_deref(), Some("quiet"));
        assert_eq!(r.memory_mib, DEFAULT_MEMORY_MIB);
        assert_eq!(r.max_queue, 0);
        // Default concurrency: what the budget holds.
        assert_eq!(r.concurrency_limit, 1024 / (128 + 8));
        // firerunner's own flag parser takes them.
        #[derive(clap::Parser)]
        struct Firerunner {
            #[command(flatten)]
            vm: crate::cli::VmArgs,
        }
        let mut argv: Vec<OsString> = vec!["firerunner".into()];
        argv.extend(r.firerunner_args(false));
        let vm = <Firerunner as clap::Parser>::try_parse_from(argv)
            .unwrap()
            .vm;
        assert_eq!(vm.load_dir, r.load_dir);
        assert!(vm.copy_base && !vm.copy_diff && !vm.load_ws);
        assert_eq!((vm.mem_size, vm.vcpu_count), (128, 1));
        assert_eq!(vm.kernel_args.as_deref(), Some("quiet"));
        assert!(vm.appfs.is_none());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let d = fixture("unknown");
        let (line, msg) = syntax(parse(
            &d,
            "kernel_path: vmlinux\nbogus: 1\nfunctions: {}\n",
            1024,
        ));
        assert_eq!(line, 2, "{msg}");
        assert!(msg.contains("bogus"), "{msg}");
        let yaml = GOOD.replace("    max_queue: 0\n", "    max_queue: 0\n    memroy: 64\n");
        let (line, msg) = syntax(parse(&d, &yaml, 1024));
        assert_eq!(line, 19, "{msg}");
        assert!(msg.contains("memroy"), "{msg}");
        let (line, msg) = syntax(parse(&d, "functions:\n  f:\n    runtimefs: [1\n", 1024));
        assert!(line >= 3, "{line} {msg}");
    }

    #[test]
    fn missing_files_name_the_key_and_line() {
        let d = fixture("missing");
        let yaml = GOOD.replace("appfs: app.img", "appfs: nope.img");
        let (line, key, msg) = invalid(parse(&d, &yaml, 1024));
        assert_eq!((line, key.as_str()), (7, "functions.hello.appfs"), "{msg}");
        assert!(msg.contains("nope.img"), "{msg}");
        let yaml = GOOD.replace("load_dir: base", "load_dir: base,gone");
        let (line, key, _) = invalid(parse(&d, &yaml, 1024));
        assert_eq!((line, key.as_str()), (15, "functions.restored.load_dir"));
        let yaml = GOOD.replace("kernel_path: vmlinux", "kernel_path: bzImage");
        let (line, key, _) = invalid(parse(&d, &yaml, 1024));
        assert_eq!((line, key.as_str()), (1, "kernel_path"));
        let yaml = format!("firerunner_path: fr\n{GOOD}");
        let (_, key, _) = invalid(parse(&d, &yaml, 1024));
        assert_eq!(key, "firerunner_path");
        let e = Config::load(&d.0.join("absent.yaml"), 1024, PathBuf::new()).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    }

    #[test]
    fn impossible_sizes_are_refused() {
        let d = fixture("sizes");
        let (line, key, msg) = invalid(parse(&d, GOOD, 60));
        assert_eq!((line, key.as_str()), (8, "functions.hello.memory"), "{msg}");
        assert!(msg.contains("--mem budget of 60 MiB"), "{msg}");
        // The default memory does not fit: the function's own line.
        let (line, key, _) = invalid(parse(&d, GOOD, 100));
        assert_eq!((line, key.as_str()), (14, "functions.restored.memory"));
        let yaml = GOOD.replace("memory: 64", "memory: 0");
        let (line, key, _) = invalid(parse(&d, &yaml, 1024));
        assert_eq!((line, key.as_str()), (8, "functions.hello.memory"));
        let yaml = GOOD.replace("memory: 64", "memory: 64\n    vcpus: 99");
        let (line, key, _) = invalid(parse(&d, &yaml, 1024));
        assert_eq!((line, key.as_str()), (9, "functions.hello.vcpus"));
        let yaml = GOOD.replace("min_idle: 1", "min_idle: 4");
        let (_, key, msg) = invalid(parse(&d, &yaml, 1024));
        assert_eq!(key, "functions.hello.min_idle", "{msg}");
        let yaml = GOOD.replace("concurrency_limit: 3", "concurrency_limit: 0");
        let (_, key, _) = invalid(parse(&d, &yaml, 1024));
        assert_eq!(key, "functions.hello.concurrency_limit");
        let yaml = GOOD.replace("memory: 64", "memory: -5");
        let (line, msg) = syntax(parse(&d, &yaml, 1024));
        assert_eq!(line, 8, "{msg}");
        let yaml = GOOD.replace("request_timeout: 2.5", "request_timeout: 0");
        let (_, key, _) = invalid(parse(&d, &yaml, 1024));
        assert_eq!(key, "functions.hello.request_timeout");
        let yaml = GOOD.replace("idle_timeout: 250ms", "idle_timeout: 5 fortnights");
        let (line, msg) = syntax(parse(&d, &yaml, 1024));
        assert_eq!(line, 11, "{msg}");
        assert!(msg.contains("unit"), "{msg}");
    }

    #[test]
    fn keep_state_needs_a_hibernate_section_and_changes_the_vm_flags() {
        let d = fixture("keep");
        let yaml = GOOD
            .replace(
                "    appfs: app.img\n",
                "    appfs: app.img\n    keep_state: true\n",
            )
            .replace(
                "    copy_base: true\n",
                "    copy_base: true\n    load_ws: true\n",
            );
        let (line, key, msg) = invalid(parse(&d, &yaml, 1024));
        assert_eq!((line, key.as_str()), (8, "functions.hello.keep_state"));
        assert!(msg.contains("hibernate"), "{msg}");
        let (_, key, _) = invalid(parse(
            &d,
            &format!("hibernate:\n  dir: h\n  disk: 0\n{yaml}"),
            1024,
        ));
        assert_eq!(key, "hibernate.disk");
        let c = parse(&d, &format!("hibernate:\n  dir: h\n{yaml}"), 1024).unwrap();
        let h = c.hibernate.as_ref().unwrap();
        assert_eq!(
            (h.dir.clone(), h.disk_mib),
            (d.0.join("h"), DEFAULT_HIBERNATE_DISK_MIB)
        );
        let hello = &c.functions[0];
        let forgetful = Function {
            keep_state: false,
            ..hello.clone()
        };
        assert!(hello.keep_state && !hello.same_vm(&forgetful));
        let args = |a: Vec<OsString>| -> Vec<String> {
            a.iter().map(|a| a.to_string_lossy().into_owned()).collect()
        };
        let flag = |a: &[String], f: &str| a.iter().position(|x| x == f).map(|i| a[i + 1].clone());
        // A wake restores the hibernated layers on top of the function's
        // own, without its working set.
        let restored = c.functions.iter().find(|f| f.load_dir.is_some()).unwrap();
        let restored_kept = Function {
            keep_state: true,
            ..restored.clone()
        };
        // No shells for a keep_state function: they keep no dirty log.
        assert!(restored.restore_request().is_some());
        assert!(restored_kept.restore_request().is_none());
        let woken =
            args(restored.kept_args(false, Path::new("/h/vm-1"), &[PathBuf::from("/h/layer-1")]));
        let own = restored.load_dir.clone().unwrap();
        assert_eq!(
            flag(&woken, "--load_dir"),
            Some(format!("{own},/h/layer-1"))
        );
        assert_eq!(flag(&woken, "--snapshot_dir").as_deref(), Some("/h/vm-1"));
        assert!(args(restored.firerunner_args(false))
            .iter()
            .any(|a| a == "--load_ws"));
        assert!(!woken.iter().any(|a| a == "--load_ws"));
        let fresh = args(hello.kept_args(false, Path::new("/h/vm-2"), &[]));
        assert_eq!(flag(&fresh, "--load_dir"), None);
        assert_eq!(flag(&fresh, "--snapshot_dir").as_deref(), Some("/h/vm-2"));
    }

    #[test]
    fn unsupported_or_inconsistent_settings_are_refused() {
        let d = fixture("misc");
        let yaml = GOOD.replace(
            "    appfs: app.img\n",
            "    appfs: app.img\n    network: true\n",
        );
        let (line, key, msg) = invalid(parse(&d, &yaml, 1024));
        assert_eq!((line, key.as_str()), (8, "functions.hello.network"));
        assert!(msg.contains("allow_network"), "{msg}");
        let allowed = format!("allow_network: true\n{yaml}");
        let c = parse(&d, &allowed, 1024).unwrap();
        let hello = &c.functions[0];
        assert!(hello.network && hello.restore_request().is_none());
        // A networked boot gets the guest's address on its command line.
        let args: Vec<String> = hello
            .firerunner_args(false)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let cmdline = &args[args.iter().position(|a| a == "--kernel_args").unwrap() + 1];
        assert_eq!(cmdline, &format!("console=ttyS0 {}", network::kernel_arg()));
        assert!(!c.functions[1].network);
        let unjailed = format!("jail: false\n{allowed}");
        let (_, key, msg) = invalid(parse(&d, &unjailed, 1024));
        assert_eq!(key, "functions.hello.network");
        assert!(msg.contains("jail"), "{msg}");
        let yaml = GOOD.replace(
            "    appfs: app.img\n",
            "    appfs: app.img\n    load_ws: true\n",
        );
        let (_, key, _) = invalid(parse(&d, &yaml, 1024));
        assert_eq!(key, "functions.hello.load_ws");
        let (_, key, _) = invalid(parse(&d, "kernel_path: vmlinux\nfunctions: {}\n", 1024));
        assert_eq!(key, "functions");
        let yaml = GOOD.replace("kernel_path: vmlinux\n", "");
        let (_, key, _) = invalid(parse(&d, &yaml, 1024));
        assert_eq!(key, "functions.hello.kernel");
        let yaml = GOOD.replace("  hello:", "  \"he llo\":");
        let (_, key, _) = invalid(parse(&d, &yaml, 1024));
        assert_eq!(key, "functions.he llo");
        let (_, msg) = syntax(parse(&d, "functions:\n  f:\n    appfs: app.img\n", 1024));
        assert!(msg.contains("runtimefs"), "{msg}");
    }

    #[test]
    fn syntax_errors_name_the_key_path() {
        let d = fixture("keypath");
        let yaml = GOOD.replace("memory: 64", "memory: lots");
        let e = parse(&d, &yaml, 1024).unwrap_err().to_string();
        assert!(e.starts_with("f.yaml:8:"), "{e}");
        assert!(
            e.contains("functions.hello.memory: expected a whole number"),
            "{e}"
        );
        let yaml = GOOD.replace("    runtimefs: rootfs.img\n    appfs", "    appfs");
        let e = parse(&d, &yaml, 1024).unwrap_err().to_string();
        assert!(
            e.contains("functions.hello: missing field `runtimefs`"),
            "{e}"
        );
        assert_eq!(
            key_path("a:\n  b:\n    # c\n\n    d: 1\n", 5),
            ["a", "b", "d"]
        );
        assert!(key_path("a: 1\n", 9).is_empty());
    }

    #[test]
    fn the_example_config_uses_only_known_keys() {
        let text = include_str!("../../resources/multivm/functions.yaml");
        let raw: RawConfig = serde_saphyr::from_str(text).unwrap();
        assert!(raw.functions.unwrap().value.contains_key("hello"));
    }

    #[test]
    fn the_deploy_section_resolves_runtimes_and_allows_no_functions() {
        let d = fixture("deploy");
        let yaml = "\
kernel_path: vmlinux
kernel_args: quiet
snapshot_dir: snap
deploy:
  state_dir: state
  mkappfs: app.img
  default_runtime: tg
  runtimes:
    tg:
      runtimefs: rootfs.img
      memory: 32
    restored:
      runtimefs: rootfs.img
      snapshot: base
      cmdline: other
";
        let c = parse(&d, yaml, 1024).unwrap();
        assert!(c.functions.is_empty());
        let dep = c.deploy.unwrap();
        assert_eq!(dep.state_dir, d.0.join("state"));
        assert_eq!(dep.image_dir, d.0, "image_dir defaults to appfs_dir");
        assert_eq!(dep.default_runtime.as_deref(), Some("tg"));
        let tg = &dep.runtimes["tg"];
        assert_eq!((tg.memory_mib, tg.vcpus), (32, 1));
        assert_eq!(tg.cmdline.as_deref(), Some("quiet"));
        assert!(tg.kernel.ends_with("vmlinux") && tg.snapshot.is_none());
        let r = &dep.runtimes["restored"];
        assert!(r.snapshot.as_ref().unwrap().ends_with("snap/base"));
        assert_eq!(r.cmdline.as_deref(), Some("other"));
        let (_, key, _) = invalid(parse(
            &d,
            &yaml.replace("default_runtime: tg", "default_runtime: x"),
            1024,
        ));
        assert_eq!(key, "deploy.default_runtime");
        let (_, key, _) = invalid(parse(
            &d,
            &yaml.replace("snapshot: base", "snapshot: gone"),
            1024,
        ));
        assert_eq!(key, "deploy.runtimes.restored.snapshot");
        let (_, key, _) = invalid(parse(&d, &yaml.replace("memory: 32", "memory: 1"), 1024));
        assert_eq!(key, "deploy.runtimes.tg.memory");
        let (_, msg) = syntax(parse(&d, &yaml.replace("memory: 32", "memroy: 32"), 1024));
        assert!(msg.contains("memroy"), "{msg}");
    }

    #[test]
    fn function_names_are_safe_path_segments() {
        for good in ["a", "hello-python3", "A_1.b", &"x".repeat(63)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".a",
            "-a",
            "a/b",
            "a b",
            "a\0",
            &"x".repeat(64),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("3d").is_err());
    }
}
