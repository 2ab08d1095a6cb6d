//! direktiv-isolate: runs Direktiv workflow actions as containers through
//! containerd's API.

pub mod config;
pub mod containerd;
pub mod image;
pub mod proto;
pub mod request;
pub mod spec;
pub mod report;
pub mod reaper;
pub mod runner;
pub mod actions;
pub mod error;
pub mod server;
