//! The conditional access engine, table by table: the app's assignment, every condition
//! of a policy, every grant and session control and how they combine, compile errors and
//! failing closed, and the sign-in log line read back as JSON.
//!
//! Policies are written as YAML (`Policy`, the fleet configuration's form), so each row
//! reads as what an administrator wrote. Every row states the outcome it expects, and a
//! row whose expectation the engine does not meet fails with its name.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use sallyport_api::conditional_access_policy::{
    ClientPlatform, PersistentBrowserSession, RiskLevel,
};
use sallyport_api::fleet_config::Policy;
use sallyport_api::published_app::Assignment;
use sallyport_policy::{
    CompileError, Decision, MfaSettings, NotApplied, Outcome, PolicySet, PolicyVerdict,
    RequestControls, Requirement, SIGN_IN_LOG_SCHEMA, SignInContext, SignInEvent, SignInStage,
    StepUp, platform_from_user_agent,
};
use serde_json::Value;

const APP: &str = "team-a/wiki";

const UA_WINDOWS: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0";
const UA_MACOS: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Safari/605.1.15";
const UA_LINUX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0";
const UA_UBUNTU: &str =
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0";
const UA_CHROMEOS: &str = "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";
const UA_IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Mobile/15E148 Safari/604.1";
const UA_IPAD: &str = "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) CriOS/120.0.6099.119 Mobile/15E148 Safari/604.1";
const UA_ANDROID: &str = "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.135 Mobile Safari/537.36";
const UA_CURL: &str = "curl/8.5.0";

/// The acr value the fleet's MFA settings accept in the tables that set them.
const MFA_ACR: &str = "http://schemas.openid.net/pape/policies/2007/06/multi-factor";

/// A policy from YAML; `id` is `t/<name>` and `state` is `Enabled` unless the YAML
/// says otherwise.
fn policy(name: &str, yaml: &str) -> Policy {
    let mut value: serde_yaml::Value = serde_yaml::from_str(yaml)
        .unwrap_or_else(|e| panic!("policy {name}: YAML does not parse: {e}\n{yaml}"));
    let map = value
        .as_mapping_mut()
        .unwrap_or_else(|| panic!("policy {name}: YAML is not a mapping:\n{yaml}"));
    if !map.contains_key("id") {
        map.insert("id".into(), format!("t/{name}").into());
    }
    if !map.contains_key("state") {
        map.insert("state".into(), "Enabled".into());
    }
    serde_yaml::from_value(value)
        .unwrap_or_else(|e| panic!("policy {name}: not a Policy: {e}\n{yaml}"))
}

/// `(name, yaml)` pairs as policies, in order.
fn policies(rows: &[(&str, &str)]) -> Vec<Policy> {
    rows.iter().map(|(name, yaml)| policy(name, yaml)).collect()
}

fn ids(policies: &[Policy]) -> Vec<String> {
    policies.iter().map(|p| p.id.clone()).collect()
}

fn ts(text: &str) -> Timestamp {
    text.parse()
        .unwrap_or_else(|e| panic!("{text:?} is not a timestamp: {e}"))
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| (*v).to_owned()).collect()
}

fn arc(id: &str) -> Arc<str> {
    Arc::from(id)
}

/// A sign-in, owned; [`Sign::context`] lends it as the engine's [`SignInContext`].
///
/// The default: alice (alice@example.com, group `staff`) from a public IPv4 address on
/// Windows, Wednesday 2026-07-08 10:00 UTC, password only, signed in 10 minutes ago, no
/// risk detected.
#[derive(Clone, Debug)]
struct Sign {
    user: String,
    email: Option<String>,
    groups: Vec<String>,
    ip: IpAddr,
    user_agent: String,
    now: Timestamp,
    auth_time: Timestamp,
    amr: Vec<String>,
    acr: Option<String>,
    sign_in_risk: Option<RiskLevel>,
    user_risk: Option<RiskLevel>,
}

impl Default for Sign {
    fn default() -> Self {
        let now = ts("2026-07-08T10:00:00Z");
        Self {
            user: "alice".to_owned(),
            email: Some("alice@example.com".to_owned()),
            groups: strings(&["staff"]),
            ip: ip("203.0.113.7"),
            user_agent: UA_WINDOWS.to_owned(),
            now,
            auth_time: now - SignedDuration::from_mins(10),
            amr: strings(&["pwd"]),
            acr: None,
            sign_in_risk: None,
            user_risk: None,
        }
    }
}

impl Sign {
    fn context(&self) -> SignInContext<'_> {
        SignInContext {
            user_name: &self.user,
            email: self.email.as_deref(),
            groups: &self.groups,
            client_ip: self.ip,
            platform: platform_from_user_agent(&self.user_agent),
            now: self.now,
            auth_time: self.auth_time,
            amr: &self.amr,
            acr: self.acr.as_deref(),
            sign_in_risk: self.sign_in_risk,
            user_risk: self.user_risk,
        }
    }

    /// Signed in `ago` before now.
    fn signed_in_ago(&mut self, ago: SignedDuration) {
        self.auth_time = self.now - ago;
    }
}

/// A change to the default sign-in, for a table row.
type Change = fn(&mut Sign);

fn ip(text: &str) -> IpAddr {
    text.parse()
        .unwrap_or_else(|e| panic!("{text:?} is not an IP address: {e}"))
}

/// Compiles `policies` (asserting they all compile) and decides `sign` for an app that
/// applies every one of them, with an empty assignment.
fn decide(policies: &[Policy], mfa: MfaSettings, sign: &Sign) -> Decision {
    let (set, errors) = PolicySet::compile(policies, mfa);
    assert!(errors.is_empty(), "unexpected compile errors: {errors:?}");
    set.app(APP, &Assignment::default(), &ids(policies))
        .evaluate(&sign.context())
}

fn no_mfa_acr() -> MfaSettings {
    MfaSettings::default()
}

fn mfa_acr(values: &[&str]) -> MfaSettings {
    MfaSettings {
        acr_values: strings(values),
    }
}

// ---------------------------------------------------------------------------------------
// The app's assignment
// ---------------------------------------------------------------------------------------

