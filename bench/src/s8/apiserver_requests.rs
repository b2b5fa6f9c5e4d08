//! What the apiserver was asked during the burst: the growth of its
//! `apiserver_request_total` counter, by resource and verb.

use std::collections::BTreeMap;

use crate::error::BenchError;

/// Requests served so far, by `"<resource>[/<subresource>] <VERB>"`.
pub type RequestCounts = BTreeMap<String, u64>;

/// The apiserver's request counters now, read from its `/metrics`.
pub async fn read(client: &kube::Client) -> Result<RequestCounts, BenchError> {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .map_err(|error| BenchError::Fixture {
            what: "the /metrics request".into(),
            message: error.to_string(),
        })?;
    let text = client
        .request_text(request)
        .await
        .map_err(BenchError::kube("reading the apiserver's /metrics"))?;
    Ok(parse(&text))
}

/// The counts that grew from `before` to `after`, by how much.
pub fn growth(before: &RequestCounts, after: &RequestCounts) -> RequestCounts {
    after
        .iter()
        .filter_map(|(key, count)| {
            let grown = count.saturating_sub(before.get(key).copied().unwrap_or(0));
            (grown > 0).then(|| (key.clone(), grown))
        })
        .collect()
}

/// Sums the `apiserver_request_total` samples of a Prometheus text exposition by
/// resource, subresource and verb (over codes, groups, versions and scopes).
fn parse(exposition: &str) -> RequestCounts {
    let mut counts = RequestCounts::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let label = |name: &str| {
            labels.split("\",").find_map(|pair| {
                let (key, value) = pair.split_once("=\"")?;
                (key.trim() == name).then(|| value.trim_end_matches('"').to_owned())
            })
        };
        let resource = label("resource").unwrap_or_default();
        if resource.is_empty() {
            continue; // non-resource URLs: /metrics, /healthz, discovery
        }
        let subresource = label("subresource").unwrap_or_default();
        let verb = label("verb").unwrap_or_default();
        let key = if subresource.is_empty() {
            format!("{resource} {verb}")
        } else {
            format!("{resource}/{subresource} {verb}")
        };
        *counts.entry(key).or_default() += value as u64;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_by_resource_subresource_and_verb() {
        let exposition = r#"# HELP apiserver_request_total [STABLE] Counter of apiserver requests
# TYPE apiserver_request_total counter
apiserver_request_total{code="201",component="apiserver",dry_run="",group="sallyport.dev",resource="publishedapps",scope="resource",subresource="",verb="APPLY",version="v1alpha1"} 990
apiserver_request_total{code="200",component="apiserver",dry_run="",group="sallyport.dev",resource="publishedapps",scope="resource",subresource="",verb="APPLY",version="v1alpha1"} 10
apiserver_request_total{code="200",component="apiserver",dry_run="",group="sallyport.dev",resource="publishedapps",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 1000
apiserver_request_total{code="200",component="",dry_run="",group="",resource="",scope="",subresource="/metrics",verb="GET",version=""} 3
apiserver_request_duration_seconds_bucket{le="0.1"} 7
"#;
        let counts = parse(exposition);
        assert_eq!(counts.get("publishedapps APPLY"), Some(&1000));
        assert_eq!(counts.get("publishedapps/status PATCH"), Some(&1000));
        assert_eq!(counts.len(), 2);

        let before = RequestCounts::from([("publishedapps APPLY".to_owned(), 400)]);
        let grown = growth(&before, &counts);
        assert_eq!(grown.get("publishedapps APPLY"), Some(&600));
        assert_eq!(grown.get("publishedapps/status PATCH"), Some(&1000));
    }
}
