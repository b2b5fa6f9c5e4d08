//! Splicing two byte streams, as both ends of a tunneled WebSocket do: the proxy between
//! the user's upgraded connection and the tunnel stream, the connector between the
//! tunnel stream and the backend's upgraded connection.
//!
//! Each direction copies until its reader ends, then shuts its writer down (on a tunnel
//! stream: `END_STREAM`), so a close travels on. A TLS connection closed without
//! `close_notify` ends like any other: the WebSocket has its own close handshake. Unlike
//! `tokio::io::copy_bidirectional`, [`splice`] does not wait without end for the second
//! direction: a WebSocket's close handshake is over once one side has closed its
//! connection, so the other gets [`Splice::linger`] to close too before both are
//! dropped. A peer that never closes cannot hold a tunnel stream open.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// How long the second direction of a [`splice`] may run once the first has ended.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(10);

/// Bytes read at once in each direction, at most: what a bulk transfer reads with.
const BUFFER: usize = 64 * 1024;
/// Bytes read at once in each direction at first: an idle or chatty WebSocket (most are)
/// holds two of these per side, not two of [`BUFFER`]. A direction whose read fills its
/// buffer doubles it, up to [`BUFFER`]: a bulk transfer reaches full reads within a few.
const FIRST_BUFFER: usize = 2 * 1024;

/// How a [`splice`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Splice {
    /// How long the second direction may run once the first has ended.
    pub linger: Duration,
}

impl Default for Splice {
    fn default() -> Self {
        Self {
            linger: DEFAULT_LINGER,
        }
    }
}

/// How a [`splice`] ended.
#[derive(Debug)]
pub struct Spliced {
    /// Bytes copied from `a` to `b`.
    pub a_to_b: u64,
    /// Bytes copied from `b` to `a`.
    pub b_to_a: u64,
    /// Why the splice ended early, if it did: a direction failed (reading, writing or
    /// shutting down), or the second direction outlived the linger.
    pub error: Option<SpliceError>,
}

/// Why a [`splice`] ended before both directions had closed.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// Copying from one side to the other failed.
    #[error("copying {direction}: {source}")]
    Io {
        /// `a to b` or `b to a`.
        direction: &'static str,
        /// The IO error.
        source: std::io::Error,
    },
    /// One side closed and the other did not within the linger.
    #[error("{direction} still open {linger:?} after the other direction closed")]
    Linger {
        /// `a to b` or `b to a`: the direction that stayed open.
        direction: &'static str,
        /// The linger.
        linger: Duration,
    },
}

/// Copies bytes both ways between `a` and `b` until both directions have ended, one
/// failed, or the second outlived `settings.linger`; see the [module](self) notes.
pub async fn splice<A, B>(a: A, b: B, settings: Splice) -> Spliced
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let a_to_b = AtomicU64::new(0);
    let b_to_a = AtomicU64::new(0);
    let forward = pump(&mut a_read, &mut b_write, &a_to_b, "a to b");
    let backward = pump(&mut b_read, &mut a_write, &b_to_a, "b to a");
    tokio::pin!(forward, backward);
    let error = tokio::select! {
        first = &mut forward => finish(first, backward, "b to a", settings.linger).await,
        first = &mut backward => finish(first, forward, "a to b", settings.linger).await,
    };
    Spliced {
        a_to_b: a_to_b.load(Ordering::Relaxed),
        b_to_a: b_to_a.load(Ordering::Relaxed),
        error,
    }
}

/// After the first direction ended with `first`: the second's end, within `linger`.
async fn finish(
    first: Result<(), SpliceError>,
    second: impl Future<Output = Result<(), SpliceError>>,
    direction: &'static str,
    linger: Duration,
) -> Option<SpliceError> {
    if let Err(error) = first {
        return Some(error);
    }
    match tokio::time::timeout(linger, second).await {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error),
        Err(_) => Some(SpliceError::Linger { direction, linger }),
    }
}