#[test]
fn assignment_is_checked_before_any_policy() {
    /// name, assignment users, assignment groups, the sign-in, assigned?
    type Row<'a> = (&'a str, &'a [&'a str], &'a [&'a str], Change, bool);
    let cases: &[Row] = &[
        ("empty assignment admits everyone", &[], &[], |_| {}, true),
        (
            "empty assignment admits a user without groups",
            &[],
            &[],
            |s| s.groups.clear(),
            true,
        ),
        ("user by name", &["alice"], &[], |_| {}, true),
        ("user by name, other case", &["ALICE"], &[], |_| {}, true),
        (
            "user by e-mail, other case",
            &["Alice@Example.COM"],
            &[],
            |_| {},
            true,
        ),
        (
            "user name that is an e-mail, no email claim",
            &["carol@example.com"],
            &[],
            |s| {
                s.user = "Carol@Example.com".to_owned();
                s.email = None;
            },
            true,
        ),
        (
            "e-mail named, but the sign-in has none",
            &["alice@example.com"],
            &[],
            |s| s.email = None,
            false,
        ),
        ("another user", &["bob"], &[], |_| {}, false),
        (
            "another user, e-mail differs too",
            &["bob@example.com"],
            &[],
            |_| {},
            false,
        ),
        ("group", &[], &["staff"], |_| {}, true),
        (
            "group among several of the user's",
            &[],
            &["ops"],
            |s| s.groups = strings(&["staff", "ops"]),
            true,
        ),
        (
            "group in other case: groups match exactly",
            &[],
            &["Staff"],
            |_| {},
            false,
        ),
        ("another group", &[], &["admins"], |_| {}, false),
        (
            "group assignment, user without groups",
            &[],
            &["staff"],
            |s| s.groups.clear(),
            false,
        ),
        (
            "user not named, but a group is",
            &["bob"],
            &["staff"],
            |_| {},
            true,
        ),
        (
            "user named, group not",
            &["alice"],
            &["admins"],
            |_| {},
            true,
        ),
    ];
    // A policy that blocks everyone: an assigned user reaches it and is blocked.
    let block = [policy(
        "block",
        "assignments: {users: {include: ['*']}}\ngrant: {block: true}",
    )];
    let (set, errors) = PolicySet::compile(&block, no_mfa_acr());
    assert!(errors.is_empty(), "{errors:?}");
    for (name, users, groups, change, assigned) in cases {
        let assignment = Assignment {
            users: strings(users),
            groups: strings(groups),
        };
        let app = set.app(APP, &assignment, &ids(&block));
        let mut sign = Sign::default();
        change(&mut sign);
        let decision = app.evaluate(&sign.context());
        if *assigned {
            assert_eq!(
                decision.outcome,
                Outcome::Blocked {
                    policy: arc("t/block")
                },
                "{name}: assigned, so the blocking policy decides"
            );
            assert_eq!(decision.policies.len(), 1, "{name}");
        } else {
            assert_eq!(decision.outcome, Outcome::NotAssigned, "{name}");
            assert!(
                decision.policies.is_empty(),
                "{name}: no policy is evaluated for a user who is not assigned: {:?}",
                decision.policies
            );
            assert_eq!(decision.session, Default::default(), "{name}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Whether a policy applies: users, groups and conditions
// ---------------------------------------------------------------------------------------

/// Runs rows of `(name, policy body without grant, sign-in change, expected)`: the body
/// gets `grant: {block: true}`, so an applying policy blocks and one that does not
/// applies leaves the sign-in allowed. `expected` is `None` for "applies".
fn check_applies(rows: &[(&str, &str, Change, Option<NotApplied>)]) {
    for (name, body, change, expected) in rows {
        let yaml = format!("{body}\ngrant: {{block: true}}");
        let policies = [policy("p", &yaml)];
        let mut sign = Sign::default();
        change(&mut sign);
        let decision = decide(&policies, no_mfa_acr(), &sign);
        let verdict = &decision.policies[0].verdict;
        match expected {
            None => {
                assert_eq!(verdict, &PolicyVerdict::Blocked, "{name}: should apply");
                assert_eq!(
                    decision.outcome,
                    Outcome::Blocked { policy: arc("t/p") },
                    "{name}"
                );
            }
            Some(reason) => {
                assert_eq!(verdict, &PolicyVerdict::NotApplied(*reason), "{name}");
                assert_eq!(decision.outcome, Outcome::Allowed, "{name}");
            }
        }
    }
}

#[test]
fn users_and_groups_include_and_exclude() {
    use NotApplied::{GroupExcluded, UserExcluded, UserNotIncluded};
    check_applies(&[
        (
            "users *",
            "assignments: {users: {include: ['*']}}",
            |_| {},
            None,
        ),
        (
            "users * applies without groups",
            "assignments: {users: {include: ['*']}}",
            |s| s.groups.clear(),
            None,
        ),
        (
            "user by name",
            "assignments: {users: {include: [alice]}}",
            |_| {},
            None,
        ),
        (
            "user by name, other case",
            "assignments: {users: {include: [ALICE]}}",
            |_| {},
            None,
        ),
        (
            "user by e-mail, other case",
            "assignments: {users: {include: [Alice@Example.com]}}",
            |_| {},
            None,
        ),
        (
            "another user",
            "assignments: {users: {include: [bob, bob@example.com]}}",
            |_| {},
            Some(UserNotIncluded),
        ),
        (
            "e-mail included, sign-in has none",
            "assignments: {users: {include: [alice@example.com]}}",
            |s| s.email = None,
            Some(UserNotIncluded),
        ),
        (
            "users * exclude the user",
            "assignments: {users: {include: ['*'], exclude: [alice]}}",
            |_| {},
            Some(UserExcluded),
        ),
        (
            "users * exclude the e-mail, other case",
            "assignments: {users: {include: ['*'], exclude: [ALICE@example.COM]}}",
            |_| {},
            Some(UserExcluded),
        ),
        (
            "included by name and excluded by e-mail",
            "assignments: {users: {include: [alice], exclude: [alice@example.com]}}",
            |_| {},
            Some(UserExcluded),
        ),
        (
            "users * exclude someone else",
            "assignments: {users: {include: ['*'], exclude: [bob]}}",
            |_| {},
            None,
        ),
        (
            "group",
            "assignments: {groups: {include: [staff]}}",
            |_| {},
            None,
        ),
        (
            "group in other case: exact match",
            "assignments: {groups: {include: [Staff]}}",
            |_| {},
            Some(UserNotIncluded),
        ),
        (
            "another group",
            "assignments: {groups: {include: [admins]}}",
            |_| {},
            Some(UserNotIncluded),
        ),
        (
            "group, user without groups",
            "assignments: {groups: {include: [staff]}}",
            |s| s.groups.clear(),
            Some(UserNotIncluded),
        ),
        (
            "groups *",
            "assignments: {groups: {include: ['*']}}",
            |_| {},
            None,
        ),
        (
            "groups * exclude the user's group",
            "assignments: {groups: {include: ['*'], exclude: [staff]}}",
            |_| {},
            Some(GroupExcluded),
        ),
        (
            "user included, group excluded: exclusion wins",
            "assignments: {users: {include: [alice]}, groups: {exclude: [staff]}}",
            |_| {},
            Some(GroupExcluded),
        ),
        (
            "group included, user excluded: exclusion wins",
            "assignments: {users: {exclude: [alice]}, groups: {include: [staff]}}",
            |_| {},
            Some(UserExcluded),
        ),
        (
            "group included and excluded",
            "assignments: {groups: {include: [staff], exclude: [staff]}}",
            |_| {},
            Some(GroupExcluded),
        ),
        (
            "one of several groups excluded",
            "assignments: {users: {include: ['*']}, groups: {exclude: [contractors]}}",
            |s| s.groups = strings(&["staff", "contractors"]),
            Some(GroupExcluded),
        ),
        (
            "user not included, group is",
            "assignments: {users: {include: [bob]}, groups: {include: [staff]}}",
            |_| {},
            None,
        ),
        (
            "group not included, user is",
            "assignments: {users: {include: [alice]}, groups: {include: [admins]}}",
            |_| {},
            None,
        ),
    ]);
}

#[test]
fn locations_v4_v6_and_mapped() {
    use NotApplied::{LocationExcluded, LocationNotIncluded};
    const ANY: &str =
        "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: [Any]}}";
    check_applies(&[
        ("Any", ANY, |_| {}, None),
        (
            "Any, IPv6 client",
            ANY,
            |s| s.ip = ip("2001:db8:1::5"),
            None,
        ),
        (
            "no include is any location",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {}}",
            |_| {},
            None,
        ),
        (
            "v4 CIDR holds the client",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: [203.0.113.0/24]}}",
            |_| {},
            None,
        ),
        (
            "v4 /32 is the client",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: [203.0.113.7/32]}}",
            |_| {},
            None,
        ),
        (
            "v4 /32 is a neighbour",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: [203.0.113.8/32]}}",
            |_| {},
            Some(LocationNotIncluded),
        ),
        (
            "v4 CIDR elsewhere",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: [198.51.100.0/24, 10.0.0.0/8]}}",
            |_| {},
            Some(LocationNotIncluded),
        ),
        (
            "second of several CIDRs",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: [10.0.0.0/8, 203.0.112.0/23]}}",
            |_| {},
            None,
        ),
        (
            "v4 /0",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: [0.0.0.0/0]}}",
            |_| {},
            None,
        ),
        (
            "Any, excluded CIDR",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: [Any], exclude: [203.0.113.0/24]}}",
            |_| {},
            Some(LocationExcluded),
        ),
        (
            "included wide, excluded narrow",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: [203.0.0.0/16], exclude: [203.0.113.0/28]}}",
            |_| {},
            Some(LocationExcluded),
        ),
        (
            "included wide, exclusion elsewhere",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: [203.0.0.0/16], exclude: [203.0.113.128/25]}}",
            |_| {},
            None,
        ),
        (
            "only an exclusion, client elsewhere",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {exclude: [10.0.0.0/8]}}",
            |_| {},
            None,
        ),
        (
            "only an exclusion, client in it",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {exclude: [10.0.0.0/8]}}",
            |s| s.ip = ip("10.20.30.40"),
            Some(LocationExcluded),
        ),
        (
            "v6 CIDR holds the client",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: ['2001:db8::/32']}}",
            |s| s.ip = ip("2001:db8:1::5"),
            None,
        ),
        (
            "v6 CIDR elsewhere",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: ['2001:db9::/32']}}",
            |s| s.ip = ip("2001:db8:1::5"),
            Some(LocationNotIncluded),
        ),
        (
            "v6 client, only v4 CIDRs",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: [0.0.0.0/0]}}",
            |s| s.ip = ip("2001:db8:1::5"),
            Some(LocationNotIncluded),
        ),
        (
            "v4 client, only v6 CIDRs",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: ['::/0']}}",
            |_| {},
            Some(LocationNotIncluded),
        ),
        (
            "v6 excluded",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: [Any], exclude: ['2001:db8:1::/48']}}",
            |s| s.ip = ip("2001:db8:1::5"),
            Some(LocationExcluded),
        ),
        (
            "v6 loopback",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: ['::1/128']}}",
            |s| s.ip = ip("::1"),
            None,
        ),
        (
            "IPv4-mapped client in a v4 CIDR",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: [203.0.113.0/24]}}",
            |s| s.ip = ip("::ffff:203.0.113.7"),
            None,
        ),
        (
            "IPv4-mapped client outside a v4 CIDR",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: [198.51.100.0/24]}}",
            |s| s.ip = ip("::ffff:203.0.113.7"),
            Some(LocationNotIncluded),
        ),
        (
            "IPv4-mapped client in an excluded v4 CIDR",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: [Any], exclude: [203.0.113.0/24]}}",
            |s| s.ip = ip("::ffff:203.0.113.7"),
            Some(LocationExcluded),
        ),
        (
            "v4 client in an IPv4-mapped CIDR",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: ['::ffff:203.0.113.0/120']}}",
            |_| {},
            None,
        ),
        (
            "v4 client outside an IPv4-mapped CIDR",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: ['::ffff:198.51.100.0/120']}}",
            |_| {},
            Some(LocationNotIncluded),
        ),
        (
            "IPv4-mapped client in an excluded IPv4-mapped CIDR",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {exclude: ['::ffff:203.0.113.0/120']}}",
            |s| s.ip = ip("::ffff:203.0.113.7"),
            Some(LocationExcluded),
        ),
        (
            "users before location: excluded user, wrong location",
            "assignments: {users: {include: ['*'], exclude: [alice]}}\nconditions: {locations: {include: [10.0.0.0/8]}}",
            |_| {},
            Some(NotApplied::UserExcluded),
        ),
    ]);
}

#[test]
fn platforms_from_real_user_agents() {
    let cases: &[(&str, &str, Option<ClientPlatform>)] = &[
        (
            "Edge on Windows 11",
            UA_WINDOWS,
            Some(ClientPlatform::Windows),
        ),
        (
            "Firefox on Windows",
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
            Some(ClientPlatform::Windows),
        ),
        ("Safari on macOS", UA_MACOS, Some(ClientPlatform::MacOs)),
        (
            "Chrome on macOS",
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
            Some(ClientPlatform::MacOs),
        ),
        ("Firefox on Linux", UA_LINUX, Some(ClientPlatform::Linux)),
        ("Firefox on Ubuntu", UA_UBUNTU, Some(ClientPlatform::Linux)),
        (
            "Chrome on ChromeOS",
            UA_CHROMEOS,
            Some(ClientPlatform::Linux),
        ),
        ("Safari on iPhone", UA_IPHONE, Some(ClientPlatform::Ios)),
        ("Chrome on iPad", UA_IPAD, Some(ClientPlatform::Ios)),
        (
            "Chrome on Android",
            UA_ANDROID,
            Some(ClientPlatform::Android),
        ),
        (
            "Samsung Internet on Android",
            "Mozilla/5.0 (Linux; Android 13; SM-S911B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/23.0 Chrome/115.0.0.0 Mobile Safari/537.36",
            Some(ClientPlatform::Android),
        ),
        ("curl", UA_CURL, None),
        ("python-requests", "python-requests/2.32.3", None),
        ("empty", "", None),
    ];
    for (name, user_agent, expected) in cases {
        assert_eq!(
            platform_from_user_agent(user_agent),
            *expected,
            "{name}: {user_agent}"
        );
    }

    use NotApplied::PlatformNotIncluded;
    check_applies(&[
        (
            "windows on Windows",
            "assignments: {users: {include: ['*']}}\nconditions: {clientPlatforms: [windows]}",
            |_| {},
            None,
        ),
        (
            "windows on macOS",
            "assignments: {users: {include: ['*']}}\nconditions: {clientPlatforms: [windows]}",
            |s| s.user_agent = UA_MACOS.to_owned(),
            Some(PlatformNotIncluded),
        ),
        (
            "macOS on macOS",
            "assignments: {users: {include: ['*']}}\nconditions: {clientPlatforms: [macOS]}",
            |s| s.user_agent = UA_MACOS.to_owned(),
            None,
        ),
        (
            "macOS on iPhone (says Mac OS X too)",
            "assignments: {users: {include: ['*']}}\nconditions: {clientPlatforms: [macOS]}",
            |s| s.user_agent = UA_IPHONE.to_owned(),
            Some(PlatformNotIncluded),
        ),
        (
            "linux on ChromeOS",
            "assignments: {users: {include: ['*']}}\nconditions: {clientPlatforms: [linux]}",
            |s| s.user_agent = UA_CHROMEOS.to_owned(),
            None,
        ),
        (
            "linux on Android (says Linux too)",
            "assignments: {users: {include: ['*']}}\nconditions: {clientPlatforms: [linux]}",
            |s| s.user_agent = UA_ANDROID.to_owned(),
            Some(PlatformNotIncluded),
        ),
        (
            "mobile on iPad",
            "assignments: {users: {include: ['*']}}\nconditions: {clientPlatforms: [iOS, android]}",
            |s| s.user_agent = UA_IPAD.to_owned(),
            None,
        ),
        (
            "mobile on Android",
            "assignments: {users: {include: ['*']}}\nconditions: {clientPlatforms: [iOS, android]}",
            |s| s.user_agent = UA_ANDROID.to_owned(),
            None,
        ),
        (
            "mobile on Linux",
            "assignments: {users: {include: ['*']}}\nconditions: {clientPlatforms: [iOS, android]}",
            |s| s.user_agent = UA_LINUX.to_owned(),
            Some(PlatformNotIncluded),
        ),
        (
            "every platform listed, curl is unknown",
            "assignments: {users: {include: ['*']}}\nconditions: {clientPlatforms: [windows, macOS, linux, iOS, android]}",
            |s| s.user_agent = UA_CURL.to_owned(),
            Some(PlatformNotIncluded),
        ),
        (
            "no platform condition, curl",
            "assignments: {users: {include: ['*']}}",
            |s| s.user_agent = UA_CURL.to_owned(),
            None,
        ),
    ]);
}

