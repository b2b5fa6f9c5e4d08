//! nginx as one reverse-proxy hop in front of the backend, configured as its
//! documentation recommends for proxying with keep-alive: an upstream pool of idle
//! keep-alive connections (`keepalive 64`, HTTP/1.1, the `Connection` header cleared),
//! `keepalive_requests 100000` on both sides, `access_log off`, proxy buffering on (its
//! default) in 64 KiB memory buffers and never to disk, request bodies of any size streamed
//! to the backend (`proxy_request_buffering off`), a master and two workers (one per core here; `worker_processes auto`
//! would choose the same). The TLS variant listens with `ssl` (no `http2`: HTTP/1.1, as
//! the benchmark's users speak to Sallyport), TLS 1.3 only, an ECDSA P-256 certificate,
//! a shared session cache and session tickets.
//!
//! It runs as its own instance: prefix, configuration, pid file, error log and temporary
//! files under its directory (`-p <dir> -c <dir>/nginx.conf -e <dir>/error.log -g
//! 'daemon off;'`), no Debian configuration read. As root the workers run as root too
//! (`user root;`), so that they can write their temporary files in the run's private
//! directory.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::tls::write_server_tls;
use super::{Started, USER_HOST, free_address, quoted, wait_for_port, write_file};
use crate::dataplane::DataplaneError;
use crate::dataplane::process::ChildProcess;

/// Worker processes (one per core on the benchmark's 2-core machines).
pub const WORKER_PROCESSES: u32 = 2;

/// Starts nginx in `dir` in front of `backend`, with TLS on the user side when
/// `user_tls`.
pub(super) async fn start(
    program: &Path,
    user_tls: bool,
    backend: SocketAddr,
    dir: &Path,
) -> Result<Started, DataplaneError> {
    let address = free_address()?;
    for temp in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let path = dir.join("temp").join(temp);
        std::fs::create_dir_all(&path)
            .map_err(DataplaneError::io(format!("creating {}", path.display())))?;
    }
    let tls = if user_tls {
        Some(write_server_tls(dir, USER_HOST)?)
    } else {
        None
    };
    let listen_tls = tls.as_ref().map(|tls| TlsFiles {
        certificate: quoted(&tls.chain_file),
        key: quoted(&tls.key_file),
    });
    let config = config(
        dir,
        address,
        backend,
        listen_tls.as_ref(),
        running_as_root(),
    );
    let config_file = dir.join("nginx.conf");
    write_file(&config_file, config.as_bytes())?;

    let args = [
        "-p".to_owned(),
        dir.display().to_string(),
        "-c".to_owned(),
        config_file.display().to_string(),
        "-e".to_owned(),
        dir.join("error.log").display().to_string(),
        "-g".to_owned(),
        "daemon off;".to_owned(),
    ];
    let mut master =
        ChildProcess::start("nginx-master", program, &args, &[], &dir.join("nginx.log"))?;
    wait_for_port(address, &mut master, Duration::from_secs(10)).await?;
    Ok(Started {
        address,
        ca_pem: tls.as_ref().map(|tls| tls.ca_pem.clone()),
        ca_file: tls.map(|tls| tls.ca_file),
        processes: vec![master],
    })
}

/// The certificate and key of the TLS listener, quoted for the configuration.
struct TlsFiles {
    certificate: String,
    key: String,
}

