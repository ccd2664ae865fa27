//! What the load generator reads from the coordinator besides its API: memory and CPU from
//! `/proc`, the machine's load average, and samples of its Prometheus `/metrics`.

use std::time::Duration;

use anyhow::{Context, Result, ensure};

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// User + system CPU seconds `pid` has used.
pub fn cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz.max(1.0))
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A plain HTTP/1.1 GET of `path` on `addr`; the body.
pub fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connecting {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of the HTTP head")?;
    ensure!(head.contains(" 200 "), "GET {path}: {head}");
    Ok(body.to_string())
}

/// The value of the sample `name_labels` (e.g. `protodino_workers{state="idle"}`).
pub fn metric(text: &str, name_labels: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(k, _)| *k == name_labels)
        .and_then(|(_, v)| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_samples() {
        let text = "# HELP protodino_workers Workers by state\n\
                    protodino_workers{state=\"idle\"} 998\n\
                    protodino_workers{state=\"lost\"} 2\n";
        assert_eq!(
            metric(text, "protodino_workers{state=\"idle\"}"),
            Some(998.0)
        );
        assert_eq!(metric(text, "protodino_workers{state=\"lost\"}"), Some(2.0));
        assert_eq!(metric(text, "protodino_workers"), None);
    }

    #[test]
    fn own_process() {
        let me = std::process::id();
        assert!(rss_kib(me).is_some_and(|k| k > 0));
        assert!(cpu_s(me).is_some_and(|s| s >= 0.0));
        assert_eq!(rss_kib(u32::MAX), None);
    }
}