#[test]
fn sign_in_and_user_risk() {
    use NotApplied::{SignInRiskNotIncluded, UserRiskNotIncluded};
    const HIGH: &str = "assignments: {users: {include: ['*']}}\nconditions: {signInRisk: [high]}";
    const MEDIUM_HIGH: &str =
        "assignments: {users: {include: ['*']}}\nconditions: {signInRisk: [medium, high]}";
    const USER_LOW: &str = "assignments: {users: {include: ['*']}}\nconditions: {userRisk: [low]}";
    check_applies(&[
        (
            "sign-in risk high, is high",
            HIGH,
            |s| s.sign_in_risk = Some(RiskLevel::High),
            None,
        ),
        (
            "sign-in risk high, is medium",
            HIGH,
            |s| s.sign_in_risk = Some(RiskLevel::Medium),
            Some(SignInRiskNotIncluded),
        ),
        (
            "sign-in risk high, none detected",
            HIGH,
            |_| {},
            Some(SignInRiskNotIncluded),
        ),
        (
            "sign-in risk high, only the user risk is high",
            HIGH,
            |s| s.user_risk = Some(RiskLevel::High),
            Some(SignInRiskNotIncluded),
        ),
        (
            "sign-in risk medium+high, is medium",
            MEDIUM_HIGH,
            |s| s.sign_in_risk = Some(RiskLevel::Medium),
            None,
        ),
        (
            "sign-in risk medium+high, is low",
            MEDIUM_HIGH,
            |s| s.sign_in_risk = Some(RiskLevel::Low),
            Some(SignInRiskNotIncluded),
        ),
        (
            "user risk low, is low",
            USER_LOW,
            |s| s.user_risk = Some(RiskLevel::Low),
            None,
        ),
        (
            "user risk low, none detected",
            USER_LOW,
            |_| {},
            Some(UserRiskNotIncluded),
        ),
        (
            "user risk low, only the sign-in risk is low",
            USER_LOW,
            |s| s.sign_in_risk = Some(RiskLevel::Low),
            Some(UserRiskNotIncluded),
        ),
        (
            "both risks listed, both match",
            "assignments: {users: {include: ['*']}}\nconditions: {signInRisk: [high], userRisk: [high]}",
            |s| {
                s.sign_in_risk = Some(RiskLevel::High);
                s.user_risk = Some(RiskLevel::High);
            },
            None,
        ),
        (
            "both risks listed, user risk none",
            "assignments: {users: {include: ['*']}}\nconditions: {signInRisk: [high], userRisk: [high]}",
            |s| s.sign_in_risk = Some(RiskLevel::High),
            Some(UserRiskNotIncluded),
        ),
        (
            "no risk condition, high risk",
            "assignments: {users: {include: ['*']}}",
            |s| {
                s.sign_in_risk = Some(RiskLevel::High);
                s.user_risk = Some(RiskLevel::High);
            },
            None,
        ),
    ]);
}

#[test]
fn time_windows() {
    // name, times (YAML flow list), now, applies?
    let cases: &[(&str, &str, &str, bool)] = &[
        // UTC, weekdays and hours (2026-07-08 is a Wednesday).
        (
            "UTC office hours, inside",
            "[{days: [Mon, Tue, Wed, Thu, Fri], from: '09:00', to: '17:00', timeZone: UTC}]",
            "2026-07-08T10:00:00Z",
            true,
        ),
        (
            "UTC office hours, at the start",
            "[{days: [Wed], from: '09:00', to: '17:00', timeZone: UTC}]",
            "2026-07-08T09:00:00Z",
            true,
        ),
        (
            "UTC office hours, a minute early",
            "[{days: [Wed], from: '09:00', to: '17:00', timeZone: UTC}]",
            "2026-07-08T08:59:59Z",
            false,
        ),
        (
            "UTC office hours, at the end (exclusive)",
            "[{days: [Wed], from: '09:00', to: '17:00', timeZone: UTC}]",
            "2026-07-08T17:00:00Z",
            false,
        ),
        (
            "UTC office hours, wrong day",
            "[{days: [Mon, Tue, Thu, Fri], from: '09:00', to: '17:00', timeZone: UTC}]",
            "2026-07-08T10:00:00Z",
            false,
        ),
        (
            "time zone defaults to UTC",
            "[{days: [Wed], from: '09:00', to: '10:00'}]",
            "2026-07-08T09:30:00Z",
            true,
        ),
        (
            "time zone defaults to UTC, outside",
            "[{days: [Wed], from: '10:00', to: '11:00'}]",
            "2026-07-08T09:30:00Z",
            false,
        ),
        (
            "no days: every day",
            "[{from: '09:00', to: '17:00', timeZone: UTC}]",
            "2026-07-12T10:00:00Z",
            true,
        ),
        (
            "second window matches",
            "[{days: [Mon], from: '09:00', to: '17:00'}, {days: [Wed], from: '09:00', to: '11:00'}]",
            "2026-07-08T10:00:00Z",
            true,
        ),
        (
            "no window matches",
            "[{days: [Mon], from: '09:00', to: '17:00'}, {days: [Wed], from: '11:00', to: '12:00'}]",
            "2026-07-08T10:00:00Z",
            false,
        ),
        // Over midnight: the window belongs to the day it opens on (2026-03-13 is a Friday).
        (
            "Fri 22:00-06:00 covers Fri 23:00",
            "[{days: [Fri], from: '22:00', to: '06:00'}]",
            "2026-03-13T23:00:00Z",
            true,
        ),
        (
            "Fri 22:00-06:00 covers Sat 03:00",
            "[{days: [Fri], from: '22:00', to: '06:00'}]",
            "2026-03-14T03:00:00Z",
            true,
        ),
        (
            "Fri 22:00-06:00 does not cover Fri 03:00",
            "[{days: [Fri], from: '22:00', to: '06:00'}]",
            "2026-03-13T03:00:00Z",
            false,
        ),
        (
            "Fri 22:00-06:00 ends Sat 06:00",
            "[{days: [Fri], from: '22:00', to: '06:00'}]",
            "2026-03-14T06:00:00Z",
            false,
        ),
        (
            "Fri 22:00-06:00 does not cover Sat 23:00",
            "[{days: [Fri], from: '22:00', to: '06:00'}]",
            "2026-03-14T23:00:00Z",
            false,
        ),
        (
            "Fri 22:00-06:00 does not cover Fri 21:59",
            "[{days: [Fri], from: '22:00', to: '06:00'}]",
            "2026-03-13T21:59:00Z",
            false,
        ),
        (
            "Sun 22:00-06:00 covers Mon 01:00 (week wraps)",
            "[{days: [Sun], from: '22:00', to: '06:00'}]",
            "2026-03-16T01:00:00Z",
            true,
        ),
        (
            "22:00-00:00 is until midnight",
            "[{days: [Wed], from: '22:00', to: '00:00'}]",
            "2026-07-08T23:30:00Z",
            true,
        ),
        (
            "22:00-00:00 does not reach Thu",
            "[{days: [Wed], from: '22:00', to: '00:00'}]",
            "2026-07-09T00:30:00Z",
            false,
        ),
        // 24:00 ends a window at midnight.
        (
            "18:00-24:00, Wed 23:59",
            "[{days: [Mon, Tue, Wed, Thu, Fri], from: '18:00', to: '24:00'}]",
            "2026-07-08T23:59:59Z",
            true,
        ),
        (
            "18:00-24:00, Thu 00:00",
            "[{days: [Mon, Tue, Wed, Thu, Fri], from: '18:00', to: '24:00'}]",
            "2026-07-09T00:00:00Z",
            false,
        ),
        (
            "18:00-24:00, Wed 17:59",
            "[{days: [Mon, Tue, Wed, Thu, Fri], from: '18:00', to: '24:00'}]",
            "2026-07-08T17:59:00Z",
            false,
        ),
        (
            "18:00-24:00 weekdays, Sat 19:00",
            "[{days: [Mon, Tue, Wed, Thu, Fri], from: '18:00', to: '24:00'}]",
            "2026-07-11T19:00:00Z",
            false,
        ),
        (
            "00:00-24:00 is the whole day",
            "[{days: [Wed], from: '00:00', to: '24:00'}]",
            "2026-07-08T00:00:00Z",
            true,
        ),
        // Europe/Berlin: UTC+2 in summer, UTC+1 in winter.
        (
            "Berlin 09-17, summer 07:30Z is 09:30",
            "[{days: [Wed], from: '09:00', to: '17:00', timeZone: Europe/Berlin}]",
            "2026-07-08T07:30:00Z",
            true,
        ),
        (
            "Berlin 09-17, winter 07:30Z is 08:30",
            "[{days: [Wed], from: '09:00', to: '17:00', timeZone: Europe/Berlin}]",
            "2026-01-07T07:30:00Z",
            false,
        ),
        (
            "Berlin 09-17, summer 15:30Z is 17:30",
            "[{days: [Wed], from: '09:00', to: '17:00', timeZone: Europe/Berlin}]",
            "2026-07-08T15:30:00Z",
            false,
        ),
        (
            "Berlin 09-17, winter 15:30Z is 16:30",
            "[{days: [Wed], from: '09:00', to: '17:00', timeZone: Europe/Berlin}]",
            "2026-01-07T15:30:00Z",
            true,
        ),
        (
            "Berlin: Wed 23:30Z is Thu 01:30 local",
            "[{days: [Wed], from: '20:00', to: '24:00', timeZone: Europe/Berlin}]",
            "2026-07-08T23:30:00Z",
            false,
        ),
        (
            "Berlin: Thu 01:30 local is Thu",
            "[{days: [Thu], from: '00:00', to: '06:00', timeZone: Europe/Berlin}]",
            "2026-07-08T23:30:00Z",
            true,
        ),
        (
            "Berlin Fri 22:00-06:00, Sat 03:00 local",
            "[{days: [Fri], from: '22:00', to: '06:00', timeZone: Europe/Berlin}]",
            "2026-07-11T01:00:00Z",
            true,
        ),
        (
            "Berlin Fri 22:00-06:00, Fri 03:00 local",
            "[{days: [Fri], from: '22:00', to: '06:00', timeZone: Europe/Berlin}]",
            "2026-07-10T01:00:00Z",
            false,
        ),
        // The night Berlin moves its clocks forward (2026-03-29, 02:00 CET -> 03:00 CEST).
        (
            "Berlin spring forward, 00:30Z is 01:30 CET",
            "[{days: [Sun], from: '01:00', to: '04:00', timeZone: Europe/Berlin}]",
            "2026-03-29T00:30:00Z",
            true,
        ),
        (
            "Berlin spring forward, 01:30Z is 03:30 CEST",
            "[{days: [Sun], from: '01:00', to: '04:00', timeZone: Europe/Berlin}]",
            "2026-03-29T01:30:00Z",
            true,
        ),
        (
            "Berlin spring forward, 02:30Z is 04:30 CEST",
            "[{days: [Sun], from: '01:00', to: '04:00', timeZone: Europe/Berlin}]",
            "2026-03-29T02:30:00Z",
            false,
        ),
        // America/New_York: UTC-4 in summer, UTC-5 in winter; DST starts 2026-03-08, three
        // weeks before Europe's.
        (
            "New York 09-17, summer 13:30Z is 09:30",
            "[{days: [Wed], from: '09:00', to: '17:00', timeZone: America/New_York}]",
            "2026-07-08T13:30:00Z",
            true,
        ),
        (
            "New York 09-17, winter 13:30Z is 08:30",
            "[{days: [Wed], from: '09:00', to: '17:00', timeZone: America/New_York}]",
            "2026-01-07T13:30:00Z",
            false,
        ),
        (
            "New York 09-17, Mon after DST starts",
            "[{days: [Mon], from: '09:00', to: '17:00', timeZone: America/New_York}]",
            "2026-03-09T13:30:00Z",
            true,
        ),
        (
            "New York 09-17, Fri before DST starts",
            "[{days: [Fri], from: '09:00', to: '17:00', timeZone: America/New_York}]",
            "2026-03-06T13:30:00Z",
            false,
        ),
        (
            "New York: Thu 02:00Z is still Wed local",
            "[{days: [Wed], from: '20:00', to: '24:00', timeZone: America/New_York}]",
            "2026-07-09T02:00:00Z",
            true,
        ),
    ];
    for (name, times, now, applies) in cases {
        let body =
            format!("assignments: {{users: {{include: ['*']}}}}\nconditions: {{times: {times}}}");
        let policies = [policy("p", &format!("{body}\ngrant: {{block: true}}"))];
        let sign = Sign {
            now: ts(now),
            ..Sign::default()
        };
        let decision = decide(&policies, no_mfa_acr(), &sign);
        let expected = if *applies {
            PolicyVerdict::Blocked
        } else {
            PolicyVerdict::NotApplied(NotApplied::OutsideTimes)
        };
        assert_eq!(decision.policies[0].verdict, expected, "{name} (now {now})");
    }
}

