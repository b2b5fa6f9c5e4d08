//! The decision for one sign-in, from the compiled fleet configuration, exactly as the
//! proxies reach it.

use sallyport_api::FleetConfig;
use sallyport_api::fleet_config::Route;
use sallyport_api::published_app::PreAuthenticationType;
use sallyport_policy::{CompileError, Decision, MfaSettings, PolicySet, SignInContext};

use super::WhatIfError;
use crate::compile::Skipped;

/// The decision for a sign-in to one app, with what it was made from.
#[derive(Debug)]
pub struct Answer<'a> {
    /// The app's route in the configuration.
    pub route: &'a Route,
    /// The engine's decision.
    pub decision: Decision,
    /// Policies the engine could not compile (it blocks for them, failing closed). Empty
    /// unless the operator and the engine disagree: the compile step refuses such
    /// policies.
    pub compile_errors: Vec<CompileError>,
}

/// Decides `sign_in` for the app `app` (`namespace/name`) of `config`, as a proxy of the
/// fleet does: every policy of the configuration compiled with the fleet's `mfa`
/// settings, then the app's assignment and the route's policies. `skipped` (the objects
/// the compile step left out) explains an app without a route.
pub fn decide<'a>(
    config: &'a FleetConfig,
    skipped: &[Skipped],
    app: &str,
    mfa: MfaSettings,
    sign_in: &SignInContext<'_>,
) -> Result<Answer<'a>, WhatIfError> {
    let Some(route) = config.route(app) else {
        return Err(
            match skipped
                .iter()
                .find(|s| s.kind == "PublishedApp" && s.id == app)
            {
                Some(skipped) => WhatIfError::AppNotServed {
                    app: app.to_owned(),
                    reason: skipped.reason,
                    message: skipped.message.clone(),
                },
                None => WhatIfError::AppNotFound {
                    app: app.to_owned(),
                },
            },
        );
    };
    if route.pre_authentication.kind != PreAuthenticationType::Oidc {
        return Err(WhatIfError::Passthrough {
            app: app.to_owned(),
        });
    }
    let (set, compile_errors) = PolicySet::compile(&config.policies, mfa);
    let policies = set.app(&route.app, &route.assignment, &route.policies);
    Ok(Answer {
        route,
        decision: policies.evaluate(sign_in),
        compile_errors,
    })
}
