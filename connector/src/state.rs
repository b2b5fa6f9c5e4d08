//! What a connector keeps across restarts so it does not register anew: its identity,
//! certificate chain, private key, the fleet's root CA and when to renew.
//!
//! It is kept in one of two [`StateStore`]s:
//!
//! - **On disk** (standalone, [`DiskState`]): one file, [`STATE_FILE`], in the state
//!   directory, readable by the connector's user only (mode 0600, directory 0700). One
//!   file, replaced atomically (written to a temporary file, flushed, renamed over the old
//!   one), means a crash never leaves a key beside a certificate it does not belong to.
//! - **In a Secret** (in a cluster, [`SecretState`]): the same document in one of the
//!   group's state slot Secrets, claimed by the pod; see [`crate::state_secret`].

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;

use rustls_pki_types::CertificateDer;
use sallyport_tunnel::ConnectorIdentity;
use sallyport_tunnel::tls::{Credentials, TlsError, certificates_from_pem};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::state_secret::{SecretState, SecretStateError};

/// The state file's name inside the state directory.
pub const STATE_FILE: &str = "connector-state.json";

/// The state file's permissions: the connector's user only.
pub const STATE_FILE_MODE: u32 = 0o600;

/// The state directory's permissions when the connector creates it.
pub const STATE_DIR_MODE: u32 = 0o700;

/// A registered connector's credentials and schedule.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorState {
    /// The connector's id, `namespace/name` of its `Connector` object.
    pub connector_id: String,
    /// Its ConnectorGroup, `namespace/name`.
    pub group_id: String,
    /// PEM: its client certificate followed by the issuer's.
    pub chain_pem: String,
    /// PEM: its private key (PKCS#8).
    pub key_pem: String,
    /// PEM: the fleet's root CA, the only root the connector trusts.
    pub ca_pem: String,
    /// When the certificate expires.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// When to ask for a new certificate.
    #[serde(with = "time::serde::rfc3339")]
    pub renew_at: OffsetDateTime,
}

impl std::fmt::Debug for ConnectorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorState")
            .field("connector_id", &self.connector_id)
            .field("group_id", &self.group_id)
            .field("key_pem", &"<redacted>")
            .field("not_after", &self.not_after)
            .field("renew_at", &self.renew_at)
            .finish_non_exhaustive()
    }
}

impl ConnectorState {
    /// The client certificate chain and key, for TLS.
    pub fn credentials(&self) -> Result<Credentials, TlsError> {
        Credentials::from_pem(
            "connector certificate",
            self.chain_pem.as_bytes(),
            self.key_pem.as_bytes(),
        )
    }

    /// The fleet's root CA certificates.
    pub fn ca(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        certificates_from_pem("fleet root CA", self.ca_pem.as_bytes())
    }

    /// The identity the certificate carries.
    pub fn identity(&self) -> Result<ConnectorIdentity, String> {
        let chain = certificates_from_pem("connector certificate", self.chain_pem.as_bytes())
            .map_err(|e| e.to_string())?;
        let leaf = chain
            .first()
            .ok_or_else(|| "the chain holds no certificate".to_owned())?;
        ConnectorIdentity::from_certificate_der(leaf).map_err(|e| e.to_string())
    }

    /// Whether the certificate should be renewed at `now`.
    pub fn needs_renewal(&self, now: OffsetDateTime) -> bool {
        now >= self.renew_at
    }

    /// Whether the certificate has expired at `now`: only a new registration helps.
    pub fn expired(&self, now: OffsetDateTime) -> bool {
        now >= self.not_after
    }
}

/// The state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading the state file failed.
    #[error("cannot read the connector state {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The state file is not a connector state.
    #[error("the connector state {path} is unreadable ({source}); remove it to register again")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// Writing the state failed.
    #[error("cannot write the connector state {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The state could not be serialized.
    #[error("cannot serialize the connector state: {0}")]
    Serialize(#[source] serde_json::Error),
    /// The state Secret could not be claimed, read or written.
    #[error(transparent)]
    Secret(#[from] SecretStateError),
}

/// Where the connector keeps its state: the flags shared by `run` and `register`.
#[derive(Debug, Args, Clone)]
pub struct StateArgs {
    /// Where the connector keeps its key, certificate and identity (outside Kubernetes):
    /// the file `connector-state.json` in this directory, mode 0600.
    #[arg(
        long,
        env = "SALLYPORT_STATE_DIR",
        default_value = "/var/lib/sallyport"
    )]
    pub state_dir: PathBuf,

    /// In Kubernetes, instead of --state-dir: keep the state in one of these Secrets
    /// ("state slots", comma-separated), which the operator makes for a ConnectorGroup's
    /// connector Deployment and sets here. The connector claims a free slot (its own
    /// after a restart; else one with credentials, whose identity it reuses; else an empty
    /// one, which it registers into), renews the claim while it runs and releases it when
    /// it stops. Needs get and patch on exactly these Secrets (in-cluster ServiceAccount or
    /// KUBECONFIG).
    #[arg(
        long,
        env = "SALLYPORT_STATE_SECRETS",
        value_delimiter = ',',
        value_name = "SECRET,...",
        conflicts_with = "state_dir"
    )]
    pub state_secrets: Vec<String>,

    /// With --state-secrets: the name this connector claims a slot under, its pod name
    /// (downward API). A restarted container with the same name takes its slot back at
    /// once. Defaults to the host name, which is the pod name in Kubernetes.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// With --state-secrets: the namespace of the Secrets. Defaults to the namespace of
    /// the in-cluster ServiceAccount or of the KUBECONFIG context.
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
}

