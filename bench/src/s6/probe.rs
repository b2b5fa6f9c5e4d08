//! What S6 watches while it changes the app: a probe per proxy replica asking `GET /`
//! every few milliseconds and noting which backend answered, a watch on the compiled
//! fleet configuration, and the pure judgement of both against the changes.
//!
//! A probe keeps one HTTP/1.1 keep-alive connection to its replica (a new one after any
//! failure) and sends one request at a time, so its observations are in order: the time
//! of each is when its answer was complete. The proxy chooses the route per request, so
//! a kept-alive connection sees a new configuration as a new one would.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use http::{Request, StatusCode};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use sallyport_api::fleet_config::{FleetConfig, STORAGE_KEY};
use sallyport_e2e::dataplane::{HttpsConnection, Protocol, empty_body};
use tokio::task::JoinHandle;

use crate::dataplane::backend::NAME_HEADER;

/// The header the connector puts on answers it makes itself (the reason of a refusal).
const CONNECTOR_ERROR_HEADER: &str = "sallyport-error";
/// Bound on one probe request, connection included.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What one probe answer showed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// A 200 from the backend of this index (in the run's list of backend names).
    Backend(usize),
    /// Anything else: another status, a 200 without a known backend name, a failed
    /// request; the text says which (it is counted by kind, so it holds no request id).
    Failed(String),
}

/// One probe answer, at the time it was complete (from the run's epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// When, from the run's epoch.
    pub at: Duration,
    /// What it showed.
    pub seen: Seen,
}

/// A time-ordered record shared by a probe (which appends) and the run (which reads).
pub type Log<T> = Arc<Mutex<Vec<T>>>;

/// Appends `item` to `log`.
fn push<T>(log: &Log<T>, item: T) {
    log.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(item);
}