/// The configuration file.
fn config(
    dir: &Path,
    listen: SocketAddr,
    backend: SocketAddr,
    tls: Option<&TlsFiles>,
    as_root: bool,
) -> String {
    let temp = |name: &str| quoted(&dir.join("temp").join(name));
    let user = if as_root {
        "# The master runs as root: the workers too, to write their temporary files in the\n\
         # run's private directory (they would drop to `nobody` otherwise).\n\
         user root;\n"
    } else {
        ""
    };
    let (listen_line, tls_lines) = match tls {
        Some(tls) => (
            format!("listen {listen} ssl;"),
            format!(
                "
        # HTTP/1.1 only (no http2), TLS 1.3, ECDSA P-256; resumption by cache and tickets.
        ssl_certificate {};
        ssl_certificate_key {};
        ssl_protocols TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_timeout 1h;
        ssl_session_tickets on;",
                tls.certificate, tls.key
            ),
        ),
        None => (format!("listen {listen};"), String::new()),
    };
    format!(
        "# Written by sallyport-bench: nginx as one reverse-proxy hop in front of {backend}.
{user}worker_processes {WORKER_PROCESSES};
pid {pid};
error_log {error_log} warn;

events {{
    # 1,000 user connections and as many upstream ones, with room to spare.
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {body};
    proxy_temp_path {proxy};
    fastcgi_temp_path {fastcgi};
    uwsgi_temp_path {uwsgi};
    scgi_temp_path {scgi};

    # Users' keep-alive connections: many requests each, as the load generator sends.
    keepalive_requests 100000;
    keepalive_timeout 75s;
    tcp_nodelay on;

    upstream backend {{
        server {backend};
        # Idle keep-alive connections to the backend kept per worker.
        keepalive 64;
        keepalive_requests 100000;
        keepalive_timeout 60s;
    }}

    server {{
        {listen_line}{tls_lines}

        location / {{
            proxy_pass http://backend;
            # Upstream keep-alive needs HTTP/1.1 and no `Connection: close`.
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            # Uploads of any size, streamed to the backend as they arrive (by default
            # nginx refuses bodies over 1 MiB and spools bodies to a temporary file);
            # downloads buffered in memory in 64 KiB buffers, never spooled to disk.
            client_max_body_size 0;
            proxy_request_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
",
        pid = quoted(&dir.join("nginx.pid")),
        error_log = quoted(&dir.join("error.log")),
        body = temp("body"),
        proxy = temp("proxy"),
        fastcgi = temp("fastcgi"),
        uwsgi = temp("uwsgi"),
        scgi = temp("scgi"),
    )
}

/// Whether this process runs with effective user id 0 (from `/proc/self/status`).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                let ids = line.strip_prefix("Uid:")?;
                ids.split_whitespace()
                    .nth(1)
                    .map(|effective| effective == "0")
            })
        })
        .unwrap_or(false)
}

/// The pids of the processes whose parent is `master` (nginx's workers), from
/// `/proc/<pid>/stat`.
pub fn workers(master: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut workers: Vec<u32> = entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            (parent_pid(&stat)? == master).then_some(pid)
        })
        .collect();
    workers.sort_unstable();
    workers
}

/// Stops `master` (SIGSTOP, so that it cannot start new workers) and kills (SIGKILL) its
/// workers: they are its children, not the benchmark's, and outlive a killed master;
/// killed while their master runs, they would be replaced at once. The master itself is
/// then killed by dropping its [`ChildProcess`].
pub(super) fn stop_master_and_kill_workers(master: u32) {
    signal("-STOP", &[master]);
    signal("-KILL", &workers(master));
}

/// Sends `signal` (`kill`'s option) to `pids` with the `kill` command.
fn signal(signal: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = std::process::Command::new("kill")
        .arg(signal)
        .args(pids.iter().map(u32::to_string))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// The parent pid (field 4) of a `/proc/<pid>/stat` line; fields are counted after the
/// command name's last `)`.
fn parent_pid(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_parent_pid_after_the_command_name() {
        assert_eq!(
            parent_pid("4242 (nginx: worker (x)) S 4241 4241 1 0 -1"),
            Some(4241)
        );
        assert_eq!(parent_pid("garbage"), None);
    }

    #[test]
    fn the_tls_config_listens_with_ssl_and_tls13_only() {
        let tls = TlsFiles {
            certificate: "\"/d/tls.crt\"".to_owned(),
            key: "\"/d/tls.key\"".to_owned(),
        };
        let listen = SocketAddr::from(([127, 0, 0, 1], 8443));
        let backend = SocketAddr::from(([127, 0, 0, 1], 8080));
        let text = config(Path::new("/d"), listen, backend, Some(&tls), true);
        assert!(text.contains("listen 127.0.0.1:8443 ssl;"), "{text}");
        assert!(text.contains("ssl_protocols TLSv1.3;"), "{text}");
        assert!(text.contains("server 127.0.0.1:8080;"), "{text}");
        assert!(text.contains("\nuser root;"), "{text}");
        let plain = config(Path::new("/d"), listen, backend, None, false);
        assert!(plain.contains("listen 127.0.0.1:8443;"), "{plain}");
        assert!(!plain.contains("ssl"), "{plain}");
        assert!(!plain.contains("user root"), "{plain}");
    }
}
