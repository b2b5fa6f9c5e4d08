//! Session controls on every request of a session: `readOnly`, `blockDownloads` and
//! `monitor` (`docs/conditional-access.md`).
//!
//! The gate's decision ([`crate::access::AccessControl::decide`], cached per session)
//! carries the controls of the enforced policies that apply
//! ([`sallyport_policy::RequestControls`]). For a request it lets through,
//! [`SessionControl::new`] takes them, and then:
//!
//! 1. [`SessionControl::refuse_request`]: under `readOnly`, a request whose method is
//!    not `GET`, `HEAD` or `OPTIONS`, or a WebSocket upgrade (its messages may write),
//!    is answered 403 naming the policy, and never reaches the app;
//! 2. [`SessionControl::filter_download`]: under `blockDownloads`, a response of the
//!    app that is a download (`Content-Disposition: attachment`, or a listed media type)
//!    is replaced by a 403 page naming the policy; the app's body is dropped unread,
//!    which resets its tunnel stream, so its bytes never reach the client;
//! 3. [`SessionControl::finish`]: under `monitor`, the answer's body is counted as it
//!    is sent, and when it is done (sent whole, or given up by the client) one
//!    `session.request` audit event is written ([`sallyport_events::audit`]): user,
//!    session, app, client IP, method, path (without the query, which may carry tokens
//!    or personal data), status, response bytes, request id and the policies asking for
//!    it. Bodies are never recorded.
//!
//! Refusals are counted in `sallyport_proxy_requests_limited_total` with `kind`
//! `session-read-only` and `session-download`.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use sallyport_events::{AuditEvent, ObjectRef, Outcome};
use sallyport_policy::{Decision, RequestControls};
use sallyport_tunnel::body::TunnelBody;
use tracing::info;

use crate::access::Subject;
use crate::pages;

/// The audit event's action: one request of a monitored session.
pub const SESSION_REQUEST_ACTION: &str = sallyport_events::audit::SESSION_REQUEST;

/// Why the proxy itself refused a request of a controlled session, as the audit event's
/// `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `readOnly`: a method other than `GET`, `HEAD`, `OPTIONS`.
    ReadOnly,
    /// `blockDownloads`: the app's answer was a download.
    DownloadBlocked,
}

impl Refusal {
    /// The reason's name in the audit event.
    pub fn reason(self) -> &'static str {
        match self {
            Self::ReadOnly => "ReadOnly",
            Self::DownloadBlocked => "DownloadBlocked",
        }
    }
}

/// The session controls in force on one request, and what monitoring records of it.
#[derive(Debug, Clone)]
pub struct SessionControl {
    controls: RequestControls,
    record: RequestRecord,
}

/// What a `session.request` audit event says of a request, apart from its answer.
#[derive(Debug, Clone)]
struct RequestRecord {
    app: Arc<str>,
    user: String,
    session: String,
    client_ip: IpAddr,
    method: String,
    path: String,
    request_id: String,
}

impl SessionControl {
    /// The controls `decision` puts on `subject`'s `request` to `app`; `None` when it
    /// puts none (the common case: nothing more to do).
    pub fn new<B>(
        decision: &Decision,
        app: &str,
        subject: &Subject,
        request: &Request<B>,
        request_id: &str,
    ) -> Option<Self> {
        let controls = &decision.session.request;
        if controls.is_empty() {
            return None;
        }
        Some(Self {
            controls: controls.clone(),
            record: RequestRecord {
                app: Arc::from(app),
                user: subject.session.user_name.clone(),
                session: subject.session.id.clone(),
                client_ip: subject.client_ip,
                method: request.method().as_str().to_owned(),
                path: request.uri().path().to_owned(),
                request_id: request_id.to_owned(),
            },
        })
    }

