//! serde defaults the operations' inputs share.

/// Default `true` (the `verify_checksum` flags).
pub(super) fn yes() -> bool {
    true
}
