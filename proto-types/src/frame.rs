//! The frame codec: `magic (4) | protocol version (u16 BE) | payload length (u32 BE) |
//! payload (postcard)`.
//!
//! The decoder faces the network, so it never panics and never allocates more
//! than its configured cap: truncated, oversize, wrong-magic, wrong-version and
//! garbage input each give a typed [`FrameError`].

use crate::msg::PROTOCOL_VERSION;
use serde::{de::DeserializeOwned, Serialize};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"DYNM";
/// Bytes before the payload.
pub const HEADER_LEN: usize = 10;
/// Default payload cap: room for 16 siblings of the default 1 MiB maximum value,
/// plus context and envelope overhead.
pub const DEFAULT_MAX_PAYLOAD: usize = 16 * (1 << 20) + (1 << 20);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame truncated: have {have} bytes, need {need}")]
    Truncated { have: usize, need: usize },
    #[error("frame payload of {len} bytes exceeds the cap of {max} bytes")]
    Oversize { len: usize, max: usize },
    #[error("bad magic {got:02x?}: not a dynamo frame (expected {MAGIC:02x?})")]
    BadMagic { got: [u8; 4] },
    #[error("protocol version {got} is not supported (this node speaks {expected})")]
    BadVersion { got: u16, expected: u16 },
    #[error("malformed payload: {0}")]
    Payload(String),
    #[error("could not encode message: {0}")]
    Encode(String),
}

/// Encodes and decodes frames with a payload cap.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    pub max_payload: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec {
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

impl FrameCodec {
    pub fn new(max_payload: usize) -> Self {
        FrameCodec { max_payload }
    }

    /// Appends one frame carrying `msg` to `out`.
    pub fn encode_into<T: Serialize>(&self, msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        if let Err(e) = postcard::to_io(msg, &mut *out) {
            out.truncate(start);
            return Err(FrameError::Encode(e.to_string()));
        }
        let buf = out;
        let len = buf.len() - start - HEADER_LEN;
        if len > self.max_payload {
            buf.truncate(start);
            return Err(FrameError::Oversize {
                len,
                max: self.max_payload,
            });
        }
        buf[start + 6..start + 10].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }

    /// One frame carrying `msg`.
    pub fn encode<T: Serialize>(&self, msg: &T) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::new();
        self.encode_into(msg, &mut out)?;
        Ok(out)
    }

    /// Checks the header at the start of `buf` and returns the payload length.
    /// `Ok(None)` means more bytes are needed to read the header.
    pub fn peek_header(&self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        // Reject a wrong magic as soon as its first bytes arrive.
        let seen = buf.len().min(4);
        if buf[..seen] != MAGIC[..seen] {
            let mut got = [0u8; 4];
            got[..seen].copy_from_slice(&buf[..seen]);
            return Err(FrameError::BadMagic { got });
        }
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let version = u16::from_be_bytes([buf[4], buf[5]]);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::BadVersion {
                got: version,
                expected: PROTOCOL_VERSION,
            });
        }
        let len = u32::from_be_bytes([buf[6], buf[7], buf[8], buf[9]]) as usize;
        if len > self.max_payload {
            return Err(FrameError::Oversize {
                len,
                max: self.max_payload,
            });
        }
        Ok(Some(len))
    }

    /// Decodes one frame from the start of a stream buffer. `Ok(None)` means the
    /// frame is not complete yet; `Ok(Some((msg, used)))` consumed `used` bytes.
    pub fn decode<T: DeserializeOwned>(
        &self,
        buf: &[u8],
    ) -> Result<Option<(T, usize)>, FrameError> {
        let Some(len) = self.peek_header(buf)? else {
            return Ok(None);
        };
        let total = HEADER_LEN + len;
        if buf.len() < total {
            return Ok(None);
        }
        let msg = decode_payload(&buf[HEADER_LEN..total])?;
        Ok(Some((msg, total)))
    }

    /// Decodes a buffer that must hold exactly one whole frame.
    pub fn decode_exact<T: DeserializeOwned>(&self, buf: &[u8]) -> Result<T, FrameError> {
        match self.decode(buf)? {
            Some((msg, used)) if used == buf.len() => Ok(msg),
            Some((_, used)) => Err(FrameError::Payload(format!(
                "{} trailing bytes after the frame",
                buf.len() - used
            ))),
            None => {
                let need = match self.peek_header(buf)? {
                    Some(len) => HEADER_LEN + len,
                    None => HEADER_LEN,
                };
                Err(FrameError::Truncated {
                    have: buf.len(),
                    need,
                })
            }
        }
    }
}

fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) =
        postcard::take_from_bytes(payload).map_err(|e| FrameError::Payload(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Payload(format!(
            "{} unused bytes at the end of the payload",
            rest.len()
        )));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{ClientEnvelope, ClientRequest, PeerMessage, WriteMode};
    use proptest::prelude::*;

    fn sample() -> ClientEnvelope {
        ClientEnvelope {
            id: 7,
            request: ClientRequest::Put {
                key: b"k".to_vec(),
                value: Some(vec![1, 2, 3]),
                context: None,
                w: Some(2),
                mode: WriteMode::Context,
            },
        }
    }

    #[test]
    fn round_trip_and_stream_split() {
        let codec = FrameCodec::default();
        let mut buf = codec.encode(&sample()).unwrap();
        codec.encode_into(&sample(), &mut buf).unwrap();
        let (a, used): (ClientEnvelope, usize) = codec.decode(&buf).unwrap().unwrap();
        assert_eq!(a, sample());
        let (b, used2): (ClientEnvelope, usize) = codec.decode(&buf[used..]).unwrap().unwrap();
        assert_eq!(b, sample());
        assert_eq!(used + used2, buf.len());
        for cut in 0..used {
            assert_eq!(codec.decode::<ClientEnvelope>(&buf[..cut]).unwrap(), None);
        }
    }

    #[test]
    fn typed_errors() {
        let codec = FrameCodec::new(64);
        let frame = codec.encode(&sample()).unwrap();
        assert!(matches!(
            codec.decode_exact::<ClientEnvelope>(&frame[..frame.len() - 1]),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            codec.decode::<ClientEnvelope>(b"GET / HTTP/1.1\r\n"),
            Err(FrameError::BadMagic { .. })
        ));
        let mut wrong_version = frame.clone();
        wrong_version[5] ^= 0xff;
        assert!(matches!(
            codec.decode::<ClientEnvelope>(&wrong_version),
            Err(FrameError::BadVersion { .. })
        ));
        let mut oversize = frame.clone();
        oversize[6..10].copy_from_slice(&65u32.to_be_bytes());
        assert_eq!(
            codec.decode::<ClientEnvelope>(&oversize),
            Err(FrameError::Oversize { len: 65, max: 64 })
        );
        let big = ClientEnvelope {
            id: 1,
            request: ClientRequest::Get {
                key: vec![0; 100],
                r: None,
            },
        };
        assert!(matches!(
            codec.encode(&big),
            Err(FrameError::Oversize { .. })
        ));
        let mut garbage = frame.clone();
        for b in &mut garbage[HEADER_LEN..] {
            *b = 0xff;
        }
        assert!(matches!(
            codec.decode::<ClientEnvelope>(&garbage),
            Err(FrameError::Payload(_))
        ));
        // A client frame sent to the peer port is a payload error, not a panic.
        let res = FrameCodec::default().decode::<PeerMessage>(&frame);
        assert!(res.is_err() || res.unwrap().is_some());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random bytes, with or without a valid header in front, never panic and
        /// never claim more bytes than they hold.
        #[test]
        fn decoder_survives_random_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            header in any::<bool>(),
            len in 0u32..600,
        ) {
            let codec = FrameCodec::new(512);
            let mut buf = Vec::new();
            if header {
                buf.extend_from_slice(&MAGIC);
                buf.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
                buf.extend_from_slice(&len.to_be_bytes());
            }
            buf.extend_from_slice(&bytes);
            if let Ok(Some((_, used))) = codec.decode::<PeerMessage>(&buf) {
                prop_assert!(used <= buf.len());
            }
            if let Ok(Some((_, used))) = codec.decode::<ClientEnvelope>(&buf) {
                prop_assert!(used <= buf.len());
            }
            let _ = codec.decode_exact::<ClientEnvelope>(&buf);
        }

        #[test]
        fn round_trips_any_get(key in proptest::collection::vec(any::<u8>(), 0..300), id in any::<u64>(), r in any::<Option<u8>>()) {
            let codec = FrameCodec::default();
            let env = ClientEnvelope { id, request: ClientRequest::Get { key, r } };
            let frame = codec.encode(&env).unwrap();
            prop_assert_eq!(codec.decode_exact::<ClientEnvelope>(&frame).unwrap(), env);
        }
    }
}
