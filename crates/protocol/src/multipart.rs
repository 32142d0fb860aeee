//! Multipart upload layout: part names, order and limits.

/// First part: the JSON manifest (the signed content).
pub const PART_MANIFEST: &str = "manifest";
/// Second part: the package bytes exactly as hashed in the manifest.
pub const PART_PACKAGE: &str = "package";
/// Largest accepted manifest part, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;
/// Most body bytes a receiver reads before the manifest is authenticated: the manifest part and
/// room for the preamble, boundaries and part headers around it. A body that has not delivered a
/// whole manifest part by then is refused.
pub const MAX_BYTES_BEFORE_AUTHENTICATION: usize = MAX_MANIFEST_BYTES + 16 * 1024;
/// Content type of the manifest part.
pub const MANIFEST_CONTENT_TYPE: &str = "application/json";
/// Content type of the package part.
pub const PACKAGE_CONTENT_TYPE: &str = "application/octet-stream";
/// Name of the last part of a streamed upload (`/deployment/stream`): the signed seal.
pub const PART_SEAL: &str = "seal";
/// Largest seal part accepted.
pub const MAX_SEAL_BYTES: usize = 4 * 1024;
