#![forbid(unsafe_code)]
pub mod proton;
pub mod proxy;
pub mod rabbit;
