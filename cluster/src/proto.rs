//! What nodes say to each other: one [`Request`] frame, one [`Response`] frame, encoded
//! with bincode 2 (serde). Variants are only ever appended: a node of the next release
//! must still understand this one's frames during a rolling upgrade.

use serde::{Deserialize, Serialize};
use shardmall_actors::route::{RemoteAnswer, RemoteCall, ScanPage, ScanRequest};

use crate::map::{ClusterMap, Member, NodeId};

/// Version byte in front of every frame.
pub const WIRE_V1: u8 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Consensus traffic; the control plane encodes and decodes its body.
    Raft(Vec<u8>),
    /// One command for one entity, sent to the node that owns its partition by the
    /// sender's map at `epoch`.
    Entity { epoch: u64, call: RemoteCall },
    /// Ids under an index in the partitions the receiver owns.
    Scan(ScanRequest),
    /// A new node asks to become a member (sent to any member; forwarded to the leader).
    Join(JoinRequest),
    /// Sent to a partition's owner: hand `partition` over to `to`.
    MovePartition { partition: u16, to: NodeId },
    /// Sent by a partition's owner to the node taking it over: the partition's whole
    /// state, folded into snapshots.
    Install(Install),
    /// Who are you, and which map do you hold?
    Ping,
    /// A replica group's consensus traffic (ADR 0016); the group layer encodes its body.
    Group(Vec<u8>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Raft(Vec<u8>),
    Entity(RemoteAnswer),
    Scan(ScanPage),
    Joined(Joined),
    Moved {
        epoch: u64,
    },
    Installed,
    Pong {
        node_id: NodeId,
        map: ClusterMap,
    },
    /// The request could not be served; the text says why.
    Error(String),
    Group(Vec<u8>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub member: Member,
}

/// What a joining node needs to serve like every other member.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Joined {
    pub map: ClusterMap,
    /// Token signing secret, so a token valid on one node is valid on all.
    pub jwt_secret: Vec<u8>,
    /// Payment callback secret, for the same reason.
    pub payment_secret: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Install {
    pub partition: u16,
    /// The map epoch the sender held when it fenced the partition.
    pub epoch: u64,
    /// (entity key, snapshot) for every entity of the partition.
    pub entities: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, thiserror::Error)]
#[error("malformed frame: {0}")]
pub struct WireError(String);

/// The most memory decoding one frame may claim: a frame whose length prefixes claim more
/// is refused instead of aborting the process on an allocation it cannot make. A
/// partition's handoff, the largest frame, stays well below it.
const DECODE_LIMIT: usize = 2 << 30;

pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = vec![WIRE_V1];
    // Encoding into a Vec cannot fail for these types (no maps with non-string keys
    // that bincode refuses); an error would be a programming error caught by the tests.
    match bincode::serde::encode_to_vec(msg, bincode::config::standard()) {
        Ok(body) => out.extend_from_slice(&body),
        Err(e) => {
            tracing::error!(error = %e, "a cluster frame failed to encode");
            out.clear();
        }
    }
    out
}

pub fn decode<T: serde::de::DeserializeOwned>(frame: &[u8]) -> Result<T, WireError> {
    match frame.split_first() {
        Some((&WIRE_V1, body)) => {
            let config = bincode::config::standard().with_limit::<DECODE_LIMIT>();
            let (msg, used) = bincode::serde::decode_from_slice(body, config)
                .map_err(|e| WireError(e.to_string()))?;
            if used != body.len() {
                return Err(WireError(format!(
                    "{} bytes left over after the message",
                    body.len() - used
                )));
            }
            Ok(msg)
        }
        Some((v, _)) => Err(WireError(format!("unknown wire version {v}"))),
        None => Err(WireError("empty frame".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame of a dozen bytes claiming a string of a terabyte is malformed, not an
    /// allocation that aborts the process.
    #[test]
    fn a_frame_claiming_more_than_the_limit_is_malformed() {
        let mut frame = vec![WIRE_V1, 253];
        frame.extend_from_slice(&(1u64 << 40).to_le_bytes());
        frame.extend_from_slice(b"abc");
        assert!(decode::<String>(&frame).is_err());
        assert!(decode::<Request>(&frame).is_err());
    }
}