#[test]
fn conditions_combine_and_the_first_unmet_is_named() {
    use NotApplied::*;
    const ALL: &str = "assignments: {groups: {include: [staff]}}
conditions:
  locations: {include: [203.0.113.0/24]}
  clientPlatforms: [windows, macOS]
  signInRisk: [medium, high]
  userRisk: [high]
  times: [{days: [Wed], from: '08:00', to: '18:00', timeZone: Europe/Berlin}]";
    fn risky(s: &mut Sign) {
        s.sign_in_risk = Some(RiskLevel::Medium);
        s.user_risk = Some(RiskLevel::High);
    }
    check_applies(&[
        ("every condition met", ALL, risky, None),
        (
            "group missing",
            ALL,
            |s| {
                risky(s);
                s.groups.clear();
            },
            Some(UserNotIncluded),
        ),
        (
            "location",
            ALL,
            |s| {
                risky(s);
                s.ip = ip("198.51.100.1");
            },
            Some(LocationNotIncluded),
        ),
        (
            "platform",
            ALL,
            |s| {
                risky(s);
                s.user_agent = UA_LINUX.to_owned();
            },
            Some(PlatformNotIncluded),
        ),
        (
            "sign-in risk",
            ALL,
            |s| {
                risky(s);
                s.sign_in_risk = Some(RiskLevel::Low);
            },
            Some(SignInRiskNotIncluded),
        ),
        (
            "user risk",
            ALL,
            |s| {
                risky(s);
                s.user_risk = None;
            },
            Some(UserRiskNotIncluded),
        ),
        (
            "time",
            ALL,
            |s| {
                risky(s);
                s.now = ts("2026-07-08T17:00:00Z");
            },
            Some(OutsideTimes),
        ),
        (
            "location before platform",
            ALL,
            |s| {
                risky(s);
                s.ip = ip("198.51.100.1");
                s.user_agent = UA_CURL.to_owned();
            },
            Some(LocationNotIncluded),
        ),
        (
            "users before everything",
            ALL,
            |s| {
                s.groups.clear();
                s.ip = ip("198.51.100.1");
            },
            Some(UserNotIncluded),
        ),
    ]);
}

// ---------------------------------------------------------------------------------------
// Compile errors and failing closed
// ---------------------------------------------------------------------------------------

#[test]
fn compile_errors_name_the_policy_and_field() {
    // name, body, the field the error names
    let cases: &[(&str, &str, &str)] = &[
        (
            "unknown time zone",
            "conditions: {times: [{from: '08:00', to: '18:00', timeZone: UTC}, {from: '08:00', to: '18:00', timeZone: Mars/Olympus_Mons}]}",
            "spec.conditions.times[1].timeZone",
        ),
        (
            "empty time zone",
            "conditions: {times: [{from: '08:00', to: '18:00', timeZone: ''}]}",
            "spec.conditions.times[0].timeZone",
        ),
        (
            "hour 25",
            "conditions: {times: [{from: '25:00', to: '18:00'}]}",
            "spec.conditions.times[0].from",
        ),
        (
            "one-digit hour",
            "conditions: {times: [{from: '08:00', to: '8:00'}]}",
            "spec.conditions.times[0].to",
        ),
        (
            "signed hour",
            "conditions: {times: [{from: '+8:00', to: '18:00'}]}",
            "spec.conditions.times[0].from",
        ),
        (
            "24:30",
            "conditions: {times: [{from: '08:00', to: '24:30'}]}",
            "spec.conditions.times[0].to",
        ),
        (
            "included CIDR",
            "conditions: {locations: {include: [Any, 10.0.0.0/33]}}",
            "spec.conditions.locations.include[1]",
        ),
        (
            "included name",
            "conditions: {locations: {include: [office]}}",
            "spec.conditions.locations.include[0]",
        ),
        (
            "excluded CIDR",
            "conditions: {locations: {exclude: [10.0.0.0/8, 'fe80::/129']}}",
            "spec.conditions.locations.exclude[1]",
        ),
        (
            "excluded Any",
            "conditions: {locations: {exclude: [Any]}}",
            "spec.conditions.locations.exclude[0]",
        ),
        (
            "sign-in frequency",
            "session: {signInFrequency: soon}",
            "spec.session.signInFrequency",
        ),
        (
            "zero sign-in frequency",
            "session: {signInFrequency: 0s}",
            "spec.session.signInFrequency",
        ),
        (
            "download content type without a subtype",
            "session: {blockDownloads: true, downloadContentTypes: [application/zip, application]}",
            "spec.session.downloadContentTypes[1]",
        ),
        (
            "download content type with parameters",
            "session: {blockDownloads: true, downloadContentTypes: ['text/csv; charset=utf-8']}",
            "spec.session.downloadContentTypes[0]",
        ),
        (
            "download content types without blocking downloads",
            "session: {downloadContentTypes: [application/zip]}",
            "spec.session.downloadContentTypes",
        ),
    ];
    for (name, body, field) in cases {
        let yaml = format!("assignments: {{users: {{include: ['*']}}}}\n{body}");
        let bad = policy("bad", &yaml);
        let error = match PolicySet::check(&bad) {
            Err(error) => error,
            Ok(()) => panic!("{name}: compiles, but should not"),
        };
        let CompileError::Invalid {
            policy: id,
            field: named,
            message,
        } = &error;
        assert_eq!(id, "t/bad", "{name}");
        assert_eq!(error.policy(), "t/bad", "{name}");
        assert_eq!(named, field, "{name}: {error}");
        assert!(!message.is_empty(), "{name}");
        let text = error.to_string();
        assert!(
            text.starts_with(&format!("ConditionalAccessPolicy t/bad: {field}: ")),
            "{name}: {text}"
        );
        // compile reports the same error and keeps the policy as one that blocks.
        let good = policy("good", "assignments: {users: {include: ['*']}}");
        let (set, errors) = PolicySet::compile(&[bad.clone(), good.clone()], no_mfa_acr());
        assert_eq!(errors, vec![error.clone()], "{name}");
        assert_eq!(set.len(), 2, "{name}");
        let decision = set
            .app(APP, &Assignment::default(), &ids(&[good, bad]))
            .evaluate(&Sign::default().context());
        assert_eq!(
            decision.outcome,
            Outcome::Blocked {
                policy: arc("t/bad")
            },
            "{name}"
        );
        assert_eq!(
            decision.policies[0].verdict,
            PolicyVerdict::Granted,
            "{name}"
        );
        match &decision.policies[1].verdict {
            PolicyVerdict::Invalid(why) => assert!(why.contains(field), "{name}: {why}"),
            other => panic!("{name}: expected Invalid, got {other:?}"),
        }
    }
    // Valid edge values compile.
    for body in [
        "conditions: {times: [{from: '00:00', to: '24:00', timeZone: America/New_York}]}",
        "conditions: {locations: {include: ['::/0', 0.0.0.0/0], exclude: ['::ffff:0:0/96']}}",
        "session: {signInFrequency: 1h30m}",
        "session: {monitor: true, readOnly: true, blockDownloads: true, downloadContentTypes: [video/*, application/PDF]}",
    ] {
        let yaml = format!("assignments: {{users: {{include: ['*']}}}}\n{body}");
        assert_eq!(PolicySet::check(&policy("ok", &yaml)), Ok(()), "{body}");
    }
}

#[test]
fn invalid_and_missing_policies_fail_closed() {
    const BAD_TZ: &str = "conditions: {times: [{from: '08:00', to: '18:00', timeZone: Nowhere/Atlantis}]}\ngrant: {require: {mfa: true}}";
    let all = policies(&[
        (
            "invalid-for-alice",
            &format!("assignments: {{users: {{include: [alice]}}}}\n{BAD_TZ}"),
        ),
        (
            "invalid-report-only",
            &format!("state: ReportOnly\nassignments: {{users: {{include: ['*']}}}}\n{BAD_TZ}"),
        ),
        (
            "invalid-but-disabled",
            &format!("state: Disabled\nassignments: {{users: {{include: ['*']}}}}\n{BAD_TZ}"),
        ),
        (
            "invalid-excluding-staff",
            &format!(
                "assignments: {{users: {{include: ['*']}}, groups: {{exclude: [staff]}}}}\n{BAD_TZ}"
            ),
        ),
    ]);
    let (set, errors) = PolicySet::compile(&all, no_mfa_acr());
    let failed: Vec<&str> = errors.iter().map(CompileError::policy).collect();
    assert_eq!(
        failed,
        [
            "t/invalid-for-alice",
            "t/invalid-report-only",
            "t/invalid-excluding-staff"
        ],
        "a disabled policy is not compiled, so it cannot fail"
    );
    let ids_of =
        |names: &[&str]| -> Vec<String> { names.iter().map(|n| format!("t/{n}")).collect() };
    // name, policies of the app, the sign-in, outcome
    let cases: &[(&str, &[&str], Change, Outcome)] = &[
        (
            "invalid policy naming the user blocks",
            &["invalid-for-alice"],
            |_| {},
            Outcome::Blocked {
                policy: arc("t/invalid-for-alice"),
            },
        ),
        (
            "invalid policy not naming the user",
            &["invalid-for-alice"],
            |s| {
                s.user = "bob".into();
                s.email = None;
            },
            Outcome::Allowed,
        ),
        (
            "invalid policy excluding the user's group",
            &["invalid-excluding-staff"],
            |_| {},
            Outcome::Allowed,
        ),
        (
            "invalid policy, excluded group left",
            &["invalid-excluding-staff"],
            |s| s.groups.clear(),
            Outcome::Blocked {
                policy: arc("t/invalid-excluding-staff"),
            },
        ),
        (
            "invalid report-only policy never blocks",
            &["invalid-report-only"],
            |_| {},
            Outcome::Allowed,
        ),
        (
            "disabled policy is left out",
            &["invalid-but-disabled"],
            |_| {},
            Outcome::Allowed,
        ),
        (
            "missing policy blocks everyone",
            &["not-in-the-set"],
            |s| {
                s.user = "bob".into();
                s.email = None;
                s.groups.clear();
            },
            Outcome::Blocked {
                policy: arc("t/not-in-the-set"),
            },
        ),
        (
            "missing policy blocks even with MFA",
            &["not-in-the-set"],
            |s| s.amr = strings(&["pwd", "mfa"]),
            Outcome::Blocked {
                policy: arc("t/not-in-the-set"),
            },
        ),
    ];
    for (name, names, change, expected) in cases {
        let app = set.app(APP, &Assignment::default(), &ids_of(names));
        let mut sign = Sign::default();
        change(&mut sign);
        let decision = app.evaluate(&sign.context());
        assert_eq!(&decision.outcome, expected, "{name}");
    }

    // The verdicts and their names.
    let app = set.app(
        APP,
        &Assignment::default(),
        &ids_of(&[
            "invalid-but-disabled",
            "invalid-for-alice",
            "invalid-report-only",
            "not-in-the-set",
        ]),
    );
    assert_eq!(
        app.len(),
        3,
        "the disabled policy is not among the app's policies"
    );
    let decision = app.evaluate(&Sign::default().context());
    let results: Vec<(&str, &str)> = decision
        .policies
        .iter()
        .map(|p| (p.policy.as_ref(), p.verdict.result_name(p.report_only)))
        .collect();
    assert_eq!(
        results,
        [
            ("t/invalid-for-alice", "failure"),
            ("t/invalid-report-only", "reportOnlyFailure"),
            ("t/not-in-the-set", "failure"),
        ]
    );
    match &decision.policies[2].verdict {
        PolicyVerdict::Invalid(why) => {
            assert!(why.contains("missing from the configuration"), "{why}")
        }
        other => panic!("expected Invalid for the missing policy, got {other:?}"),
    }
    assert_eq!(
        decision.outcome,
        Outcome::Blocked {
            policy: arc("t/invalid-for-alice")
        }
    );
}

