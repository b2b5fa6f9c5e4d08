//! Policies compiled for evaluation, and the policies of one app.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net};
use sallyport_api::conditional_access_policy::{
    ClientPlatform, ContentType, DEFAULT_DOWNLOAD_CONTENT_TYPES, IncludeExclude,
    PersistentBrowserSession, PolicyState, RequirementOperator, RiskLevel,
};
use sallyport_api::fleet_config::Policy;
use sallyport_api::published_app::Assignment;

use crate::context::MfaSettings;
use crate::time_window::CompiledWindow;

/// A policy that cannot be evaluated as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// A field holds a value the engine cannot use.
    #[error("ConditionalAccessPolicy {policy}: {field}: {message}")]
    Invalid {
        /// The policy's id, `namespace/name`.
        policy: String,
        /// The field, as a path in the policy's spec.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl CompileError {
    /// The id of the policy at fault.
    pub fn policy(&self) -> &str {
        match self {
            Self::Invalid { policy, .. } => policy,
        }
    }
}

/// Users or groups to include and exclude, folded for matching.
#[derive(Clone, Debug, Default)]
pub(crate) struct Members {
    /// `"*"` was included: every user, for groups as for users (a group list of `"*"`
    /// leaves no one out, whatever groups they have).
    pub everyone: bool,
    pub include: NameList,
    pub exclude: NameList,
}

/// Names, sorted for binary search: cheaper than hashing for the few names a policy
/// usually lists, and still logarithmic for a long list.
#[derive(Clone, Debug, Default)]
pub(crate) struct NameList(Vec<String>);

impl NameList {
    /// Whether `name` is in the list (exactly).
    pub fn contains(&self, name: &str) -> bool {
        self.0
            .binary_search_by(|listed| listed.as_str().cmp(name))
            .is_ok()
    }

    /// True when the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names, sorted.
    pub fn iter(&self) -> std::slice::Iter<'_, String> {
        self.0.iter()
    }
}

impl FromIterator<String> for NameList {
    fn from_iter<I: IntoIterator<Item = String>>(names: I) -> Self {
        let mut names: Vec<String> = names.into_iter().collect();
        names.sort_unstable();
        names.dedup();
        Self(names)
    }
}

impl<'a> IntoIterator for &'a NameList {
    type Item = &'a String;
    type IntoIter = std::slice::Iter<'a, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl Members {
    /// Users match ignoring ASCII case; groups (`fold = false`) exactly.
    fn new(list: &IncludeExclude, fold: bool) -> Self {
        let folded = |name: &String| {
            if fold {
                name.to_ascii_lowercase()
            } else {
                name.clone()
            }
        };
        Self {
            everyone: list.include.iter().any(|name| name == "*"),
            include: list
                .include
                .iter()
                .filter(|n| *n != "*")
                .map(folded)
                .collect(),
            exclude: list.exclude.iter().map(folded).collect(),
        }
    }
}

/// Client IP locations, parsed.
#[derive(Clone, Debug, Default)]
pub(crate) struct CompiledLocations {
    /// `Any` was included, or nothing was.
    pub any: bool,
    pub include: Vec<IpNet>,
    pub exclude: Vec<IpNet>,
}

/// `net` in the form client IPs are compared in: an IPv4-mapped IPv6 network
/// (`::ffff:192.0.2.0/120`) becomes the IPv4 network it maps (`192.0.2.0/24`), since
/// evaluation reads a mapped client IP as the IPv4 address it is.
fn canonical(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && let Some(prefix) = v6.prefix_len().checked_sub(96)
        && let Some(v4) = v6.network().to_ipv4_mapped()
        && let Ok(v4) = Ipv4Net::new(v4, prefix)
    {
        return IpNet::V4(v4);
    }
    net
}

/// The grant requirements of a policy.
#[derive(Clone, Debug)]
pub(crate) struct CompiledRequirements {
    pub operator: RequirementOperator,
    pub mfa: bool,
    /// Accepted `acr` values (one must match) and required `amr` methods (all must be
    /// present), when an authentication strength is required.
    pub strength: Option<(Vec<String>, Vec<String>)>,
    pub groups: Vec<String>,
}

/// One policy, ready to evaluate.
#[derive(Clone, Debug)]
pub(crate) struct CompiledPolicy {
    pub id: Arc<str>,
    pub report_only: bool,
    pub users: Members,
    pub groups: Members,
    pub locations: Option<CompiledLocations>,
    pub platforms: Vec<ClientPlatform>,
    pub sign_in_risk: Vec<RiskLevel>,
    pub user_risk: Vec<RiskLevel>,
    pub times: Vec<CompiledWindow>,
    pub block: bool,
    pub require: Option<CompiledRequirements>,
    pub sign_in_frequency: Option<std::time::Duration>,
    pub persistent_browser_session: Option<PersistentBrowserSession>,
    /// Session control `monitor`.
    pub monitor: bool,
    /// Session control `readOnly`.
    pub read_only: bool,
    /// Session control `blockDownloads`, with the media types that count as downloads
    /// (the policy's own, or [`DEFAULT_DOWNLOAD_CONTENT_TYPES`]); `None` when it does not
    /// block downloads.
    pub block_downloads: Option<Arc<[ContentType]>>,
    /// Why the policy could not be compiled: it then blocks everyone it names (an
    /// enforced policy that cannot be read fails closed).
    pub invalid: Option<String>,
}

