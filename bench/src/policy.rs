//! The per-request cost of conditional access: [`AppPolicies::evaluate`] for one sign-in
//! against an app with 1, 100 and 1,000 policies, alone and together with the sign-in
//! log line ([`SignInEvent`] as JSON) that the proxy writes for every decision.
//!
//! The engine is pure (no IO, no locks), so this is CPU time per call on one thread, no
//! processes. The policies are generated as a fleet would hold them: a baseline that
//! applies to everyone, blocks for other teams, office CIDRs, night and weekend windows
//! in real time zones, risk and platform conditions, named users and report-only
//! policies; three in ten apply to the benchmark's user, the rest stop at one condition
//! or another, and the decision is `allowed` (checked before timing).
//!
//! Each count is timed over `--rounds` rounds of a bounded number of calls, sized from a
//! calibration run to take about `--round-ms` each; inputs and results go through
//! [`std::hint::black_box`]. The median round is reported, with the fastest and slowest.

use std::fmt::Write as _;
use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

use clap::Args;
use jiff::{SignedDuration, Timestamp};
use sallyport_api::fleet_config::Policy;
use sallyport_api::published_app::Assignment;
use sallyport_policy::{
    AppPolicies, CompileError, MfaSettings, Outcome, PolicySet, PolicyVerdict, SignInContext,
    SignInEvent, SignInStage, platform_from_user_agent,
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::machine::Machine;
use crate::report::{build_profile, grouped, write_heading, written};

/// Options of `sallyport-bench policy`.
#[derive(Clone, Debug, Args)]
pub struct PolicyArgs {
    /// Policy counts of the app, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000",
        value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub policies: Vec<u32>,

    /// Timed rounds per count and measurement; the median round is reported.
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(1..=101))]
    pub rounds: u32,

    /// About how long one round takes, in milliseconds: the calls per round are sized to
    /// it from a calibration run.
    #[arg(long, value_name = "MS", default_value_t = 200,
        value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub round_ms: u64,

    /// The most calls in one round, whatever the calibration says.
    #[arg(long, default_value_t = 2_000_000,
        value_parser = clap::value_parser!(u64).range(10..=100_000_000))]
    pub max_calls: u64,
}

