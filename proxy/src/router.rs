//! Which published app serves a request: host, port and path to a [`Route`].
//!
//! A [`Router`] is built once per fleet configuration version and then shared read-only
//! by every request, so a lookup is a handful of hash probes with no allocation:
//!
//! - **Host.** Compared case-insensitively, without its port, a trailing dot ignored
//!   (see [`HostKey`]). An exact host beats a wildcard host; `*.apps.example.com`
//!   matches exactly one more left-most label (`wiki.apps.example.com`, never
//!   `a.wiki.apps.example.com` nor `apps.example.com`). When the exact host has no route
//!   for the port and path, the wildcard host is tried next, as the configuration's
//!   "first match in specificity order" rule demands.
//! - **Port.** The route's port must equal the port the user connected to.
//! - **Path.** Among the routes of one host and port the longest matching path prefix
//!   wins. Prefixes start and end with `/`; `/app/` matches `/app/` and `/app/x`, and it
//!   also matches the bare `/app`, reported as [`RouteMatch::missing_slash`] so that the
//!   proxy redirects to `/app/` instead of handing the app a path outside its prefix.
//!   That bare match beats a shorter prefix such as `/` (as nginx does for its
//!   prefix locations). Paths compare case-sensitively, after [`normalize_path`]
//!   decodes percent-encoded unreserved characters (so `/%77iki/` cannot slip past the
//!   `/wiki/` route to a shorter one); dot segments are not resolved here: the
//!   forwarding step refuses them.
//!
//! Each host and port holds its prefixes in a hash map keyed by the prefix without its
//! trailing slash; a lookup probes only the request path's own `/` boundaries that are
//! no longer than the longest prefix, from the longest down, so the cost depends on
//! the request, never on the number of routes.
//!
//! The router hands out [`AppRoute`]s: each configuration route with what forwarding
//! works out once per route ([`PreparedRoute`]: its internal URL split, its app header),
//! so that requests do not.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;
use sallyport_api::fleet_config::{FleetConfig, Route};
use sallyport_api::published_app::PreAuthenticationType;
use sallyport_policy::{AppPolicies, MfaSettings, PolicySet};
use tracing::error;

use crate::forward::{ForwardRoute, InternalUrl, PreparedRoute};
use crate::rate_limit::AppRateLimiter;

/// The longest host name a [`HostKey`] holds: DNS names are at most 253 characters.
pub const MAX_HOST_LEN: usize = 253;

/// A host name normalised for lookups, kept on the stack: ASCII lower case, without
/// port, without trailing dot.
///
/// Normalising the `Host` header or SNI this way costs no allocation, which matters on
/// the request path.
pub struct HostKey {
    bytes: [u8; MAX_HOST_LEN],
    len: usize,
}

impl HostKey {
    /// The normalised form of `host` (`Wiki.Example.COM.:443` becomes
    /// `wiki.example.com`; `[::1]:8443` becomes `[::1]`). `None` for an empty host, a
    /// host longer than [`MAX_HOST_LEN`], or one with non-ASCII characters (DNS names
    /// are ASCII; international names travel as punycode).
    pub fn new(host: &str) -> Option<Self> {
        let host = strip_port(host);
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.is_empty() || host.len() > MAX_HOST_LEN || !host.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; MAX_HOST_LEN];
        for (to, from) in bytes.iter_mut().zip(host.bytes()) {
            *to = from.to_ascii_lowercase();
        }
        Some(Self {
            bytes,
            len: host.len(),
        })
    }

    /// The normalised host.
    pub fn as_str(&self) -> &str {
        // Only ASCII bytes are ever stored, so this is always valid UTF-8.
        std::str::from_utf8(self.bytes.get(..self.len).unwrap_or_default()).unwrap_or_default()
    }

    /// What a wildcard covering this host is keyed by: the host without its left-most
    /// label (`wiki.apps.example.com` -> `apps.example.com`). `None` when the host has a
    /// single label or an empty left-most label.
    pub fn wildcard_parent(&self) -> Option<&str> {
        wildcard_parent(self.as_str())
    }
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HostKey").field(&self.as_str()).finish()
    }
}

