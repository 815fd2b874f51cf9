//! Command-line clients of a running server. `import.rs` is `jobcast import FILE`: a client of the
//! public protocol only (it uses `protocol` and `framing`, nothing of the server).

pub mod import;