/// The policy benchmark could not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum PolicyBenchError {
    /// A generated policy is not a valid `Policy`.
    #[error("generated policy {id}: {source}")]
    Fixture {
        /// The policy's id.
        id: String,
        /// Why it does not deserialise.
        source: serde_json::Error,
    },
    /// A generated policy does not compile.
    #[error("the generated policies do not compile: {0}")]
    Compile(#[from] CompileError),
    /// The generated sign-in was not allowed, so the benchmark would time another path
    /// than the one it describes.
    #[error("with {policies} policies the generated sign-in was {outcome}, not allowed: {reason}")]
    UnexpectedDecision {
        /// How many policies the app had.
        policies: usize,
        /// The outcome's name.
        outcome: &'static str,
        /// The outcome, in full.
        reason: String,
    },
    /// The report could not be encoded.
    #[error("encoding the report: {0}")]
    Encode(#[from] serde_json::Error),
    /// The report could not be written.
    #[error("writing the report: {0}")]
    Write(#[from] std::io::Error),
}

/// The benchmark's user: alice, in three groups, from the office network on Windows, who
/// signed in with MFA 30 minutes before a Wednesday 10:00 UTC.
struct User {
    groups: Vec<String>,
    amr: Vec<String>,
    now: Timestamp,
}

impl User {
    fn new() -> Self {
        Self {
            groups: ["staff", "eng-platform", "all-employees"]
                .map(str::to_owned)
                .to_vec(),
            amr: ["pwd", "mfa"].map(str::to_owned).to_vec(),
            // 2026-07-08T10:00:00Z, a Wednesday.
            now: Timestamp::constant(1_783_504_800, 0),
        }
    }

    fn context(&self) -> SignInContext<'_> {
        SignInContext {
            user_name: "alice",
            email: Some("alice@example.com"),
            groups: &self.groups,
            client_ip: std::net::IpAddr::from([203, 0, 113, 45]),
            platform: platform_from_user_agent(
                "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
            ),
            now: self.now,
            auth_time: self.now - SignedDuration::from_mins(30),
            amr: &self.amr,
            acr: None,
            sign_in_risk: None,
            user_risk: None,
        }
    }
}

/// The `index`th generated policy. Kinds cycle through ten; 0, 7 (report-only) and 8
/// apply to the benchmark's user, every other kind stops at one condition.
fn generated(index: usize) -> Result<Policy, PolicyBenchError> {
    let id = format!("team-{:02}/policy-{index:05}", index % 37);
    let octet = index % 250;
    let spec = match index % 10 {
        // The fleet baseline: MFA and an 8-hour sign-in frequency for everyone but a
        // break-glass account and the office network. Applies, met.
        0 => json!({
            "assignments": {"users": {"include": ["*"], "exclude": [format!("breakglass-{index}@example.com")]}},
            "conditions": {"locations": {"include": ["Any"], "exclude": [format!("10.{octet}.0.0/16")]}},
            "grant": {"require": {"mfa": true}},
            "session": {"signInFrequency": "8h", "persistentBrowserSession": "Never"},
        }),
        // Another team is blocked outside its office: not the user's group.
        1 => json!({
            "assignments": {"groups": {"include": [format!("team-{index}")]}},
            "conditions": {"locations": {"include": ["Any"], "exclude": [format!("10.{octet}.0.0/16"), format!("192.168.{octet}.0/24")]}},
            "grant": {"block": true},
        }),
        // MFA from a list of partner networks: the client is in none of the eight.
        2 => json!({
            "assignments": {"users": {"include": ["*"]}},
            "conditions": {"locations": {"include": (0..8).map(|k| format!("198.18.{}.0/24", (octet + k * 31) % 256)).collect::<Vec<_>>()}},
            "grant": {"require": {"mfa": true}},
        }),
        // The user's group is blocked at night (Berlin) and at weekends (New York): the
        // time zones are converted, the windows are closed.
        3 => json!({
            "assignments": {"groups": {"include": ["staff"]}},
            "conditions": {"times": [
                {"days": ["Mon", "Tue", "Wed", "Thu", "Fri"], "from": "22:00", "to": "06:00", "timeZone": "Europe/Berlin"},
                {"days": ["Sat", "Sun"], "from": "00:00", "to": "24:00", "timeZone": "America/New_York"},
            ]},
            "grant": {"block": true},
        }),
        // Risky sign-ins are blocked: no risk detected.
        4 => json!({
            "assignments": {"users": {"include": ["*"]}},
            "conditions": {"signInRisk": ["high"]},
            "grant": {"block": true},
        }),
        // Phishing-resistant sign-in on mobile: the user is on Windows.
        5 => json!({
            "assignments": {"groups": {"include": ["staff"]}},
            "conditions": {"clientPlatforms": ["iOS", "android"]},
            "grant": {"require": {"authenticationStrength": {"acrValues": [format!("phr-{index}")], "amr": ["hwk"]}}},
        }),
        // Named users, not this one.
        6 => json!({
            "assignments": {"users": {"include": (0..5).map(|k| format!("user-{index}-{k}@example.com")).collect::<Vec<_>>()}},
            "grant": {"require": {"mfa": true}},
        }),
        // A report-only trial of a group requirement: applies, would fail.
        7 => json!({
            "state": "ReportOnly",
            "assignments": {"users": {"include": ["*"]}},
            "grant": {"require": {"groups": [format!("admins-{index}")]}},
        }),
        // Office hours from the office network for the user's group, MFA or an
        // engineering group: applies, met.
        8 => json!({
            "assignments": {"groups": {"include": ["staff", format!("eng-{index}")]}},
            "conditions": {
                "locations": {"include": ["203.0.113.0/24", "2001:db8:100::/48"]},
                "times": [{"days": ["Mon", "Tue", "Wed", "Thu", "Fri"], "from": "08:00", "to": "18:00", "timeZone": "Europe/Berlin"}],
            },
            "grant": {"require": {"operator": "OR", "mfa": true, "groups": [format!("eng-{index}")]}},
        }),
        // Contractors at elevated user risk: no risk detected.
        _ => json!({
            "assignments": {"users": {"include": ["*"], "exclude": [format!("contractor-{index}@example.com")]}, "groups": {"exclude": ["contractors"]}},
            "conditions": {"userRisk": ["medium", "high"]},
            "grant": {"require": {"mfa": true}},
        }),
    };
    let mut policy = spec;
    if let Value::Object(fields) = &mut policy {
        fields.insert("id".to_owned(), Value::String(id.clone()));
        fields
            .entry("state")
            .or_insert_with(|| Value::String("Enabled".to_owned()));
    }
    serde_json::from_value(policy).map_err(|source| PolicyBenchError::Fixture { id, source })
}

/// An app with `count` generated policies, assigned to the `staff` group.
fn app_with(count: usize) -> Result<AppPolicies, PolicyBenchError> {
    let mut policies = (0..count).map(generated).collect::<Result<Vec<_>, _>>()?;
    policies.sort_by(|a, b| a.id.cmp(&b.id));
    let (set, errors) = PolicySet::compile(
        &policies,
        MfaSettings {
            acr_values: vec![
                "http://schemas.openid.net/pape/policies/2007/06/multi-factor".to_owned(),
            ],
        },
    );
    if let Some(error) = errors.into_iter().next() {
        return Err(error.into());
    }
    let ids: Vec<String> = policies.iter().map(|p| p.id.clone()).collect();
    let assignment = Assignment {
        users: Vec::new(),
        groups: vec!["staff".to_owned()],
    };
    Ok(set.app("team-00/wiki", &assignment, &ids))
}

/// Nanoseconds per call of the rounds: the median round, the fastest and the slowest.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct NsPerCall {
    /// The median round.
    pub median: f64,
    /// The fastest round.
    pub min: f64,
    /// The slowest round.
    pub max: f64,
}

