//! The fleet's identity keys, kept current in the [`Authenticator`]: the session key ring
//! (Secret `sallyport-session-keys`, key `keys.json`) and the assertion signing keys
//! (Secret `sallyport-assertion-signing`, key `key.pem`), both made and rotated by the
//! operator in the fleet's namespace. Standalone, they are files laid out like Secrets
//! under `--tls-dir`; when absent there, the proxy makes throw-away keys (sessions then
//! end with the process and are not shared with other replicas) and says so.

use std::sync::Arc;
use std::time::Duration;

use sallyport_identity::{AssertionKeys, SessionKeys, unix_now};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::app_tls::SecretSource;
use crate::auth::Authenticator;

/// The Secret holding the session key ring.
pub const SESSION_KEYS_SECRET: &str = "sallyport-session-keys";
/// Its key.
pub const SESSION_KEYS_KEY: &str = "keys.json";
/// The Secret holding the assertion signing keys.
pub const ASSERTION_SECRET: &str = "sallyport-assertion-signing";
/// Its key.
pub const ASSERTION_KEY: &str = "key.pem";

/// How often the keys are read again (the operator rotates them).
pub const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// Where the keys come from and what happens when they are missing.
#[derive(Clone)]
pub struct KeySource {
    /// Secrets (cluster) or a directory laid out like them (standalone).
    pub secrets: SecretSource,
    /// The fleet's namespace.
    pub namespace: String,
    /// Make throw-away keys when none can be read (standalone only).
    pub ephemeral_fallback: bool,
}

/// Loads the keys once; returns whether both are loaded.
pub async fn load(auth: &Authenticator, source: &KeySource, first: bool) -> bool {
    let mut complete = true;
    match source
        .secrets
        .read_key(&source.namespace, SESSION_KEYS_SECRET, SESSION_KEYS_KEY)
        .await
        .map_err(|e| e.to_string())
        .and_then(|bytes| String::from_utf8(bytes).map_err(|e| e.to_string()))
        .and_then(|text| SessionKeys::parse(&text).map_err(|e| e.to_string()))
    {
        Ok(keys) => {
            if first {
                info!(active = %keys.active_id(), keys = keys.ids().count(), "session keys loaded");
            }
            auth.set_session_keys(keys);
        }
        Err(error) if first && source.ephemeral_fallback => match SessionKeys::generate(unix_now())
        {
            Ok(keys) => {
                warn!(%error, "no session keys to read; using throw-away keys: sessions end with this process and other replicas cannot open them");
                auth.set_session_keys(keys);
            }
            Err(generate) => {
                warn!(%error, %generate, "no session keys; sign-in is unavailable");
                complete = false;
            }
        },
        Err(error) => {
            if first || !auth.has_session_keys() {
                warn!(secret = SESSION_KEYS_SECRET, key = SESSION_KEYS_KEY, %error, "cannot read the session keys; sign-in is unavailable until they can be read");
                complete = false;
            } else {
                warn!(secret = SESSION_KEYS_SECRET, %error, "cannot read the session keys again; keeping the ones loaded");
            }
        }
    }
    match source
        .secrets
        .read_key(&source.namespace, ASSERTION_SECRET, ASSERTION_KEY)
        .await
        .map_err(|e| e.to_string())
        .and_then(|bytes| String::from_utf8(bytes).map_err(|e| e.to_string()))
        .and_then(|text| AssertionKeys::from_pem(&text).map_err(|e| e.to_string()))
    {
        Ok(keys) => {
            if first {
                info!(kid = %keys.kid(), "assertion signing keys loaded");
            }
            auth.set_assertion_keys(keys);
        }
        Err(error) if first && source.ephemeral_fallback => {
            match AssertionKeys::generate_pem().and_then(|pem| AssertionKeys::from_pem(&pem)) {
                Ok(keys) => {
                    warn!(%error, kid = %keys.kid(), "no assertion signing key to read; using a throw-away key");
                    auth.set_assertion_keys(keys);
                }
                Err(generate) => {
                    warn!(%error, %generate, "no assertion signing key; assertions are left out");
                    complete = false;
                }
            }
        }
        Err(error) => {
            if first || !auth.has_assertion_keys() {
                warn!(secret = ASSERTION_SECRET, key = ASSERTION_KEY, %error, "cannot read the assertion signing keys; assertions are left out until they can be read");
                complete = false;
            } else {
                warn!(secret = ASSERTION_SECRET, %error, "cannot read the assertion signing keys again; keeping the ones loaded");
            }
        }
    }
    complete
}

/// Reads the keys again every [`RELOAD_EVERY`] until `shutdown` (not when the first
/// load fell back to throw-away keys: there is nothing to follow then).
pub async fn follow(auth: Arc<Authenticator>, source: KeySource, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(RELOAD_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
        load(&auth, &source, false).await;
    }
}
