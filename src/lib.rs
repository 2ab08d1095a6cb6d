//! direktiv-isolate: runs Direktiv workflow actions as containers through
//! containerd's API.

pub mod proto;