/// Where the state is kept: a directory, or a claimed state Secret.
#[derive(Debug, Clone)]
pub enum StateStore {
    /// The state file in a directory (standalone).
    Disk(DiskState),
    /// A claimed state slot Secret (in a cluster).
    Secret(Arc<SecretState>),
}

impl StateStore {
    /// The store `args` ask for. With state Secrets this claims a slot, waiting while all
    /// are held by live pods (until `shutdown`), and keeps the claim until
    /// [`StateStore::release`]; losing the claim later cancels `shutdown`.
    pub async fn open(args: &StateArgs, shutdown: &CancellationToken) -> Result<Self, StateError> {
        if args.state_secrets.is_empty() {
            return Ok(Self::Disk(DiskState::new(&args.state_dir)));
        }
        let client = kube::Client::try_default()
            .await
            .map_err(|e| SecretStateError::Client(Box::new(e)))?;
        let namespace = args
            .pod_namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let pod = args
            .pod_name
            .clone()
            .filter(|n| !n.is_empty())
            .or_else(|| hostname::get().ok().and_then(|h| h.into_string().ok()))
            .unwrap_or_else(|| "connector".to_owned());
        let claimed =
            SecretState::claim(client, &namespace, &args.state_secrets, &pod, shutdown).await?;
        Ok(Self::Secret(claimed))
    }

    /// The saved state; `None` when nothing was registered into this store yet.
    pub async fn load(&self) -> Result<Option<ConnectorState>, StateError> {
        match self {
            Self::Disk(disk) => disk.load(),
            Self::Secret(secret) => Ok(secret.load().await?),
        }
    }

    /// Saves `state`, replacing what was saved before.
    pub async fn save(&self, state: &ConnectorState) -> Result<(), StateError> {
        match self {
            Self::Disk(disk) => disk.save(state),
            Self::Secret(secret) => Ok(secret.save(state).await?),
        }
    }

    /// Lets go of the store when the connector stops cleanly: a state Secret is released
    /// for the next pod, credentials kept.
    pub async fn release(&self) {
        if let Self::Secret(secret) = self {
            secret.release().await;
        }
    }

    /// An error when the store was taken away while the connector ran (a state Secret
    /// another pod claimed after this one's claim lapsed).
    pub fn check(&self) -> Result<(), StateError> {
        match self {
            Self::Secret(secret) => secret.lost().map_or(Ok(()), |e| Err(e.into())),
            Self::Disk(_) => Ok(()),
        }
    }
}

impl std::fmt::Display for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Disk(disk) => write!(f, "{}", disk.path().display()),
            Self::Secret(secret) => write!(f, "Secret {}", secret.secret()),
        }
    }
}

/// The connector state kept in a directory on disk.
#[derive(Debug, Clone)]
pub struct DiskState {
    dir: PathBuf,
}

