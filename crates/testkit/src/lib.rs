//! `deploy-testkit`: what the workspace's tests share.
//!
//! - [`hosts`]: extra Docker engines, each a cold target host in its own network namespace
//!   (`../shared/TEST-HOSTS.md` in the project's notes; docs/OPERATIONS.md for the commands).

pub mod hosts;
