//! A small private network for the partition scenario, made of Linux network namespaces
//! (`ip netns`, so root and iproute2 are needed; [`Net::create`] says why when they are not
//! there, and the scenario skips).
//!
//! Topology (every address lives in a namespace made here; the host's own namespace gets no
//! interface, address, route or sysctl):
//!
//! ```text
//!   pdnet-<pid>-<n>-hub                          pdnet-<pid>-<n>-w<i>, one per worker
//!   ┌──────────────────────────────┐             ┌──────────────────────────┐
//!   │ br0 10.213.0.1/24 (bridge)   │  veth pair  │ eth0 10.213.0.<11+i>/24  │
//!   │   ├─ w0 ─────────────────────┼─────────────┼─ eth0   (worker i)       │
//!   │   ├─ w1 ...                  │             │ own tmpfs on /dev/shm    │
//!   │ coordinator, test clients    │             └──────────────────────────┘
//!   └──────────────────────────────┘
//! ```
//!
//! - One L2 segment: the hub bridges every worker's veth, so no namespace forwards IP packets
//!   and no `ip_forward` is needed anywhere.
//! - The coordinator runs in the hub (`ip netns exec`), its gRPC server on the bridge address,
//!   its `/metrics` on the hub's loopback. The test's clients reach both from a thread that
//!   entered the hub with `setns(2)` ([`Net::in_hub`]; a network namespace is per thread).
//! - Each worker runs in its own namespace with a private tmpfs on `/dev/shm` (a mount
//!   namespace of its own via `unshare --mount`), so its peers cannot open the shared-memory
//!   segment its group's rank 0 offers and every group of several workers uses the TCP ring —
//!   as workers on different hosts do.
//! - Cutting a worker off is `ip link set eth0 down` inside its namespace ([`Net::set_link`]).
//!
//! The namespaces go when the [`Net`] drops (after the processes in them are killed: declare
//! it before them), and namespaces of this kind left behind by a test process that no longer
//! exists are removed when the next one is made.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

const PREFIX: &str = "pdnet-";
/// The hub's bridge address; workers are `10.213.0.<11 + i>`, all in `10.213.0.0/24`.
const HUB_ADDR: &str = "10.213.0.1";
const PREFIX_LEN: u32 = 24;

/// Where `ip netns add` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";

/// The namespaces of one scenario.
pub struct Net {
    hub: String,
    hosts: Vec<String>,
    /// Every namespace made so far, in order (removed in reverse).
    made: Vec<String>,
}

/// Runs `ip ARGS`; the error names the command and holds its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running `ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Removes namespaces of this kind whose test process is gone (a run killed before its
/// cleanup).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

impl Net {
    /// The hub and `hosts` worker namespaces, linked and addressed; `Err(why)` when
    /// namespaces (or veth pairs, bridges, a private `/dev/shm`) cannot be made here — what
    /// was made is removed again.
    pub fn create(hosts: usize) -> Result<Net, String> {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        remove_stale();
        let base = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let mut net = Net {
            hub: format!("{base}-hub"),
            hosts: (0..hosts).map(|i| format!("{base}-w{i}")).collect(),
            made: Vec::new(),
        };
        let hub = net.hub.clone();
        ip(&["netns", "add", &hub])?;
        net.made.push(hub.clone());
        let hub_cidr = format!("{HUB_ADDR}/{PREFIX_LEN}");
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "addr", "add", &hub_cidr, "dev", "br0"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let ns = net.hosts[i].clone();
            ip(&["netns", "add", &ns])?;
            net.made.push(ns.clone());
            let port = format!("w{i}");
            let cidr = format!("{}/{PREFIX_LEN}", net.host_addr(i));
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            // Both ends made where they live: nothing appears in the host's namespace.
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &hub, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &hub, "link", "set", &port, "up"])?;
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        // The private /dev/shm the workers get (see `host_prefix`) must be possible too.
        if hosts > 0 {
            let mut probe = net.host_prefix(0);
            probe.push("true".into());
            let out = Command::new(&probe[0])
                .args(&probe[1..])
                .output()
                .map_err(|e| format!("running {probe:?}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "a private /dev/shm in a namespace ({probe:?}): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(net)
    }

    /// The hub's name.
    pub fn hub(&self) -> &str {
        &self.hub
    }

    /// The hub's bridge address (where the coordinator listens).
    pub fn hub_addr(&self) -> &'static str {
        HUB_ADDR
    }

    /// Worker `i`'s namespace.
    pub fn host(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// Worker `i`'s address.
    pub fn host_addr(&self, i: usize) -> String {
        format!("10.213.0.{}", 11 + i)
    }

    /// The command words that run a program in the hub (its arguments follow).
    pub fn hub_prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.hub]
            .map(String::from)
            .to_vec()
    }

    /// The command words that run a program in worker `i`'s namespace with a private tmpfs on
    /// `/dev/shm` (its arguments follow; the shell execs them, so the process keeps the pid).
    pub fn host_prefix(&self, i: usize) -> Vec<String> {
        [
            "ip",
            "netns",
            "exec",
            &self.hosts[i],
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs -o size=256m,mode=1777 pdnet-shm /dev/shm && exec \"$@\"",
            "sh",
        ]
        .map(String::from)
        .to_vec()
    }

    /// Takes worker `i`'s link down (`up == false`) or brings it back.
    pub fn set_link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.hosts[i], "link", "set", "eth0", state]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs `f` on a thread that entered the hub's network namespace: the sockets it opens
    /// (gRPC channels, `/metrics` requests) live in the hub, where the coordinator listens.
    /// A panic in `f` is resumed on the calling thread.
    pub fn in_hub<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("{NETNS_DIR}/{}", self.hub);
        let joined = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name(format!("in {}", self.hub))
                .spawn_scoped(s, move || {
                    let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                    // SAFETY: setns(2) on a namespace file we hold open; it moves only this
                    // thread, which ends with `f`.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
                    drop(ns);
                    f()
                })
                .expect("spawning a thread")
                .join()
        });
        joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Bytes worker `i` has received so far on its established TCP connections from the
    /// addresses in `from` (`ss -ti` in its namespace; closed connections are not counted).
    pub fn tcp_bytes_received(&self, i: usize, from: &[String]) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.hosts[i]])
            .args(["ss", "-tinOH", "state", "established"])
            .output()
            .expect("running ss");
        assert!(
            out.status.success(),
            "ss in {}: {}",
            self.hosts[i],
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                // Recv-Q Send-Q Local:Port Peer:Port info...
                let words: Vec<&str> = l.split_whitespace().collect();
                let peer_ip = words.get(3)?.rsplit_once(':')?.0;
                from.iter().any(|a| a == peer_ip).then(|| {
                    words
                        .iter()
                        .find_map(|w| w.strip_prefix("bytes_received:"))
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0)
                })
            })
            .sum()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Removing a worker's namespace removes its veth pair (both ends) with it.
        for ns in self.made.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleaning up: {e}");
            }
        }
    }
}
