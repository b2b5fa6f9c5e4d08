//! `ConditionalAccessPolicy`: who may reach which apps, from where, and how authenticated.
//!
//! Evaluation follows the reference product: every enabled policy whose assignments and
//! conditions match a sign-in applies; a block in any of them blocks; otherwise all their
//! grant requirements must be met. `ReportOnly` policies are evaluated and logged, never
//! enforced. Policies in the operator's namespace apply to every app in the fleet.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{ObjectName, matches, validated_string};
use crate::duration::Duration;

/// A conditional access policy: assignments, conditions, grant and session controls.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sallyport.dev",
    version = "v1alpha1",
    kind = "ConditionalAccessPolicy",
    namespaced,
    status = "ConditionalAccessPolicyStatus",
    shortname = "cap",
    category = "sallyport",
    doc = "ConditionalAccessPolicy decides who may reach which PublishedApps, from where and how strongly authenticated. Every enabled policy whose assignments and conditions match a sign-in applies: a block in any of them blocks, otherwise all their grant requirements must be met. ReportOnly policies are evaluated and logged but never enforced. Policies in the operator's namespace apply to every app in the fleet.",
    printcolumn(
        name = "STATE",
        type_ = "string",
        json_path = ".spec.state",
        description = "Enabled, ReportOnly or Disabled"
    ),
    printcolumn(
        name = "MATCHED",
        type_ = "integer",
        json_path = ".status.matchedApps",
        description = "How many apps the policy applies to"
    ),
    printcolumn(
        name = "READY",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the policy is in force"
    ),
    printcolumn(
        name = "AGE",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ConditionalAccessPolicySpec {
    /// `Enabled` enforces the policy; `ReportOnly` evaluates and logs it without enforcing;
    /// `Disabled` ignores it.
    #[serde(default)]
    pub state: PolicyState,

    /// Which apps, users and groups the policy applies to.
    pub assignments: Assignments,

    /// Further conditions a sign-in must meet for the policy to apply. Omitted conditions
    /// always match.
    #[serde(default, skip_serializing_if = "Conditions::is_empty")]
    pub conditions: Conditions,

    /// What a sign-in the policy applies to must satisfy: blocked, or the requirements.
    #[serde(default)]
    pub grant: Grant,

    /// Session controls for sign-ins the policy applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<PolicySessionControls>,
}

/// Whether a policy is enforced.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PolicyState {
    /// Evaluated and enforced.
    #[default]
    Enabled,
    /// Evaluated and logged with its would-be result, never enforced.
    ReportOnly,
    /// Ignored.
    Disabled,
}

/// Which apps, users and groups a policy applies to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("(has(self.users) && size(self.users.include) > 0) || (has(self.groups) && size(self.groups.include) > 0)")
    .message("must include users or groups; use users.include: [\"*\"] for everyone"))]
#[serde(rename_all = "camelCase")]
pub struct Assignments {
    /// The apps the policy applies to, by label selector and/or by name.
    pub apps: AppSelection,

    /// Users the policy applies to. `"*"` in `include` means every user.
    #[serde(default, skip_serializing_if = "IncludeExclude::is_empty")]
    pub users: IncludeExclude,

    /// Groups (the provider's `groups` claim) whose members the policy applies to.
    #[serde(default, skip_serializing_if = "IncludeExclude::is_empty")]
    pub groups: IncludeExclude,
}

/// The apps a policy applies to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.selector) || (has(self.names) && size(self.names) > 0)")
    .message("must select apps by selector or by names; use selector: {} for every app"))]
#[serde(rename_all = "camelCase")]
pub struct AppSelection {
    /// PublishedApps whose labels match. An empty selector (`{}`) selects every app in
    /// the policy's namespace, or every app in the fleet for a policy in the operator's
    /// namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,

    /// Names of PublishedApps in the policy's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub names: Vec<ObjectName>,
}

