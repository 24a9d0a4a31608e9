//! Test support for Drawbridge: private RabbitMQ nodes and clusters, a fault-injecting
//! TCP proxy, Qpid Proton peers, the daemons as child processes, a verifiable message
//! stream, and a small world of organisations wired together.
#![forbid(unsafe_code)]

pub mod daemon;
pub mod proton;
pub mod proxy;
pub mod rabbit;
pub mod stream;
pub mod world;
