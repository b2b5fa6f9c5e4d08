//! Sallyport's benchmarks: the scenarios of the performance design
//! (`shared/design/performance.md`) as reproducible runs against real processes on
//! loopback, reported as a table and one JSON line. `make bench` runs them in release
//! mode; results and how they were obtained are in `BENCHMARKS.md`.
//!
//! Benchmarks measure and report; they assert no timing (that belongs in no test).
//!
//! - [`s8`]: the operator under 1,000 PublishedApps, and the fleet configuration compiler
//!   at 10,000 apps;
//! - [`compare`]: S1, S1b, S2 and S3 side by side with real peers (direct, nginx, rathole
//!   over TCP and TLS, frp, Sallyport passthrough and with authentication and policy), with
//!   plots; `quick`, its short form that CI checks against a baseline of ratios;
//! - [`dataplane`]: S1 (small GETs, 50 keep-alive connections) and S3 (1 GiB download and
//!   upload over one connection, with the memory growth of proxy and connector), straight
//!   to a backend and through the proxy and connector, side by side;
//! - [`flood`]: legitimate users next to a request flood from other addresses, with the
//!   proxy's abuse limits and without;
//! - [`policy`]: the per-request cost of conditional access, 1 to 1,000 policies per
//!   app, in process;
//! - [`operator_process`]: the operator as a real process; [`procfs`]: memory and CPU time
//!   of processes;
//! - [`machine`], [`stats`]: where a run happened, and summaries of repeated measurements.

pub mod compare;
pub mod dataplane;
pub mod error;
pub mod flood;
pub mod machine;
pub mod operator_process;
pub mod peers;
pub mod policy;
pub mod procfs;
pub mod report;
pub mod s4;
pub mod s5;
pub mod s6;
pub mod s7;
pub mod s8;
pub mod stats;

use std::io::Write;

use clap::{Parser, Subcommand};

pub use dataplane::DataplaneError;
pub use error::BenchError;
pub use policy::PolicyBenchError;

/// Command-line interface of `sallyport-bench`.
#[derive(Debug, Parser)]
#[command(
    name = "sallyport-bench",
    version,
    about = "Sallyport's benchmarks, on loopback, against real processes",
    long_about = "Sallyport's benchmarks, on loopback, against real processes.\n\n\
        Each scenario prints a table and, as its last line on stdout, the same results as one \
        JSON object; progress goes to stderr. Build the workspace binaries in release mode \
        first (`cargo build --release --workspace --bins`); `make bench` does that and runs \
        every scenario."
)]
pub struct Cli {
    /// The scenario to run.
    #[command(subcommand)]
    pub command: Scenario,
}

