//! Errors of a reconcile.

/// A reconcile failed; the object is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    /// The operating system gave no random bytes for a token.
    #[error("cannot generate a registration token: {0}")]
    Random(getrandom::Error),
    /// Building the PKI failed.
    #[error(transparent)]
    Pki(crate::pki::build::PkiError),
    /// The fleet configuration could not be compiled.
    #[error("cannot compile the fleet configuration: {0}")]
    Compile(#[source] crate::compile::CompileError),
    /// The fleet configuration could not be encoded.
    #[error("cannot encode the fleet configuration: {0}")]
    FleetConfig(#[source] sallyport_api::fleet_config::FleetConfigError),
    /// The compressed configuration does not fit one ConfigMap.
    #[error(
        "the compressed fleet configuration is {bytes} bytes, over the {limit}-byte limit of one ConfigMap; the last stored configuration stays in force"
    )]
    FleetConfigTooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// A finalizer step failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Building a status or object as JSON failed.
    #[error("cannot serialize {what}: {source}")]
    Serialize {
        /// What was being serialized.
        what: &'static str,
        /// The serializer's error.
        source: serde_json::Error,
    },
}

impl Error {
    /// A short, stable label for metrics and Warning Events.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "api_error",
            Error::Kube(_) => "kube_client_error",
            Error::Serialize { .. } => "serialize_error",
            Error::Random(_) => "random_error",
            Error::Finalizer(_) => "finalizer_error",
            Error::Pki(_) => "pki_error",
            Error::Compile(_) => "compile_error",
            Error::FleetConfig(_) => "fleet_config_error",
            Error::FleetConfigTooLarge { .. } => "fleet_config_too_large",
        }
    }
}
