//! API security (issue 11; ISOLATE.md §9), against real daemons, real TLS and real
//! clients: the local socket is root's (or its group's); the TCP listener answers gRPC
//! health to anyone and everything else only to a verified client certificate or a
//! bearer token, scoped to the token's namespaces; the tokens file is re-read; a daemon
//! that would serve TCP unauthenticated does not start; reports to an `https://` flow
//! endpoint are never sent in cleartext, and arrive over mutual TLS.
//!
//! Each trial runs daemons of its own (`PrivateIsolated`): they change its listeners.

mod listeners;
mod tls;
mod tokens;

use std::net::SocketAddr;

use anyhow::{Context, Result};
use direktiv_isolate::client::{self, Authed, Bearer, Target};
use direktiv_isolate::proto::control::isolate_control_client::IsolateControlClient;
use direktiv_isolate::proto::isolate::direktiv_isolate_client::DirektivIsolateClient;
use libtest_mimic::Trial;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::harness::trial;

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "auth::local_socket_is_for_root_or_its_group",
            listeners::local_socket_is_for_root_or_its_group,
        ),
        trial(
            "auth::unsafe_listeners_do_not_start",
            listeners::unsafe_listeners_do_not_start,
        ),
        trial(
            "auth::open_and_socket_only_listeners",
            listeners::open_and_socket_only_listeners,
        ),
        trial(
            "auth::tokens_are_scoped_to_their_namespaces",
            tokens::scoped_to_their_namespaces,
        ),
        trial(
            "auth::tokens_file_changes_take_effect",
            tokens::file_changes_take_effect,
        ),
        trial("auth::mutual_tls_listener", tls::mutual_tls_listener),
        trial(
            "auth::flow_reports_over_tls_only",
            tls::flow_reports_over_tls_only,
        ),
    ]
}

/// A connection to `addr` over TCP, with TLS when `tls` is given.
pub async fn tcp(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<Channel> {
    client::connect(&Target::Tcp {
        addr: addr.to_string(),
        tls,
    })
    .await
    .with_context(|| format!("connect to {addr}"))
}

/// Both services on `channel`, every call carrying `token`.
pub fn clients(
    channel: &Channel,
    token: Option<&str>,
) -> Result<(DirektivIsolateClient<Authed>, IsolateControlClient<Authed>)> {
    let bearer = Bearer::new(token)?;
    Ok((
        DirektivIsolateClient::with_interceptor(channel.clone(), bearer.clone()),
        IsolateControlClient::with_interceptor(channel.clone(), bearer),
    ))
}

/// gRPC health of `isolate.DirektivIsolate` on `channel`, asked without credentials.
pub async fn health(channel: &Channel) -> Result<ServingStatus> {
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "isolate.DirektivIsolate".into(),
        })
        .await
        .context("health check")?
        .into_inner()
        .status();
    Ok(status)
}
