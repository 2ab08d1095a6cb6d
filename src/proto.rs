//! Generated gRPC code for the wire protocols in `proto/`. Nothing here is
//! written by hand; the `.proto` files are the source of truth.

/// `package isolate;`: the service isolated serves.
#[allow(clippy::all, missing_docs)]
pub mod isolate {
    tonic::include_proto!("isolate");
}

/// `package flow;`: the result callback isolated makes.
#[allow(clippy::all, missing_docs)]
pub mod flow {
    tonic::include_proto!("flow");
}

/// `package isolated.control.v1;`: isolated's own control service.
#[allow(clippy::all, missing_docs)]
pub mod control {
    tonic::include_proto!("isolated.control.v1");
}