// ---------------------------------------------------------------------------------------
// Grants and how the outcomes combine
// ---------------------------------------------------------------------------------------

fn step_up(
    policies: &[&str],
    unmet: &[Requirement],
    acr_values: &[&str],
    max_age: Option<Duration>,
) -> Outcome {
    Outcome::StepUp(StepUp {
        policies: policies.iter().map(|p| arc(p)).collect(),
        unmet: unmet.to_vec(),
        acr_values: strings(acr_values),
        max_age,
    })
}

fn denied(policy: &str, unmet: &[Requirement]) -> Outcome {
    Outcome::Denied {
        policy: arc(policy),
        unmet: unmet.to_vec(),
    }
}

fn blocked(policy: &str) -> Outcome {
    Outcome::Blocked {
        policy: arc(policy),
    }
}

fn with_mfa(s: &mut Sign) {
    s.amr = strings(&["pwd", "mfa"]);
}

fn in_admins(s: &mut Sign) {
    s.groups = strings(&["staff", "admins"]);
}

const EVERYONE: &str = "assignments: {users: {include: ['*']}}";

/// One row of the grants table.
struct Case<'a> {
    name: &'a str,
    policies: Vec<(&'a str, &'a str)>,
    mfa_acr: &'a [&'a str],
    sign: Change,
    outcome: Outcome,
}

fn case<'a>(
    name: &'a str,
    policies: &[(&'a str, &'a str)],
    mfa_acr: &'a [&'a str],
    sign: Change,
    outcome: Outcome,
) -> Case<'a> {
    Case {
        name,
        policies: policies.to_vec(),
        mfa_acr,
        sign,
        outcome,
    }
}

#[test]
fn grants_and_outcomes() {
    use Requirement::{AuthenticationStrength as Strength, Groups, Mfa, SignInFrequency};
    let hour = Duration::from_secs(3600);
    let mfa = format!("{EVERYONE}\ngrant: {{require: {{mfa: true}}}}");
    let gold = format!(
        "{EVERYONE}\ngrant: {{require: {{authenticationStrength: {{acrValues: [gold, silver]}}}}}}"
    );
    let hwk =
        format!("{EVERYONE}\ngrant: {{require: {{authenticationStrength: {{amr: [hwk, pin]}}}}}}");
    let gold_hwk = format!(
        "{EVERYONE}\ngrant: {{require: {{authenticationStrength: {{acrValues: [gold], amr: [hwk]}}}}}}"
    );
    let admins = format!("{EVERYONE}\ngrant: {{require: {{groups: [admins, secops]}}}}");
    let and =
        format!("{EVERYONE}\ngrant: {{require: {{operator: AND, mfa: true, groups: [admins]}}}}");
    let or =
        format!("{EVERYONE}\ngrant: {{require: {{operator: OR, mfa: true, groups: [admins]}}}}");
    let or_strength = format!(
        "{EVERYONE}\ngrant: {{require: {{operator: OR, mfa: true, authenticationStrength: {{acrValues: [gold]}}}}}}"
    );
    let or_groups_hourly = format!(
        "{EVERYONE}\ngrant: {{require: {{operator: OR, groups: [admins]}}}}\nsession: {{signInFrequency: 1h}}"
    );
    let hourly = format!("{EVERYONE}\nsession: {{signInFrequency: 1h}}");
    let eight_hourly = format!("{EVERYONE}\nsession: {{signInFrequency: 8h}}");
    let hourly_when_risky = format!("{hourly}\nconditions: {{signInRisk: [high]}}");
    let mfa_hourly =
        format!("{EVERYONE}\ngrant: {{require: {{mfa: true}}}}\nsession: {{signInFrequency: 1h}}");
    let block = format!("{EVERYONE}\ngrant: {{block: true}}");
    let block_bob = "assignments: {users: {include: [bob]}}\ngrant: {block: true}".to_owned();
    let mfa_report_only = format!("state: ReportOnly\n{mfa}");
    let block_report_only = format!("state: ReportOnly\n{block}");
    let admins_report_only = format!("state: ReportOnly\n{admins}");
    let mfa_disabled = format!("state: Disabled\n{mfa}");
    let block_disabled = format!("state: Disabled\n{block}");
    let mfa_off_site = format!(
        "{EVERYONE}\nconditions: {{locations: {{include: [Any], exclude: [203.0.113.0/24]}}}}\ngrant: {{require: {{mfa: true}}}}"
    );

    let cases = vec![
        case("no policy", &[], &[], |_| {}, Outcome::Allowed),
        case(
            "policy without requirements",
            &[("a", EVERYONE)],
            &[],
            |_| {},
            Outcome::Allowed,
        ),
        // MFA, through amr and through the fleet's acr values.
        case(
            "mfa, password only",
            &[("a", &mfa)],
            &[],
            |_| {},
            step_up(&["t/a"], &[Mfa], &[], None),
        ),
        case(
            "mfa, amr mfa",
            &[("a", &mfa)],
            &[],
            with_mfa,
            Outcome::Allowed,
        ),
        case(
            "mfa, amr otp alone is not mfa",
            &[("a", &mfa)],
            &[],
            |s| s.amr = strings(&["pwd", "otp"]),
            step_up(&["t/a"], &[Mfa], &[], None),
        ),
        case(
            "mfa, fleet acr value",
            &[("a", &mfa)],
            &[MFA_ACR],
            |s| s.acr = Some(MFA_ACR.into()),
            Outcome::Allowed,
        ),
        case(
            "mfa, other acr: step up asks for the fleet's",
            &[("a", &mfa)],
            &[MFA_ACR, "urn:mfa"],
            |s| s.acr = Some("urn:password".into()),
            step_up(&["t/a"], &[Mfa], &[MFA_ACR, "urn:mfa"], None),
        ),
        case(
            "mfa, acr value but the fleet accepts none",
            &[("a", &mfa)],
            &[],
            |s| s.acr = Some(MFA_ACR.into()),
            step_up(&["t/a"], &[Mfa], &[], None),
        ),
        // Authentication strengths.
        case(
            "strength acr, met by the second value",
            &[("a", &gold)],
            &[],
            |s| s.acr = Some("silver".into()),
            Outcome::Allowed,
        ),
        case(
            "strength acr, other acr",
            &[("a", &gold)],
            &[],
            |s| s.acr = Some("bronze".into()),
            step_up(&["t/a"], &[Strength], &["gold", "silver"], None),
        ),
        case(
            "strength acr, no acr",
            &[("a", &gold)],
            &[],
            with_mfa,
            step_up(&["t/a"], &[Strength], &["gold", "silver"], None),
        ),
        case(
            "strength amr, all present",
            &[("a", &hwk)],
            &[],
            |s| s.amr = strings(&["pwd", "hwk", "pin"]),
            Outcome::Allowed,
        ),
        case(
            "strength amr, one missing",
            &[("a", &hwk)],
            &[],
            |s| s.amr = strings(&["pwd", "hwk"]),
            step_up(&["t/a"], &[Strength], &[], None),
        ),
        case(
            "strength acr and amr, both",
            &[("a", &gold_hwk)],
            &[],
            |s| {
                s.acr = Some("gold".into());
                s.amr = strings(&["hwk"]);
            },
            Outcome::Allowed,
        ),
        case(
            "strength acr and amr, amr missing",
            &[("a", &gold_hwk)],
            &[],
            |s| s.acr = Some("gold".into()),
            step_up(&["t/a"], &[Strength], &["gold"], None),
        ),
        case(
            "strength acr and amr, acr wrong",
            &[("a", &gold_hwk)],
            &[],
            |s| {
                s.acr = Some("silver".into());
                s.amr = strings(&["hwk"]);
            },
            step_up(&["t/a"], &[Strength], &["gold"], None),
        ),
        // Groups.
        case(
            "groups, member of the second",
            &[("a", &admins)],
            &[],
            |s| s.groups = strings(&["secops"]),
            Outcome::Allowed,
        ),
        case(
            "groups, not a member: denied",
            &[("a", &admins)],
            &[],
            with_mfa,
            denied("t/a", &[Groups]),
        ),
        case(
            "groups, other case: denied",
            &[("a", &admins)],
            &[],
            |s| s.groups = strings(&["Admins"]),
            denied("t/a", &[Groups]),
        ),
        // AND and OR.
        case(
            "AND, both met",
            &[("a", &and)],
            &[],
            |s| {
                with_mfa(s);
                in_admins(s);
            },
            Outcome::Allowed,
        ),
        case(
            "AND, group met, mfa not: step up",
            &[("a", &and)],
            &[MFA_ACR],
            in_admins,
            step_up(&["t/a"], &[Mfa], &[MFA_ACR], None),
        ),
        case(
            "AND, mfa met, group not: denied",
            &[("a", &and)],
            &[],
            with_mfa,
            denied("t/a", &[Groups]),
        ),
        case(
            "AND, neither: denied, both unmet",
            &[("a", &and)],
            &[],
            |_| {},
            denied("t/a", &[Mfa, Groups]),
        ),
        case(
            "OR, only the group",
            &[("a", &or)],
            &[],
            in_admins,
            Outcome::Allowed,
        ),
        case(
            "OR, only mfa",
            &[("a", &or)],
            &[],
            with_mfa,
            Outcome::Allowed,
        ),
        case(
            "OR, neither: step up to mfa",
            &[("a", &or)],
            &[MFA_ACR],
            |_| {},
            step_up(&["t/a"], &[Mfa], &[MFA_ACR], None),
        ),
        case(
            "OR, mfa or strength, neither: either acr",
            &[("a", &or_strength)],
            &[MFA_ACR],
            |_| {},
            step_up(&["t/a"], &[Mfa, Strength], &[MFA_ACR, "gold"], None),
        ),
        case(
            "OR, strength met",
            &[("a", &or_strength)],
            &[MFA_ACR],
            |s| s.acr = Some("gold".into()),
            Outcome::Allowed,
        ),
        // Sign-in frequency.
        case(
            "frequency 1h, signed in 10 min ago",
            &[("a", &hourly)],
            &[],
            |_| {},
            Outcome::Allowed,
        ),
        case(
            "frequency 1h, signed in 2h ago",
            &[("a", &hourly)],
            &[],
            |s| s.signed_in_ago(SignedDuration::from_hours(2)),
            step_up(&["t/a"], &[SignInFrequency], &[], Some(hour)),
        ),
        case(
            "frequency 1h, signed in exactly 1h ago",
            &[("a", &hourly)],
            &[],
            |s| s.signed_in_ago(SignedDuration::from_hours(1)),
            step_up(&["t/a"], &[SignInFrequency], &[], Some(hour)),
        ),
        case(
            "frequency 1h and 8h, both lapsed: shortest max_age",
            &[("a", &eight_hourly), ("b", &hourly)],
            &[],
            |s| s.signed_in_ago(SignedDuration::from_hours(10)),
            step_up(&["t/a", "t/b"], &[SignInFrequency], &[], Some(hour)),
        ),
        case(
            "frequency 1h and 8h, 1h lapsed",
            &[("a", &eight_hourly), ("b", &hourly)],
            &[],
            |s| s.signed_in_ago(SignedDuration::from_hours(2)),
            step_up(&["t/b"], &[SignInFrequency], &[], Some(hour)),
        ),
        case(
            "frequency 8h lapsed, 1h does not apply",
            &[("a", &eight_hourly), ("b", &hourly_when_risky)],
            &[],
            |s| s.signed_in_ago(SignedDuration::from_hours(10)),
            step_up(&["t/a"], &[SignInFrequency], &[], Some(8 * hour)),
        ),
        case(
            "mfa and frequency, both",
            &[("a", &mfa_hourly)],
            &[MFA_ACR],
            |s| s.signed_in_ago(SignedDuration::from_hours(2)),
            step_up(&["t/a"], &[Mfa, SignInFrequency], &[MFA_ACR], Some(hour)),
        ),
        case(
            "mfa met, frequency lapsed",
            &[("a", &mfa_hourly)],
            &[MFA_ACR],
            |s| {
                with_mfa(s);
                s.signed_in_ago(SignedDuration::from_hours(2));
            },
            step_up(&["t/a"], &[SignInFrequency], &[], Some(hour)),
        ),
        case(
            "OR groups, frequency lapsed, not a member: denied",
            &[("a", &or_groups_hourly)],
            &[],
            |s| s.signed_in_ago(SignedDuration::from_hours(2)),
            denied("t/a", &[Groups, SignInFrequency]),
        ),
        case(
            "OR groups, frequency lapsed, member: step up",
            &[("a", &or_groups_hourly)],
            &[],
            |s| {
                in_admins(s);
                s.signed_in_ago(SignedDuration::from_hours(2));
            },
            step_up(&["t/a"], &[SignInFrequency], &[], Some(hour)),
        ),
        // Several policies.
        case(
            "step-ups merge, acr values deduplicated in order",
            &[("a", &gold), ("b", &mfa), ("c", &or_strength)],
            &["silver", MFA_ACR],
            |_| {},
            step_up(
                &["t/a", "t/b", "t/c"],
                &[Mfa, Strength],
                &["gold", "silver", MFA_ACR],
                None,
            ),
        ),
        case(
            "denied wins over step up",
            &[("a", &mfa), ("b", &admins)],
            &[],
            |_| {},
            denied("t/b", &[Groups]),
        ),
        case(
            "first denied policy is named",
            &[("a", &admins), ("b", &and)],
            &[],
            |_| {},
            denied("t/a", &[Groups]),
        ),
        case(
            "block wins over step up and denied",
            &[("a", &mfa), ("b", &admins), ("c", &block)],
            &[],
            |_| {},
            blocked("t/c"),
        ),
        case(
            "block wins even when everything else is met",
            &[("a", &mfa), ("b", &admins), ("c", &block)],
            &[],
            |s| {
                with_mfa(s);
                in_admins(s);
            },
            blocked("t/c"),
        ),
        case(
            "first blocking policy is named",
            &[("a", &block), ("b", &block)],
            &[],
            |_| {},
            blocked("t/a"),
        ),
        case(
            "a block that does not apply",
            &[("a", &block_bob), ("b", &mfa)],
            &[],
            with_mfa,
            Outcome::Allowed,
        ),
        case(
            "requirement of a policy that does not apply",
            &[("a", &mfa_off_site)],
            &[],
            |_| {},
            Outcome::Allowed,
        ),
        case(
            "requirement of a policy that applies off-site",
            &[("a", &mfa_off_site)],
            &[],
            |s| s.ip = ip("198.51.100.9"),
            step_up(&["t/a"], &[Mfa], &[], None),
        ),
        // Report-only and disabled policies never change the outcome.
        case(
            "report-only block",
            &[("a", &block_report_only)],
            &[],
            |_| {},
            Outcome::Allowed,
        ),
        case(
            "report-only mfa",
            &[("a", &mfa_report_only)],
            &[],
            |_| {},
            Outcome::Allowed,
        ),
        case(
            "report-only groups beside enforced mfa",
            &[("a", &admins_report_only), ("b", &mfa)],
            &[MFA_ACR],
            |_| {},
            step_up(&["t/b"], &[Mfa], &[MFA_ACR], None),
        ),
        case(
            "report-only block beside enforced groups",
            &[("a", &block_report_only), ("b", &admins)],
            &[],
            |_| {},
            denied("t/b", &[Groups]),
        ),
        case(
            "disabled block",
            &[("a", &block_disabled)],
            &[],
            |_| {},
            Outcome::Allowed,
        ),
        case(
            "disabled mfa beside enforced groups",
            &[("a", &mfa_disabled), ("b", &admins)],
            &[],
            in_admins,
            Outcome::Allowed,
        ),
    ];
    for case in cases {
        let policies: Vec<Policy> = case.policies.iter().map(|(n, y)| policy(n, y)).collect();
        let mut sign = Sign::default();
        (case.sign)(&mut sign);
        let decision = decide(&policies, mfa_acr(case.mfa_acr), &sign);
        assert_eq!(decision.outcome, case.outcome, "{}", case.name);
        let listed: Vec<&str> = decision
            .policies
            .iter()
            .map(|p| p.policy.as_ref())
            .collect();
        let expected: Vec<&str> = policies
            .iter()
            .filter(|p| p.state != sallyport_api::conditional_access_policy::PolicyState::Disabled)
            .map(|p| p.id.as_str())
            .collect();
        assert_eq!(
            listed, expected,
            "{}: every enabled and report-only policy has a result, in order",
            case.name
        );
    }
}