/// Copies `reader` to `writer` until `reader` ends, then shuts `writer` down.
async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    copied: &AtomicU64,
    direction: &'static str,
) -> Result<(), SpliceError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let failed = |source| SpliceError::Io { direction, source };
    let mut buffer = vec![0u8; FIRST_BUFFER];
    loop {
        let read = match reader.read(&mut buffer).await {
            Ok(read) => read,
            // A TLS peer that closed its connection without close_notify, as many
            // WebSocket clients do once the close handshake is over: an end like any.
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(error) => return Err(failed(error)),
        };
        let Some(chunk) = buffer.get(..read).filter(|chunk| !chunk.is_empty()) else {
            break;
        };
        writer.write_all(chunk).await.map_err(failed)?;
        writer.flush().await.map_err(failed)?;
        copied.fetch_add(read as u64, Ordering::Relaxed);
        if read == buffer.len() && buffer.len() < BUFFER {
            buffer.resize((buffer.len() * 2).min(BUFFER), 0);
        }
    }
    writer.shutdown().await.map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_cross_both_ways_and_closes_travel_on() {
        let (a, mut a_peer) = tokio::io::duplex(1024);
        let (b, mut b_peer) = tokio::io::duplex(1024);
        let spliced = tokio::spawn(splice(a, b, Splice::default()));
        a_peer
            .write_all(b"to b")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut got = [0u8; 4];
        b_peer
            .read_exact(&mut got)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got, b"to b");
        b_peer
            .write_all(b"back to a")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut got = [0u8; 9];
        a_peer
            .read_exact(&mut got)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got, b"back to a");

        b_peer.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
        let mut rest = Vec::new();
        a_peer
            .read_to_end(&mut rest)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(rest.is_empty());
        a_peer.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
        let spliced = tokio::time::timeout(Duration::from_secs(10), spliced)
            .await
            .unwrap_or_else(|_| panic!("the splice did not end"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((spliced.a_to_b, spliced.b_to_a), (4, 9));
        assert!(spliced.error.is_none(), "{:?}", spliced.error);
    }

    #[tokio::test]
    async fn a_side_that_never_closes_is_dropped_after_the_linger() {
        let (a, mut a_peer) = tokio::io::duplex(1024);
        let (b, b_peer) = tokio::io::duplex(1024);
        let settings = Splice {
            linger: Duration::from_millis(200),
        };
        let spliced = tokio::spawn(splice(a, b, settings));
        drop(b_peer);
        let mut rest = Vec::new();
        a_peer
            .read_to_end(&mut rest)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // `a_peer` stays open: the splice gives up after the linger.
        let spliced = tokio::time::timeout(Duration::from_secs(10), spliced)
            .await
            .unwrap_or_else(|_| panic!("the splice did not end"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(
                spliced.error,
                Some(SpliceError::Linger {
                    direction: "a to b",
                    ..
                })
            ),
            "{:?}",
            spliced.error
        );
        drop(a_peer);
    }

    /// A bulk transfer grows the first small buffer and arrives whole and in order.
    #[tokio::test]
    async fn a_bulk_transfer_past_the_first_buffer_arrives_whole() {
        let (a, mut a_peer) = tokio::io::duplex(256 * 1024);
        let (b, mut b_peer) = tokio::io::duplex(256 * 1024);
        let spliced = tokio::spawn(splice(a, b, Splice::default()));
        let sent: Vec<u8> = (0..(3 * BUFFER + 123)).map(|i| (i % 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                a_peer
                    .write_all(&sent)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                a_peer.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
                a_peer
            })
        };
        let mut got = Vec::new();
        b_peer
            .read_to_end(&mut got)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the bytes arrived changed or out of order");
        b_peer.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
        let a_peer = writer.await.unwrap_or_else(|e| panic!("{e}"));
        let spliced = tokio::time::timeout(Duration::from_secs(10), spliced)
            .await
            .unwrap_or_else(|_| panic!("the splice did not end"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spliced.a_to_b, sent.len() as u64);
        assert!(spliced.error.is_none(), "{:?}", spliced.error);
        drop(a_peer);
    }
}
