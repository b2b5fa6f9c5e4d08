//! The what-if answer as text for people.

use std::fmt::Write as _;
use std::time::Duration;

use sallyport_api::conditional_access_policy::{ClientPlatform, RiskLevel};
use sallyport_policy::{Outcome, RequestControls, SignInContext, SignInEvent};

use super::decide::Answer;

/// The answer for `sign_in` as text: the sign-in, the decision and its reason, what a
/// step-up would request, the session controls, then one row per policy.
pub fn text(answer: &Answer<'_>, sign_in: &SignInContext<'_>, event: &SignInEvent<'_>) -> String {
    let mut text = String::new();
    let route = answer.route;
    let decision = &answer.decision;
    // Writing to a String cannot fail.
    let _ = writeln!(text, "App:       {} ({})", route.app, route.url);
    let _ = writeln!(text, "User:      {}", user(sign_in));
    let _ = writeln!(
        text,
        "Client:    {} ({}), platform {}",
        sign_in.client_ip,
        event.location.network,
        sign_in.platform.map_or("unknown", platform_name)
    );
    let _ = writeln!(
        text,
        "Time:      {}, authenticated at {} ({} ago)",
        sign_in.now,
        sign_in.auth_time,
        human(sign_in.now.duration_since(sign_in.auth_time).unsigned_abs())
    );
    let _ = writeln!(
        text,
        "Sign-in:   amr {}, acr {}, sign-in risk {}, user risk {}",
        list_or(sign_in.amr, "(none)"),
        sign_in.acr.unwrap_or("(none)"),
        sign_in.sign_in_risk.map_or("none", risk_name),
        sign_in.user_risk.map_or("none", risk_name)
    );
    let _ = writeln!(text);
    let _ = writeln!(text, "Decision:  {}", decision.outcome.name());
    let _ = writeln!(text, "Reason:    {}", event.reason);
    if let Outcome::StepUp(step_up) = &decision.outcome {
        let _ = writeln!(
            text,
            "Step-up:   the proxy sends the user back to the provider with acr_values={} max_age={}",
            if step_up.acr_values.is_empty() {
                "(none)".to_owned()
            } else {
                step_up.acr_values.join(" ")
            },
            step_up.max_age.map_or_else(
                || "(none)".to_owned(),
                |age| format!("{} ({})", age.as_secs(), human(age))
            )
        );
    }
    let session = &decision.session;
    let mut controls = Vec::new();
    if let Some(frequency) = session.sign_in_frequency {
        controls.push(format!("sign-in frequency {}", human(frequency)));
    }
    if let Some(at) = session.reauthenticate_at {
        controls.push(format!("re-authentication due at {at}"));
    }
    if let Some(persistent) = session.persistent_browser_session {
        controls.push(format!("persistent browser session {persistent:?}"));
    }
    controls.extend(request_controls(&session.request, ""));
    if !controls.is_empty() {
        let _ = writeln!(text, "Session:   {}", controls.join(", "));
    }
    let would = request_controls(&decision.report_only_session, "would ");
    if !would.is_empty() {
        let _ = writeln!(
            text,
            "Report-only session controls (not enforced): {}",
            would.join(", ")
        );
    }
    let _ = writeln!(text);
    if event.policies.is_empty() {
        let _ = writeln!(
            text,
            "{}",
            match decision.outcome {
                Outcome::NotAssigned => {
                    "No policy was evaluated: the user is not assigned to the app."
                }
                _ => "No enabled or report-only policy applies to the app.",
            }
        );
        return text;
    }
    // The log leaves out the words for a policy that did not apply; say why here.
    let why: Vec<String> = event
        .policies
        .iter()
        .map(|p| {
            let mut why = match (&p.detail, p.not_applied) {
                (Some(detail), _) => detail.clone(),
                (None, Some(reason)) => format!("not applied: {reason}"),
                (None, None) => String::new(),
            };
            let controls = if p.state == "reportOnly" {
                decision.report_only_session.of_policy(p.id)
            } else {
                session.request.of_policy(p.id)
            };
            if !controls.is_empty() {
                let _ = write!(why, "; session: {}", controls.join(", "));
            }
            why
        })
        .collect();
    let rows: Vec<[&str; 4]> = event
        .policies
        .iter()
        .zip(&why)
        .map(|(p, why)| [p.id, p.state, p.result, why.as_str()])
        .collect();
    let header = ["POLICY", "STATE", "RESULT", "WHY"];
    let width = |column: usize| {
        rows.iter()
            .map(|row| row[column].len())
            .chain([header[column].len()])
            .max()
            .unwrap_or_default()
    };
    let widths = [width(0), width(1), width(2)];
    for row in std::iter::once(header).chain(rows) {
        let _ = writeln!(
            text,
            "{:w0$}  {:w1$}  {:w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
        );
    }
    text
}

/// The per-request session controls of `request` in words, each with the policies that
/// ask for it, every one starting with `prefix`.
fn request_controls(request: &RequestControls, prefix: &str) -> Vec<String> {
    let by = |policies: &[std::sync::Arc<str>]| {
        policies
            .iter()
            .map(|p| p.as_ref())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut controls = Vec::new();
    if request.monitors() {
        controls.push(format!(
            "{prefix}monitor every request (audit session.request; {})",
            by(&request.monitor)
        ));
    }
    if request.is_read_only() {
        controls.push(format!(
            "{prefix}allow only GET, HEAD and OPTIONS ({})",
            by(&request.read_only)
        ));
    }
    if request.blocks_downloads() {
        let types = request
            .download_content_types
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        controls.push(format!(
            "{prefix}block downloads (attachments and {types}; {})",
            by(&request.block_downloads)
        ));
    }
    controls
}

/// `name <email>`, with the groups.
fn user(sign_in: &SignInContext<'_>) -> String {
    let mut user = sign_in.user_name.to_owned();
    if let Some(email) = sign_in.email.filter(|e| *e != sign_in.user_name) {
        user.push_str(&format!(" <{email}>"));
    }
    user.push_str(&format!(", groups {}", list_or(sign_in.groups, "(none)")));
    user
}

fn list_or(values: &[String], empty: &'static str) -> String {
    if values.is_empty() {
        empty.to_owned()
    } else {
        values.join(" ")
    }
}

/// The platform's name as policies spell it.
pub(super) fn platform_name(platform: ClientPlatform) -> &'static str {
    match platform {
        ClientPlatform::Windows => "windows",
        ClientPlatform::MacOs => "macOS",
        ClientPlatform::Linux => "linux",
        ClientPlatform::Ios => "iOS",
        ClientPlatform::Android => "android",
    }
}

fn risk_name(level: RiskLevel) -> &'static str {
    match level {
        RiskLevel::Low => "low",
        RiskLevel::Medium => "medium",
        RiskLevel::High => "high",
    }
}

/// A duration as `8h`, `1h30m`, `90s` or `2d3h`: whole seconds, largest units first.
pub(super) fn human(duration: Duration) -> String {
    let mut seconds = duration.as_secs();
    if seconds == 0 {
        return "0s".to_owned();
    }
    let mut text = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        let count = seconds / size;
        if count > 0 {
            let _ = write!(text, "{count}{unit}");
            seconds %= size;
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human(Duration::from_secs(0)), "0s");
        assert_eq!(human(Duration::from_secs(8 * 3600)), "8h");
        assert_eq!(human(Duration::from_secs(5400)), "1h30m");
        assert_eq!(human(Duration::from_secs(90_061)), "1d1h1m1s");
        assert_eq!(human(Duration::from_millis(1500)), "1s");
    }
}
