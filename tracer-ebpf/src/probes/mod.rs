//! One file per hooked domain.
pub mod openssl;
pub mod process;
pub mod socket;
