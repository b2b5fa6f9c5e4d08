//! S8's results: a table for people, one JSON line for machines, and the goals.

use std::fmt::Write as _;
use std::io::Write;

use serde::Serialize;

use super::compile::CompileReport;
use super::operator::OperatorReport;
use super::proxy_memory::ProxyMemoryReport;
use crate::error::BenchError;
use crate::machine::Machine;
pub use crate::report::GoalOutcome;
use crate::report::{build_profile, grouped, write_heading, written};

/// S8 goal: this many seconds until 1,000 apps are Ready.
pub const READY_GOAL_S: f64 = 30.0;
/// S8 goal: this many milliseconds for a 10,000-app compile.
pub const COMPILE_GOAL_MS: f64 = 1000.0;
/// S8 goal: proxy RSS at 10,000 apps, MiB.
pub const PROXY_RSS_GOAL_MIB: f64 = 200.0;
/// What a ConfigMap holds at most.
const CONFIG_MAP_LIMIT: usize = 1024 * 1024;

/// Everything one S8 run measured.
#[derive(Clone, Debug, Serialize)]
pub struct S8Report {
    /// Always `"S8"`.
    pub scenario: &'static str,
    /// How this benchmark was built (`release` or `debug`).
    pub profile: &'static str,
    /// Where it ran.
    pub machine: Machine,
    /// The compile part, unless skipped.
    pub compile: Option<CompileReport>,
    /// The proxy part, unless skipped.
    pub proxy: Option<ProxyMemoryReport>,
    /// The operator part, unless skipped.
    pub operator: Option<OperatorReport>,
    /// The S8 goals this run speaks to.
    pub goals: Vec<GoalOutcome>,
}

