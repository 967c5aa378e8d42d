//! Helpers every service uses: the version check and error statuses.

use std::collections::HashMap;

use ttrpc::Code;

/// A request's ttrpc metadata.
pub type Metadata = HashMap<String, Vec<String>>;

/// Refuses a request whose client speaks another API version.
pub fn check_version(meta: &Metadata) -> ttrpc::Result<()> {
    let values = meta.get(husk_protocol::VERSION_KEY).map(|v| v.as_slice());
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