/// Users or groups to include, and exceptions to exclude.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IncludeExclude {
    /// Names included; `"*"` means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), inner(length(min = 1, max = 256)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[x_kube(validation = Rule::new("!('*' in self) || size(self) == 1")
        .message("\"*\" already includes everyone and must stand alone"))]
    pub include: Vec<String>,

    /// Names excluded even when included, for example break-glass accounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), inner(length(min = 1, max = 256)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[x_kube(validation = Rule::new("!('*' in self)")
        .message("must not hold \"*\": a policy that excludes everyone never applies"))]
    pub exclude: Vec<String>,
}

impl IncludeExclude {
    /// True when nothing is included or excluded.
    pub fn is_empty(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }
}

/// Conditions a sign-in must meet for a policy to apply.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Conditions {
    /// Client IP locations the policy applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locations: Option<Locations>,

    /// Sign-in risk levels the policy applies to: `low`, `medium`, `high`. Empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub sign_in_risk: Vec<RiskLevel>,

    /// User risk levels the policy applies to: `low`, `medium`, `high`. Empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub user_risk: Vec<RiskLevel>,

    /// Client platforms, read from the User-Agent, the policy applies to. Empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub client_platforms: Vec<ClientPlatform>,

    /// Time windows the policy applies in. Empty: any time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub times: Vec<TimeWindow>,
}

impl Conditions {
    /// True when no condition is set: the policy applies whatever the sign-in's context.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// Client IP locations, as CIDRs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Locations {
    /// CIDRs the client IP must be in, or `Any`. Empty: any location.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub include: Vec<Location>,

    /// CIDRs that exempt a client IP from the policy even when included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub exclude: Vec<Cidr>,
}

/// CEL: a CIDR's host bits are zero (only meaningful once `isCIDR(self)` holds).
const CIDR_MASKED: &str = "cidr(self).masked() == cidr(self)";

/// What [`CIDR_MASKED`] expects, for messages.
const CIDR_MASKED_MESSAGE: &str =
    "must have its host bits zero, such as 10.20.0.0/16 rather than 10.20.0.1/16";

validated_string!(
    /// A client IP range as a CIDR (`10.20.0.0/16`, `2001:db8::/32`), or `Any`.
    Location,
    max_length = 64,
    rules = [
        (
            "self == 'Any' || isCIDR(self)",
            "must be Any or a CIDR such as 10.20.0.0/16 or 2001:db8::/32"
        ),
        (
            format!("self == 'Any' || !isCIDR(self) || {CIDR_MASKED}"),
            CIDR_MASKED_MESSAGE
        ),
    ]
);

validated_string!(
    /// A client IP range as a CIDR, such as `192.0.2.0/24` or `2001:db8::/32`.
    Cidr,
    max_length = 64,
    rules = [
        (
            "isCIDR(self)",
            "must be a CIDR such as 192.0.2.0/24 or 2001:db8::/32"
        ),
        (
            format!("!isCIDR(self) || {CIDR_MASKED}"),
            CIDR_MASKED_MESSAGE
        ),
    ]
);

/// A risk level, as a risk detection or the identity provider reports it.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum RiskLevel {
    /// Low risk.
    Low,
    /// Medium risk.
    Medium,
    /// High risk.
    High,
}

/// A client platform, as read from the User-Agent.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClientPlatform {
    /// Microsoft Windows.
    #[serde(rename = "windows")]
    Windows,
    /// Apple macOS.
    #[serde(rename = "macOS")]
    MacOs,
    /// Linux desktops.
    #[serde(rename = "linux")]
    Linux,
    /// Apple iOS and iPadOS.
    #[serde(rename = "iOS")]
    Ios,
    /// Android.
    #[serde(rename = "android")]
    Android,
}

/// RE2: a time of day, `HH:MM` in 24-hour form; `24:00` ends a window at midnight.
const TIME_OF_DAY: &str = r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$";

/// A weekly time window in a time zone.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.from != self.to")
    .message("from and to must differ; omit times to match at any time")
    .field_path(".to"))]
#[serde(rename_all = "camelCase")]
pub struct TimeWindow {
    /// Days of the week the window is open on (`Mon` … `Sun`). Empty: every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub days: Vec<Weekday>,

