//! Helpers every service uses: the version check and error statuses.

use ttrpc::{Code, TtrpcContext};

/// Refuses a request whose client speaks another API version.
pub fn check_version(ctx: &TtrpcContext) -> ttrpc::Result<()> {
    let values = ctx
        .metadata
        .get(husk_protocol::VERSION_KEY)
        .map(|v| v.as_slice());
    husk_protocol::check_version(values)
        .map_err(|m| ttrpc::Error::RpcStatus(ttrpc::get_status(Code::FAILED_PRECONDITION, m)))
}

pub fn invalid(msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(Code::INVALID_ARGUMENT, msg.into()))
}

pub fn internal(msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(Code::INTERNAL, msg.into()))
}

pub fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}
