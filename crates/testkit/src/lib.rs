//! `deploy-testkit`: what the test crates share (a dev-dependency only, never shipped). Real
//! parts only, nothing mocked.
//!
//! - [`api`]: signed requests to a receiver, answers as `(status, JSON)`.
//! - [`docker`]: the engine connection and the one cleanup guard.
//! - [`images`]: test images built `FROM scratch` from the static busybox.
//! - [`receiver`]: a real receiver on an ephemeral loopback port, in process or as a child
//!   process.
//! - [`signing`]: the test key and hand-made signed requests.
//! - [`hosts`]: extra, real Docker engines standing for cold target hosts, each in its own
//!   network namespace (`../shared/TEST-HOSTS.md`).
//! - [`tmpfs`]: a small tmpfs, for a disk that is really full.

pub mod api;
pub mod docker;
pub mod hosts;
pub mod images;
pub mod receiver;
pub mod signing;
pub mod tmpfs;