    /// Start of the window, `HH:MM` in 24-hour form, for example `08:00`.
    #[schemars(length(max = 5))]
    #[x_kube(validation = Rule::new(matches("self", TIME_OF_DAY)).message("must be a 24-hour time HH:MM such as 08:00"))]
    pub from: String,

    /// End of the window, `HH:MM` in 24-hour form, for example `18:00`. A window whose
    /// end is before its start runs over midnight.
    #[schemars(length(max = 5))]
    #[x_kube(validation = Rule::new(matches("self", TIME_OF_DAY)).message("must be a 24-hour time HH:MM such as 18:00 (24:00 for midnight)"))]
    pub to: String,

    /// IANA time zone of `from` and `to`, for example `Europe/Berlin`.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new(r"self.matches(r'^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*$')")
        .message("must be an IANA time zone name such as Europe/Berlin or UTC"))]
    pub time_zone: String,
}

fn default_time_zone() -> String {
    "UTC".to_owned()
}

/// A day of the week.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weekday {
    /// Monday.
    Mon,
    /// Tuesday.
    Tue,
    /// Wednesday.
    Wed,
    /// Thursday.
    Thu,
    /// Friday.
    Fri,
    /// Saturday.
    Sat,
    /// Sunday.
    Sun,
}

/// What a sign-in a policy applies to must satisfy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[x_kube(validation = Rule::new("!(self.block && has(self.require))")
    .message("block and require are mutually exclusive: a blocking policy has nothing to satisfy")
    .field_path(".require"))]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    /// Block access outright. A block in any applying policy wins.
    #[serde(default)]
    pub block: bool,

    /// Requirements a sign-in must meet to be allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require: Option<GrantRequirements>,
}

/// Requirements a sign-in must meet to be allowed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.mfa || has(self.authenticationStrength) || (has(self.groups) && size(self.groups) > 0)")
    .message("must require something: mfa, authenticationStrength or groups"))]
#[serde(rename_all = "camelCase")]
pub struct GrantRequirements {
    /// `AND`: every requirement must be met; `OR`: one is enough.
    #[serde(default)]
    pub operator: RequirementOperator,

    /// Require multi-factor authentication, read from the ID token's `amr`/`acr`; when it
    /// is missing the user is sent back to the provider to step up.
    #[serde(default)]
    pub mfa: bool,

    /// Require a specific authentication strength.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication_strength: Option<AuthenticationStrength>,

    /// Require membership of one of these groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 256)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub groups: Vec<String>,
}

/// How several grant requirements combine.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RequirementOperator {
    /// Every requirement must be met.
    #[default]
    #[serde(rename = "AND")]
    And,
    /// One requirement is enough.
    #[serde(rename = "OR")]
    Or,
}

/// An authentication strength, as the ID token's `acr` and `amr` claims state it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("(has(self.acrValues) && size(self.acrValues) > 0) || (has(self.amr) && size(self.amr) > 0)")
    .message("must list acrValues or amr"))]
#[serde(rename_all = "camelCase")]
pub struct AuthenticationStrength {
    /// Accepted `acr` values; one must match. Also sent as `acr_values` when stepping up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 256)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub acr_values: Vec<String>,

    /// Required `amr` methods, for example `otp`, `hwk` or `mfa`; all must be present.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub amr: Vec<String>,
}

/// Session controls for sign-ins a policy applies to.
///
/// `signInFrequency` and `persistentBrowserSession` act on the session; `monitor`,
/// `readOnly` and `blockDownloads` act on every request of it. The controls of every
/// applying `Enabled` policy combine: the shortest frequency, `Never` over `Always`, and
/// any policy asking to monitor, to allow only reading or to block downloads is enough.
/// `ReportOnly` policies report the controls they would apply in the sign-in log, and
/// enforce none.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[x_kube(validation = Rule::new("!has(self.downloadContentTypes) || size(self.downloadContentTypes) == 0 || (has(self.blockDownloads) && self.blockDownloads)")
    .message("downloadContentTypes only counts with blockDownloads: true")
    .field_path(".downloadContentTypes"))]
#[serde(rename_all = "camelCase")]
pub struct PolicySessionControls {
    /// Force re-authentication once the sign-in is older than this, for example `8h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign_in_frequency: Option<Duration>,