#[test]
fn report_only_policies_get_report_only_result_names() {
    let all = policies(&[
        ("e-block", &format!("{EVERYONE}\ngrant: {{block: true}}")),
        (
            "e-granted",
            &format!("{EVERYONE}\ngrant: {{require: {{mfa: true}}}}"),
        ),
        (
            "e-not-applied",
            "assignments: {users: {include: [bob]}}\ngrant: {block: true}",
        ),
        (
            "r-block",
            &format!("state: ReportOnly\n{EVERYONE}\ngrant: {{block: true}}"),
        ),
        (
            "r-granted",
            &format!("state: ReportOnly\n{EVERYONE}\ngrant: {{require: {{mfa: true}}}}"),
        ),
        (
            "r-groups",
            &format!("state: ReportOnly\n{EVERYONE}\ngrant: {{require: {{groups: [admins]}}}}"),
        ),
        (
            "r-not-applied",
            "state: ReportOnly\nassignments: {users: {include: [bob]}}\ngrant: {block: true}",
        ),
    ]);
    let mut sign = Sign::default();
    with_mfa(&mut sign);
    let decision = decide(&all, no_mfa_acr(), &sign);
    let results: Vec<(&str, bool, &str)> = decision
        .policies
        .iter()
        .map(|p| {
            (
                p.policy.as_ref(),
                p.report_only,
                p.verdict.result_name(p.report_only),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            ("t/e-block", false, "failure"),
            ("t/e-granted", false, "success"),
            ("t/e-not-applied", false, "notApplied"),
            ("t/r-block", true, "reportOnlyFailure"),
            ("t/r-granted", true, "reportOnlySuccess"),
            ("t/r-groups", true, "reportOnlyFailure"),
            ("t/r-not-applied", true, "reportOnlyNotApplied"),
        ]
    );
    assert_eq!(
        decision.policies[5].verdict,
        PolicyVerdict::Unmet(vec![Requirement::Groups])
    );
    assert_eq!(decision.outcome, blocked("t/e-block"));
    // Without the enforced block, the report-only failures still change nothing.
    let decision = decide(&all[1..], no_mfa_acr(), &sign);
    assert_eq!(decision.outcome, Outcome::Allowed);
}

// ---------------------------------------------------------------------------------------
// Session controls
// ---------------------------------------------------------------------------------------

#[test]
fn session_controls_of_the_applying_enforced_policies() {
    let hour = Duration::from_secs(3600);
    let frequency = |value: &str| format!("{EVERYONE}\nsession: {{signInFrequency: {value}}}");
    let persistent =
        |value: &str| format!("{EVERYONE}\nsession: {{persistentBrowserSession: {value}}}");
    let eight = frequency("8h");
    let one = frequency("1h");
    let ninety = frequency("90m");
    let five_min_report_only = format!("state: ReportOnly\n{}", frequency("5m"));
    let thirty_min_for_bob =
        "assignments: {users: {include: [bob]}}\nsession: {signInFrequency: 30m}".to_owned();
    let always = persistent("Always");
    let never = persistent("Never");
    let never_report_only = format!("state: ReportOnly\n{never}");
    let never_for_bob =
        "assignments: {users: {include: [bob]}}\nsession: {persistentBrowserSession: Never}"
            .to_owned();
    let both =
        format!("{EVERYONE}\nsession: {{signInFrequency: 2h, persistentBrowserSession: Always}}");

    /// name, policies, sign-in frequency, persistent browser session
    type Row<'a> = (
        &'a str,
        Vec<(&'a str, &'a str)>,
        Option<Duration>,
        Option<PersistentBrowserSession>,
    );
    let cases: Vec<Row> = vec![
        ("none", vec![("a", EVERYONE)], None, None),
        ("one frequency", vec![("a", &eight)], Some(8 * hour), None),
        (
            "shortest of three",
            vec![("a", &eight), ("b", &one), ("c", &ninety)],
            Some(hour),
            None,
        ),
        (
            "shortest, listed first",
            vec![("a", &one), ("b", &eight)],
            Some(hour),
            None,
        ),
        (
            "report-only frequency is ignored",
            vec![("a", &eight), ("b", &five_min_report_only)],
            Some(8 * hour),
            None,
        ),
        (
            "frequency of a policy that does not apply is ignored",
            vec![("a", &eight), ("b", &thirty_min_for_bob)],
            Some(8 * hour),
            None,
        ),
        (
            "Always",
            vec![("a", &always)],
            None,
            Some(PersistentBrowserSession::Always),
        ),
        (
            "Never",
            vec![("a", &never)],
            None,
            Some(PersistentBrowserSession::Never),
        ),
        (
            "Always then Never: Never wins",
            vec![("a", &always), ("b", &never)],
            None,
            Some(PersistentBrowserSession::Never),
        ),
        (
            "Never then Always: Never wins",
            vec![("a", &never), ("b", &always)],
            None,
            Some(PersistentBrowserSession::Never),
        ),
        (
            "report-only Never is ignored",
            vec![("a", &always), ("b", &never_report_only)],
            None,
            Some(PersistentBrowserSession::Always),
        ),
        (
            "Never of a policy that does not apply is ignored",
            vec![("a", &always), ("b", &never_for_bob)],
            None,
            Some(PersistentBrowserSession::Always),
        ),
        (
            "both controls in one policy, and a shorter one",
            vec![("a", &both), ("b", &ninety), ("c", &never)],
            Some(90 * 60 * Duration::from_secs(1)),
            Some(PersistentBrowserSession::Never),
        ),
    ];
    for (name, rows, frequency, persistent) in cases {
        let sign = Sign::default();
        let decision = decide(&policies(&rows), no_mfa_acr(), &sign);
        assert_eq!(decision.outcome, Outcome::Allowed, "{name}");
        assert_eq!(decision.session.sign_in_frequency, frequency, "{name}");
        assert_eq!(
            decision.session.persistent_browser_session, persistent,
            "{name}"
        );
        let reauthenticate_at = frequency.map(|f| {
            sign.auth_time + SignedDuration::try_from(f).unwrap_or_else(|e| panic!("{name}: {e}"))
        });
        assert_eq!(
            decision.session.reauthenticate_at, reauthenticate_at,
            "{name}"
        );
    }
    // The session controls of a policy that is not met still apply.
    let mut sign = Sign::default();
    sign.signed_in_ago(SignedDuration::from_hours(3));
    let decision = decide(
        &policies(&[("a", &eight), ("b", &one)]),
        no_mfa_acr(),
        &sign,
    );
    assert_eq!(decision.session.sign_in_frequency, Some(hour));
    assert_eq!(
        decision.session.reauthenticate_at,
        Some(ts("2026-07-08T08:00:00Z"))
    );
    assert_eq!(
        decision.outcome,
        step_up(&["t/b"], &[Requirement::SignInFrequency], &[], Some(hour))
    );
}