impl DiskState {
    /// The state kept in `dir` (created on first save).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The state file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The saved state; `None` when the connector never registered here.
    pub fn load(&self) -> Result<Option<ConnectorState>, StateError> {
        let path = self.path();
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(source) if source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        if let Ok(metadata) = std::fs::metadata(&path) {
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                warn!(path = %path.display(), mode = format!("{mode:o}"), "the connector state, which holds its private key, is readable by others; it is rewritten 0600 at the next renewal");
            }
        }
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| StateError::Parse { path, source })
    }

    /// Saves `state`, replacing the previous one atomically.
    pub fn save(&self, state: &ConnectorState) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(state).map_err(StateError::Serialize)?;
        let write = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Write { path, source }
        };
        DirBuilder::new()
            .recursive(true)
            .mode(STATE_DIR_MODE)
            .create(&self.dir)
            .map_err(write(&self.dir))?;
        let path = self.path();
        let temporary = self.dir.join(format!(
            ".{STATE_FILE}.{}.{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(STATE_FILE_MODE)
                .open(&temporary)
                .map_err(write(&temporary))?;
            // The mode given at creation is filtered by the umask; set it exactly.
            file.set_permissions(std::fs::Permissions::from_mode(STATE_FILE_MODE))
                .map_err(write(&temporary))?;
            file.write_all(&json).map_err(write(&temporary))?;
            file.sync_all().map_err(write(&temporary))?;
            std::fs::rename(&temporary, &path).map_err(write(&path))?;
            // Make the rename itself durable.
            File::open(&self.dir)
                .and_then(|dir| dir.sync_all())
                .map_err(write(&self.dir))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(id: &str) -> ConnectorState {
        let at = |s: i64| OffsetDateTime::from_unix_timestamp(s).unwrap_or_else(|e| panic!("{e}"));
        ConnectorState {
            connector_id: id.to_owned(),
            group_id: "infra/east".to_owned(),
            chain_pem: "chain".to_owned(),
            key_pem: "secret key".to_owned(),
            ca_pem: "ca".to_owned(),
            not_after: at(1_800_000_000),
            renew_at: at(1_790_000_000),
        }
    }

    #[test]
    fn saves_and_loads_atomically_and_privately() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = DiskState::new(dir.path().join("state"));
        assert!(matches!(store.load(), Ok(None)));

        let first = state("infra/vm-1-abcde");
        store.save(&first).unwrap_or_else(|e| panic!("{e}"));
        let mode = std::fs::metadata(store.path())
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_default();
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(dir.path().join("state"))
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_default();
        assert_eq!(dir_mode, 0o700);
        assert_eq!(store.load().ok().flatten(), Some(first));

        let second = state("infra/vm-1-fghij");
        store.save(&second).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.load().ok().flatten(), Some(second));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(leftovers, [STATE_FILE], "no temporary file is left behind");

        let text = std::fs::read_to_string(store.path()).unwrap_or_default();
        assert!(
            text.contains("\"notAfter\": \"2027-01-15T08:00:00Z\""),
            "{text}"
        );
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = DiskState::new(dir.path());
        std::fs::write(store.path(), "{").unwrap_or_else(|e| panic!("{e}"));
        let error = store
            .load()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            error.contains(&store.path().display().to_string()),
            "{error}"
        );

        let blocked = DiskState::new(store.path().join("below-a-file"));
        let error = blocked.save(&state("infra/a")).err().map(|e| e.to_string());
        assert!(error.unwrap_or_default().contains("below-a-file"));
    }

    #[test]
    fn the_key_stays_out_of_debug_output() {
        let text = format!("{:?}", state("infra/a"));
        assert!(!text.contains("secret key"), "{text}");
    }

    #[derive(Debug, clap::Parser)]
    struct Flags {
        #[command(flatten)]
        state: StateArgs,
    }

    #[test]
    fn state_secrets_and_a_state_dir_exclude_each_other() {
        use clap::Parser;
        let flags = Flags::try_parse_from([
            "c",
            "--state-secrets",
            "dc-connector-state-0,dc-connector-state-1",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            flags.state.state_secrets,
            ["dc-connector-state-0", "dc-connector-state-1"]
        );
        let error = Flags::try_parse_from(["c", "--state-secrets", "s-0", "--state-dir", "/x"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("cannot be used with"), "{error}");
        let disk = Flags::try_parse_from(["c"]).unwrap_or_else(|e| panic!("{e}"));
        assert!(disk.state.state_secrets.is_empty());
        assert_eq!(disk.state.state_dir, Path::new("/var/lib/sallyport"));
    }

    #[tokio::test]
    async fn without_state_secrets_the_store_is_the_directory() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let args = StateArgs {
            state_dir: dir.path().to_owned(),
            state_secrets: vec![],
            pod_name: None,
            pod_namespace: None,
        };
        let store = StateStore::open(&args, &CancellationToken::new())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(store.load().await, Ok(None)));
        store
            .save(&state("infra/a"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.load().await.ok().flatten(), Some(state("infra/a")));
        store.release().await;
        assert!(store.check().is_ok());
        assert!(store.to_string().ends_with(STATE_FILE), "{store}");
    }

    #[test]
    fn renewal_and_expiry_follow_the_schedule() {
        let s = state("infra/a");
        assert!(!s.needs_renewal(s.renew_at - time::Duration::seconds(1)));
        assert!(s.needs_renewal(s.renew_at));
        assert!(!s.expired(s.renew_at));
        assert!(s.expired(s.not_after));
    }
}