/// A scenario of the performance design.
#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// S8: the operator under N PublishedApps applied at once (default 1,000: time until
    /// all are Ready and published), the fleet configuration compile at 10,000 apps, and
    /// one proxy's memory holding 10,000 apps.
    #[command(
        long_about = "S8: the operator under a burst of PublishedApps, and the fleet \
        configuration compiler at scale.\n\n\
        Operator part: starts a real control plane (etcd and kube-apiserver on 127.0.0.1) \
        through `sallyport-cluster`, installs the CRDs, creates one ConnectorGroup, a wildcard \
        kubernetes.io/tls Secret and one Connector reported connected, starts \
        `sallyport-operator run` as a process, then server-side applies --apps PublishedApps \
        with --concurrency in flight. It reports the time from the first apply until all are \
        applied, until all are Ready (status condition Ready=True, seen by a watch), and until \
        the fleet configuration ConfigMap holds every route; per-app apply-to-Ready latency; \
        the operator's peak RSS; CPU time by process (operator, kube-apiserver, etcd, this \
        benchmark). Goal: 1,000 apps Ready <= 30 s.\n\n\
        Compile part: generates a fleet of --compile-apps apps (the recipe of \
        operator/tests/compile_scale.rs) and times `compile` and the gzip encoding \
        --compile-runs times (min/median/max), with the JSON and gzip sizes. Goal: 10,000 \
        apps compile <= 1 s.\n\n\
        Proxy part: one `sallyport-proxy` (standalone) follows a configuration file holding \
        the generated fleet of --proxy-apps apps, with every TLS Secret it names (the default \
        certificate and each app's own, issued by one CA of the run); external URLs carry the \
        proxy's port and providers point at a closed loopback port. Reports its RSS on an \
        empty configuration, holding and serving the fleet, and after one new HTTPS \
        connection and GET to every app (--proxy-concurrency at a time), per app. Goal: \
        10,000 apps <= 200 MiB.\n\n\
        Everything binds 127.0.0.1 and is stopped when the run ends, also on failure. Every \
        wait is bounded: the operator's start by 3 minutes, everything after the first apply \
        by --timeout."
    )]
    S8(s8::S8Args),

    /// S1 and S3: small GETs over 50 keep-alive connections, and 1 GiB downloads and
    /// uploads over one connection, straight to a backend and through the proxy and
    /// connector, A B A B; medians, ratios to direct, memory growth.
    #[command(
        long_about = "S1 and S3: the data plane, straight to a backend and through \
        sallyport-proxy and sallyport-connector, measured side by side in one run.\n\n\
        Starts, on 127.0.0.1 and without a cluster: a small hyper backend (this executable, \
        `dataplane-backend`), `sallyport-proxy run` in standalone mode (a fleet configuration \
        compiled from a ConnectorGroup and a passthrough PublishedApp, a static registration \
        token, the fleet's PKI and the app's certificate written to files) and \
        `sallyport-connector run`, which registers and keeps its tunnels to the proxy. Users \
        reach the proxy over TLS (the app's self-signed certificate, SNI app.bench.test); the \
        direct reference is plain HTTP to the backend.\n\n\
        S3 first, on fresh processes: per round, one connection per target downloads \
        --transfer-mib (1 GiB) direct, then through the proxy, then uploads as much on the \
        same connections, direct then through the proxy, timed by this benchmark's own client \
        (streamed, nothing kept); the proxy's and connector's VmRSS is sampled every 20 ms \
        during each transfer. Then S1: per round, oha runs --duration seconds with --connections keep-alive connections \
        direct, then through the proxy; 200 answers per second are counted, and the CPU time \
        of the proxy, connector and backend per request is read from /proc.\n\n\
        Reports medians over --rounds, ratios to direct (of the medians, with the range of \
        the per-round ratios), and the goals it can judge (S1 >= 12,000 req/s; S3 memory \
        growth <= 64 MiB). oha comes from `bash bench/install-tools.sh`. Every process is \
        killed when the run ends, also on failure; every wait and transfer is bounded."
    )]
    Dataplane(dataplane::DataplaneArgs),

    /// Conditional access: the per-request cost of evaluating an app's policies (1, 100
    /// and 1,000), alone and with the sign-in log line.
    #[command(
        long_about = "Conditional access: the per-request cost of the policy engine, in \
        process, on one thread.\n\n\
        Generates apps with --policies policies each (default 1, 100 and 1,000) as a fleet \
        would hold them: an MFA baseline, blocks for other teams, partner-network CIDRs, \
        night and weekend windows in Europe/Berlin and America/New_York, risk and platform \
        conditions, named users, report-only trials; three kinds in ten apply to the \
        benchmark's user and the decision is `allowed` (checked before timing). Then times \
        `AppPolicies::evaluate` for one sign-in, and `evaluate` plus the sign-in log line \
        (`SignInEvent` built and encoded as JSON), over --rounds rounds of a bounded \
        number of calls (sized to about --round-ms per round, at most --max-calls), inputs \
        and results through `std::hint::black_box`. Reports the median round in \
        nanoseconds per call, with the fastest and slowest."
    )]
    Policy(policy::PolicyArgs),

    /// Flood: legitimate users, one loopback address each, next to a request flood from
    /// other loopback addresses, through the proxy's abuse limits and without them.
    #[command(
        long_about = "Flood: what legitimate users get while other addresses flood the proxy.\n\n\
        Starts the data-plane benchmark's system (backend, sallyport-proxy standalone, \
        sallyport-connector) on loopback. --users users, each from its own address \
        (127.0.1.1 onwards) on one keep-alive connection, send small GETs back to back \
        (--user-mode max, a closed loop: the fleet's capacity for them) or every \
        1/--user-rate s (--user-mode fixed); --flood-addresses addresses from 127.0.0.2 on \
        open --flood-connections connections each and send GETs back to back, ignoring \
        Retry-After and reconnecting when closed. The per-client limits count each user's \
        address like a flooder's. Phases of --duration s, against the proxy's default \
        limits and then against a proxy with the per-client rate, in-flight and \
        connection caps off: users alone, then users and flood. Reports the users' served \
        requests per second, success ratio and latency, the flood's answers by status and \
        connection failures, and the CPU seconds of each process. Bounded by the phases' \
        durations and the number of connections."
    )]
    Flood(flood::FloodArgs),

    /// S4: N idle WebSockets through the proxy and a connector (default 10,000): resident
    /// memory per idle stream of the proxy and the connector.
    #[command(
        long_about = "S4: many idle tunneled streams, and what each costs in memory.\n\n\
        Starts the data-plane benchmark's system (backend, sallyport-proxy standalone with \
        its per-client and in-flight limits off, one sallyport-connector keeping --tunnels \
        tunnels, by default one per 1,000 streams plus one: a tunnel carries at most 1,000 \
        streams) on loopback. Raises the open-files limit to the hard limit (inherited by \
        the children) and opens --streams WebSockets (HTTP/1.1 upgrade over user TLS) to the \
        backend's echo at /ws, from --source-addresses loopback addresses (127.0.6.1..), \
        --concurrency handshakes at a time; each is checked with one echoed frame, then left \
        idle. Reads the VmRSS of the proxy, the connector and the backend before, with half \
        and with all open (after --settle seconds idle each), and after closing them; \
        reports the growth per stream (goal: <= 16 KiB per side) and the slope from half to \
        all, and checks --recheck streams again after the idle time. Bounded: 30 s per \
        handshake, --open-timeout for all."
    )]
    S4(s4::S4Args),

    /// S5: a connector's start to the first proxied response; with two connectors, a
    /// SIGKILL and a SIGTERM under load; 1,000 in-flight requests cancelled at once.
    #[command(
        long_about = "S5: connectors starting, dying and draining, and a mass cancellation.\n\n\
        Starts the data-plane benchmark's backend and sallyport-proxy (standalone, JSON logs, \
        per-client limits off) and runs connectors of the group as processes. Per round \
        (--rounds): (1) with no connector running, starts one on an empty state directory \
        (registration) and users already connected poll GET / every --poll-ms: spawn to the \
        first 200, to the connector's `dialling the fleet` and to the proxy's `tunnel \
        opened`; kills it and restarts it on its saved state, measured the same; (2) starts \
        a second connector, --connections users send GETs back to back, one connector gets \
        SIGKILL: failed requests, first to last failure, time until new requests succeed; \
        (3) the same with SIGTERM: failed requests and the drain time; (4) --cancel-requests \
        requests to the backend's /slow/--slow-ms on --cancel-connections HTTP/2 \
        connections, dropped at once when all reached the backend and again right after \
        sending: tunnel teardowns in the proxy's and connectors' logs and the proxy's \
        tunnels-open gauge, and whether GETs right after succeed. Goals: first response <= \
        50 ms median, new requests within 1 s of a kill, no loss on drain, no teardown."
    )]
    S5(s5::S5Args),

    /// S6: a PublishedApp change in the cluster until all proxy replicas enforce it.
    #[command(
        long_about = "S6: a PublishedApp change in the cluster, timed until every proxy \
        replica enforces it, under steady load.\n\n\
        Starts, on 127.0.0.1: a control plane (etcd and kube-apiserver) through \
        `sallyport-cluster`, the CRDs, `sallyport-operator run` as its ServiceAccount, \
        --proxies `sallyport-proxy run` replicas (default 3) as the proxy's ServiceAccount, \
        watching the compiled fleet configuration as in a cluster, one ConnectorGroup with \
        two `sallyport-connector run`, and two backends (this executable, \
        `dataplane-backend --name blue|green`, each naming itself in an x-backend-name \
        header); one passthrough PublishedApp at https://s6.bench.test/ served from blue.\n\n\
        A probe per replica asks GET / every --probe-ms on a keep-alive connection and \
        notes which backend answered; a watch notes the app's internal URL in every \
        version of the compiled configuration ConfigMap; one oha per replica sends \
        --rate requests per second in all (default 1,000, an equal share each, -q with \
        --latency-correction, --connections keep-alive connections each) from --warmup-ms \
        before the first change until oha is interrupted after the last.\n\n\
        Then --changes times (default 20), one at a time: a merge patch of \
        spec.internalUrl to the other backend (a blue/green cut-over). A replica's latency \
        runs from the apiserver's answer to the patch to its probe's first answer from the \
        new backend; the next change waits until every replica has it (at most \
        --change-timeout s; past it the run stops changing and reports itself incomplete) \
        and --settle-ms more.\n\n\
        Reports per change the patch's round trip, the time until the compiled \
        configuration was seen (the operator's part) and each replica's latency; p50, p99 \
        and max over every change and replica and per replica; and the errors: oha's \
        answers other than 200 and failed requests, failed probes, and answers from the \
        old backend after a replica had shown the new one (a flip back). Goal: <= 1 s p99 \
        on 3 proxies and no error under 1,000 req/s. Every process is killed when the run \
        ends, also on failure; the run's directory (every log) is kept when it fails or \
        with --keep-dir."
    )]
    S6(s6::S6Args),

    /// S7: 1,000 connectors reconnecting at once: SIGKILL to the proxy, restarted at
    /// once; time until every tunnel is back (goal: 2 s).
    #[command(long_about = "S7: 1,000 connectors reconnecting at once.\n\n\
        Starts, on 127.0.0.1 and without a cluster, the data-plane benchmark's backend and \
        sallyport-proxy standalone (per-client limits off: every connector dials from \
        127.0.0.1), then --connectors real connectors of one group (default 1,000), each \
        with its own key, certificate, state directory and --tunnels tunnels (default 2, \
        the connector's default). They run as tasks of --hosts host processes (this \
        executable, `s7-connector-host`, through the connector's library): 1,000 connector \
        processes would not fit this machine. The open-files limit is raised to the hard \
        limit and checked, with the ephemeral ports, against the run's size; the run stops \
        at once when they are too low.\n\n\
        Setup (reported, not the goal): the hosts register every connector \
        (--register-concurrency at a time; the proxy signs each CSR), then all connectors \
        start at once: time until the proxy counts every tunnel.\n\n\
        Per round (--rounds): the proxy gets SIGKILL and is started again at once on the \
        same addresses, configuration and PKI. Its port is polled every millisecond, then \
        its sallyport_proxy_tunnels_open gauge every --poll-ms until it counts every tunnel \
        (at most --round-timeout s). Reports the time to 50, 90, 99 and 100% of the \
        tunnels from the port's opening and from the kill; the same from the connectors' \
        own `tunnel up` log lines, per tunnel and per connector; their dial failures by \
        depth of backoff and how long backoffs ran past the proxy's return; tunnels open \
        at fixed points after the port opened (the curve's shape); the CPU time of the new \
        proxy and of the hosts; after --settle-ms, --gets GETs through the proxy that the \
        backend must answer. Goal: every tunnel back within 2 s of the proxy accepting \
        again, in every round (also judged, stricter, from the kill).\n\n\
        Every wait is bounded; every process is killed when the run ends, also on failure; \
        the run's directory (every log) is kept when it fails or with --keep-dir.")]
    S7(s7::S7Args),

    /// S7's connector host (started by `s7`, not for people).
    #[command(hide = true)]
    S7ConnectorHost(s7::host::HostArgs),

    /// S1, S1b, S2, S3 side by side with real peers: direct, nginx (plain and TLS),
    /// rathole (TCP and TLS), frp, Sallyport (passthrough, and with authentication and
    /// policy), A B C ... per round; medians, ratios, goals, plots.
    #[command(
        long_about = "The data plane side by side with its peers, in one run.\n\n\
        One backend (this executable, `dataplane-backend`) is reached eight ways (--targets): \
        straight (plain HTTP, the limit); through nginx as a reverse-proxy hop, plain and \
        with user TLS; through rathole, plain TCP and TLS on the tunnel hop; through frp \
        (TLS on the tunnel hop, its default); through sallyport-proxy and \
        sallyport-connector to a passthrough app (user TLS, the reverse HTTP/2 tunnel over \
        mTLS); and to an app with OpenID Connect pre-authentication and conditional access \
        (a session cookie sealed with the fleet's session keys, an Enabled policy requiring \
        MFA from every location, a ReportOnly baseline, identity headers, a signed \
        assertion). Peers are installed by --peers-script (rathole from crates.io, frp from \
        the Go module proxy, nginx from Debian) once per version, outside the repository.\n\n\
        Scenarios (--scenarios), each over --rounds rounds, every target once per round in \
        order: S3, one connection per transfer downloads then uploads --transfer-mib \
        (this benchmark's own client; the hop's VmRSS sampled every 20 ms); S1, oha with \
        --connections keep-alive connections for --duration s; S1b, the same with a new \
        connection (and TLS handshake) per request; S2, oha at each of --rates requests per \
        second with --latency-correction (coordinated omission corrected). Only status 200 \
        counts. Reports, per scenario and target: median, min-max, median of the per-round \
        ratios to direct and of Sallyport over each peer, latency percentiles, failures, the \
        hop's CPU per request (or per GiB) from /proc, memory growth; the goals of \
        performance.md this run can judge; with --plots, SVG plots of throughput and \
        latency. Every process is killed when the run ends, also on failure; every wait, \
        load and transfer is bounded."
    )]
    Compare(compare::CompareArgs),

    /// The short comparison CI runs (`make bench-quick`): direct, rathole-TLS and
    /// Sallyport with authentication and policy, S1 and an S3 download, 3 rounds; fails
    /// when a ratio falls below its baseline times the tolerance.
    #[command(long_about = "The short comparison CI runs (`make bench-quick`).\n\n\
        Runs `compare` with direct, rathole-tls and sallyport-auth, S3 downloads of \
        --transfer-mib and S1 for --duration s, --rounds rounds, then checks each ratio of \
        --baseline (Sallyport over a peer, or over direct; medians of the per-round ratios) \
        against `baseline x tolerance`. Ratios rather than absolute speeds, so a slower or \
        busier machine does not fail it; the tolerance (0.5 in the committed baseline) \
        absorbs noise and catches a large regression. Exits non-zero naming the ratios that \
        fell.")]
    Quick(compare::quick::QuickArgs),

    /// The data-plane benchmark's backend (started by `dataplane`, not for people).
    #[command(hide = true)]
    DataplaneBackend(dataplane::backend::BackendArgs),
}

