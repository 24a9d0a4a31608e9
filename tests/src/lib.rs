//! Test support for Drawbridge: private RabbitMQ nodes and clusters, a fault-injecting
//! TCP proxy, Qpid Proton peers, the daemons as child processes, and a small world of
//! organisations wired together. The fixtures the integration tests share are in
//! [`fixtures`]: the banks' legal names (re-exported here), the two-organisation world, a
//! link brought up, message streams sent and counted; a member's own AMQP 1.0 connection to
//! a float is in [`peer_client`]; a network world of namespaces (inside, dmz, outside)
//! behind nftables, for the tunnel-mode tests, is in [`netns`]; a stream inbox filled as a
//! float fills it, for the node's side, in [`node_stream`]. What a node does comes from
//! `drawbridge-node`, the verifiable message stream from `drawbridge-stream` (re-exported as
//! [`stream`]). The `drawbridge-demo` binary (`drawbridge demo`) is built on this kit.
#![forbid(unsafe_code)]

pub mod daemon;
pub mod fe2o3_peer;
pub mod fixtures;
pub mod netns;
pub mod node_stream;
pub mod outbound_proxy;
pub mod peer_client;
pub mod proton;
pub mod proxy;
pub mod rabbit;
pub mod world;
pub use drawbridge_node as node;
pub use drawbridge_stream as stream;
pub use fixtures::{BANK_A, BANK_B, BANK_C};
