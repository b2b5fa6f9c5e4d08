//! Readiness and liveness probes, as the kubelet runs them: `httpGet` (HTTP only) and
//! `tcpSocket` against the loopback port the agent gave the container port, with the
//! probe's period, thresholds, initial delay and timeout.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{ContainerPort, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// What a probe checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// `GET path` on the address answers 200–399.
    Http {
        /// Where.
        address: SocketAddr,
        /// The path and query.
        path: String,
    },
    /// A TCP connection to the address succeeds.
    Tcp {
        /// Where.
        address: SocketAddr,
    },
}

/// A probe of one container, resolved against the agent's port mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// What it checks.
    pub check: Check,
    /// `initialDelaySeconds`.
    pub initial_delay: Duration,
    /// `periodSeconds` (default 10).
    pub period: Duration,
    /// `timeoutSeconds` (default 1).
    pub timeout: Duration,
    /// `successThreshold` (default 1).
    pub success_threshold: u32,
    /// `failureThreshold` (default 3).
    pub failure_threshold: u32,
}

/// A probe the agent cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// An exec or gRPC probe, or an HTTPS one.
    #[error("only httpGet (scheme HTTP) and tcpSocket probes are supported")]
    Unsupported,
    /// A named port the container does not declare.
    #[error("the probe's port {0:?} is not a port of the container")]
    UnknownPort(String),
    /// A port number out of range.
    #[error("the probe's port {0} is not a valid port")]
    InvalidPort(i32),
}

/// The loopback port the agent gives each container port (by number), and the numbers of
/// the named ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortMap {
    /// Container port number to local port.
    pub local: BTreeMap<i32, u16>,
    /// Port name to container port number.
    pub names: BTreeMap<String, i32>,
}

impl PortMap {
    /// Gives every port in `ports` a port from `free` (called once per port).
    pub fn allocate(
        ports: &[ContainerPort],
        mut free: impl FnMut() -> std::io::Result<u16>,
    ) -> std::io::Result<Self> {
        let mut map = PortMap::default();
        for port in ports {
            map.local.insert(port.container_port, free()?);
            if let Some(name) = &port.name {
                map.names.insert(name.clone(), port.container_port);
            }
        }
        Ok(map)
    }

    /// The local port for a probe's `port` (a number or a container port's name); a
    /// number the container does not declare is used as it is.
    pub fn resolve(&self, port: &IntOrString) -> Result<u16, ProbeError> {
        let number = match port {
            IntOrString::Int(number) => *number,
            IntOrString::String(name) => match name.parse::<i32>() {
                Ok(number) => number,
                Err(_) => *self
                    .names
                    .get(name)
                    .ok_or_else(|| ProbeError::UnknownPort(name.clone()))?,
            },
        };
        match self.local.get(&number) {
            Some(local) => Ok(*local),
            None => u16::try_from(number).map_err(|_| ProbeError::InvalidPort(number)),
        }
    }
}

impl ProbeSpec {
    /// `probe` with the kubelet's defaults, its port resolved through `ports`.
    pub fn parse(probe: &Probe, ports: &PortMap) -> Result<Self, ProbeError> {
        let address = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let check = if let Some(http) = &probe.http_get {
            if http
                .scheme
                .as_deref()
                .is_some_and(|s| !s.eq_ignore_ascii_case("HTTP"))
            {
                return Err(ProbeError::Unsupported);
            }
            Check::Http {
                address: address(ports.resolve(&http.port)?),
                path: http
                    .path
                    .clone()
                    .filter(|p| !p.is_empty())
                    .unwrap_or("/".into()),
            }
        } else if let Some(tcp) = &probe.tcp_socket {
            Check::Tcp {
                address: address(ports.resolve(&tcp.port)?),
            }
        } else {
            return Err(ProbeError::Unsupported);
        };
        let seconds = |value: Option<i32>, default: u64| {
            Duration::from_secs(
                value
                    .and_then(|v| u64::try_from(v).ok())
                    .filter(|v| *v > 0)
                    .unwrap_or(default),
            )
        };
        let count = |value: Option<i32>, default: u32| {
            value
                .and_then(|v| u32::try_from(v).ok())
                .filter(|v| *v > 0)
                .unwrap_or(default)
        };
        Ok(Self {
            check,
            initial_delay: Duration::from_secs(
                probe
                    .initial_delay_seconds
                    .and_then(|v| u64::try_from(v).ok())
                    .unwrap_or(0),
            ),
            period: seconds(probe.period_seconds, 10),
            timeout: seconds(probe.timeout_seconds, 1),
            success_threshold: count(probe.success_threshold, 1),
            failure_threshold: count(probe.failure_threshold, 3),
        })
    }

    /// Runs the check once; `Err` says why it failed.
    pub async fn run(&self) -> Result<(), String> {
        match tokio::time::timeout(self.timeout, self.check.run()).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }
}