/// A scenario could not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// S8 failed.
    #[error(transparent)]
    Bench(#[from] BenchError),
    /// The data-plane scenarios failed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// The policy benchmark failed.
    #[error(transparent)]
    Policy(#[from] PolicyBenchError),
    /// `quick` measured a ratio below its floor.
    #[error(transparent)]
    Regression(#[from] compare::quick::Regression),
}

/// Runs the scenario `cli` names and writes its report to `out`.
pub fn run(cli: Cli, out: &mut impl Write) -> Result<(), Error> {
    match cli.command {
        Scenario::S8(args) => Ok(s8::run(&args)?.write(out)?),
        Scenario::Dataplane(args) => Ok(dataplane::run(&args)?.write(out)?),
        Scenario::Compare(args) => Ok(compare::run(&args)?.write(out)?),
        Scenario::Quick(args) => compare::quick::run(&args)?.write(out),
        Scenario::Policy(args) => Ok(policy::run(&args)?.write(out)?),
        Scenario::Flood(args) => Ok(flood::run(&args)?.write(out)?),
        Scenario::S4(args) => Ok(s4::run(&args)?.write(out)?),
        Scenario::S5(args) => Ok(s5::run(&args)?.write(out)?),
        Scenario::S6(args) => Ok(s6::run(&args)?.write(out)?),
        Scenario::S7(args) => Ok(s7::run(&args)?.write(out)?),
        Scenario::S7ConnectorHost(args) => Ok(s7::host::serve(&args)?),
        Scenario::DataplaneBackend(args) => Ok(dataplane::backend::serve(&args)?),
    }
}
