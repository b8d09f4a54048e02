//! A body fed through a tokio channel, one definition for every stream
//! gantry makes as it goes: the daemon's JSON progress and archives, the
//! mirror's blob passed on while it is fetched, a plugin's pushed blob.
//!
//! Written here rather than taken from http-body-util: its `Channel`
//! (0.1) has neither a blocking send (the daemon's writers run on
//! blocking threads) nor reserved permits (the host feeds a request only
//! as the connection takes it), both of which a tokio mpsc has.

use bytes::Bytes;
use hyper::body::{Body, Frame};
use std::pin::Pin;
use std::task::{Context, Poll};

/// What a [`ChannelBody`] is fed with: bytes, or the error that ends it.
pub type Chunk = std::io::Result<Bytes>;

/// A body whose pieces arrive on a channel; it ends when every sender
/// is gone, or with the first error sent.
pub struct ChannelBody(tokio::sync::mpsc::Receiver<Chunk>);

impl ChannelBody {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Chunk>) -> ChannelBody {
        ChannelBody(rx)
    }

    /// A body and the sender that feeds it, holding up to `buffer` pieces.
    pub fn channel(buffer: usize) -> (tokio::sync::mpsc::Sender<Chunk>, ChannelBody) {
        let (tx, rx) = tokio::sync::mpsc::channel(buffer);
        (tx, ChannelBody(rx))
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|c| c.map(|r| r.map(Frame::data)))
    }
}
