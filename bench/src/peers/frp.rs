//! frp in front of the backend: `frps` (the public end: its bind port, and the proxy's
//! remote port users connect to) and `frpc` next to the backend, with one `[[proxies]]`
//! entry of type `tcp`. TOML configuration (frp >= 0.52). frp's defaults are kept and
//! written out: `transport.tls.enable = true` (since 0.50: frpc speaks TLS to frps, which
//! serves a self-signed certificate it generates; frpc verifies nothing unless given a
//! `trustedCaFile`), `transport.tcpMux = true` (one TCP connection between frpc and frps
//! carries every user connection as a yamux stream), `transport.poolCount = 1` (one work
//! connection, a stream with tcpMux, opened ahead of the next user connection).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::{Started, free_address, token, wait_for_port, write_file};
use crate::dataplane::DataplaneError;
use crate::dataplane::process::ChildProcess;

/// frp's log level: warnings and errors (at `info` frps logs every user connection).
const LOG_LEVEL: &str = "warn";

/// Starts `frps` and `frpc` in `dir` in front of `backend`.
pub(super) async fn start(
    frps: &Path,
    frpc: &Path,
    backend: SocketAddr,
    dir: &Path,
) -> Result<Started, DataplaneError> {
    let bind = free_address()?;
    let remote = free_address()?;
    let token = token();
    let server_config = format!(
        "# Written by sallyport-bench: frps (public end).
bindAddr = \"{bind_ip}\"
bindPort = {bind_port}
# Where proxies' remote ports listen (users connect there).
proxyBindAddr = \"{remote_ip}\"
auth.method = \"token\"
auth.token = \"{token}\"
# frp's default: frpc and frps multiplex user connections over one TCP connection.
transport.tcpMux = true
# frp's default: TLS from frpc is accepted, plain TCP too (frpc uses TLS by default).
transport.tls.force = false
log.to = \"console\"
log.level = \"{LOG_LEVEL}\"
log.disablePrintColor = true
",
        bind_ip = bind.ip(),
        bind_port = bind.port(),
        remote_ip = remote.ip(),
    );
    let client_config = format!(
        "# Written by sallyport-bench: frpc (private end, next to the backend).
serverAddr = \"{bind_ip}\"
serverPort = {bind_port}
loginFailExit = true
auth.method = \"token\"
auth.token = \"{token}\"
# frp's defaults, written out: TLS to frps (since 0.50), one multiplexed TCP connection,
# one work connection opened ahead.
transport.tls.enable = true
transport.tcpMux = true
transport.poolCount = 1
log.to = \"console\"
log.level = \"{LOG_LEVEL}\"
log.disablePrintColor = true

[[proxies]]
name = \"app\"
type = \"tcp\"
localIP = \"{backend_ip}\"
localPort = {backend_port}
remotePort = {remote_port}
",
        bind_ip = bind.ip(),
        bind_port = bind.port(),
        backend_ip = backend.ip(),
        backend_port = backend.port(),
        remote_port = remote.port(),
    );
    let server_file = dir.join("frps.toml");
    let client_file = dir.join("frpc.toml");
    write_file(&server_file, server_config.as_bytes())?;
    write_file(&client_file, client_config.as_bytes())?;

    let mut server = ChildProcess::start(
        "frps",
        frps,
        &["-c".to_owned(), server_file.display().to_string()],
        &[],
        &dir.join("frps.log"),
    )?;
    wait_for_port(bind, &mut server, Duration::from_secs(10)).await?;
    let client = ChildProcess::start(
        "frpc",
        frpc,
        &["-c".to_owned(), client_file.display().to_string()],
        &[],
        &dir.join("frpc.log"),
    )?;
    Ok(Started {
        address: remote,
        ca_pem: None,
        ca_file: None,
        processes: vec![server, client],
    })
}
