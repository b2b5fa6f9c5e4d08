//! The peers the data-plane scenarios compare Sallyport with, started on loopback in front
//! of the benchmark's backend: nginx as one reverse-proxy hop (plain HTTP, and HTTPS as
//! users reach Sallyport), rathole with TLS on its tunnel hop and with plain TCP, and frp
//! (TLS on its tunnel hop, its default). `bench/install-peers.sh` installs them once per
//! version ([`PeerTools::install`]); [`RunningPeer::start`] writes each one's
//! configuration, as its documentation recommends for throughput, and starts it.
//!
//! - [`nginx`]: a master and two workers, upstream keep-alive, `access_log off`;
//! - [`rathole`]: a server (the public end users connect to) and a client (the private end
//!   next to the backend), one service;
//! - [`frp`]: `frps` (public end) and `frpc` (private end), one TCP proxy;
//! - [`tls`]: a CA and a server certificate (ECDSA P-256) for nginx's user side and
//!   rathole's tunnel, and the PKCS#12 bundle rathole reads.

pub mod frp;
pub mod nginx;
pub mod rathole;
pub mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::dataplane::DataplaneError;
use crate::dataplane::client::Target;
use crate::dataplane::fleet::{free_address, wait_for_backend_answer, wait_for_port};
use crate::dataplane::process::ChildProcess;

/// The host name of the peers' certificates: nginx's user side (SNI and `Host` of
/// [`RunningPeer::target`]) uses the app's host name, as Sallyport's proxy does.
pub const USER_HOST: &str = crate::dataplane::fleet::APP_HOST;
/// The host name rathole's client expects on its tunnel (`[client.transport.tls] hostname`).
pub const TUNNEL_HOST: &str = crate::dataplane::fleet::TUNNEL_HOST;

/// How long [`RunningPeer::start`] waits for the first answer through a peer.
const START_WITHIN: Duration = Duration::from_secs(30);
/// How long [`PeerTools::install`] lets `bench/install-peers.sh` run (a cold install
/// builds rathole and frp: minutes on two shared cores).
const INSTALL_WITHIN: Duration = Duration::from_secs(30 * 60);

/// The peers the data-plane scenarios compare against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PeerKind {
    /// nginx, one reverse-proxy hop, plain HTTP on both sides.
    Nginx,
    /// nginx, one reverse-proxy hop, HTTPS (TLS 1.3, HTTP/1.1) on the user side, plain
    /// HTTP to the backend: what users get from Sallyport's proxy, without the tunnel.
    NginxTls,
    /// rathole, TLS (native-tls, OpenSSL) on the tunnel hop; users connect in plain TCP.
    RatholeTls,
    /// rathole, plain TCP on the tunnel hop.
    RatholeTcp,
    /// frp, one TCP proxy; TLS on the tunnel hop (frp's default) and tcpMux (its default).
    Frp,
}

impl PeerKind {
    /// Every peer, in report order.
    pub const ALL: [PeerKind; 5] = [
        PeerKind::Nginx,
        PeerKind::NginxTls,
        PeerKind::RatholeTls,
        PeerKind::RatholeTcp,
        PeerKind::Frp,
    ];

    /// Its name in reports, directories and progress lines.
    pub fn label(self) -> &'static str {
        match self {
            PeerKind::Nginx => "nginx",
            PeerKind::NginxTls => "nginx-tls",
            PeerKind::RatholeTls => "rathole-tls",
            PeerKind::RatholeTcp => "rathole-tcp",
            PeerKind::Frp => "frp",
        }
    }

    /// Whether users reach it over TLS (only [`PeerKind::NginxTls`]; the tunnels carry
    /// the users' bytes as they are, plain HTTP here).
    pub fn user_tls(self) -> bool {
        matches!(self, PeerKind::NginxTls)
    }

    /// Whether it is a tunnel (a public and a private end) rather than one proxy hop.
    pub fn is_tunnel(self) -> bool {
        matches!(
            self,
            PeerKind::RatholeTls | PeerKind::RatholeTcp | PeerKind::Frp
        )
    }
}

