//! rathole in front of the backend: a server (the public end: its control port, and the
//! service port users connect to) and a client next to the backend, which opens the
//! control channel to the server and one data channel per visitor connection. One
//! service, `app`; the default token; `nodelay = true` on the transport and the service
//! (rathole's default, written out). With TLS, the tunnel hop (control and data channels)
//! runs over native-tls (OpenSSL): the server reads a PKCS#12 identity, the client trusts
//! the peers' CA and checks the host name [`TUNNEL_HOST`]. Users' bytes cross the tunnel
//! as they come (plain HTTP here).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::tls::{PKCS12_PASSWORD, write_pkcs12, write_server_tls};
use super::{Started, TUNNEL_HOST, free_address, quoted, token, wait_for_port, write_file};
use crate::dataplane::DataplaneError;
use crate::dataplane::process::ChildProcess;

/// rathole's log filter: start-up and channel events, nothing per connection.
const LOG_FILTER: &str = "info";

/// Starts rathole's server and client in `dir` in front of `backend`, with TLS on the
/// tunnel hop when `tunnel_tls`.
pub(super) async fn start(
    program: &Path,
    tunnel_tls: bool,
    backend: SocketAddr,
    dir: &Path,
) -> Result<Started, DataplaneError> {
    let control = free_address()?;
    let service = free_address()?;
    let token = token();
    let (server_tls, client_tls) = if tunnel_tls {
        let tls = write_server_tls(dir, TUNNEL_HOST)?;
        let pkcs12 = dir.join("identity.p12");
        write_pkcs12(&tls, &pkcs12).await?;
        (
            format!(
                "
[server.transport.tls]
pkcs12 = {}
pkcs12_password = \"{PKCS12_PASSWORD}\"
",
                quoted(&pkcs12)
            ),
            format!(
                "
[client.transport.tls]
trusted_root = {}
hostname = \"{TUNNEL_HOST}\"
",
                quoted(&tls.ca_file)
            ),
        )
    } else {
        (String::new(), String::new())
    };
    let transport = if tunnel_tls { "tls" } else { "tcp" };
    let server_config = format!(
        "# Written by sallyport-bench: rathole's server (public end), tunnel over {transport}.
[server]
bind_addr = \"{control}\"
default_token = \"{token}\"

[server.transport]
type = \"{transport}\"

[server.transport.tcp]
nodelay = true
{server_tls}
[server.services.app]
bind_addr = \"{service}\"
nodelay = true
"
    );
    let client_config = format!(
        "# Written by sallyport-bench: rathole's client (private end, next to the backend).
[client]
remote_addr = \"{control}\"
default_token = \"{token}\"

[client.transport]
type = \"{transport}\"

[client.transport.tcp]
nodelay = true
{client_tls}
[client.services.app]
local_addr = \"{backend}\"
nodelay = true
"
    );
    let server_file = dir.join("server.toml");
    let client_file = dir.join("client.toml");
    write_file(&server_file, server_config.as_bytes())?;
    write_file(&client_file, client_config.as_bytes())?;

    let mut server = ChildProcess::start(
        "rathole-server",
        program,
        &["--server".to_owned(), server_file.display().to_string()],
        &[("RUST_LOG", LOG_FILTER)],
        &dir.join("server.log"),
    )?;
    wait_for_port(control, &mut server, Duration::from_secs(10)).await?;
    let client = ChildProcess::start(
        "rathole-client",
        program,
        &["--client".to_owned(), client_file.display().to_string()],
        &[("RUST_LOG", LOG_FILTER)],
        &dir.join("client.log"),
    )?;
    Ok(Started {
        address: service,
        ca_pem: None,
        ca_file: None,
        processes: vec![server, client],
    })
}
