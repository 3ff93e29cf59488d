//! Discovery service client, wire-compatible with siderolabs/discovery-client
//! as Talos uses it (spec `discovery-protocol.md` §1, §3, §5).
//!
//! Pure parts: [`endpoint`] (Talos endpoint URLs), [`backoff`] (reconnect
//! schedule), [`view`] (applying Watch messages).

pub mod backoff;
pub mod endpoint;
pub mod view;

pub use backoff::{Backoff, BackoffConfig};
pub use endpoint::{EndpointError, ServiceEndpoint};
pub use view::{DiscoveredAffiliate, WatchView};
