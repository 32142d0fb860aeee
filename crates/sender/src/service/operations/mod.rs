//! The service's operations, the seed's `package_container`, `transfer_package` and
//! `publish_transfer_event`: the library pipeline plus lifecycle events and metrics. Shared by
//! the resource routes and `POST /api/v1/execute`; nothing here knows HTTP.

mod events;
mod package;
mod transfer;

pub use events::{publish, EventInput, PublishedEvent};
pub use package::{package, PackageInput, PackageOutput};
pub use transfer::{transfer, TransferInput, TransferReport};

use serde_json::json;

use crate::SenderError;

/// serde default for the `verify_checksum` flags.
fn yes() -> bool {
    true
}

fn error_payload(e: &SenderError) -> serde_json::Value {
    json!({ "code": e.code(), "message": e.to_string() })
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
