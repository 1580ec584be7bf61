//! A network for each VM that snapshot clones can share: a network
//! namespace per VM, laid out the same way for every VM, so that a guest
//! restored from a snapshot finds the address, gateway and gateway MAC it
//! was snapshotted with.
//!
//! ```text
//!  guest eth0 172.16.0.2/30                namespace snapvm-<uid>
//!     │ virtio-net                         (forwards; masquerades to eth0;
//!  TAP vm0 172.16.0.1/30, 02:00:ac:10:00:01  nothing gets in unasked)
//!  veth eth0 10.200.x.y+2/30, default route via +1
//!     │
//!  veth snv<uid> 10.200.x.y+1/30           the controller's namespace
//!                                          (table inet snapvm: masquerades
//!                                          to the outside, drops what VMs
//!                                          send to this host or each other)
//! ```
//!
//! `<uid>` is the VM's jail slot ([`crate::jail::Slot`]), which a
//! controller holds exclusively, so names and addresses never collide
//! between concurrent controllers sharing a uid range; `x.y` is the uid
//! modulo 65 536 (a /30 each in 10.200.0.0/14). The namespace is named,
//! `/run/netns/snapvm-<uid>`, so `ip netns exec` reaches it; the TAP is
//! not persistent: it lives as long as the VM holds its descriptor
//! (passed as `--tap_fd`), and the veth pair as long as the namespace.
//!
//! Creating one runs `ip` twice and `nft` once (Debian's iproute2 and
//! nftables); the rest (the namespace, the TAP, forwarding) is done here.

use std::fs::{self, File};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::vmm::config::DEFAULT_KERNEL_ARGS;
use crate::vmm::devices::virtio::net::tap::{Tap, TapError};

/// The guest's address in every VM namespace.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);
/// The TAP's address in every VM namespace: the guest's gateway.
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
/// The TAP's MAC in every VM namespace (locally administered), so that
/// the gateway's entry in a restored guest's neighbour cache stays right.
pub const GATEWAY_MAC: &str = "02:00:ac:10:00:01";
/// The TAP's name in every VM namespace.
pub const TAP_NAME: &str = "vm0";
/// Where the controller's resolver is read from: the first IPv4 name
/// server of the first file that names one that is not a loopback
/// address (a local stub such as systemd-resolved's 127.0.0.53 cannot
/// serve VMs; its upstreams are in the second file).
const RESOLV_CONF: [&str; 2] = ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"];
/// The block the VM namespaces' uplinks take their /30s from.
pub const UPLINK_NET: &str = "10.200.0.0/14";
/// Prefix of the uplinks' host ends (`snv<uid>`), which the host's rules
/// match.
const UPLINK_PREFIX: &str = "snv";
const NETNS_DIR: &str = "/run/netns";

/// The kernel command line argument that configures the guest's
/// interface at boot (`CONFIG_IP_PNP`): a VM booted with it and then
/// snapshotted keeps that configuration in every clone.
pub fn kernel_arg() -> String {
    format!("ip={GUEST_ADDR}::{GATEWAY_ADDR}:255.255.255.252::eth0:off")
}