/// `host` without a trailing `:port`; an IPv6 literal keeps its brackets.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// `host` without its left-most label, when both parts are non-empty.
fn wildcard_parent(host: &str) -> Option<&str> {
    match host.split_once('.') {
        Some((label, parent)) if !label.is_empty() && !parent.is_empty() => Some(parent),
        _ => None,
    }
}

/// A configuration route as the router serves it: the [`Route`] (which it dereferences
/// to) and what forwarding prepared for it.
#[derive(Debug, Clone)]
pub struct AppRoute {
    route: Route,
    prepared: PreparedRoute,
    policies: Option<Arc<AppPolicies>>,
    rate_limiter: Arc<AppRateLimiter>,
}

impl AppRoute {
    /// `route`, prepared for forwarding, without conditional access (passthrough), with
    /// a fresh bucket for its whole rate limit.
    pub fn new(route: Route) -> Self {
        let prepared = PreparedRoute::new(&route);
        let rate_limiter = Arc::new(AppRateLimiter::new(&route.rate_limit, 1));
        Self {
            route,
            prepared,
            policies: None,
            rate_limiter,
        }
    }

    /// The app's request rate limit on this replica.
    pub fn rate_limiter(&self) -> &AppRateLimiter {
        &self.rate_limiter
    }

    /// The app's assignment and conditional access policies; `None` for a passthrough
    /// app.
    pub fn policies(&self) -> Option<&Arc<AppPolicies>> {
        self.policies.as_ref()
    }
}

impl Deref for AppRoute {
    type Target = Route;

    fn deref(&self) -> &Route {
        &self.route
    }
}

impl ForwardRoute for AppRoute {
    fn route(&self) -> &Route {
        &self.route
    }

    fn internal_url(&self) -> Option<InternalUrl<'_>> {
        self.prepared.internal_url(&self.route)
    }

    fn app_header(&self) -> Option<HeaderValue> {
        self.prepared.app_header()
    }
}

/// A route a request matched, with what the proxy needs beyond the route itself.
#[derive(Debug, Clone, Copy)]
pub struct RouteMatch<'a> {
    /// The matched route, prepared for forwarding; it dereferences to the [`Route`].
    pub route: &'a AppRoute,
    /// The route's position in [`FleetConfig::routes`]: a stable key for per-route state
    /// (rate limiters, counters) kept in arrays alongside this configuration version.
    pub index: usize,
    /// True when the path is the route's prefix without its trailing slash (`/app` for
    /// `/app/`): the proxy should redirect to the prefix rather than forward.
    pub missing_slash: bool,
}

/// The generation of the next router built.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// The routes of one fleet configuration, indexed by host, port and path prefix.
pub struct Router {
    config: Arc<FleetConfig>,
    /// Unique per router built in this process: the configuration generation that
    /// cached decisions are keyed by.
    generation: u64,
    /// Route index by app id.
    by_app: HashMap<Box<str>, usize>,
    /// The configuration's routes, in its order, prepared.
    routes: Vec<AppRoute>,
    /// Exact hosts.
    exact: HashMap<Box<str>, HostRoutes>,
    /// Wildcard hosts, keyed by what follows `*.`.
    wildcard: HashMap<Box<str>, HostRoutes>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Counts, not thousands of routes in a log line.
        f.debug_struct("Router")
            .field("version", &self.config.version)
            .field("generation", &self.generation)
            .field("routes", &self.config.routes.len())
            .field("exact_hosts", &self.exact.len())
            .field("wildcard_hosts", &self.wildcard.len())
            .finish()
    }
}

/// The routes of one host (exact or wildcard), by port.
#[derive(Debug, Default)]
struct HostRoutes {
    /// A host is published on one or two ports at most, so a short list beats a map.
    ports: Vec<PortRoutes>,
}