    /// Under `readOnly`, the 403 answer to a request that may write (`websocket`: it is
    /// a WebSocket upgrade); `None` when it may pass.
    pub fn refuse_request<B>(
        &self,
        request: &Request<B>,
        websocket: bool,
        accept: Option<&HeaderValue>,
    ) -> Option<Response<TunnelBody>> {
        let policy = self.controls.read_only.first()?;
        let method = request.method().as_str();
        if RequestControls::is_safe_method(method) && !websocket {
            return None;
        }
        let record = &self.record;
        info!(app = %record.app, user = %record.user, session = %record.session, request_id = %record.request_id, %method, %policy, "read-only session: request refused");
        crate::metrics::limited("session-read-only", &record.app);
        let what = if websocket {
            "WebSocket connections".to_owned()
        } else {
            format!("{method} requests")
        };
        let mut response = pages::error_response(
            accept,
            StatusCode::FORBIDDEN,
            "Read-only access",
            &format!(
                "Your session with this application is read-only under access policy {policy}: \
                 only viewing is allowed, so {what} are refused. Nothing was sent to the application."
            ),
            &record.request_id,
        );
        mark(&mut response, Refusal::ReadOnly);
        Some(response)
    }

    /// Under `blockDownloads`, the 403 answer replacing `response` when it is a
    /// download (`response` is then dropped here, body unread); else `response`.
    pub fn filter_download(
        &self,
        response: Response<TunnelBody>,
        accept: Option<&HeaderValue>,
    ) -> Response<TunnelBody> {
        let Some(policy) = self.controls.block_downloads.first() else {
            return response;
        };
        let text = |name: header::HeaderName| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
        };
        if !self.controls.is_download(
            text(header::CONTENT_DISPOSITION),
            text(header::CONTENT_TYPE),
        ) {
            return response;
        }
        let record = &self.record;
        info!(app = %record.app, user = %record.user, session = %record.session, request_id = %record.request_id, path = %record.path, %policy, status = response.status().as_u16(), "download blocked");
        crate::metrics::limited("session-download", &record.app);
        drop(response);
        let mut blocked = pages::error_response(
            accept,
            StatusCode::FORBIDDEN,
            "Download blocked",
            &format!(
                "Downloads from this application are blocked by access policy {policy}. \
                 You can keep browsing it; the file was not sent."
            ),
            &record.request_id,
        );
        mark(&mut blocked, Refusal::DownloadBlocked);
        blocked
    }

    /// The answer as sent: under `monitor`, its body counted and one audit event
    /// written once it is done.
    pub fn finish(&self, response: Response<TunnelBody>) -> Response<TunnelBody> {
        if !self.controls.monitors() {
            return response;
        }
        let status = response.status();
        let refusal = response.extensions().get::<Refusal>().copied();
        let monitor = Monitor {
            record: self.record.clone(),
            policies: self
                .controls
                .monitor
                .iter()
                .map(|p| p.to_string())
                .collect(),
            status,
            refusal,
            bytes: 0,
            ended: false,
        };
        response.map(|body| {
            http_body_util::BodyExt::boxed_unsync(MonitoredBody {
                inner: body,
                monitor,
            })
        })
    }
}

/// Marks a refusal of the proxy's own, for the audit event.
fn mark(response: &mut Response<TunnelBody>, refusal: Refusal) {
    response.extensions_mut().insert(refusal);
}

/// What is known of a monitored request's answer so far.
#[derive(Debug)]
struct Monitor {
    record: RequestRecord,
    policies: Vec<String>,
    status: StatusCode,
    refusal: Option<Refusal>,
    bytes: u64,
    ended: bool,
}

impl Monitor {
    /// The audit event of the request.
    fn event(&self) -> AuditEvent {
        let record = &self.record;
        let outcome = if self.refusal.is_some() {
            Outcome::Refused
        } else {
            Outcome::Success
        };
        let mut event = AuditEvent::new(
            SESSION_REQUEST_ACTION,
            ObjectRef::from_id("PublishedApp", &record.app),
            outcome,
        )
        .message(format!(
            "{} {} {} answered {}",
            record.user, record.method, record.path, self.status
        ))
        .source_address(Some(record.client_ip.to_string()))
        .detail("user", &record.user)
        .detail("sessionId", &record.session)
        .detail("clientIp", record.client_ip.to_string())
        .detail("method", &record.method)
        .detail("path", &record.path)
        .detail("status", self.status.as_u16())
        .detail("bytes", self.bytes)
        .detail("complete", self.ended)
        .detail("requestId", &record.request_id)
        .detail("policies", &self.policies);
        if let Some(refusal) = self.refusal {
            event = event.reason(refusal.reason());
        }
        event
    }
}