/// The policy ids in `controls`' lists, as `(monitor, readOnly, blockDownloads)`.
fn request_ids(controls: &RequestControls) -> (Vec<String>, Vec<String>, Vec<String>) {
    let ids = |list: &[Arc<str>]| list.iter().map(|p| p.to_string()).collect::<Vec<_>>();
    (
        ids(&controls.monitor),
        ids(&controls.read_only),
        ids(&controls.block_downloads),
    )
}

#[test]
fn per_request_session_controls_combine_by_union() {
    let monitor = format!("{EVERYONE}\nsession: {{monitor: true}}");
    let read_only = format!("{EVERYONE}\nsession: {{readOnly: true}}");
    let downloads = format!("{EVERYONE}\nsession: {{blockDownloads: true}}");
    let pdf = format!(
        "{EVERYONE}\nsession: {{blockDownloads: true, downloadContentTypes: [application/pdf, video/*]}}"
    );
    let all_three =
        format!("{EVERYONE}\nsession: {{monitor: true, readOnly: true, blockDownloads: true}}");
    let monitor_report_only = format!("state: ReportOnly\n{monitor}");
    let read_only_report_only = format!("state: ReportOnly\n{read_only}");
    let monitor_for_bob = "assignments: {users: {include: [bob]}}\nsession: {monitor: true}";
    let read_only_blocked =
        format!("{EVERYONE}\ngrant: {{block: true}}\nsession: {{readOnly: true}}");
    let off = format!("{EVERYONE}\nsession: {{monitor: false, readOnly: false}}");

    type Ids<'a> = &'a [&'a str];
    /// name, policies, enforced (monitor, readOnly, blockDownloads), report-only ones
    type Row<'a> = (&'a str, Vec<(&'a str, &'a str)>, [Ids<'a>; 3], [Ids<'a>; 3]);
    let cases: Vec<Row> = vec![
        (
            "none",
            vec![("a", EVERYONE)],
            [&[], &[], &[]],
            [&[], &[], &[]],
        ),
        (
            "explicitly off",
            vec![("a", &off)],
            [&[], &[], &[]],
            [&[], &[], &[]],
        ),
        (
            "monitor",
            vec![("a", &monitor)],
            [&["t/a"], &[], &[]],
            [&[], &[], &[]],
        ),
        (
            "read-only",
            vec![("a", &read_only)],
            [&[], &["t/a"], &[]],
            [&[], &[], &[]],
        ),
        (
            "downloads",
            vec![("a", &downloads)],
            [&[], &[], &["t/a"]],
            [&[], &[], &[]],
        ),
        (
            "one policy with all three",
            vec![("a", &all_three)],
            [&["t/a"], &["t/a"], &["t/a"]],
            [&[], &[], &[]],
        ),
        (
            "union of several policies, each listed",
            vec![
                ("a", &monitor),
                ("b", &read_only),
                ("c", &all_three),
                ("d", &pdf),
            ],
            [&["t/a", "t/c"], &["t/b", "t/c"], &["t/c", "t/d"]],
            [&[], &[], &[]],
        ),
        (
            "report-only is reported, not enforced",
            vec![("a", &monitor_report_only), ("b", &read_only_report_only)],
            [&[], &[], &[]],
            [&["t/a"], &["t/b"], &[]],
        ),
        (
            "report-only beside an enforced one",
            vec![("a", &monitor), ("b", &monitor_report_only)],
            [&["t/a"], &[], &[]],
            [&["t/b"], &[], &[]],
        ),
        (
            "a policy that does not apply adds nothing",
            vec![("a", monitor_for_bob), ("b", &read_only)],
            [&[], &["t/b"], &[]],
            [&[], &[], &[]],
        ),
    ];
    for (name, rows, enforced, report_only) in cases {
        let decision = decide(&policies(&rows), no_mfa_acr(), &Sign::default());
        assert_eq!(decision.outcome, Outcome::Allowed, "{name}");
        let strings = |ids: Ids| ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            request_ids(&decision.session.request),
            (
                strings(enforced[0]),
                strings(enforced[1]),
                strings(enforced[2])
            ),
            "{name}: enforced"
        );
        assert_eq!(
            request_ids(&decision.report_only_session),
            (
                strings(report_only[0]),
                strings(report_only[1]),
                strings(report_only[2])
            ),
            "{name}: report-only"
        );
        let request = &decision.session.request;
        assert_eq!(request.monitors(), !enforced[0].is_empty(), "{name}");
        assert_eq!(request.is_read_only(), !enforced[1].is_empty(), "{name}");
        assert_eq!(
            request.blocks_downloads(),
            !enforced[2].is_empty(),
            "{name}"
        );
    }
    // Controls of an applying enforced policy hold whatever its grant says.
    let decision = decide(
        &policies(&[("a", &read_only_blocked)]),
        no_mfa_acr(),
        &Sign::default(),
    );
    assert_eq!(decision.outcome, blocked("t/a"));
    assert!(decision.session.request.is_read_only());
    // The controls a policy asks for, by name.
    let decision = decide(
        &policies(&[("a", &monitor), ("c", &all_three)]),
        no_mfa_acr(),
        &Sign::default(),
    );
    assert_eq!(decision.session.request.of_policy("t/a"), ["monitor"]);
    assert_eq!(
        decision.session.request.of_policy("t/c"),
        ["monitor", "readOnly", "blockDownloads"]
    );
    assert!(decision.session.request.of_policy("t/x").is_empty());
}

#[test]
fn downloads_are_recognised_by_disposition_and_content_type() {
    let defaults = decide(
        &policies(&[(
            "a",
            &format!("{EVERYONE}\nsession: {{blockDownloads: true}}"),
        )]),
        no_mfa_acr(),
        &Sign::default(),
    )
    .session
    .request;
    let listed = decide(
        &policies(&[
            (
                "a",
                &format!(
                    "{EVERYONE}\nsession: {{blockDownloads: true, downloadContentTypes: [application/PDF, video/*]}}"
                ),
            ),
            (
                "b",
                &format!(
                    "{EVERYONE}\nsession: {{blockDownloads: true, downloadContentTypes: [application/pdf, text/csv]}}"
                ),
            ),
        ]),
        no_mfa_acr(),
        &Sign::default(),
    )
    .session
    .request;
    let types: Vec<&str> = listed
        .download_content_types
        .iter()
        .map(|t| t.as_str())
        .collect();
    assert_eq!(
        types,
        ["application/PDF", "video/*", "text/csv"],
        "union, no repeats"
    );
    let not_blocking = RequestControls::default();

    /// name, Content-Disposition, Content-Type, download with defaults?, with the lists?
    type Row<'a> = (&'a str, Option<&'a str>, Option<&'a str>, bool, bool);
    let cases: &[Row] = &[
        (
            "a page",
            None,
            Some("text/html; charset=utf-8"),
            false,
            false,
        ),
        ("no headers", None, None, false, false),
        (
            "attachment",
            Some("attachment; filename=\"report.pdf\""),
            Some("text/html"),
            true,
            true,
        ),
        (
            "attachment, other case",
            Some("Attachment"),
            None,
            true,
            true,
        ),
        (
            "inline",
            Some("inline; filename=a.zip"),
            Some("text/plain"),
            false,
            false,
        ),
        (
            "a filename alone is no attachment",
            Some("filename=attachment"),
            None,
            false,
            false,
        ),
        (
            "octet-stream",
            None,
            Some("application/octet-stream"),
            true,
            false,
        ),
        (
            "zip with a parameter",
            None,
            Some("Application/Zip; x=1"),
            true,
            false,
        ),
        ("pdf", None, Some("application/pdf"), false, true),
        ("video by wildcard", None, Some("video/mp4"), false, true),
        (
            "csv from the second policy",
            None,
            Some("text/csv;charset=utf-8"),
            false,
            true,
        ),
        ("empty type", None, Some(" ; x=1"), false, false),
    ];
    for (name, disposition, content_type, with_defaults, with_lists) in cases {
        assert_eq!(
            defaults.is_download(*disposition, *content_type),
            *with_defaults,
            "{name}: defaults"
        );
        assert_eq!(
            listed.is_download(*disposition, *content_type),
            *with_lists,
            "{name}: lists"
        );
        assert!(
            !not_blocking.is_download(*disposition, *content_type),
            "{name}: nothing is a download when downloads are not blocked"
        );
    }
    for (method, safe) in [
        ("GET", true),
        ("HEAD", true),
        ("OPTIONS", true),
        ("POST", false),
        ("PUT", false),
        ("PATCH", false),
        ("DELETE", false),
        ("CONNECT", false),
        ("TRACE", false),
        ("get", false),
    ] {
        assert_eq!(RequestControls::is_safe_method(method), safe, "{method}");
    }
}

// ---------------------------------------------------------------------------------------
// What the proxy keeps: the named groups
// ---------------------------------------------------------------------------------------