/// The routes of one host and port, by path prefix.
#[derive(Debug)]
struct PortRoutes {
    port: u16,
    /// Path prefix without its trailing slash (`/app/` -> `/app`, `/` -> ``) to the
    /// route's index in the configuration.
    prefixes: HashMap<Box<str>, usize>,
    /// The length of the longest key of `prefixes`: no lookup probes beyond it.
    longest: usize,
}

impl Router {
    /// Indexes the routes of `config`. When two routes share host, port and path prefix
    /// (which the operator refuses as a host conflict), the first in configuration order
    /// wins. Hosts are normalised as [`HostKey`] does; a prefix is read as if it started
    /// and ended with `/`. Routes whose host cannot be normalised are never matched.
    pub fn new(config: Arc<FleetConfig>) -> Self {
        Self::build(config, MfaSettings::default(), 1, None)
    }

    /// Like [`Router::new`], compiling the configuration's ConditionalAccessPolicies
    /// with `mfa` for the OIDC routes, and sharing each app's rate limit among
    /// `replicas`: a route keeps its bucket from `previous` while its limit and the
    /// replica count stay the same. A policy that fails to compile blocks the users it
    /// names (the engine fails closed); the failure is logged.
    pub fn build(
        config: Arc<FleetConfig>,
        mfa: MfaSettings,
        replicas: usize,
        previous: Option<&Router>,
    ) -> Self {
        let (policy_set, errors) = PolicySet::compile(&config.policies, mfa);
        for error in errors {
            error!(policy = error.policy(), %error, "ConditionalAccessPolicy cannot be evaluated; it blocks the users it names until fixed");
        }
        let mut exact: HashMap<Box<str>, HostRoutes> = HashMap::new();
        let mut wildcard: HashMap<Box<str>, HostRoutes> = HashMap::new();
        for (index, route) in config.routes.iter().enumerate() {
            let (is_wildcard, host) = match route.host.strip_prefix("*.") {
                Some(parent) => (true, parent),
                None => (false, route.host.as_str()),
            };
            let Some(host) = HostKey::new(host) else {
                continue;
            };
            let table = if is_wildcard {
                &mut wildcard
            } else {
                &mut exact
            };
            table.entry(host.as_str().into()).or_default().insert(
                route.port,
                prefix_key(&route.path_prefix),
                index,
            );
        }
        let routes: Vec<AppRoute> = config
            .routes
            .iter()
            .cloned()
            .map(|route| {
                let kept = previous
                    .and_then(|router| router.by_app.get(route.app.as_str()))
                    .and_then(|index| previous?.routes.get(*index))
                    .map(|old| &old.rate_limiter)
                    .filter(|bucket| bucket.enforces(&route.rate_limit, replicas))
                    .cloned();
                let mut prepared = AppRoute::new(route);
                prepared.rate_limiter = kept.unwrap_or_else(|| {
                    Arc::new(AppRateLimiter::new(&prepared.rate_limit, replicas))
                });
                if prepared.pre_authentication.kind != PreAuthenticationType::Passthrough {
                    prepared.policies = Some(Arc::new(policy_set.app(
                        &prepared.app,
                        &prepared.assignment,
                        &prepared.route.policies,
                    )));
                }
                prepared
            })
            .collect();
        let by_app = routes
            .iter()
            .enumerate()
            .map(|(index, route)| (route.app.as_str().into(), index))
            .collect();
        Self {
            config,
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            by_app,
            routes,
            exact,
            wildcard,
        }
    }

    /// The configuration this router indexes.
    pub fn config(&self) -> &Arc<FleetConfig> {
        &self.config
    }

    /// This router's generation: different for every router built in the process.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The assignment and policies of app `app` (`namespace/name`); `None` when the app
    /// is not published or is passthrough.
    pub fn policies_of(&self, app: &str) -> Option<&AppPolicies> {
        let index = *self.by_app.get(app)?;
        self.routes.get(index)?.policies().map(Arc::as_ref)
    }

    /// The route serving `path` on `host` (a `Host` header or `:authority`, port allowed
    /// and ignored) and `port` (the port the user connected to). See [`Router::lookup`]
    /// for the bare-prefix case.
    pub fn find(&self, host: &str, port: u16, path: &str) -> Option<&Route> {
        self.lookup(host, port, path)
            .map(|found| &found.route.route)
    }