    /// `Always` keeps the session cookie across browser restarts; `Never` drops it when
    /// the browser closes. Overrides the app's cookie setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_browser_session: Option<PersistentBrowserSession>,

    /// Monitor the session: every request of it is written to the audit stream as a
    /// `session.request` event with the user, app, client IP, method, path (without the
    /// query), status, response bytes, request id and the policies asking for it. Bodies
    /// are never recorded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub monitor: bool,

    /// Allow only reading: requests with a safe method (`GET`, `HEAD`, `OPTIONS`) pass;
    /// any other method, and WebSocket upgrades, are answered 403 naming the policy and
    /// never reach the app.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,

    /// Block downloads: a response of the app that is a file download (its
    /// `Content-Disposition` is `attachment`, or its `Content-Type` is one of
    /// `downloadContentTypes`) is replaced by a 403 page naming the policy; the app's
    /// body is dropped, never sent. Pages and other responses pass.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub block_downloads: bool,

    /// Media types (`type/subtype`, or `type/*` for a whole type; parameters such as
    /// `charset` are not part of it) whose responses count as downloads when
    /// `blockDownloads` is set, besides any response with `Content-Disposition:
    /// attachment`. Compared ignoring case. Empty: application/octet-stream and the
    /// common archive types (zip, gzip, tar, 7z, rar, bzip2, xz, zstd).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub download_content_types: Vec<ContentType>,
}

/// The media types that count as downloads when a policy blocks downloads and lists no
/// `downloadContentTypes` of its own.
pub const DEFAULT_DOWNLOAD_CONTENT_TYPES: &[&str] = &[
    "application/octet-stream",
    "application/zip",
    "application/x-zip-compressed",
    "application/gzip",
    "application/x-gzip",
    "application/x-tar",
    "application/x-7z-compressed",
    "application/vnd.rar",
    "application/x-rar-compressed",
    "application/x-bzip2",
    "application/x-xz",
    "application/zstd",
];

/// RE2: a media type without parameters, `type/subtype` or `type/*` (RFC 6838 names).
const MEDIA_TYPE: &str =
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/([A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*|[*])$";

/// What [`MEDIA_TYPE`] expects, for messages.
const MEDIA_TYPE_MESSAGE: &str = "must be a media type type/subtype such as application/zip, or type/* such as video/*, without parameters";

validated_string!(
    /// A media type without parameters: `type/subtype` (`application/zip`) or `type/*`
    /// (`video/*`).
    ContentType,
    max_length = 255,
    rules = [(matches("self", MEDIA_TYPE), MEDIA_TYPE_MESSAGE)]
);

impl ContentType {
    /// Checks the value as admission does ([`MEDIA_TYPE`]); the error says what is
    /// expected.
    pub fn check(&self) -> Result<(), String> {
        let name_char = |c: char| c.is_ascii_alphanumeric() || "!#$&^_.+-".contains(c);
        let name = |part: &str| {
            part.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
                && part.chars().all(name_char)
        };
        let valid = self.0.len() <= 255
            && self
                .0
                .split_once('/')
                .is_some_and(|(kind, subtype)| name(kind) && (subtype == "*" || name(subtype)));
        if valid {
            Ok(())
        } else {
            Err(format!("{:?} {MEDIA_TYPE_MESSAGE}", self.0))
        }
    }

    /// Whether a response's media type `essence` (`type/subtype`, lower case, without
    /// parameters) is this one, ignoring case; `type/*` takes every subtype.
    pub fn matches(&self, essence: &str) -> bool {
        match self.0.strip_suffix("/*") {
            Some(kind) => essence
                .split_once('/')
                .is_some_and(|(essence_kind, _)| essence_kind.eq_ignore_ascii_case(kind)),
            None => self.0.eq_ignore_ascii_case(essence),
        }
    }
}

/// Whether the session survives a browser restart.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PersistentBrowserSession {
    /// The session cookie survives browser restarts.
    Always,
    /// The session cookie is dropped when the browser closes.
    Never,
}