/// A response body that counts the bytes sent and writes the request's audit event when
/// it is dropped: after its end was sent, or when the client went away before.
struct MonitoredBody {
    inner: TunnelBody,
    monitor: Monitor,
}

impl Body for MonitoredBody {
    type Data = Bytes;
    type Error = sallyport_tunnel::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.monitor.bytes += u64::try_from(data.len()).unwrap_or(u64::MAX);
                }
            }
            Poll::Ready(None) => self.monitor.ended = true,
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MonitoredBody {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.monitor.ended = true;
        }
        sallyport_events::audit(self.monitor.event());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use sallyport_api::fleet_config::Policy;
    use sallyport_api::published_app::Assignment;
    use sallyport_identity::Session;
    use sallyport_policy::{MfaSettings, PolicySet};
    use sallyport_tunnel::body::full;

    use crate::access::AccessSettings;

    fn decision(session: serde_json::Value) -> Decision {
        let policy: Policy = serde_json::from_value(serde_json::json!({
            "id": "t/p", "state": "Enabled",
            "assignments": {"users": {"include": ["*"]}},
            "session": session,
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let (set, errors) = PolicySet::compile(&[policy], MfaSettings::default());
        assert!(errors.is_empty(), "{errors:?}");
        let app = set.app("team-a/wiki", &Assignment::default(), &["t/p".to_owned()]);
        app.evaluate(&subject().context(jiff::Timestamp::now()))
    }

    fn subject() -> Subject {
        let session = Session {
            id: "s-1".to_owned(),
            subject: "alice".to_owned(),
            user_name: "alice".to_owned(),
            display_name: None,
            email: None,
            groups: Vec::new(),
            groups_cut: false,
            claims: Default::default(),
            issuer: "https://idp".to_owned(),
            auth_time: 0,
            issued_at: 0,
            expires_at: u64::MAX,
            amr: Vec::new(),
            acr: None,
        };
        Subject::new(
            Arc::new(session),
            IpAddr::from([203, 0, 113, 9]),
            None,
            &AccessSettings::default(),
        )
    }

    fn request(method: &str, path: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn control(session: serde_json::Value, request: &Request<()>) -> Option<SessionControl> {
        SessionControl::new(
            &decision(session),
            "team-a/wiki",
            &subject(),
            request,
            "r-1",
        )
    }

    fn answer(headers: &[(&str, &'static str)], body: &'static str) -> Response<TunnelBody> {
        let mut response = Response::new(full(body));
        for (name, value) in headers {
            response.headers_mut().insert(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap_or_else(|e| panic!("{e}")),
                HeaderValue::from_static(value),
            );
        }
        response
    }

    async fn text(response: Response<TunnelBody>) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn no_controls_no_work() {
        assert!(
            control(
                serde_json::json!({"signInFrequency": "8h"}),
                &request("POST", "/x")
            )
            .is_none()
        );
    }

    #[tokio::test]
    async fn read_only_refuses_all_but_safe_methods_naming_the_policy() {
        for (method, websocket, refused) in [
            ("GET", false, false),
            ("HEAD", false, false),
            ("OPTIONS", false, false),
            ("POST", false, true),
            ("PUT", false, true),
            ("DELETE", false, true),
            ("PATCH", false, true),
            ("GET", true, true),
            ("CONNECT", true, true),
        ] {
            let request = request(method, "/form?x=1");
            let control = control(serde_json::json!({"readOnly": true}), &request)
                .unwrap_or_else(|| panic!("{method}: no control"));
            let answer = control.refuse_request(&request, websocket, None);
            assert_eq!(answer.is_some(), refused, "{method} websocket={websocket}");
            if let Some(answer) = answer {
                assert_eq!(answer.status(), StatusCode::FORBIDDEN);
                assert_eq!(
                    answer.extensions().get::<Refusal>(),
                    Some(&Refusal::ReadOnly)
                );
                let page = text(answer).await;
                assert!(page.contains("Read-only access"), "{page}");
                assert!(page.contains("t/p"), "{page}");
            }
        }
        // Without readOnly nothing is refused.
        let request = request("POST", "/");
        let monitored = control(serde_json::json!({"monitor": true}), &request)
            .unwrap_or_else(|| panic!("none"));
        assert!(monitored.refuse_request(&request, false, None).is_none());
    }

    #[tokio::test]
    async fn downloads_are_replaced_and_pages_pass() {
        let request = request("GET", "/files/report.zip");
        let control = control(serde_json::json!({"blockDownloads": true}), &request)
            .unwrap_or_else(|| panic!("none"));
        let page = answer(&[("content-type", "text/html")], "<p>page</p>");
        let page = control.filter_download(page, None);
        assert_eq!(page.status(), StatusCode::OK);
        assert!(page.extensions().get::<Refusal>().is_none());
        assert_eq!(text(page).await, "<p>page</p>");
        for headers in [
            &[("content-disposition", "attachment; filename=report.zip")][..],
            &[("content-type", "application/zip")][..],
        ] {
            let file = answer(headers, "SECRET FILE BYTES");
            let blocked = control.filter_download(file, None);
            assert_eq!(blocked.status(), StatusCode::FORBIDDEN, "{headers:?}");
            assert_eq!(
                blocked.extensions().get::<Refusal>(),
                Some(&Refusal::DownloadBlocked)
            );
            assert!(blocked.headers().get(header::CONTENT_DISPOSITION).is_none());
            let page = text(blocked).await;
            assert!(
                page.contains("Download blocked") && page.contains("t/p"),
                "{page}"
            );
            assert!(!page.contains("SECRET"), "{page}");
        }
    }

    #[tokio::test]
    async fn monitoring_counts_the_bytes_sent_and_leaves_the_body_alone() {
        let request = request("POST", "/form?token=secret");
        let control = control(serde_json::json!({"monitor": true}), &request)
            .unwrap_or_else(|| panic!("none"));
        assert_eq!(control.record.path, "/form", "the query is left out");
        let response = control.finish(answer(&[], "twelve bytes"));
        let collected = response
            .into_body()
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"twelve bytes"));
        // Not monitored: the answer is passed on as it is.
        let plain = SessionControl::new(
            &decision(serde_json::json!({"readOnly": true})),
            "team-a/wiki",
            &subject(),
            &request,
            "r-1",
        )
        .unwrap_or_else(|| panic!("none"));
        assert!(!plain.controls.monitors());

        // The count, frame by frame, and the end.
        let mut body = MonitoredBody {
            inner: full("twelve bytes"),
            monitor: Monitor {
                record: control.record.clone(),
                policies: vec!["t/p".to_owned()],
                status: StatusCode::OK,
                refusal: None,
                bytes: 0,
                ended: false,
            },
        };
        while let Some(frame) = body.frame().await {
            frame.unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(body.monitor.bytes, 12);
        assert!(body.monitor.ended);

        let mut monitor = Monitor {
            record: control.record.clone(),
            policies: vec!["t/p".to_owned()],
            status: StatusCode::FORBIDDEN,
            refusal: Some(Refusal::DownloadBlocked),
            bytes: 42,
            ended: true,
        };
        let event = monitor.event();
        assert_eq!(event.action, "session.request");
        assert_eq!(
            event.object,
            ObjectRef::namespaced("PublishedApp", "team-a", "wiki")
        );
        assert_eq!(event.outcome, Outcome::Refused);
        assert_eq!(event.reason.as_deref(), Some("DownloadBlocked"));
        let details = serde_json::Value::Object(event.details.clone());
        assert_eq!(
            details,
            serde_json::json!({
                "user": "alice", "sessionId": "s-1", "clientIp": "203.0.113.9",
                "method": "POST", "path": "/form", "status": 403, "bytes": 42,
                "complete": true, "requestId": "r-1", "policies": ["t/p"],
            })
        );
        monitor.refusal = None;
        assert_eq!(monitor.event().outcome, Outcome::Success);
        assert!(monitor.event().reason.is_none());
    }
}
