//! A registry held in memory: tokens given at start-up, records kept until the process
//! ends. For tests and the standalone proxy, where no Kubernetes API is at hand.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use futures::future::BoxFuture;
use time::OffsetDateTime;

use super::{
    ConnectorRecord, RecordEvent, RegistrationError, Registry, VersionReport, tokens_equal,
};

/// A registration token known from start-up.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticToken {
    /// The group it registers to, `namespace/name`.
    pub group_id: String,
    /// The token.
    pub token: String,
    /// When it stops being accepted; `None` never.
    pub expires_at: Option<OffsetDateTime>,
    /// How many registrations it allows; 0 is unlimited.
    pub max_uses: u32,
}

impl std::fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticToken")
            .field("group_id", &self.group_id)
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("max_uses", &self.max_uses)
            .finish()
    }
}

#[derive(Debug)]
struct Token {
    token: StaticToken,
    uses: u32,
}

/// A registry held in memory.
///
/// Unlike [`super::KubeRegistry`] it accepts the renewal of a connector it has no record
/// of: its records do not survive a restart, so it cannot tell a revoked connector from
/// one registered before the restart. Revocation then rests on the fleet
/// configuration's `revokedConnectors`, which the fleet API checks first.
#[derive(Debug, Default)]
pub struct MemoryRegistry {
    tokens: Mutex<Vec<Token>>,
    records: Mutex<BTreeMap<String, ConnectorRecord>>,
    versions: Mutex<BTreeMap<String, VersionReport>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemoryRegistry {
    /// A registry accepting `tokens`.
    pub fn new(tokens: Vec<StaticToken>) -> Self {
        Self {
            tokens: Mutex::new(
                tokens
                    .into_iter()
                    .map(|token| Token { token, uses: 0 })
                    .collect(),
            ),
            records: Mutex::new(BTreeMap::new()),
            versions: Mutex::new(BTreeMap::new()),
        }
    }

    /// The versions the connector `connector_id` (`namespace/name`) last reported.
    pub fn version_of(&self, connector_id: &str) -> Option<VersionReport> {
        lock(&self.versions).get(connector_id).cloned()
    }

    /// Every recorded connector, by connector id (`namespace/name`).
    pub fn records(&self) -> BTreeMap<String, ConnectorRecord> {
        lock(&self.records).clone()
    }

    /// The record of the connector `connector_id` (`namespace/name`).
    pub fn record_of(&self, connector_id: &str) -> Option<ConnectorRecord> {
        lock(&self.records).get(connector_id).cloned()
    }

    /// How many registrations used the tokens of `group_id`.
    pub fn uses(&self, group_id: &str) -> u32 {
        lock(&self.tokens)
            .iter()
            .filter(|t| t.token.group_id == group_id)
            .map(|t| t.uses)
            .sum()
    }

    /// Checks the token and, when `spend`, counts a use.
    fn redeem_now(
        &self,
        group_id: &str,
        presented: &str,
        now: OffsetDateTime,
        spend: bool,
    ) -> Result<(), RegistrationError> {
        let mut tokens = lock(&self.tokens);
        // Compare with every token of the group, so the time taken does not tell which
        // one matched.
        let mut matched = None;
        for (index, token) in tokens.iter().enumerate() {
            let equal = tokens_equal(presented, &token.token.token);
            if token.token.group_id == group_id && equal {
                matched = Some(index);
            }
        }
        let Some(token) = matched.and_then(|index| tokens.get_mut(index)) else {
            return Err(RegistrationError::TokenInvalid {
                group: group_id.to_owned(),
                detail: "no such token".to_owned(),
            });
        };
        if let Some(expires_at) = token.token.expires_at
            && expires_at <= now
        {
            return Err(RegistrationError::TokenExpired {
                group: group_id.to_owned(),
                expired_at: expires_at.to_string(),
            });
        }
        let max_uses = token.token.max_uses;
        if max_uses > 0 && token.uses >= max_uses {
            return Err(RegistrationError::TokenUsedUp {
                group: group_id.to_owned(),
                max_uses,
            });
        }
        if spend {
            token.uses = token.uses.saturating_add(1);
        }
        Ok(())
    }
}

impl Registry for MemoryRegistry {
    fn redeem<'a>(
        &'a self,
        group_id: &'a str,
        presented_token: &'a str,
    ) -> BoxFuture<'a, Result<(), RegistrationError>> {
        Box::pin(async move {
            self.redeem_now(group_id, presented_token, OffsetDateTime::now_utc(), true)
        })
    }

    fn check<'a>(
        &'a self,
        group_id: &'a str,
        presented_token: &'a str,
    ) -> BoxFuture<'a, Result<(), RegistrationError>> {
        Box::pin(async move {
            self.redeem_now(group_id, presented_token, OffsetDateTime::now_utc(), false)
        })
    }

    fn record(&self, record: ConnectorRecord) -> BoxFuture<'_, Result<(), RegistrationError>> {
        Box::pin(async move {
            let mut records = lock(&self.records);
            let id = record.identity.connector_id();
            let mut record = record;
            if record.event == RecordEvent::Renewed && record.hostname.is_none() {
                record.hostname = records.get(&id).and_then(|r| r.hostname.clone());
            }
            records.insert(id, record);
            Ok(())
        })
    }

    fn report_version(
        &self,
        report: VersionReport,
    ) -> BoxFuture<'_, Result<(), RegistrationError>> {
        Box::pin(async move {
            lock(&self.versions).insert(report.identity.connector_id(), report);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use sallyport_tunnel::ConnectorIdentity;

    use super::*;

    fn token(group: &str, token: &str, expires_in: Option<i64>, max_uses: u32) -> StaticToken {
        StaticToken {
            group_id: group.to_owned(),
            token: token.to_owned(),
            expires_at: expires_in.map(|s| OffsetDateTime::now_utc() + time::Duration::seconds(s)),
            max_uses,
        }
    }

    fn reason(result: Result<(), RegistrationError>) -> &'static str {
        result.err().map_or("Ok", |e| e.reason())
    }

    #[tokio::test]
    async fn tokens_are_checked_and_counted() {
        let registry = MemoryRegistry::new(vec![
            token("infra/east", "east-token", Some(3600), 2),
            token("infra/west", "west-token", None, 0),
            token("infra/old", "old-token", Some(-1), 0),
        ]);
        assert_eq!(
            reason(registry.redeem("infra/east", "east-token").await),
            "Ok"
        );
        assert_eq!(
            reason(registry.redeem("infra/east", "west-token").await),
            "TokenInvalid"
        );
        assert_eq!(
            reason(registry.redeem("infra/none", "east-token").await),
            "TokenInvalid"
        );
        assert_eq!(
            reason(registry.redeem("infra/east", "").await),
            "TokenInvalid"
        );
        assert_eq!(
            reason(registry.redeem("infra/old", "old-token").await),
            "TokenExpired"
        );
        assert_eq!(
            reason(registry.redeem("infra/east", "east-token").await),
            "Ok"
        );
        assert_eq!(
            reason(registry.redeem("infra/east", "east-token").await),
            "TokenUsedUp"
        );
        assert_eq!(registry.uses("infra/east"), 2);
        for _ in 0..5 {
            assert_eq!(
                reason(registry.redeem("infra/west", "west-token").await),
                "Ok"
            );
        }
        assert_eq!(registry.uses("infra/west"), 5);
    }

    #[tokio::test]
    async fn checks_spend_nothing() {
        let registry = MemoryRegistry::new(vec![
            token("infra/east", "east-token", Some(3600), 1),
            token("infra/old", "old-token", Some(-1), 0),
        ]);
        for _ in 0..3 {
            assert_eq!(
                reason(registry.check("infra/east", "east-token").await),
                "Ok"
            );
        }
        assert_eq!(registry.uses("infra/east"), 0);
        assert_eq!(
            reason(registry.check("infra/east", "wrong").await),
            "TokenInvalid"
        );
        assert_eq!(
            reason(registry.check("infra/none", "east-token").await),
            "TokenInvalid"
        );
        assert_eq!(
            reason(registry.check("infra/old", "old-token").await),
            "TokenExpired"
        );
        assert_eq!(
            reason(registry.redeem("infra/east", "east-token").await),
            "Ok"
        );
        assert_eq!(
            reason(registry.check("infra/east", "east-token").await),
            "TokenUsedUp"
        );
        assert_eq!(registry.uses("infra/east"), 1);
    }

    #[tokio::test]
    async fn renewals_keep_the_host_name() {
        let registry = MemoryRegistry::new(vec![]);
        let identity =
            ConnectorIdentity::new("infra", "east", "vm-1-abcde").unwrap_or_else(|e| panic!("{e}"));
        let now = OffsetDateTime::now_utc();
        let record = ConnectorRecord {
            event: RecordEvent::Registered,
            identity: identity.clone(),
            hostname: Some("vm-1".to_owned()),
            version: "0.1.0".to_owned(),
            serial_hex: "01".to_owned(),
            issued_at: now,
            not_after: now,
        };
        assert!(registry.record(record.clone()).await.is_ok());
        let renewed = ConnectorRecord {
            event: RecordEvent::Renewed,
            hostname: None,
            serial_hex: "02".to_owned(),
            ..record
        };
        assert!(registry.record(renewed).await.is_ok());
        let kept = registry.record_of("infra/vm-1-abcde");
        assert_eq!(
            kept.map(|r| (r.hostname, r.serial_hex)),
            Some((Some("vm-1".to_owned()), "02".to_owned()))
        );
    }
}
