//! Sallyport's OpenID Connect relying party, built on the `openidconnect` crate (an
//! implementation of the specification's relying-party side with strongly typed
//! discovery, PKCE, nonce and ID token validation, so none of that is hand-written here).
//!
//! - [`ProviderHttpClient`]: HTTPS to providers, the system roots plus the fleet's extra
//!   CAs, a timeout and a size cap on every exchange.
//! - [`Provider`]: one discovered provider; starts sign-ins (authorization code + PKCE
//!   S256, `state`, `nonce`, step-up parameters) and finishes them (code exchange, ID
//!   token validation with key rotation handled by fetching the key set again).
//! - [`Providers`]: the providers of a fleet, discovered on first use.

pub mod http;
pub mod provider;

pub use http::{HttpError, ProviderHttpClient};
pub use provider::{
    AuthenticationRequirements, ClientSettings, OidcError, Provider, Providers, SignInSecrets,
    SignedIn,
};