/// Where the peer executables are.
#[derive(Clone, Debug)]
pub struct PeerTools {
    /// nginx (Debian's).
    pub nginx: PathBuf,
    /// rathole (crates.io; server and client in one executable).
    pub rathole: PathBuf,
    /// frp's server.
    pub frps: PathBuf,
    /// frp's client.
    pub frpc: PathBuf,
}

impl PeerTools {
    /// Runs `bash <script>` (`bench/install-peers.sh`, which installs what is missing and
    /// returns at once otherwise; its progress goes to this process's stderr) and reads
    /// its `KEY=path` lines. Bounded by 30 minutes.
    pub async fn install(script: &Path) -> Result<Self, DataplaneError> {
        let what = format!("running bash {}", script.display());
        let child = tokio::process::Command::new("bash")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| DataplaneError::Spawn {
                program: script.to_owned(),
                source,
            })?;
        let output = tokio::time::timeout(INSTALL_WITHIN, child.wait_with_output())
            .await
            .map_err(|_| DataplaneError::Timeout {
                what: what.clone(),
                waited: INSTALL_WITHIN,
                last: None,
            })?
            .map_err(DataplaneError::io(what.clone()))?;
        if !output.status.success() {
            return Err(DataplaneError::Io {
                what,
                source: std::io::Error::other(format!(
                    "it exited with {} (its progress is on stderr above)",
                    output.status
                )),
            });
        }
        let lines = parse_key_lines(&String::from_utf8_lossy(&output.stdout));
        let tool = |key: &'static str| {
            lines
                .get(key)
                .map(PathBuf::from)
                .filter(|path| path.is_file())
                .ok_or_else(|| DataplaneError::BinaryNotFound {
                    name: key,
                    path: lines.get(key).map(PathBuf::from).unwrap_or_default(),
                    hint: "bench/install-peers.sh printed no existing file for it",
                })
        };
        Ok(Self {
            nginx: tool("NGINX")?,
            rathole: tool("RATHOLE")?,
            frps: tool("FRPS")?,
            frpc: tool("FRPC")?,
        })
    }

    /// The version of each peer, for the report: `nginx` (`nginx/1.22.1`), `rathole`
    /// (`rathole 0.5.0`), `frp` (frps's, `0.71.0`). A version that cannot be read is
    /// reported as `unknown (<why>)`.
    pub async fn versions(&self) -> BTreeMap<String, String> {
        let mut versions = BTreeMap::new();
        // `nginx -v` writes `nginx version: nginx/1.22.1` to stderr.
        let nginx = version_output(&self.nginx, "-v").await.map(|text| {
            text.trim()
                .strip_prefix("nginx version: ")
                .unwrap_or(text.trim())
                .to_owned()
        });
        versions.insert("nginx".to_owned(), nginx.unwrap_or_else(unknown));
        // `rathole --version` writes `rathole` and then `Build Version:     0.5.0` among
        // other build lines.
        let rathole = version_output(&self.rathole, "--version")
            .await
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.trim().strip_prefix("Build Version:"))
                    .map(|version| format!("rathole {}", version.trim()))
                    .ok_or_else(|| format!("no Build Version line in {:?}", text.trim()))
            });
        versions.insert("rathole".to_owned(), rathole.unwrap_or_else(unknown));
        let frp = version_output(&self.frps, "--version").await;
        versions.insert(
            "frp".to_owned(),
            frp.map(|text| text.trim().to_owned())
                .unwrap_or_else(unknown),
        );
        versions
    }
}

fn unknown(why: String) -> String {
    format!("unknown ({why})")
}

