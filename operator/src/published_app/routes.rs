//! Route ownership: when two PublishedApps claim the same host, port and path prefix, the
//! older one keeps it.

use kube::ResourceExt;
use sallyport_api::PublishedApp;

use crate::external_url::ExternalUrl;

/// The order in which apps claim routes: older first, then by namespace and name so the
/// outcome never depends on list order.
fn claim_order(app: &PublishedApp) -> (Option<k8s_openapi::jiff::Timestamp>, String, String) {
    (
        app.creation_timestamp().map(|t| t.0),
        app.namespace().unwrap_or_default(),
        app.name_any(),
    )
}

/// `namespace/name` of the app among `others` that holds `app`'s route before it, if any.
/// Apps being deleted hold nothing.
pub fn route_holder<'a>(
    app: &PublishedApp,
    others: impl IntoIterator<Item = &'a PublishedApp>,
) -> Option<String> {
    let route = ExternalUrl::parse(&app.spec.external_url).ok()?;
    let mine = claim_order(app);
    others
        .into_iter()
        .filter(|other| other.namespace() != app.namespace() || other.name_any() != app.name_any())
        .filter(|other| other.metadata.deletion_timestamp.is_none())
        .filter(|other| ExternalUrl::parse(&other.spec.external_url).is_ok_and(|r| r == route))
        .map(|other| (claim_order(other), other))
        .filter(|(order, _)| *order < mine)
        .min_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, holder)| {
            format!(
                "{}/{}",
                holder.namespace().unwrap_or_default(),
                holder.name_any()
            )
        })
}

/// Whether two apps claim the same route, for mapping a change of one to the other.
pub fn same_route(a: &PublishedApp, b: &PublishedApp) -> bool {
    match (
        ExternalUrl::parse(&a.spec.external_url),
        ExternalUrl::parse(&b.spec.external_url),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(namespace: &str, name: &str, created: &str, url: &str) -> PublishedApp {
        let yaml = format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: PublishedApp\nmetadata: {{name: {name}, namespace: {namespace}, uid: {namespace}-{name}, creationTimestamp: '{created}'}}\nspec: {{externalUrl: '{url}', internalUrl: 'http://x.corp/', connectorGroup: {{name: dc}}}}\n"
        );
        serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_older_app_keeps_the_route() {
        let old = app(
            "team-b",
            "old",
            "2026-01-01T00:00:00Z",
            "https://wiki.example.com/",
        );
        let new = app(
            "team-a",
            "new",
            "2026-02-01T00:00:00Z",
            "https://WIKI.example.com",
        );
        let other_path = app(
            "team-c",
            "docs",
            "2025-01-01T00:00:00Z",
            "https://wiki.example.com/docs/",
        );
        let all = [old.clone(), new.clone(), other_path];
        assert_eq!(route_holder(&new, &all).as_deref(), Some("team-b/old"));
        assert_eq!(route_holder(&old, &all), None);
    }

    #[test]
    fn ties_are_broken_by_namespace_and_name() {
        let a = app(
            "team-a",
            "a",
            "2026-01-01T00:00:00Z",
            "https://wiki.example.com/",
        );
        let b = app(
            "team-b",
            "b",
            "2026-01-01T00:00:00Z",
            "https://wiki.example.com/",
        );
        let all = [a.clone(), b.clone()];
        assert_eq!(route_holder(&b, &all).as_deref(), Some("team-a/a"));
        assert_eq!(route_holder(&a, &all), None);
    }

    #[test]
    fn an_app_being_deleted_releases_its_route() {
        let mut old = app(
            "team-b",
            "old",
            "2026-01-01T00:00:00Z",
            "https://wiki.example.com/",
        );
        old.metadata.deletion_timestamp = old.metadata.creation_timestamp.clone();
        let new = app(
            "team-a",
            "new",
            "2026-02-01T00:00:00Z",
            "https://wiki.example.com/",
        );
        assert_eq!(route_holder(&new, [&old, &new]), None);
    }
}