/// A kernel command line (`None`: firerunner's default) with
/// [`kernel_arg`] added.
pub fn with_kernel_arg(cmdline: Option<&str>) -> String {
    format!(
        "{} {}",
        cmdline.unwrap_or(DEFAULT_KERNEL_ARGS),
        kernel_arg()
    )
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("a VM's network needs root (a network namespace, a TAP, nftables rules)")]
    NotRoot,
    #[error(
        "cannot create a network namespace: {0} (a VM's network needs root, CAP_SYS_ADMIN and \
         CAP_NET_ADMIN)"
    )]
    Unshare(nix::Error),
    #[error("cannot name network namespace {path}: {source}")]
    Name { path: PathBuf, source: nix::Error },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("cannot open the VM's TAP: {0}")]
    Tap(#[from] TapError),
    #[error("cannot run {tool} (Debian's {package}; scripts/setup.sh installs it): {source}")]
    Spawn {
        tool: &'static str,
        package: &'static str,
        source: std::io::Error,
    },
    #[error("{tool} failed to {what}: {stderr}")]
    Tool {
        tool: &'static str,
        what: String,
        stderr: String,
    },
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

/// The namespace of the VM of jail slot `uid`.
pub fn netns_name(uid: u32) -> String {
    format!("snapvm-{uid}")
}

fn netns_path(uid: u32) -> PathBuf {
    Path::new(NETNS_DIR).join(netns_name(uid))
}

/// The uplink's host end and its address; the namespace end is +1.
fn uplink(uid: u32) -> (String, Ipv4Addr) {
    let base = u32::from(Ipv4Addr::new(10, 200, 0, 0));
    let host = Ipv4Addr::from(base + (uid % 65_536) * 4 + 1);
    (format!("{UPLINK_PREFIX}{uid}"), host)
}

/// Runs `tool` with `script` on stdin, in the calling thread's network
/// namespace.
fn run(
    tool: &'static str,
    args: &[&str],
    script: &str,
    what: impl Into<String>,
) -> Result<(), NetworkError> {
    let package = if tool == "nft" {
        "nftables"
    } else {
        "iproute2"
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetworkError::Spawn {
            tool,
            package,
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A tool that died early is reported by its status below.
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| NetworkError::Spawn {
            tool,
            package,
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(NetworkError::Tool {
        tool,
        what: what.into(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// Turns on IPv4 forwarding in the calling thread's network namespace.
fn forward() -> Result<(), NetworkError> {
    let path = Path::new("/proc/sys/net/ipv4/ip_forward");
    fs::write(path, "1").map_err(|source| NetworkError::Io {
        what: "cannot turn on forwarding in",
        path: path.to_owned(),
        source,
    })
}

/// Makes the controller's namespace the VMs' way out: IPv4 forwarding on,
/// and the table `inet snapvm`, which masquerades what VM namespaces
/// send out and drops what they send to this host's own addresses or to
/// one another. Idempotent: a table that lists exactly these rules is
/// left alone (listing costs an `nft` run of ~2 ms, loading ~14 ms: the
/// kernel waits out an RCU grace period per commit); anything else is
/// replaced atomically. Shared by every controller of this namespace,
/// and left in place when they stop: it matches only the uplinks, which
/// exist only while their VMs do.
pub fn install_host_rules() -> Result<(), NetworkError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(NetworkError::NotRoot);
    }
    forward()?;
    let table = format!(
        "table inet snapvm {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter - 10; policy accept;\n\
         \t\tiifname \"{UPLINK_PREFIX}*\" drop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter - 10; policy accept;\n\
         \t\tiifname \"{UPLINK_PREFIX}*\" oifname \"{UPLINK_PREFIX}*\" drop\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {UPLINK_NET} oifname != \"{UPLINK_PREFIX}*\" masquerade\n\
         \t}}\n\
         }}\n"
    );
    let listed = Command::new("nft")
        .args(["list", "table", "inet", "snapvm"])
        .stderr(Stdio::null())
        .output();
    let words = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
    if listed.is_ok_and(|o| {
        o.status.success() && words(&String::from_utf8_lossy(&o.stdout)) == words(&table)
    }) {
        return Ok(());
    }
    run(
        "nft",
        &["-f", "-"],
        &format!("table inet snapvm\ndelete table inet snapvm\n{table}"),
        "load the host's rules (table inet snapvm)",
    )
}

/// The resolver DNS queries to the gateway go to (see [`RESOLV_CONF`]).
pub fn resolver() -> Option<Ipv4Addr> {
    RESOLV_CONF.iter().find_map(|path| {
        fs::read_to_string(path).ok()?.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next()?.parse::<Ipv4Addr>().ok())
                .flatten()
                .filter(|a| !a.is_loopback() && !a.is_unspecified())
        })
    })
}

/// The slots in `range` that have a namespace.
pub fn named(range: std::ops::Range<u32>) -> Vec<u32> {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("snapvm-")?
                .parse::<u32>()
                .ok()
        })
        .filter(|uid| range.contains(uid))
        .collect()
}

/// Removes the namespace of slot `uid` if there is one (what a controller
/// killed with its VMs leaves). Its devices go with it once no VM holds
/// its TAP.
pub fn remove(uid: u32) {
    let path = netns_path(uid);
    if !path.exists() {
        return;
    }
    if let Err(e) = umount2(&path, MntFlags::MNT_DETACH) {
        log::warn!("cannot unmount {}: {e}", path.display());
    }
    if let Err(e) = fs::remove_file(&path) {
        log::warn!("cannot remove {}: {e}", path.display());
    }
}

/// A VM's network namespace and its TAP. Dropping it removes the
/// namespace's name; the namespace itself ends with the VM's descriptor.
#[derive(Debug)]
pub struct VmNetwork {
    uid: u32,
    tap: Tap,
}

impl VmNetwork {
    /// Creates the namespace of jail slot `uid` (replacing a leftover),
    /// wired as the module doc shows, and opens its TAP. On failure
    /// nothing is left.
    pub fn create(uid: u32) -> Result<Self, NetworkError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(NetworkError::NotRoot);
        }
        remove(uid);
        Self::wire(uid).inspect_err(|_| {
            // An uplink of this namespace's (made before a later step
            // failed) goes now; an interface of that name that is not
            // ours (the error may be that the name is taken) stays.
            let (uplink, _) = uplink(uid);
            let shown = Command::new("ip")
                .args(["-o", "link", "show", &uplink])
                .stderr(Stdio::null())
                .output();
            let ours = format!("link-netns {}", netns_name(uid));
            if shown.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&ours)) {
                delete_uplink(uid);
            }
            remove(uid);
        })
    }

    fn wire(uid: u32) -> Result<Self, NetworkError> {
        let start = std::time::Instant::now();
        let path = netns_path(uid);
        let tap = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("netns".into())
                .spawn_scoped(s, || Self::inside(&path))
                .map_err(NetworkError::Thread)?
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })?;
        let inside = start.elapsed();
        let (uplink, host) = uplink(uid);
        let ns = Ipv4Addr::from(u32::from(host) + 1);
        let name = netns_name(uid);
        run(
            "ip",
            &["-batch", "-"],
            &format!(
                "link add {uplink} type veth peer name eth0 netns {name}\n\
                 addr add {host}/30 dev {uplink}\n\
                 link set dev {uplink} up\n"
            ),
            format!("make the uplink {uplink} of {name}"),
        )?;
        run(
            "ip",
            &["-n", &name, "-batch", "-"],
            &format!(
                "link set dev lo up\n\
                 link set dev {TAP_NAME} address {GATEWAY_MAC}\n\
                 addr add {GATEWAY_ADDR}/30 dev {TAP_NAME}\n\
                 link set dev {TAP_NAME} up\n\
                 addr add {ns}/30 dev eth0\n\
                 link set dev eth0 up\n\
                 route add default via {host} dev eth0\n"
            ),
            format!("configure {name}"),
        )?;
        log::debug!(
            "network {name} made in {} us (namespace, TAP and rules: {} us)",
            start.elapsed().as_micros(),
            inside.as_micros()
        );
        Ok(Self { uid, tap })
    }

    /// In a thread of its own (a network namespace is a per-thread
    /// property; the thread ends after): creates the namespace, names it
    /// `path`, opens the TAP, turns on forwarding and loads its rules.
    fn inside(path: &Path) -> Result<Tap, NetworkError> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(NetworkError::Unshare)?;
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| NetworkError::Io { what, path, source }
        };
        fs::create_dir_all(NETNS_DIR).map_err(io("cannot create", Path::new(NETNS_DIR)))?;
        File::create(path).map_err(io("cannot create", path))?;
        mount(
            Some("/proc/thread-self/ns/net"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|source| NetworkError::Name {
            path: path.to_owned(),
            source,
        })?;
        let tap = Tap::open(TAP_NAME)?;
        forward()?;
        // The guest's name server is its gateway (its root image says so):
        // DNS to it goes on to this host's resolver, if there is one.
        let dns = match resolver() {
            Some(r) => format!(
                "\tchain prerouting {{\n\
                 \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
                 \t\tiifname \"{TAP_NAME}\" ip daddr {GATEWAY_ADDR} udp dport 53 dnat to {r}\n\
                 \t\tiifname \"{TAP_NAME}\" ip daddr {GATEWAY_ADDR} tcp dport 53 dnat to {r}\n\
                 \t}}\n"
            ),
            None => {
                log::debug!("no resolver in {RESOLV_CONF:?}: VMs get no DNS");
                String::new()
            }
        };
        let rules = format!(
            "table ip snapvm {{\n\
             {dns}\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy drop;\n\
             \t\tiifname \"{TAP_NAME}\" oifname \"eth0\" accept\n\
             \t\tiifname \"eth0\" oifname \"{TAP_NAME}\" ct state established,related accept\n\
             \t}}\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy drop;\n\
             \t\tiifname \"lo\" accept\n\
             \t\tct state established,related accept\n\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\toifname \"eth0\" masquerade\n\
             \t}}\n\
             }}\n"
        );
        run(
            "nft",
            &["-f", "-"],
            &rules,
            format!("load the rules of {}", path.display()),
        )?;
        Ok(tap)
    }

    /// The TAP, for the VM (`--tap_fd`).
    pub fn tap(&self) -> impl AsFd + '_ {
        self.tap.as_fd()
    }

    /// The namespace's name (`ip netns exec NAME ...`).
    pub fn name(&self) -> String {
        netns_name(self.uid)
    }
}

impl Drop for VmNetwork {
    /// Deletes the uplink (both ends), which the namespace's own end would
    /// take only later (the kernel tears namespaces down asynchronously),
    /// so that the slot's next VM can make it again at once.
    fn drop(&mut self) {
        delete_uplink(self.uid);
        remove(self.uid);
    }
}

/// Deletes the uplink of slot `uid`, both ends.
fn delete_uplink(uid: u32) {
    let (uplink, _) = uplink(uid);
    if let Err(e) = run(
        "ip",
        &["link", "del", &uplink],
        "",
        format!("delete {uplink}"),
    ) {
        log::warn!("{e}");
    }
}
