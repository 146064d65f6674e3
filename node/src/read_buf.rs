//! The receive buffer every connection reader shares (peer links, the binary
//! client port and its client, RESP): bytes read from the socket and how far
//! they have been decoded.
//!
//! One read often carries a batch of frames (a pipelining client, a peer's
//! batched writes). Each is decoded in place from [`ReadBuf::unread`] and
//! marked with [`ReadBuf::consume`]; the consumed bytes are dropped once, when
//! [`ReadBuf::fill`] reads more, rather than once per frame.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes read ahead of each socket read.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Default)]
pub(crate) struct ReadBuf {
    bytes: Vec<u8>,
    start: usize,
}

impl ReadBuf {
    /// The bytes received and not yet consumed.
    pub fn unread(&self) -> &[u8] {
        &self.bytes[self.start..]
    }

    /// Marks the first `n` unread bytes as decoded.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.bytes.len());
    }

    /// Drops the consumed bytes and reads more from `r`; how many were read
    /// (0 at end of stream). Cancel-safe: if the future is dropped, no byte
    /// is lost.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> std::io::Result<usize> {
        self.bytes.drain(..self.start);
        self.start = 0;
        self.bytes.reserve(READ_CHUNK);
        r.read_buf(&mut self.bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_are_consumed_in_place_and_dropped_on_the_next_read() {
        let mut buf = ReadBuf::default();
        let mut input: &[u8] = b"abcdef";
        assert_eq!(buf.fill(&mut input).await.unwrap(), 6);
        assert_eq!(buf.unread(), b"abcdef");
        buf.consume(2);
        assert_eq!(buf.unread(), b"cdef");
        buf.consume(100);
        assert_eq!(buf.unread(), b"");
        let mut more: &[u8] = b"gh";
        assert_eq!(buf.fill(&mut more).await.unwrap(), 2);
        assert_eq!(buf.unread(), b"gh");
        assert_eq!(buf.bytes.len(), 2, "consumed bytes were dropped");
        assert_eq!(buf.fill(&mut more).await.unwrap(), 0, "end of stream");
    }
}
