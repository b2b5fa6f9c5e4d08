//! The Sallyport API: the custom resources that platform engineers write in YAML.
//!
//! Group `sallyport.dev`, version `v1alpha1`:
//!
//! - [`PublishedApp`]: an internal web application published on an external HTTPS URL;
//! - [`ConnectorGroup`]: a set of connectors in one private network, and how they register;
//! - [`ConditionalAccessPolicy`]: who may reach which apps, from where, how authenticated;
//! - [`Connector`]: one registered connector, created by the system at registration.
//!
//! Every field carries a doc comment because that comment is what `kubectl explain`
//! prints. Server-side validation lives in the schema itself (OpenAPI constraints and CEL
//! rules in `x-kubernetes-validations`), so a malformed object is rejected at admission
//! with a message that names the field and says what is expected.

// Each `#[kube(printcolumn(type_ = ..))]` repeats keys that clippy mistakes for duplicates.
#![allow(clippy::duplicated_attributes)]

pub mod common;
pub mod conditional_access_policy;
pub mod connector;
pub mod connector_group;
pub mod crdgen;
pub mod duration;
pub mod fleet_config;
pub mod published_app;
pub mod registration;

pub use common::{ObjectReference, SecretKeyReference};
pub use conditional_access_policy::{
    ConditionalAccessPolicy, ConditionalAccessPolicySpec, ConditionalAccessPolicyStatus,
};
pub use connector::{Connector, ConnectorSpec, ConnectorStatus};
pub use connector_group::{ConnectorGroup, ConnectorGroupSpec, ConnectorGroupStatus};
pub use duration::Duration;
pub use fleet_config::{FleetConfig, GroupSlice};
pub use published_app::{PublishedApp, PublishedAppSpec, PublishedAppStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every Sallyport resource.
pub const GROUP: &str = "sallyport.dev";

/// The API version of this crate's types.
pub const VERSION: &str = "v1alpha1";

/// The `CustomResourceDefinition` of every Sallyport kind, in a stable order.
pub fn custom_resource_definitions() -> Vec<CustomResourceDefinition> {
    vec![
        ConditionalAccessPolicy::crd(),
        Connector::crd(),
        ConnectorGroup::crd(),
        PublishedApp::crd(),
    ]
}
