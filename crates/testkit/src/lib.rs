//! `deploy-testkit`: what the test crates share (a dev-dependency only, never shipped).
//!
//! - [`hosts`]: extra, real Docker engines standing for cold target hosts, each in its own
//!   network namespace (`../shared/TEST-HOSTS.md`).

pub mod hosts;
