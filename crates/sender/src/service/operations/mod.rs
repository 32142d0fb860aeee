//! The service's operations, `package_container`, `transfer_package` and
//! `publish_transfer_event`: the library pipeline plus lifecycle events and metrics. Shared by
//! the resource routes and `POST /api/v1/execute`; nothing here knows HTTP.

mod events;
mod package;
mod rollout;
mod transfer;

pub(crate) use events::{publish, EventInput, PublishedEvent};
pub(crate) use package::{package, PackageInput, PackageOutput};
pub(crate) use rollout::{start as start_rollout, RolloutInput, RolloutView, Rollouts};
pub(crate) use transfer::{transfer, TransferInput, TransferReport};
mod serde_defaults;
