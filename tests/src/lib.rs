//! Test support for Drawbridge: private RabbitMQ nodes and clusters, a fault-injecting
//! TCP proxy, Qpid Proton peers, the daemons as child processes, and a small world of
//! organisations wired together. What a node does comes from `drawbridge-node`, the
//! verifiable message stream from `drawbridge-stream` (re-exported as [`stream`]). The
//! `drawbridge-demo` binary (`drawbridge demo`) is built on this kit.
#![forbid(unsafe_code)]

pub mod daemon;
pub mod proton;
pub mod proxy;
pub mod rabbit;
pub mod world;
pub use drawbridge_node as node;
pub use drawbridge_stream as stream;