/// One policy count, measured.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyRow {
    /// Policies of the app.
    pub policies: usize,
    /// Enforced policies that apply to the user.
    pub applying: usize,
    /// Report-only policies (they are evaluated too).
    pub report_only: usize,
    /// The decision (always `allowed`: checked before timing).
    pub decision: &'static str,
    /// Calls per timed round.
    pub calls_per_round: u64,
    /// `AppPolicies::evaluate`.
    pub evaluate_ns: NsPerCall,
    /// `evaluate`, then the sign-in log line built and encoded as JSON.
    pub evaluate_and_log_ns: NsPerCall,
    /// Length of the log line, bytes.
    pub log_line_bytes: usize,
}

/// What one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyReport {
    /// Always `"policy"`.
    pub scenario: &'static str,
    /// How this benchmark was built (`release` or `debug`).
    pub profile: &'static str,
    /// Where it ran.
    pub machine: Machine,
    /// Timed rounds per measurement.
    pub rounds: u32,
    /// One row per policy count.
    pub rows: Vec<PolicyRow>,
}

/// Runs the benchmark: one row per policy count of `args`.
pub fn run(args: &PolicyArgs) -> Result<PolicyReport, PolicyBenchError> {
    let user = User::new();
    let context = user.context();
    let round = Duration::from_millis(args.round_ms);
    let mut rows = Vec::with_capacity(args.policies.len());
    for &count in &args.policies {
        let count = count as usize;
        eprintln!("policy: {count} policies");
        let app = app_with(count)?;
        let decision = app.evaluate(&context);
        if !matches!(decision.outcome, Outcome::Allowed) {
            return Err(PolicyBenchError::UnexpectedDecision {
                policies: count,
                outcome: decision.outcome.name(),
                reason: format!("{:?}", decision.outcome),
            });
        }
        let applying = decision
            .policies
            .iter()
            .filter(|p| !p.report_only && !matches!(p.verdict, PolicyVerdict::NotApplied(_)))
            .count();
        let report_only = decision.policies.iter().filter(|p| p.report_only).count();
        let log_line = SignInEvent::new(app.app(), SignInStage::Request, &context, &decision)
            .with_request_id("0123456789abcdef0123456789abcdef")
            .with_session_id("s-0123456789abcdef")
            .to_json();

        let evaluate = || {
            black_box(app.evaluate(black_box(&context)));
        };
        let evaluate_and_log = || {
            let context = black_box(&context);
            let decision = app.evaluate(context);
            let line = SignInEvent::new(app.app(), SignInStage::Request, context, &decision)
                .with_request_id("0123456789abcdef0123456789abcdef")
                .with_session_id("s-0123456789abcdef")
                .to_json();
            black_box(line);
        };
        let calls = calls_per_round(evaluate_and_log, round, args.max_calls);
        let evaluate_ns = timed(evaluate, calls, args.rounds);
        let evaluate_and_log_ns = timed(evaluate_and_log, calls, args.rounds);
        rows.push(PolicyRow {
            policies: app.len(),
            applying,
            report_only,
            decision: decision.outcome.name(),
            calls_per_round: calls,
            evaluate_ns,
            evaluate_and_log_ns,
            log_line_bytes: log_line.len(),
        });
    }
    Ok(PolicyReport {
        scenario: "policy",
        profile: build_profile(),
        machine: Machine::here(),
        rounds: args.rounds,
        rows,
    })
}