impl CompiledPolicy {
    fn new(policy: &Policy) -> Result<Self, CompileError> {
        let id: Arc<str> = Arc::from(policy.id.as_str());
        let invalid = |field: String, message: String| CompileError::Invalid {
            policy: policy.id.clone(),
            field,
            message,
        };
        let conditions = &policy.conditions;
        let locations = match &conditions.locations {
            None => None,
            Some(locations) => {
                let mut compiled = CompiledLocations {
                    any: locations.include.is_empty(),
                    ..CompiledLocations::default()
                };
                for (index, location) in locations.include.iter().enumerate() {
                    if location.as_str() == "Any" {
                        compiled.any = true;
                        continue;
                    }
                    compiled
                        .include
                        .push(canonical(location.as_str().parse().map_err(|e| {
                            invalid(
                                format!("spec.conditions.locations.include[{index}]"),
                                format!("{:?} is not a CIDR: {e}", location.as_str()),
                            )
                        })?));
                }
                for (index, cidr) in locations.exclude.iter().enumerate() {
                    compiled
                        .exclude
                        .push(canonical(cidr.as_str().parse().map_err(|e| {
                            invalid(
                                format!("spec.conditions.locations.exclude[{index}]"),
                                format!("{:?} is not a CIDR: {e}", cidr.as_str()),
                            )
                        })?));
                }
                Some(compiled)
            }
        };
        let times = conditions
            .times
            .iter()
            .enumerate()
            .map(|(index, window)| CompiledWindow::new(&policy.id, index, window))
            .collect::<Result<Vec<_>, _>>()?;
        let session = policy.session.clone().unwrap_or_default();
        let sign_in_frequency = session
            .sign_in_frequency
            .as_ref()
            .map(|frequency| {
                frequency
                    .to_std()
                    .map_err(|e| invalid("spec.session.signInFrequency".to_owned(), e.to_string()))
            })
            .transpose()?;
        for (index, content_type) in session.download_content_types.iter().enumerate() {
            content_type.check().map_err(|message| {
                invalid(
                    format!("spec.session.downloadContentTypes[{index}]"),
                    message,
                )
            })?;
        }
        if !session.block_downloads && !session.download_content_types.is_empty() {
            return Err(invalid(
                "spec.session.downloadContentTypes".to_owned(),
                "only counts with blockDownloads: true".to_owned(),
            ));
        }
        let block_downloads = session.block_downloads.then(|| {
            if session.download_content_types.is_empty() {
                DEFAULT_DOWNLOAD_CONTENT_TYPES
                    .iter()
                    .map(|t| ContentType((*t).to_owned()))
                    .collect()
            } else {
                session.download_content_types.iter().cloned().collect()
            }
        });
        let require = policy.grant.require.as_ref().map(|r| CompiledRequirements {
            operator: r.operator,
            mfa: r.mfa,
            strength: r
                .authentication_strength
                .as_ref()
                .map(|s| (s.acr_values.clone(), s.amr.clone())),
            groups: r.groups.clone(),
        });
        Ok(Self {
            id,
            report_only: policy.state == PolicyState::ReportOnly,
            users: Members::new(&policy.assignments.users, true),
            groups: Members::new(&policy.assignments.groups, false),
            locations,
            platforms: conditions.client_platforms.clone(),
            sign_in_risk: conditions.sign_in_risk.clone(),
            user_risk: conditions.user_risk.clone(),
            times,
            block: policy.grant.block,
            require,
            sign_in_frequency,
            persistent_browser_session: session.persistent_browser_session,
            monitor: session.monitor,
            read_only: session.read_only,
            block_downloads,
            invalid: None,
        })
    }

    /// The stand-in for a policy that failed to compile: it keeps its assignments and
    /// blocks (an enforced policy) or reports a block (a report-only one).
    fn failed_closed(policy: &Policy, error: &CompileError) -> Self {
        Self {
            id: Arc::from(policy.id.as_str()),
            report_only: policy.state == PolicyState::ReportOnly,
            users: Members::new(&policy.assignments.users, true),
            groups: Members::new(&policy.assignments.groups, false),
            locations: None,
            platforms: Vec::new(),
            sign_in_risk: Vec::new(),
            user_risk: Vec::new(),
            times: Vec::new(),
            block: true,
            require: None,
            sign_in_frequency: None,
            persistent_browser_session: None,
            monitor: false,
            read_only: false,
            block_downloads: None,
            invalid: Some(error.to_string()),
        }
    }