impl Check {
    async fn run(&self) -> Result<(), String> {
        match self {
            Check::Tcp { address } => TcpStream::connect(address)
                .await
                .map(drop)
                .map_err(|e| format!("connect {address}: {e}")),
            Check::Http { address, path } => {
                let stream = TcpStream::connect(address)
                    .await
                    .map_err(|e| format!("connect {address}: {e}"))?;
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .map_err(|e| format!("HTTP handshake with {address}: {e}"))?;
                let driver = tokio::spawn(connection);
                let request = http::Request::get(path.as_str())
                    .header(http::header::HOST, address.to_string())
                    .header(http::header::USER_AGENT, "kube-probe/sallyport-e2e")
                    .body(Empty::<bytes::Bytes>::new())
                    .map_err(|e| format!("GET {path}: {e}"))?;
                let answer = sender.send_request(request).await;
                driver.abort();
                let status = answer.map_err(|e| format!("GET {path}: {e}"))?.status();
                if (200..400).contains(&status.as_u16()) {
                    Ok(())
                } else {
                    Err(format!("GET {path}: {status}"))
                }
            }
        }
    }
}

/// The running state of one probe: consecutive results and when it runs next.
#[derive(Debug, Clone)]
pub struct ProbeState {
    /// The probe.
    pub spec: ProbeSpec,
    /// Whether the probe currently holds (readiness starts false, liveness true).
    pub passing: bool,
    /// Consecutive successes.
    pub successes: u32,
    /// Consecutive failures.
    pub failures: u32,
    /// When the probe runs next.
    pub next: Instant,
    /// The last failure, for the logs.
    pub last_error: Option<String>,
}

impl ProbeState {
    /// A probe of a container started at `started`.
    pub fn new(spec: ProbeSpec, started: Instant, passing: bool) -> Self {
        Self {
            next: started + spec.initial_delay,
            spec,
            passing,
            successes: 0,
            failures: 0,
            last_error: None,
        }
    }

    /// Records one result at `now`; returns whether `passing` changed.
    pub fn record(&mut self, result: Result<(), String>, now: Instant) -> bool {
        self.next = now + self.spec.period;
        let before = self.passing;
        match result {
            Ok(()) => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                self.last_error = None;
                if self.successes >= self.spec.success_threshold {
                    self.passing = true;
                }
            }
            Err(error) => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                self.last_error = Some(error);
                if self.failures >= self.spec.failure_threshold {
                    self.passing = false;
                }
            }
        }
        before != self.passing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::HTTPGetAction;

    fn ports() -> PortMap {
        let mut next = 40_000;
        PortMap::allocate(
            &[ContainerPort {
                name: Some("metrics".into()),
                container_port: 9090,
                ..ContainerPort::default()
            }],
            || {
                next += 1;
                Ok(next)
            },
        )
        .unwrap_or_else(|e| panic!("allocate: {e}"))
    }

    fn http(port: IntOrString) -> Probe {
        Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".into()),
                port,
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(2),
            failure_threshold: Some(1),
            ..Probe::default()
        }
    }

    #[test]
    fn named_and_numbered_ports_map_to_the_local_port() {
        let ports = ports();
        for port in [
            IntOrString::String("metrics".into()),
            IntOrString::Int(9090),
            IntOrString::String("9090".into()),
        ] {
            let spec = ProbeSpec::parse(&http(port), &ports).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                spec.check,
                Check::Http {
                    address: "127.0.0.1:40001".parse().unwrap_or_else(|e| panic!("{e}")),
                    path: "/readyz".into()
                }
            );
            assert_eq!(spec.period, Duration::from_secs(2));
            assert_eq!(spec.timeout, Duration::from_secs(1));
            assert_eq!((spec.success_threshold, spec.failure_threshold), (1, 1));
        }
        assert_eq!(
            ProbeSpec::parse(&http(IntOrString::String("http".into())), &ports),
            Err(ProbeError::UnknownPort("http".into()))
        );
        assert_eq!(
            ProbeSpec::parse(&Probe::default(), &ports),
            Err(ProbeError::Unsupported)
        );
    }

    #[test]
    fn thresholds_flip_the_state() {
        let spec = ProbeSpec::parse(&http(IntOrString::Int(9090)), &ports())
            .unwrap_or_else(|e| panic!("{e}"));
        let spec = ProbeSpec {
            success_threshold: 2,
            failure_threshold: 2,
            ..spec
        };
        let now = Instant::now();
        let mut state = ProbeState::new(spec, now, false);
        assert!(!state.record(Ok(()), now));
        assert!(state.record(Ok(()), now), "two successes make it pass");
        assert!(!state.record(Err("503".into()), now));
        assert!(
            state.record(Err("503".into()), now),
            "two failures make it fail"
        );
        assert!(!state.passing);
    }
}