/// What `program flag` printed (stdout, or stderr when stdout is empty), bounded by 10 s.
async fn version_output(program: &Path, flag: &str) -> Result<String, String> {
    let run = tokio::process::Command::new(program)
        .arg(flag)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .map_err(|_| format!("{} {flag} took over 10 s", program.display()))?
        .map_err(|error| format!("{} {flag}: {error}", program.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let text = if stdout.trim().is_empty() {
        String::from_utf8_lossy(&output.stderr).into_owned()
    } else {
        stdout.into_owned()
    };
    if output.status.success() && !text.trim().is_empty() {
        Ok(text)
    } else {
        Err(format!(
            "{} {flag} exited with {}: {}",
            program.display(),
            output.status,
            text.trim()
        ))
    }
}

/// The `KEY=value` lines of `text` (other lines ignored).
fn parse_key_lines(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.trim().split_once('=')?;
            let key_ok = !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            key_ok.then(|| (key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// A running peer in front of a backend: users connect to `address` (plain HTTP, or HTTPS
/// trusting `ca_pem` for [`PeerKind::NginxTls`]) and reach the backend through it. Its
/// processes are killed when it is dropped.
pub struct RunningPeer {
    /// Which peer.
    pub kind: PeerKind,
    /// Where users connect.
    pub address: SocketAddr,
    /// The CA certificate (PEM) users trust, for [`PeerKind::NginxTls`]; its server
    /// certificate is for [`USER_HOST`].
    pub ca_pem: Option<String>,
    /// The same CA certificate as a file (e.g. for oha's `--cacert`).
    pub ca_file: Option<PathBuf>,
    /// Its directory: configuration, keys, logs.
    pub dir: PathBuf,
    /// Its processes, the public end first.
    processes: Vec<ChildProcess>,
}

impl RunningPeer {
    /// Starts the peer's processes in `dir/<label>/` (configuration, keys, logs) in front
    /// of `backend`, and waits (at most 30 s) until a `GET /` through it returns the
    /// backend's body ([`SMALL_BODY`]). Call it from the thread that stays alive for the
    /// whole run (see [`ChildProcess::start`]).
    pub async fn start(
        kind: PeerKind,
        tools: &PeerTools,
        backend: SocketAddr,
        dir: &Path,
    ) -> Result<Self, DataplaneError> {
        let dir = dir.join(kind.label());
        std::fs::create_dir_all(&dir)
            .map_err(DataplaneError::io(format!("creating {}", dir.display())))?;
        eprintln!(
            "peers: starting {} in front of {backend} (in {})",
            kind.label(),
            dir.display()
        );
        let started = match kind {
            PeerKind::Nginx | PeerKind::NginxTls => {
                nginx::start(&tools.nginx, kind.user_tls(), backend, &dir).await?
            }
            PeerKind::RatholeTls | PeerKind::RatholeTcp => {
                rathole::start(&tools.rathole, kind == PeerKind::RatholeTls, backend, &dir).await?
            }
            PeerKind::Frp => frp::start(&tools.frps, &tools.frpc, backend, &dir).await?,
        };
        let mut peer = Self {
            kind,
            address: started.address,
            ca_pem: started.ca_pem,
            ca_file: started.ca_file,
            dir,
            processes: started.processes,
        };
        peer.wait_until_served(START_WITHIN).await?;
        Ok(peer)
    }

    /// Where the benchmark's own client sends requests: plain HTTP to [`Self::address`],
    /// or HTTPS with SNI [`USER_HOST`] trusting only [`Self::ca_pem`].
    pub fn target(&self) -> Result<Target, DataplaneError> {
        match &self.ca_pem {
            Some(ca_pem) if self.kind.user_tls() => Target::proxy(
                self.address,
                USER_HOST,
                self.address.port(),
                ca_pem.as_bytes(),
            ),
            _ => Ok(Target::Direct {
                address: self.address,
            }),
        }
    }

    /// The pids of its processes, the public end first: `nginx-master` then one
    /// `nginx-worker` per worker (the master's children, read from `/proc`);
    /// `rathole-server` then `rathole-client`; `frps` then `frpc`.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        let mut pids: Vec<(&'static str, u32)> = self
            .processes
            .iter()
            .map(|process| (process.name(), process.pid()))
            .collect();
        if matches!(self.kind, PeerKind::Nginx | PeerKind::NginxTls) {
            let workers: Vec<u32> = self
                .processes
                .first()
                .map(|master| nginx::workers(master.pid()))
                .unwrap_or_default();
            pids.extend(workers.into_iter().map(|pid| ("nginx-worker", pid)));
        }
        pids
    }

    /// Fails when one of its processes has exited.
    pub fn check_running(&mut self) -> Result<(), DataplaneError> {
        self.processes
            .iter_mut()
            .try_for_each(ChildProcess::check_running)
    }

    /// Waits until a `GET /` through the peer gets the backend's answer.
    async fn wait_until_served(&mut self, within: Duration) -> Result<(), DataplaneError> {
        let target = self.target()?;
        let what = format!(
            "the first answer from the backend through {} (logs in {})",
            self.kind.label(),
            self.dir.display()
        );
        wait_for_backend_answer(&target, Instant::now() + within, within, what, || {
            self.check_running()
        })
        .await
    }
}

impl Drop for RunningPeer {
    fn drop(&mut self) {
        // nginx's workers are the master's children, not ours: killing the master (what
        // dropping its ChildProcess does) would leave them serving. Stop the master (so
        // that it starts no new ones) and kill them first.
        if matches!(self.kind, PeerKind::Nginx | PeerKind::NginxTls)
            && let Some(master) = self.processes.first_mut()
            && master.check_running().is_ok()
        {
            nginx::stop_master_and_kill_workers(master.pid());
        }
    }
}

/// What a peer's start function hands to [`RunningPeer::start`].
struct Started {
    address: SocketAddr,
    ca_pem: Option<String>,
    ca_file: Option<PathBuf>,
    processes: Vec<ChildProcess>,
}

/// Writes `content` to `path`.
fn write_file(path: &Path, content: &[u8]) -> Result<(), DataplaneError> {
    std::fs::write(path, content).map_err(DataplaneError::io(format!("writing {}", path.display())))
}

/// A token for a tunnel's authentication: random enough for a run on loopback.
fn token() -> String {
    format!(
        "bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    )
}

/// `path` as a string for a configuration file, quotes and backslashes escaped (TOML and
/// nginx accept the same escapes for these two).
fn quoted(path: &Path) -> String {
    let text = path.display().to_string();
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_key_lines_and_ignores_the_rest() {
        let lines = parse_key_lines(
            "NGINX=/usr/sbin/nginx\nprogress line\nRATHOLE=/t/rathole-0.5.0/bin/rathole\nlower=x\n",
        );
        assert_eq!(
            lines.get("NGINX").map(String::as_str),
            Some("/usr/sbin/nginx")
        );
        assert_eq!(
            lines.get("RATHOLE").map(String::as_str),
            Some("/t/rathole-0.5.0/bin/rathole")
        );
        assert_eq!(lines.len(), 2);
    }

    #[test]
    fn labels_are_distinct_and_only_nginx_tls_has_user_tls() {
        let labels: std::collections::BTreeSet<_> =
            PeerKind::ALL.iter().map(|kind| kind.label()).collect();
        assert_eq!(labels.len(), PeerKind::ALL.len());
        let tls: Vec<_> = PeerKind::ALL
            .into_iter()
            .filter(|kind| kind.user_tls())
            .collect();
        assert_eq!(tls, vec![PeerKind::NginxTls]);
    }

    #[test]
    fn quotes_paths_for_config_files() {
        assert_eq!(quoted(Path::new("/a b/c\"d")), "\"/a b/c\\\"d\"");
    }
}