    /// A policy the configuration names but does not hold: it blocks everyone.
    fn missing(id: &str) -> Self {
        let everyone = IncludeExclude {
            include: vec!["*".to_owned()],
            exclude: Vec::new(),
        };
        Self {
            id: Arc::from(id),
            report_only: false,
            users: Members::new(&everyone, true),
            groups: Members::default(),
            locations: None,
            platforms: Vec::new(),
            sign_in_risk: Vec::new(),
            user_risk: Vec::new(),
            times: Vec::new(),
            block: true,
            require: None,
            sign_in_frequency: None,
            persistent_browser_session: None,
            monitor: false,
            read_only: false,
            block_downloads: None,
            invalid: Some(format!(
                "ConditionalAccessPolicy {id} is applied to the app but missing from the configuration"
            )),
        }
    }

    /// The groups the policy names anywhere.
    fn named_groups(&self) -> impl Iterator<Item = &str> {
        self.groups
            .include
            .iter()
            .chain(&self.groups.exclude)
            .map(String::as_str)
            .chain(
                self.require
                    .iter()
                    .flat_map(|r| r.groups.iter().map(String::as_str)),
            )
    }
}

/// Every policy of a fleet configuration, compiled.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    by_id: HashMap<String, Arc<CompiledPolicy>>,
    /// Ids of the `Disabled` policies: left out of an app's policies, unlike ids the
    /// set does not hold at all.
    disabled: HashSet<String>,
    mfa: Arc<MfaSettings>,
}

impl PolicySet {
    /// Compiles `policies`. A policy that cannot be compiled is kept as one that blocks
    /// the users and groups it names (fail closed) and is reported in the errors; the
    /// operator rejects such policies before they reach a configuration, so errors here
    /// mean the operator and this engine disagree.
    pub fn compile(policies: &[Policy], mfa: MfaSettings) -> (Self, Vec<CompileError>) {
        let mut errors = Vec::new();
        let disabled = policies
            .iter()
            .filter(|policy| policy.state == PolicyState::Disabled)
            .map(|policy| policy.id.clone())
            .collect();
        let by_id = policies
            .iter()
            .filter(|policy| policy.state != PolicyState::Disabled)
            .map(|policy| {
                let compiled = CompiledPolicy::new(policy).unwrap_or_else(|error| {
                    let stand_in = CompiledPolicy::failed_closed(policy, &error);
                    errors.push(error);
                    stand_in
                });
                (policy.id.clone(), Arc::new(compiled))
            })
            .collect();
        let set = Self {
            by_id,
            disabled,
            mfa: Arc::new(mfa),
        };
        (set, errors)
    }

    /// Checks that `policy` compiles, for admission and status.
    pub fn check(policy: &Policy) -> Result<(), CompileError> {
        CompiledPolicy::new(policy).map(|_| ())
    }

    /// How many policies the set holds.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True when the set holds no policy.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The policies of app `app`: its `assignment` and the policies `policy_ids` (the
    /// route's list). An id the set does not hold blocks everyone (fail closed);
    /// disabled policies are left out.
    pub fn app(&self, app: &str, assignment: &Assignment, policy_ids: &[String]) -> AppPolicies {
        let policies = policy_ids
            .iter()
            .filter(|id| !self.disabled.contains(id.as_str()))
            .map(|id| {
                self.by_id
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(CompiledPolicy::missing(id)))
            })
            .collect();
        AppPolicies {
            app: Arc::from(app),
            assigned_users: assignment
                .users
                .iter()
                .map(|u| u.to_ascii_lowercase())
                .collect(),
            assigned_groups: assignment.groups.iter().cloned().collect(),
            policies,
            mfa: Arc::clone(&self.mfa),
        }
    }
}

/// The assignment and policies of one app, ready to evaluate sign-ins.
#[derive(Clone, Debug)]
pub struct AppPolicies {
    pub(crate) app: Arc<str>,
    pub(crate) assigned_users: NameList,
    pub(crate) assigned_groups: NameList,
    pub(crate) policies: Vec<Arc<CompiledPolicy>>,
    pub(crate) mfa: Arc<MfaSettings>,
}

impl AppPolicies {
    /// The app's id, `namespace/name`.
    pub fn app(&self) -> &str {
        &self.app
    }

    /// How many policies apply to the app (enabled and report-only).
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// True when no policy applies to the app.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Every group the app's assignment or policies name: the groups a session must keep
    /// when it has to drop some to fit its cookie.
    pub fn named_groups(&self) -> BTreeSet<&str> {
        self.assigned_groups
            .iter()
            .map(String::as_str)
            .chain(self.policies.iter().flat_map(|p| p.named_groups()))
            .collect()
    }
}