    /// Like [`Router::find`], with the route's index and whether the path lacked the
    /// prefix's trailing slash.
    pub fn lookup(&self, host: &str, port: u16, path: &str) -> Option<RouteMatch<'_>> {
        let host = HostKey::new(host)?;
        if !path.starts_with('/') {
            return None;
        }
        let path = normalize_path(path);
        let path = path.as_ref();
        let in_table = |table: &HashMap<Box<str>, HostRoutes>, key: &str| {
            table.get(key).and_then(|routes| routes.find(port, path))
        };
        let (index, missing_slash) = in_table(&self.exact, host.as_str())
            .or_else(|| in_table(&self.wildcard, host.wildcard_parent()?))?;
        let route = self.routes.get(index)?;
        Some(RouteMatch {
            route,
            index,
            missing_slash,
        })
    }

    /// The route at `index` of the configuration, as a [`RouteMatch::index`] names it.
    pub fn route(&self, index: usize) -> Option<&Route> {
        self.routes.get(index).map(|found| &found.route)
    }
}

/// `path` with percent-encoded unreserved characters (letters, digits, `-`, `.`, `_`,
/// `~`) decoded, which RFC 3986 section 6.2.2.2 says names the same resource. Borrowed,
/// without allocation, when there is nothing to decode. Other escapes (`%2F`, `%20`)
/// stay as they are: decoding them would change the path's meaning.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let Some(first) = (0..bytes.len()).find(|&i| unreserved_escape(bytes, i).is_some()) else {
        return Cow::Borrowed(path);
    };
    let mut normalized = String::with_capacity(path.len());
    normalized.push_str(path.get(..first).unwrap_or_default());
    let mut i = first;
    while i < bytes.len() {
        match unreserved_escape(bytes, i) {
            Some(decoded) => {
                normalized.push(char::from(decoded));
                i += 3;
            }
            None => {
                // Copy the whole character: `path` may hold non-ASCII text.
                let width = path
                    .get(i..)
                    .and_then(|rest| rest.chars().next())
                    .map_or(1, char::len_utf8);
                normalized.push_str(path.get(i..i + width).unwrap_or_default());
                i += width;
            }
        }
    }
    Cow::Owned(normalized)
}

/// The unreserved character escaped as `%XX` at `at` in `bytes`, if one is.
fn unreserved_escape(bytes: &[u8], at: usize) -> Option<u8> {
    let [b'%', high, low] = *bytes.get(at..at + 3)? else {
        return None;
    };
    let hex = |digit: u8| char::from(digit).to_digit(16);
    let decoded = u8::try_from(hex(high)? * 16 + hex(low)?).ok()?;
    (decoded.is_ascii_alphanumeric() || matches!(decoded, b'-' | b'.' | b'_' | b'~'))
        .then_some(decoded)
}

/// The map key of a path prefix: without its trailing slash, with a leading one.
fn prefix_key(prefix: &str) -> Box<str> {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if trimmed.is_empty() || trimmed.starts_with('/') {
        trimmed.into()
    } else {
        format!("/{trimmed}").into()
    }
}

impl HostRoutes {
    fn insert(&mut self, port: u16, prefix: Box<str>, index: usize) {
        let position = match self.ports.iter().position(|p| p.port == port) {
            Some(position) => position,
            None => {
                self.ports.push(PortRoutes {
                    port,
                    prefixes: HashMap::new(),
                    longest: 0,
                });
                self.ports.len() - 1
            }
        };
        if let Some(routes) = self.ports.get_mut(position) {
            routes.longest = routes.longest.max(prefix.len());
            routes.prefixes.entry(prefix).or_insert(index);
        }
    }

    /// The index of the route for `path` on `port`, and whether it matched as a bare
    /// prefix without its trailing slash.
    fn find(&self, port: u16, path: &str) -> Option<(usize, bool)> {
        self.ports
            .iter()
            .find(|routes| routes.port == port)
            .and_then(|routes| routes.find(path))
    }
}

