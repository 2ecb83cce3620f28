//! A replicated coordinator's link to another member: raft messages, as bytes.

use kiln_proto::MAX_MESSAGE;
use kiln_proto::tls::NodeTls;
use kiln_proto::v1::{self, raft_client::RaftClient};
use tonic::transport::Channel;

use crate::{ClientError, endpoint};

/// A link to one member, connected on first use and again after a failure.
#[derive(Clone)]
pub struct RaftLink {
    client: RaftClient<Channel>,
    address: String,
}

impl RaftLink {
    /// A link to the member at `address` (`https://` with this node's `tls`).
    pub fn new(address: &str, tls: Option<&NodeTls>) -> Result<RaftLink, ClientError> {
        let channel = endpoint(address, tls)?.connect_timeout(std::time::Duration::from_secs(1)).connect_lazy();
        let client =
            RaftClient::new(channel).max_encoding_message_size(MAX_MESSAGE).max_decoding_message_size(MAX_MESSAGE);
        Ok(RaftLink { client, address: address.to_string() })
    }

    /// Sends `messages` from member `from` to member `to`.
    pub async fn send(&self, from: u64, to: u64, messages: Vec<Vec<u8>>) -> Result<(), ClientError> {
        let batch = v1::RaftBatch { from, to, messages };
        self.client
            .clone()
            .send(batch)
            .await
            .map_err(|status| ClientError::rpc(&format!("raft member {to} at {}", self.address), status))?;
        Ok(())
    }
}