impl S8Report {
    /// A report of the parts that ran, judged against the goals.
    pub fn new(
        compile: Option<CompileReport>,
        proxy: Option<ProxyMemoryReport>,
        operator: Option<OperatorReport>,
    ) -> Self {
        let mut goals = Vec::new();
        if let Some(operator) = &operator {
            goals.push(GoalOutcome {
                goal: format!(
                    "{} apps Ready <= {READY_GOAL_S} s{}",
                    grouped(operator.apps as u64),
                    stated_for(operator.apps, 1000)
                ),
                measured: format!("{:.1} s", operator.all_ready_s),
                met: operator.all_ready_s <= READY_GOAL_S,
            });
        }
        if let Some(compile) = &compile {
            goals.push(GoalOutcome {
                goal: format!(
                    "{}-app compile <= {COMPILE_GOAL_MS} ms (median){}",
                    grouped(compile.apps as u64),
                    stated_for(compile.apps, 10_000)
                ),
                measured: format!("{:.0} ms", compile.compile.median_ms),
                met: compile.compile.median_ms <= COMPILE_GOAL_MS,
            });
        }
        if let Some(proxy) = &proxy {
            let rss = mib(proxy.judged_rss_bytes());
            goals.push(GoalOutcome {
                goal: format!(
                    "proxy RSS at {} apps <= {PROXY_RSS_GOAL_MIB} MiB{}",
                    grouped(proxy.apps as u64),
                    stated_for(proxy.apps, 10_000)
                ),
                measured: format!("{rss:.0} MiB"),
                met: rss <= PROXY_RSS_GOAL_MIB,
            });
        }
        Self {
            scenario: "S8",
            profile: build_profile(),
            machine: Machine::here(),
            compile,
            proxy,
            operator,
            goals,
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        written(|out| self.write_table(out))
    }

    fn write_table(&self, out: &mut String) -> std::fmt::Result {
        write_heading(
            out,
            "S8: the operator under a burst of PublishedApps; the fleet configuration compiler",
            &self.machine,
            self.profile,
            "make bench",
        )?;
        if let Some(o) = &self.operator {
            writeln!(out)?;
            writeln!(
                out,
                "operator: {} PublishedApps, {} server-side applies in flight",
                o.apps, o.concurrency
            )?;
            let row =
                |out: &mut String, name: &str, value: String| writeln!(out, "  {name:<46} {value}");
            row(
                out,
                "all applied",
                format!(
                    "{:.2} s ({:.0} applies/s)",
                    o.all_applied_s, o.apply_rate_per_s
                ),
            )?;
            row(out, "all Ready", format!("{:.2} s", o.all_ready_s))?;
            row(
                out,
                "fleet configuration holds every route",
                format!("{:.2} s", o.config_all_routes_s),
            )?;
            row(
                out,
                "per app, apply to Ready: p50 / p99 / max",
                format!(
                    "{:.2} / {:.2} / {:.2} s",
                    o.ready_latency.p50_s, o.ready_latency.p99_s, o.ready_latency.max_s
                ),
            )?;
            row(
                out,
                "fleet configuration versions during the burst",
                o.config_writes.to_string(),
            )?;
            row(
                out,
                "fleet configuration size (gzip)",
                format!("{} bytes", grouped(o.config_gzip_bytes as u64)),
            )?;
            row(
                out,
                "operator peak RSS (VmHWM) / RSS at the end",
                format!(
                    "{:.1} / {:.1} MiB",
                    mib(o.operator_memory.peak_rss_bytes),
                    mib(o.operator_memory.rss_bytes)
                ),
            )?;
            let cpu = &o.cpu;
            let optional =
                |seconds: Option<f64>| seconds.map_or("?".to_owned(), |s| format!("{s:.1}"));
            row(
                out,
                "CPU s: operator / apiserver / etcd / bench",
                format!(
                    "{:.1} / {} / {} / {:.1} s over {:.1} s wall",
                    cpu.operator_s,
                    optional(cpu.kube_apiserver_s),
                    optional(cpu.etcd_s),
                    cpu.bench_s,
                    cpu.wall_s
                ),
            )?;
            let mut busiest: Vec<(&String, &u64)> = o.apiserver_requests.iter().collect();
            busiest.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let top: Vec<String> = busiest
                .iter()
                .take(6)
                .map(|(key, count)| format!("{key} {count}"))
                .collect();
            row(
                out,
                "apiserver requests during the burst",
                format!(
                    "{} in all; most: {}",
                    o.apiserver_requests_total,
                    top.join(", ")
                ),
            )?;
            row(
                out,
                "(setup) control plane start / operator up",
                format!(
                    "{:.1} s / {:.1} s",
                    o.control_plane_start_s, o.operator_up_s
                ),
            )?;
            writeln!(
                out,
                "  times are from the first apply; operator: {}",
                o.operator_binary
            )?;
        }
        if let Some(c) = &self.compile {
            writeln!(out)?;
            writeln!(
                out,
                "compile: a generated fleet of {} apps ({} routes, {} policies), {} runs",
                c.apps, c.routes, c.policies, c.runs
            )?;
            let row =
                |out: &mut String, name: &str, value: String| writeln!(out, "  {name:<46} {value}");
            row(
                out,
                "compile: min / median / max",
                format!(
                    "{:.0} / {:.0} / {:.0} ms",
                    c.compile.min_ms, c.compile.median_ms, c.compile.max_ms
                ),
            )?;
            row(
                out,
                "JSON + gzip: min / median / max",
                format!(
                    "{:.0} / {:.0} / {:.0} ms",
                    c.gzip.min_ms, c.gzip.median_ms, c.gzip.max_ms
                ),
            )?;
            row(
                out,
                "compact JSON",
                format!(
                    "{} bytes ({:.0} per route)",
                    grouped(c.json_bytes as u64),
                    c.json_bytes as f64 / c.routes.max(1) as f64
                ),
            )?;
            row(
                out,
                "gzip",
                format!(
                    "{} bytes ({:.1}x smaller; {:.0}% of a ConfigMap's 1 MiB)",
                    grouped(c.gzip_bytes as u64),
                    c.json_bytes as f64 / c.gzip_bytes.max(1) as f64,
                    100.0 * c.gzip_bytes as f64 / CONFIG_MAP_LIMIT as f64
                ),
            )?;
        }
        if let Some(p) = &self.proxy {
            writeln!(out)?;
            writeln!(
                out,
                "proxy: one sallyport-proxy holding the generated fleet of {} apps ({} TLS Secrets, {} bytes of JSON)",
                grouped(p.apps as u64),
                grouped(p.certificates as u64),
                grouped(p.config_json_bytes as u64)
            )?;
            let row =
                |out: &mut String, name: &str, value: String| writeln!(out, "  {name:<46} {value}");
            row(
                out,
                "RSS: empty configuration",
                format!("{:.1} MiB", mib(p.empty.rss_bytes)),
            )?;
            row(
                out,
                "RSS: holding and serving every app",
                format!(
                    "{:.1} MiB (served {:.2} s after the file arrived)",
                    mib(p.loaded.rss_bytes),
                    p.load_s
                ),
            )?;
            let answers: Vec<String> = p
                .answers
                .iter()
                .map(|(status, count)| format!("{status} x{count}"))
                .collect();
            row(
                out,
                "RSS: after one request to every app",
                format!(
                    "{:.1} MiB (peak {:.1}; {:.1} s; {})",
                    mib(p.visited.rss_bytes),
                    mib(p.visited.peak_rss_bytes),
                    p.visit_s,
                    answers.join(", ")
                ),
            )?;
            row(
                out,
                "growth over the empty proxy, per app",
                format!("{:.1} KiB", p.per_app_bytes() / 1024.0),
            )?;
            writeln!(
                out,
                "  proxy CPU {:.1} s; proxy: {}",
                p.proxy_cpu_s, p.proxy_binary
            )?;
        }
        if !self.goals.is_empty() {
            writeln!(out)?;
            writeln!(out, "goals")?;
            for goal in &self.goals {
                writeln!(
                    out,
                    "  {:<60} {:>10}  {}",
                    goal.goal,
                    goal.measured,
                    if goal.met { "met" } else { "NOT met" }
                )?;
            }
        }
        Ok(())
    }

    /// The table, then the report as one JSON line (the last line).
    pub fn write(&self, out: &mut impl Write) -> Result<(), BenchError> {
        let json =
            serde_json::to_string(self).map_err(|error| BenchError::Encode(error.to_string()))?;
        write!(out, "{}\n{json}\n", self.table())
            .and_then(|()| out.flush())
            .map_err(BenchError::io("writing the report"))
    }
}

/// A note when a goal stated for `stated` is judged at another size.
fn stated_for(measured: usize, stated: usize) -> String {
    if measured == stated {
        String::new()
    } else {
        format!(" (the goal is for {})", grouped(stated as u64))
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Spread;

    #[test]
    fn the_json_line_is_the_last_line_and_parses() -> Result<(), Box<dyn std::error::Error>> {
        let spread = Spread {
            min_ms: 1.0,
            median_ms: 2.0,
            max_ms: 3.0,
        };
        let compile = CompileReport {
            apps: 10_000,
            runs: 3,
            routes: 10_000,
            policies: 102,
            compile: spread,
            gzip: spread,
            json_bytes: 11_000_000,
            gzip_bytes: 380_000,
        };
        let report = S8Report::new(Some(compile), None, None);
        assert_eq!(report.goals.len(), 1);
        assert!(report.goals.iter().all(|g| g.met));
        let mut out = Vec::new();
        report.write(&mut out)?;
        let text = String::from_utf8(out)?;
        let last = text.lines().last().ok_or("no output")?;
        let json: serde_json::Value = serde_json::from_str(last)?;
        assert_eq!(json["scenario"], "S8");
        assert_eq!(json["compile"]["gzip_bytes"], 380_000);
        assert!(text.contains("11,000,000 bytes"));
        Ok(())
    }
}