/// The observed state of a ConditionalAccessPolicy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConditionalAccessPolicyStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Accepted` and `Ready`, with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// How many PublishedApps the policy applies to.
    #[serde(default)]
    pub matched_apps: i32,
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt as _;

    use super::*;

    fn session(yaml: &str) -> PolicySessionControls {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
    }

    #[test]
    fn content_types_are_checked_as_admission_does() {
        let cases: &[(&str, bool)] = &[
            ("application/zip", true),
            ("Application/Vnd.MS-Excel", true),
            (
                "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                true,
            ),
            ("video/*", true),
            ("application/x-7z-compressed", true),
            ("text/plain+json", true),
            ("", false),
            ("zip", false),
            ("application/", false),
            ("/zip", false),
            ("*/*", false),
            ("application/zip; charset=utf-8", false),
            ("application/zip/extra", false),
            ("application/-zip", false),
            ("application/z ip", false),
            ("application/zïp", false),
        ];
        let regex = MEDIA_TYPE;
        assert!(regex.starts_with('^') && regex.ends_with('$'));
        for (value, valid) in cases {
            let checked = ContentType(value.to_string()).check();
            assert_eq!(checked.is_ok(), *valid, "{value:?}: {checked:?}");
            if let Err(message) = checked {
                assert!(message.contains("type/subtype"), "{message}");
            }
        }
        for default in DEFAULT_DOWNLOAD_CONTENT_TYPES {
            assert!(
                ContentType(default.to_string()).check().is_ok(),
                "{default}"
            );
        }
    }

    #[test]
    fn content_types_match_ignoring_case_and_by_wildcard() {
        let zip = ContentType("Application/ZIP".to_owned());
        assert!(zip.matches("application/zip"));
        assert!(!zip.matches("application/zipx"));
        let video = ContentType("video/*".to_owned());
        assert!(video.matches("video/mp4"));
        assert!(video.matches("VIDEO/webm"));
        assert!(!video.matches("audio/mp4"));
        assert!(!video.matches("video"));
    }

    #[test]
    fn session_controls_read_with_defaults_and_write_only_what_is_set() {
        let all = session(
            "{monitor: true, readOnly: true, blockDownloads: true, downloadContentTypes: [application/pdf, video/*]}",
        );
        assert!(all.monitor && all.read_only && all.block_downloads);
        assert_eq!(
            all.download_content_types,
            [
                ContentType("application/pdf".to_owned()),
                ContentType("video/*".to_owned())
            ]
        );
        let none = session("{signInFrequency: 8h}");
        assert!(!none.monitor && !none.read_only && !none.block_downloads);
        assert!(none.download_content_types.is_empty());
        let written = serde_json::to_value(&none).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(written, serde_json::json!({"signInFrequency": "8h"}));
        let written = serde_json::to_value(&all).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(written["readOnly"], serde_json::json!(true));
        assert_eq!(written["blockDownloads"], serde_json::json!(true));
    }

    #[test]
    fn the_schema_validates_each_new_field() {
        let crd =
            serde_json::to_value(ConditionalAccessPolicy::crd()).unwrap_or_else(|e| panic!("{e}"));
        let session = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["session"];
        for field in ["monitor", "readOnly", "blockDownloads"] {
            assert_eq!(
                session["properties"][field]["type"],
                serde_json::json!("boolean"),
                "{field}: {session}"
            );
            assert!(
                session["properties"][field]["description"]
                    .as_str()
                    .is_some_and(|d| !d.is_empty()),
                "{field} has no description"
            );
        }
        let types = &session["properties"]["downloadContentTypes"];
        assert_eq!(types["maxItems"], serde_json::json!(64), "{types}");
        assert_eq!(types["x-kubernetes-list-type"], serde_json::json!("set"));
        let item_rules = types["items"]["x-kubernetes-validations"].to_string();
        assert!(item_rules.contains("type/subtype"), "{item_rules}");
        let rules = session["x-kubernetes-validations"].to_string();
        assert!(
            rules.contains("downloadContentTypes only counts with blockDownloads: true")
                && rules.contains(".downloadContentTypes"),
            "{rules}"
        );
    }
}