impl PortRoutes {
    /// `path` starts with `/`. A key `k` matches when `path` is `k` followed by `/` and
    /// anything (a real prefix match), or when `path` is exactly `k` (the bare prefix,
    /// which is longer than any real match and so wins over them).
    fn find(&self, path: &str) -> Option<(usize, bool)> {
        if !path.ends_with('/')
            && path.len() <= self.longest
            && let Some(&index) = self.prefixes.get(path)
        {
            return Some((index, true));
        }
        let bytes = path.as_bytes();
        let end = bytes.len().min(self.longest + 1);
        bytes
            .get(..end)
            .unwrap_or_default()
            .iter()
            .enumerate()
            .rev()
            .filter(|&(_, &b)| b == b'/')
            // Slicing at an ASCII '/' is always on a character boundary.
            .find_map(|(slash, _)| self.prefixes.get(path.get(..slash)?))
            .map(|&index| (index, false))
    }
}

/// Test fixtures shared by the proxy's routing and forwarding tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use sallyport_api::fleet_config::Route;

    /// A passthrough route of `app` on `host`:`port` under `prefix`, to `internal_url`.
    pub(crate) fn route(
        app: &str,
        host: &str,
        port: u16,
        prefix: &str,
        internal_url: &str,
    ) -> Route {
        let authority = if port == 443 {
            host.to_owned()
        } else {
            format!("{host}:{port}")
        };
        serde_json::from_value(serde_json::json!({
            "app": app,
            "host": host,
            "port": port,
            "pathPrefix": prefix,
            "url": format!("https://{authority}{prefix}"),
            "internalUrl": internal_url,
            "connectorGroup": "infra/east",
            "preAuthentication": { "type": "Passthrough" },
            "tls": { "secretRef": { "namespace": "sallyport-system", "name": "default-tls" } },
            "backend": { "timeout": "85s", "websockets": true },
            "rateLimit": { "requestsPerSecond": 500, "burst": 1000 },
        }))
        .unwrap_or_else(|e| panic!("fixture route: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::route;
    use super::*;

    fn router(routes: Vec<Route>) -> Router {
        let config = FleetConfig::new(routes, vec![], vec![], vec![])
            .unwrap_or_else(|e| panic!("fleet config: {e}"));
        Router::new(Arc::new(config))
    }

    fn app_of<'a>(router: &'a Router, host: &str, port: u16, path: &str) -> Option<&'a str> {
        router.find(host, port, path).map(|r| r.app.as_str())
    }

    #[test]
    fn host_keys_are_normalised_without_allocation() {
        let key = |host: &str| HostKey::new(host).map(|k| k.as_str().to_owned());
        assert_eq!(key("Wiki.Example.COM"), Some("wiki.example.com".into()));
        assert_eq!(
            key("wiki.example.com.:8443"),
            Some("wiki.example.com".into())
        );
        assert_eq!(key("[::1]:443"), Some("[::1]".into()));
        assert_eq!(key(""), None);
        assert_eq!(key(":443"), None);
        assert_eq!(key("wïki.example.com"), None);
        assert_eq!(key(&"a".repeat(254)), None);
        assert!(key(&"a".repeat(253)).is_some());
        let parent = HostKey::new("wiki.apps.example.com");
        assert_eq!(
            parent.as_ref().and_then(HostKey::wildcard_parent),
            Some("apps.example.com")
        );
        assert_eq!(
            HostKey::new("localhost")
                .as_ref()
                .and_then(HostKey::wildcard_parent),
            None
        );
    }

    #[test]
    fn an_exact_host_beats_a_wildcard() {
        let router = router(vec![
            route("t/star", "*.apps.example.com", 443, "/", "http://star/"),
            route("t/wiki", "wiki.apps.example.com", 443, "/", "http://wiki/"),
        ]);
        assert_eq!(
            app_of(&router, "wiki.apps.example.com", 443, "/x"),
            Some("t/wiki")
        );
        assert_eq!(
            app_of(&router, "chat.apps.example.com", 443, "/x"),
            Some("t/star")
        );
    }

    #[test]
    fn a_wildcard_matches_exactly_one_label() {
        let router = router(vec![route(
            "t/star",
            "*.apps.example.com",
            443,
            "/",
            "http://star/",
        )]);
        assert_eq!(
            app_of(&router, "a.apps.example.com", 443, "/"),
            Some("t/star")
        );
        assert_eq!(app_of(&router, "a.b.apps.example.com", 443, "/"), None);
        assert_eq!(app_of(&router, "apps.example.com", 443, "/"), None);
        assert_eq!(app_of(&router, ".apps.example.com", 443, "/"), None);
    }

    #[test]
    fn an_exact_host_without_a_matching_path_falls_back_to_the_wildcard() {
        let router = router(vec![
            route(
                "t/api",
                "wiki.apps.example.com",
                443,
                "/api/",
                "http://api/",
            ),
            route("t/star", "*.apps.example.com", 443, "/", "http://star/"),
        ]);
        assert_eq!(
            app_of(&router, "wiki.apps.example.com", 443, "/api/v1"),
            Some("t/api")
        );
        assert_eq!(
            app_of(&router, "wiki.apps.example.com", 443, "/other"),
            Some("t/star")
        );
    }

    #[test]
    fn the_longest_prefix_wins() {
        let router = router(vec![
            route("t/root", "apps.example.com", 443, "/", "http://root/"),
            route("t/app", "apps.example.com", 443, "/app/", "http://app/"),
            route(
                "t/deep",
                "apps.example.com",
                443,
                "/app/deep/",
                "http://deep/",
            ),
        ]);
        let app = |path: &str| app_of(&router, "apps.example.com", 443, path);
        assert_eq!(app("/"), Some("t/root"));
        assert_eq!(app("/application"), Some("t/root"));
        assert_eq!(app("/app/"), Some("t/app"));
        assert_eq!(app("/app/x/y"), Some("t/app"));
        assert_eq!(app("/app/deeper"), Some("t/app"));
        assert_eq!(app("/app/deep/"), Some("t/deep"));
        assert_eq!(app("/app/deep/x"), Some("t/deep"));
        assert_eq!(app("/APP/x"), Some("t/root"), "paths are case-sensitive");
        assert_eq!(app("app/x"), None, "not an origin-form path");
        assert_eq!(app(""), None);
    }

    #[test]
    fn a_bare_prefix_matches_for_a_redirect_and_beats_shorter_prefixes() {
        let router = router(vec![
            route("t/root", "apps.example.com", 443, "/", "http://root/"),
            route("t/app", "apps.example.com", 443, "/app/", "http://app/"),
        ]);
        let found = router.lookup("apps.example.com", 443, "/app");
        assert_eq!(
            found.map(|m| (m.route.app.as_str(), m.missing_slash)),
            Some(("t/app", true))
        );
        let found = router.lookup("apps.example.com", 443, "/app/");
        assert_eq!(found.map(|m| (m.index, m.missing_slash)), Some((1, false)));
        let found = router.lookup("apps.example.com", 443, "/ap");
        assert_eq!(found.map(|m| (m.index, m.missing_slash)), Some((0, false)));
        assert_eq!(router.route(1).map(|r| r.app.as_str()), Some("t/app"));
    }

    #[test]
    fn encoded_unreserved_characters_cannot_dodge_a_longer_prefix() {
        let router = router(vec![
            route("t/root", "apps.example.com", 443, "/", "http://root/"),
            route("t/wiki", "apps.example.com", 443, "/wiki/", "http://wiki/"),
        ]);
        assert_eq!(
            app_of(&router, "apps.example.com", 443, "/%77iki/x"),
            Some("t/wiki")
        );
        assert_eq!(
            app_of(&router, "apps.example.com", 443, "/wik%69%2Fx"),
            Some("t/root")
        );
        assert_eq!(
            normalize_path("/a%2D%5f%7e%41%2e/%2F%20%zz%4"),
            "/a-_~A./%2F%20%zz%4"
        );
        assert_eq!(normalize_path("/ünï%63ode"), "/ünïcode");
        assert!(matches!(normalize_path("/plain/%2F"), Cow::Borrowed(_)));
    }

    #[test]
    fn the_port_must_match() {
        let router = router(vec![
            route("t/https", "apps.example.com", 443, "/", "http://a/"),
            route("t/alt", "apps.example.com", 8443, "/", "http://b/"),
        ]);
        assert_eq!(
            app_of(&router, "apps.example.com", 443, "/"),
            Some("t/https")
        );
        assert_eq!(
            app_of(&router, "apps.example.com:8443", 8443, "/"),
            Some("t/alt")
        );
        // The port in the Host header is ignored: the listener's port decides.
        assert_eq!(
            app_of(&router, "apps.example.com:8443", 443, "/"),
            Some("t/https")
        );
        assert_eq!(app_of(&router, "apps.example.com", 80, "/"), None);
    }

    #[test]
    fn hosts_compare_case_insensitively_without_trailing_dot() {
        let router = router(vec![route(
            "t/wiki",
            "wiki.example.com",
            443,
            "/",
            "http://w/",
        )]);
        assert_eq!(
            app_of(&router, "WIKI.Example.com", 443, "/"),
            Some("t/wiki")
        );
        assert_eq!(
            app_of(&router, "wiki.example.com.", 443, "/"),
            Some("t/wiki")
        );
        assert_eq!(
            app_of(&router, "wiki.example.com.:443", 443, "/"),
            Some("t/wiki")
        );
        assert_eq!(app_of(&router, "other.example.com", 443, "/"), None);
    }

    #[test]
    fn the_first_of_duplicate_routes_wins() {
        let router = router(vec![
            route("t/first", "apps.example.com", 443, "/app/", "http://a/"),
            route("t/second", "apps.example.com", 443, "/app/", "http://b/"),
        ]);
        assert_eq!(
            app_of(&router, "apps.example.com", 443, "/app/"),
            Some("t/first")
        );
    }

    #[test]
    fn ten_thousand_routes_are_found_by_hash() {
        let mut routes = Vec::with_capacity(10_000);
        for i in 0..5_000 {
            let host = format!("app{i}.apps.example.com");
            routes.push(route(&format!("t/host{i}"), &host, 443, "/", "http://h/"));
        }
        for i in 0..4_999 {
            let prefix = format!("/p{i}/");
            routes.push(route(
                &format!("t/path{i}"),
                "shared.example.com",
                443,
                &prefix,
                "http://p/",
            ));
        }
        routes.push(route("t/star", "*.apps.example.com", 443, "/", "http://s/"));
        let router = router(routes);
        assert_eq!(router.config().routes.len(), 10_000);

        let started = std::time::Instant::now();
        for i in (0..5_000).step_by(7) {
            let host = format!("app{i}.apps.example.com");
            let expected = format!("t/host{i}");
            assert_eq!(
                app_of(&router, &host, 443, "/some/page"),
                Some(expected.as_str())
            );
            let path = format!("/p{i}/some/page?x");
            let expected = format!("t/path{i}");
            assert_eq!(
                app_of(&router, "shared.example.com", 443, &path),
                Some(expected.as_str())
            );
        }
        assert_eq!(
            app_of(&router, "nope.apps.example.com", 443, "/"),
            Some("t/star")
        );
        assert_eq!(app_of(&router, "shared.example.com", 443, "/p99999/"), None);
        // 1,430 lookups; a linear scan of 10k routes each would take far longer in a
        // debug build. Generous, so it does not flake on a loaded machine.
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn a_very_long_path_probes_only_up_to_the_longest_prefix() {
        let router = router(vec![route(
            "t/a",
            "apps.example.com",
            443,
            "/a/",
            "http://a/",
        )]);
        let long = format!("/a/{}", "x/".repeat(10_000));
        assert_eq!(app_of(&router, "apps.example.com", 443, &long), Some("t/a"));
    }
}
