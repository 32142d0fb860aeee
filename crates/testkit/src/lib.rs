//! The workspace's shared test kit, a dev-dependency of every test crate: real parts only (the
//! real receiver on loopback, the real Docker engine), nothing mocked.

pub mod docker;
pub mod images;
pub mod receiver;
pub mod signing;
