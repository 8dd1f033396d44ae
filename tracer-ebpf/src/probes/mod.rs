//! One file per hooked domain.
pub mod enforce;
pub mod openssl;
pub mod process;
pub mod socket;