/// A copy of `log`.
pub fn snapshot<T: Clone>(log: &Log<T>) -> Vec<T> {
    log.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// A running probe of one replica; stopped when dropped.
pub struct Probe {
    /// What it saw so far.
    pub log: Log<Observation>,
    task: JoinHandle<()>,
}

/// Where a probe sends its requests.
#[derive(Clone, Debug)]
pub struct ProbeTarget {
    /// The replica's listen address.
    pub address: SocketAddr,
    /// The app's host name (SNI and `Host`).
    pub host: String,
    /// The app's certificate, PEM: the only one trusted.
    pub ca_pem: Vec<u8>,
    /// The backends' names, in the order [`Seen::Backend`] counts them.
    pub names: Vec<String>,
}

impl Probe {
    /// Starts probing `target` every `every`, times taken from `epoch`.
    pub fn start(target: ProbeTarget, epoch: Instant, every: Duration) -> Self {
        let log: Log<Observation> = Arc::default();
        let task = tokio::spawn(probe(target, epoch, every, log.clone()));
        Self { log, task }
    }

    /// Stops probing; returns everything it saw.
    pub fn stop(self) -> Vec<Observation> {
        self.task.abort();
        snapshot(&self.log)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn probe(target: ProbeTarget, epoch: Instant, every: Duration, log: Log<Observation>) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connection: Option<HttpsConnection> = None;
    loop {
        ticks.tick().await;
        let seen = match tokio::time::timeout(PROBE_TIMEOUT, ask(&target, &mut connection)).await {
            Ok(seen) => seen,
            Err(_) => {
                connection = None;
                Seen::Failed(format!("no answer within {PROBE_TIMEOUT:?}"))
            }
        };
        if matches!(seen, Seen::Failed(_)) {
            connection = None;
        }
        push(
            &log,
            Observation {
                at: epoch.elapsed(),
                seen,
            },
        );
    }
}

/// One `GET /` on `connection` (opened first when there is none).
async fn ask(target: &ProbeTarget, connection: &mut Option<HttpsConnection>) -> Seen {
    if connection.is_none() {
        match HttpsConnection::open(
            target.address,
            &target.host,
            &target.ca_pem,
            Protocol::Http1,
        )
        .await
        {
            Ok(opened) => *connection = Some(opened),
            Err(error) => return Seen::Failed(format!("connecting: {error}")),
        }
    }
    let Some(open) = connection.as_mut() else {
        return Seen::Failed("no connection".to_owned());
    };
    let request = match Request::get("/").body(empty_body()) {
        Ok(request) => request,
        Err(error) => return Seen::Failed(format!("building the request: {error}")),
    };
    match open.request(request).await {
        Ok(answer) => classify(
            answer.status,
            answer
                .headers
                .get(NAME_HEADER)
                .and_then(|v| v.to_str().ok()),
            answer
                .headers
                .get(CONNECTOR_ERROR_HEADER)
                .and_then(|v| v.to_str().ok()),
            &target.names,
        ),
        Err(error) => Seen::Failed(format!("request failed: {error}")),
    }
}

/// What an answer with `status`, backend name `name` and connector refusal `refusal`
/// shows, the backends being `names`.
pub fn classify(
    status: StatusCode,
    name: Option<&str>,
    refusal: Option<&str>,
    names: &[String],
) -> Seen {
    if status != StatusCode::OK {
        return Seen::Failed(match refusal {
            Some(reason) => format!("status {} ({reason})", status.as_u16()),
            None => format!("status {}", status.as_u16()),
        });
    }
    match name.and_then(|name| names.iter().position(|known| known == name)) {
        Some(index) => Seen::Backend(index),
        None => Seen::Failed(format!("status 200 from backend {name:?}")),
    }
}

/// One version of the compiled fleet configuration as the benchmark's watch saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigSeen {
    /// When the watch delivered it, from the run's epoch.
    pub at: Duration,
    /// The app's internal URL in it (`None` when the app has no route in it).
    pub internal_url: Option<String>,
}

/// A watch on the fleet configuration ConfigMap; stopped when dropped.
pub struct ConfigWatch {
    /// What it saw so far.
    pub log: Log<ConfigSeen>,
    task: JoinHandle<()>,
}

impl ConfigWatch {
    /// Watches ConfigMap `name` of `config_maps`' namespace, noting the internal URL of
    /// the route of `app` (`namespace/name`) in every version.
    pub fn start(config_maps: Api<ConfigMap>, name: &str, app: String, epoch: Instant) -> Self {
        let log: Log<ConfigSeen> = Arc::default();
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let seen = log.clone();
        let task = tokio::spawn(async move {
            let mut events = pin!(watcher(config_maps, config).default_backoff());
            while let Some(event) = events.next().await {
                let config_map = match event {
                    Ok(Event::Apply(config_map) | Event::InitApply(config_map)) => config_map,
                    _ => continue,
                };
                let at = epoch.elapsed();
                let Some(config) = config_map
                    .binary_data
                    .as_ref()
                    .and_then(|data| data.get(STORAGE_KEY))
                    .and_then(|bytes| FleetConfig::from_gzip_json(&bytes.0).ok())
                else {
                    continue;
                };
                let internal_url = config
                    .routes
                    .iter()
                    .find(|route| route.app == app)
                    .map(|route| route.internal_url.clone());
                push(&seen, ConfigSeen { at, internal_url });
            }
        });
        Self { log, task }
    }

    /// Stops watching; returns everything it saw.
    pub fn stop(self) -> Vec<ConfigSeen> {
        self.task.abort();
        snapshot(&self.log)
    }
}

impl Drop for ConfigWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one replica's probes showed between the start of one change and the next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// The first answer from the expected backend (from the run's epoch).
    pub first_new: Option<Duration>,
    /// Answers from another backend before that one (expected while the change travels).
    pub old_before: u64,
    /// Answers from another backend after it: the replica flipped back (an error).
    pub stale: u64,
    /// Probes that did not get a 200 from a known backend (errors).
    pub failed: u64,
    /// Probes in the window.
    pub probes: u64,
}

/// Judges the `observations` (in time order) made from `start` (inclusive) to `end`
/// (exclusive; `None`: to the last), when backend `expected` should answer.
pub fn judge(
    observations: &[Observation],
    start: Duration,
    end: Option<Duration>,
    expected: usize,
) -> Window {
    let from = observations.partition_point(|o| o.at < start);
    let to = end.map_or(observations.len(), |end| {
        observations.partition_point(|o| o.at < end)
    });
    let mut window = Window::default();
    for observation in observations.get(from..to).unwrap_or_default() {
        window.probes += 1;
        match &observation.seen {
            Seen::Failed(_) => window.failed += 1,
            Seen::Backend(index) if *index == expected => {
                if window.first_new.is_none() {
                    window.first_new = Some(observation.at);
                }
            }
            Seen::Backend(_) if window.first_new.is_some() => window.stale += 1,
            Seen::Backend(_) => window.old_before += 1,
        }
    }
    window
}

