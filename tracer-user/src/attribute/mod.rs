//! What an exchange means: which configured route it matched (`routes`), who made the call
//! (`attribution`), and whose personal data its answer disclosed (`disclosure`, reading the
//! body with `jsonpath`). Pure: no kernel, no I/O beyond the attributor's state file.

pub mod attribution;
pub mod credentials;
pub mod disclosure;
pub mod jsonpath;
pub mod jwt;
pub mod routes;
