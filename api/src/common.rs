//! Types and CEL rules shared by several Sallyport resources.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// RE2: a DNS-1123 subdomain, the form of Kubernetes object names and DNS host names.
pub(crate) const DNS_SUBDOMAIN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// What [`DNS_SUBDOMAIN`] expects, for messages.
pub(crate) const DNS_SUBDOMAIN_MESSAGE: &str = "must be a Kubernetes object name: lower-case letters, digits, '-' and '.', starting and ending with a letter or digit";

/// RE2: a DNS-1123 label, the form of namespace names.
pub(crate) const DNS_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// RE2: an HTTP header name as Sallyport accepts it in configuration.
pub(crate) const HEADER_NAME: &str = r"^[A-Za-z0-9][-A-Za-z0-9]*$";

/// The CEL expression `VAR.matches(r'REGEX')`.
pub(crate) fn matches(var: &str, regex: &str) -> String {
    format!("{var}.matches(r'{regex}')")
}

/// A reference to a named object of a known kind, optionally in another namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReference {
    /// Name of the referenced object.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(matches("self", DNS_SUBDOMAIN)).message(DNS_SUBDOMAIN_MESSAGE))]
    pub name: String,

    /// Namespace of the referenced object. Defaults to the namespace of the object that
    /// holds this reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new(matches("self", DNS_LABEL)).message("must be a namespace name: lower-case letters, digits and '-', starting and ending with a letter or digit"))]
    pub namespace: Option<String>,
}

/// A key of a Secret in the namespace of the object that holds this reference.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(matches("self", DNS_SUBDOMAIN)).message(DNS_SUBDOMAIN_MESSAGE))]
    pub name: String,

    /// Key within the Secret's data, for example `client-secret` or `ca.crt`.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(r"self.matches(r'^[-._a-zA-Z0-9]+$')").message("must be a Secret data key: letters, digits, '-', '_' and '.'"))]
    pub key: String,
}

/// Defines a string newtype whose schema carries a length limit and CEL rules, so that a
/// bad list entry is reported with its index (`spec.x.include[2]`) and rules stay cheap.
macro_rules! validated_string {
    ($(#[$doc:meta])* $name:ident, max_length = $max:expr, rules = [$(($rule:expr, $message:expr)),* $(,)?]) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The value as written.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn inline_schema() -> bool {
                true
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                let rules: Vec<serde_json::Value> = vec![
                    $(serde_json::json!({"rule": $rule, "message": $message})),*
                ];
                let mut schema = schemars::json_schema!({
                    "type": "string",
                    "minLength": 1,
                    "maxLength": $max,
                });
                if !rules.is_empty() {
                    schema.insert("x-kubernetes-validations".to_owned(), rules.into());
                }
                schema
            }
        }
    };
}
pub(crate) use validated_string;

validated_string!(
    /// The name of a Kubernetes object in the same namespace.
    ObjectName,
    max_length = 253,
    rules = [(matches("self", DNS_SUBDOMAIN), DNS_SUBDOMAIN_MESSAGE)]
);