/// The first answer from backend `expected` in `log` from `start` on, if any yet.
pub fn first_from(log: &Log<Observation>, start: Duration, expected: usize) -> Option<Duration> {
    let log = log.lock().unwrap_or_else(PoisonError::into_inner);
    judge(&log, start, None, expected).first_new
}

/// The first configuration version seen from `start` on whose app route has
/// `internal_url`.
pub fn config_reached(
    seen: &[ConfigSeen],
    start: Duration,
    internal_url: &str,
) -> Option<Duration> {
    seen.iter()
        .find(|c| c.at >= start && c.internal_url.as_deref() == Some(internal_url))
        .map(|c| c.at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }

    fn log(entries: &[(u64, Option<usize>)]) -> Vec<Observation> {
        entries
            .iter()
            .map(|(at, backend)| Observation {
                at: ms(*at),
                seen: match backend {
                    Some(index) => Seen::Backend(*index),
                    None => Seen::Failed("status 503".to_owned()),
                },
            })
            .collect()
    }

    #[test]
    fn the_first_new_answer_ends_the_wait_and_a_flip_back_is_stale() {
        // Change to backend 1 at 100 ms, the next change at 300 ms.
        let observations = log(&[
            (90, Some(0)),
            (105, Some(0)),
            (110, Some(0)),
            (150, Some(1)),
            (160, Some(1)),
            (170, Some(0)), // flipped back: stale
            (180, None),    // an error
            (190, Some(1)),
            (305, Some(0)), // the next change's window
        ]);
        let window = judge(&observations, ms(100), Some(ms(300)), 1);
        assert_eq!(
            window,
            Window {
                first_new: Some(ms(150)),
                old_before: 2,
                stale: 1,
                failed: 1,
                probes: 7,
            }
        );
        // The next window (back to backend 0) starts with the answer at 305 ms.
        let next = judge(&observations, ms(300), None, 0);
        assert_eq!(next.first_new, Some(ms(305)));
        assert_eq!((next.stale, next.failed, next.probes), (0, 0, 1));
    }

    #[test]
    fn a_replica_that_never_changes_has_no_first_new_answer() {
        let observations = log(&[(10, Some(0)), (20, Some(0)), (30, Some(0))]);
        let window = judge(&observations, ms(0), None, 1);
        assert_eq!(window.first_new, None);
        assert_eq!((window.old_before, window.stale), (3, 0));
        assert_eq!(judge(&[], ms(0), None, 1), Window::default());
    }

    #[test]
    fn answers_are_sorted_into_kinds() {
        let names = ["blue".to_owned(), "green".to_owned()];
        assert_eq!(
            classify(StatusCode::OK, Some("green"), None, &names),
            Seen::Backend(1)
        );
        assert_eq!(
            classify(StatusCode::OK, None, None, &names),
            Seen::Failed("status 200 from backend None".to_owned())
        );
        assert_eq!(
            classify(
                StatusCode::FORBIDDEN,
                Some("blue"),
                Some("OutsideInternalUrl"),
                &names
            ),
            Seen::Failed("status 403 (OutsideInternalUrl)".to_owned())
        );
    }

    #[test]
    fn the_configuration_counts_from_the_change_on() {
        let seen = [
            ConfigSeen {
                at: ms(5),
                internal_url: Some("http://b/".to_owned()),
            },
            ConfigSeen {
                at: ms(50),
                internal_url: Some("http://a/".to_owned()),
            },
            ConfigSeen {
                at: ms(80),
                internal_url: Some("http://b/".to_owned()),
            },
        ];
        assert_eq!(config_reached(&seen, ms(10), "http://b/"), Some(ms(80)));
        assert_eq!(config_reached(&seen, ms(90), "http://b/"), None);
    }
}
