//! direktiv-isolate: runs Direktiv workflow actions as containers through
//! containerd's API.

pub mod actions;
pub mod auth;
pub mod client;
pub mod config;
pub mod containerd;
pub mod control;
pub mod embedded;
pub mod engine;
pub mod error;
pub mod image;
pub mod listen;
pub mod lock;
pub mod metrics;
pub mod network;
pub mod proto;
pub mod readiness;
pub mod reaper;
pub mod recover;
pub mod report;
pub mod request;
pub mod runner;
pub mod server;
pub mod spec;
pub mod store;
pub mod text;
