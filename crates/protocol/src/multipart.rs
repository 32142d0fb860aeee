//! Multipart upload layout: part names, order and limits.

/// First part: the JSON manifest (the signed content).
pub const PART_MANIFEST: &str = "manifest";
/// Second part: the package bytes exactly as hashed in the manifest.
pub const PART_PACKAGE: &str = "package";
/// Largest accepted manifest part, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;
/// Content type of the manifest part.
pub const MANIFEST_CONTENT_TYPE: &str = "application/json";
/// Content type of the package part.
pub const PACKAGE_CONTENT_TYPE: &str = "application/octet-stream";