/// Calls of `call` that take about `round`: calls it for at least 50 ms (at least ten
/// times) and scales; between 10 and `max`.
fn calls_per_round(mut call: impl FnMut(), round: Duration, max: u64) -> u64 {
    let started = Instant::now();
    let mut calls: u64 = 0;
    while calls < 10 || (started.elapsed() < Duration::from_millis(50) && calls < max) {
        call();
        calls += 1;
    }
    let per_call = started.elapsed().as_secs_f64() / calls as f64;
    let fitting = (round.as_secs_f64() / per_call.max(1e-9)) as u64;
    fitting.clamp(10, max)
}

/// `rounds` rounds of `calls` calls of `call`, in nanoseconds per call.
fn timed(mut call: impl FnMut(), calls: u64, rounds: u32) -> NsPerCall {
    let mut per_call: Vec<f64> = (0..rounds)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..calls {
                call();
            }
            started.elapsed().as_nanos() as f64 / calls as f64
        })
        .collect();
    per_call.sort_by(f64::total_cmp);
    let middle = per_call.len() / 2;
    let median = if per_call.len().is_multiple_of(2) {
        (per_call[middle - 1] + per_call[middle]) / 2.0
    } else {
        per_call[middle]
    };
    NsPerCall {
        median,
        min: per_call.first().copied().unwrap_or(median),
        max: per_call.last().copied().unwrap_or(median),
    }
}

impl PolicyReport {
    /// The human-readable table.
    pub fn table(&self) -> String {
        written(|out| self.write_table(out))
    }

    fn write_table(&self, out: &mut String) -> std::fmt::Result {
        write_heading(
            out,
            "Conditional access: per-request policy cost (AppPolicies::evaluate, one thread)",
            &self.machine,
            self.profile,
            "make bench-policy",
        )?;
        writeln!(
            out,
            "median of {} rounds (fastest-slowest); every decision: allowed",
            self.rounds
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "{:>8}  {:>8}  {:>11}  {:>26}  {:>26}  {:>8}",
            "policies", "applying", "report-only", "ns/evaluate", "ns/evaluate+log", "log line"
        )?;
        for row in &self.rows {
            writeln!(
                out,
                "{:>8}  {:>8}  {:>11}  {:>26}  {:>26}  {:>6} B",
                grouped(row.policies as u64),
                row.applying,
                row.report_only,
                ns(row.evaluate_ns),
                ns(row.evaluate_and_log_ns),
                grouped(row.log_line_bytes as u64),
            )?;
        }
        Ok(())
    }

    /// Writes the table, then the report as one JSON line.
    pub fn write(&self, out: &mut impl Write) -> Result<(), PolicyBenchError> {
        let json = serde_json::to_string(self)?;
        write!(out, "{}\n{json}\n", self.table())?;
        out.flush()?;
        Ok(())
    }
}

/// `median (min-max)`, in whole nanoseconds with thousands grouped.
fn ns(spread: NsPerCall) -> String {
    let whole = |value: f64| grouped(value.round() as u64);
    format!(
        "{} ({}-{})",
        whole(spread.median),
        whole(spread.min),
        whole(spread.max)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated fleet is what the module says: it compiles, three kinds in ten
    /// apply (one of them report-only), and the user is allowed.
    #[test]
    fn generated_policies_compile_and_allow_the_user() {
        let user = User::new();
        for (count, applying, report_only) in [(1, 1, 0), (100, 20, 10), (1000, 200, 100)] {
            let app = app_with(count).unwrap_or_else(|e| panic!("{count}: {e}"));
            assert_eq!(app.len(), count);
            let decision = app.evaluate(&user.context());
            assert_eq!(decision.outcome, Outcome::Allowed, "{count}");
            let applied = decision
                .policies
                .iter()
                .filter(|p| !p.report_only && !matches!(p.verdict, PolicyVerdict::NotApplied(_)))
                .count();
            assert_eq!(applied, applying, "{count}");
            assert_eq!(
                decision.policies.iter().filter(|p| p.report_only).count(),
                report_only,
                "{count}"
            );
        }
    }

    #[test]
    fn rounds_are_bounded_and_summarised() {
        let mut calls = 0u64;
        let per_round = calls_per_round(|| calls += 1, Duration::from_millis(1), 1000);
        assert!((10..=1000).contains(&per_round), "{per_round}");
        let mut counted = 0u64;
        let spread = timed(|| counted += 1, 100, 5);
        assert_eq!(counted, 500);
        assert!(spread.min <= spread.median && spread.median <= spread.max);
    }
}