#[test]
fn named_groups_of_the_assignment_and_the_apps_policies() {
    let all = policies(&[
        (
            "a",
            "assignments: {groups: {include: [admins], exclude: [contractors]}}\ngrant: {require: {groups: [secops, admins]}}",
        ),
        (
            "b",
            "assignments: {users: {include: ['*']}, groups: {exclude: [interns]}}",
        ),
        ("c", "assignments: {groups: {include: [elsewhere]}}"),
        (
            "d",
            "state: Disabled\nassignments: {groups: {include: [disabled-group]}}",
        ),
        (
            "e",
            "state: ReportOnly\nassignments: {groups: {include: [watched]}}",
        ),
        ("f", "assignments: {groups: {include: ['*']}}"),
    ]);
    let (set, errors) = PolicySet::compile(&all, no_mfa_acr());
    assert!(errors.is_empty(), "{errors:?}");
    let assignment = Assignment {
        users: strings(&["alice"]),
        groups: strings(&["staff", "ops"]),
    };
    let route: Vec<String> = ["t/a", "t/b", "t/d", "t/e", "t/f"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let app = set.app(APP, &assignment, &route);
    assert_eq!(app.app(), APP);
    assert_eq!(app.len(), 4);
    let groups: Vec<&str> = app.named_groups().into_iter().collect();
    assert_eq!(
        groups,
        [
            "admins",
            "contractors",
            "interns",
            "ops",
            "secops",
            "staff",
            "watched"
        ]
    );
    let bare = set.app(APP, &Assignment::default(), &[]);
    assert!(bare.is_empty());
    assert!(bare.named_groups().is_empty());
}

// ---------------------------------------------------------------------------------------
// The sign-in log line
// ---------------------------------------------------------------------------------------

fn field<'v>(value: &'v Value, path: &str) -> &'v Value {
    path.split('.')
        .fold(value, |v, key| match key.parse::<usize>() {
            Ok(index) => &v[index],
            Err(_) => &v[key],
        })
}

#[test]
fn sign_in_event_json_reads_back_field_by_field() {
    let all = policies(&[
        (
            "a-mfa",
            &format!(
                "{EVERYONE}\ngrant: {{require: {{mfa: true}}}}\nsession: {{signInFrequency: 8h}}"
            ),
        ),
        (
            "b-office",
            "assignments: {users: {include: ['*']}}\nconditions: {locations: {include: [10.0.0.0/8]}}\ngrant: {block: true}",
        ),
        (
            "c-admins",
            &format!("state: ReportOnly\n{EVERYONE}\ngrant: {{require: {{groups: [admins]}}}}"),
        ),
        (
            "d-granted",
            &format!("{EVERYONE}\ngrant: {{require: {{groups: [staff]}}}}"),
        ),
    ]);
    let (set, errors) = PolicySet::compile(&all, mfa_acr(&[MFA_ACR]));
    assert!(errors.is_empty(), "{errors:?}");
    let app = set.app(APP, &Assignment::default(), &ids(&all));
    let sign = Sign {
        acr: Some("urn:password".to_owned()),
        sign_in_risk: Some(RiskLevel::Low),
        ..Sign::default()
    };
    let context = sign.context();
    let decision = app.evaluate(&context);
    let line = SignInEvent::new(app.app(), SignInStage::SignIn, &context, &decision)
        .with_request_id("req-1")
        .with_session_id("sess-1")
        .to_json();
    assert!(!line.contains('\n'), "one line: {line}");
    let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let expect = |path: &str, value: Value| {
        assert_eq!(field(&event, path), &value, "{path} in {line}");
    };
    use serde_json::json;
    expect("schema", json!(SIGN_IN_LOG_SCHEMA));
    expect("schema", json!("sallyport.dev/sign-in/v1"));
    expect("time", json!("2026-07-08T10:00:00Z"));
    expect("requestId", json!("req-1"));
    expect("stage", json!("signIn"));
    expect("app", json!(APP));
    expect("user", json!("alice"));
    expect("sessionId", json!("sess-1"));
    expect("clientIp", json!("203.0.113.7"));
    expect("location.network", json!("public"));
    expect("platform", json!("windows"));
    expect("amr", json!(["pwd"]));
    expect("acr", json!("urn:password"));
    expect("authTime", json!("2026-07-08T09:50:00Z"));
    expect("signInRisk", json!("low"));
    expect("userRisk", Value::Null);
    expect("decision", json!("stepUp"));
    let reason = field(&event, "reason")
        .as_str()
        .unwrap_or_else(|| panic!("reason: {line}"));
    assert_eq!(
        reason,
        "policies t/a-mfa require multi-factor authentication: the user must sign in again"
    );

    expect("policies.0.id", json!("t/a-mfa"));
    expect("policies.0.state", json!("enabled"));
    expect("policies.0.result", json!("failure"));
    expect("policies.0.unmet", json!(["mfa"]));
    expect(
        "policies.0.detail",
        json!("applies; not met: multi-factor authentication"),
    );
    assert!(
        field(&event, "policies.0").get("notApplied").is_none(),
        "{line}"
    );

    expect("policies.1.id", json!("t/b-office"));
    expect("policies.1.state", json!("enabled"));
    expect("policies.1.result", json!("notApplied"));
    expect("policies.1.notApplied", json!("locationNotIncluded"));
    assert!(
        field(&event, "policies.1").get("detail").is_none(),
        "{line}"
    );
    assert!(field(&event, "policies.1").get("unmet").is_none(), "{line}");

    expect("policies.2.id", json!("t/c-admins"));
    expect("policies.2.state", json!("reportOnly"));
    expect("policies.2.result", json!("reportOnlyFailure"));
    expect("policies.2.unmet", json!(["groups"]));

    expect("policies.3.id", json!("t/d-granted"));
    expect("policies.3.result", json!("success"));
    expect(
        "policies.3.detail",
        json!("applies; every requirement is met"),
    );
    assert_eq!(
        field(&event, "policies").as_array().map(Vec::len),
        Some(4),
        "{line}"
    );
    // The session controls in force: a-mfa's frequency; nothing per request.
    expect("sessionControls.signInFrequencySeconds", json!(8 * 3600));
    expect(
        "sessionControls.reauthenticateAt",
        json!("2026-07-08T17:50:00Z"),
    );
    for absent in [
        "monitor",
        "readOnly",
        "blockDownloads",
        "persistentBrowserSession",
    ] {
        assert!(
            event["sessionControls"].get(absent).is_none(),
            "{absent}: {line}"
        );
    }
    assert!(event.get("reportOnlySessionControls").is_none(), "{line}");

    // Per-request controls, enforced and report-only.
    let controls = policies(&[
        (
            "m-monitor",
            &format!("{EVERYONE}\nsession: {{monitor: true, persistentBrowserSession: Never}}"),
        ),
        (
            "r-readonly",
            &format!(
                "{EVERYONE}\nsession: {{readOnly: true, blockDownloads: true, downloadContentTypes: [application/pdf]}}"
            ),
        ),
        (
            "w-watch",
            &format!(
                "state: ReportOnly\n{EVERYONE}\nsession: {{monitor: true, blockDownloads: true}}"
            ),
        ),
    ]);
    let (controls_set, errors) = PolicySet::compile(&controls, no_mfa_acr());
    assert!(errors.is_empty(), "{errors:?}");
    let controls_app = controls_set.app(APP, &Assignment::default(), &ids(&controls));
    let sign = Sign::default();
    let context = sign.context();
    let decision = controls_app.evaluate(&context);
    let line = SignInEvent::new(APP, SignInStage::Request, &context, &decision).to_json();
    let controlled: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(
        controlled["sessionControls"],
        json!({
            "persistentBrowserSession": "Never",
            "monitor": ["t/m-monitor"],
            "readOnly": ["t/r-readonly"],
            "blockDownloads": ["t/r-readonly"],
            "downloadContentTypes": ["application/pdf"],
        }),
        "{line}"
    );
    assert_eq!(
        controlled["reportOnlySessionControls"]["monitor"],
        json!(["t/w-watch"]),
        "{line}"
    );
    assert_eq!(
        controlled["reportOnlySessionControls"]["blockDownloads"],
        json!(["t/w-watch"]),
        "{line}"
    );
    assert!(
        controlled["reportOnlySessionControls"]
            .get("readOnly")
            .is_none(),
        "{line}"
    );
    assert_eq!(controlled["decision"], json!("allowed"), "{line}");

    // Outcome by outcome: the decision name and the reason, without optional ids.
    // name, policies, sign-in, decision, reason
    let cases: &[(&str, &[usize], Change, &str, &str)] = &[
        (
            "allowed, one applies",
            &[3],
            |_| {},
            "allowed",
            "assigned, and the 1 enforced policies that apply are satisfied",
        ),
        (
            "allowed, none applies",
            &[1],
            |_| {},
            "allowed",
            "assigned, and no enforced policy applies",
        ),
        (
            "blocked",
            &[1],
            |s| s.ip = ip("::ffff:10.1.2.3"),
            "blocked",
            "blocked by policy t/b-office",
        ),
        (
            "denied",
            &[2, 3],
            |s| s.groups.clear(),
            "denied",
            "policy t/d-granted requires membership of a required group, which signing in again cannot provide",
        ),
    ];
    for (name, indexes, change, decision_name, reason) in cases {
        let chosen: Vec<String> = indexes.iter().map(|i| all[*i].id.clone()).collect();
        let app = set.app(APP, &Assignment::default(), &chosen);
        let mut sign = Sign::default();
        change(&mut sign);
        let context = sign.context();
        let decision = app.evaluate(&context);
        let line = SignInEvent::new(app.app(), SignInStage::Request, &context, &decision).to_json();
        let event: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{name}: {e}: {line}"));
        assert_eq!(event["decision"], json!(decision_name), "{name}: {line}");
        assert_eq!(event["reason"], json!(reason), "{name}: {line}");
        assert_eq!(event["stage"], json!("request"), "{name}");
        assert!(event.get("requestId").is_none(), "{name}: {line}");
        assert!(event.get("sessionId").is_none(), "{name}: {line}");
        assert_eq!(event["clientIp"], json!(sign.ip.to_string()), "{name}");
    }

    // Not assigned: no policies; an unknown platform is null; private and loopback
    // networks.
    let app = set.app(
        APP,
        &Assignment {
            users: strings(&["bob"]),
            groups: vec![],
        },
        &ids(&all),
    );
    let sign = Sign {
        user_agent: UA_CURL.to_owned(),
        ip: ip("10.1.2.3"),
        ..Sign::default()
    };
    let context = sign.context();
    let decision = app.evaluate(&context);
    let line = SignInEvent::new(app.app(), SignInStage::WhatIf, &context, &decision).to_json();
    let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(event["decision"], json!("notAssigned"), "{line}");
    assert_eq!(
        event["reason"],
        json!("the app's assignment names neither the user nor any of their groups")
    );
    assert_eq!(event["policies"], json!([]), "{line}");
    assert_eq!(event["platform"], Value::Null, "{line}");
    assert_eq!(event["stage"], json!("whatIf"), "{line}");
    assert_eq!(event["location"]["network"], json!("private"), "{line}");
    for (address, network) in [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("fd00::1", "private"),
        ("::ffff:192.168.1.1", "private"),
        ("2001:db8::1", "public"),
    ] {
        let sign = Sign {
            ip: ip(address),
            ..Sign::default()
        };
        let context = sign.context();
        let decision = app.evaluate(&context);
        let event: Value = serde_json::from_str(
            &SignInEvent::new(APP, SignInStage::Stream, &context, &decision).to_json(),
        )
        .unwrap_or_else(|e| panic!("{address}: {e}"));
        assert_eq!(event["location"]["network"], json!(network), "{address}");
        assert_eq!(event["stage"], json!("stream"), "{address}");
    }
}
