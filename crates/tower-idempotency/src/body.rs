//! The body type the layer hands on, in both directions.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// A body that is either bytes the layer holds (a buffered tracked request, a replay, a
    /// problem, a buffered response) or a body streamed as it comes, maybe after a buffered
    /// prefix.
    ///
    /// The inner service receives its requests with this body, and callers receive their
    /// responses with it.
    pub struct IdempotencyBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

/// What the layer answers: the inner service's response, with its body streamed or held, or
/// an answer of the layer's own.
pub(crate) type IdempotencyResponse<B> = Response<IdempotencyBody<B>>;

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Full { data: Option<Bytes> },
        Stream { prefix: Option<Bytes>, #[pin] body: B },
        Boxed { prefix: Option<Bytes>, body: Pin<Box<B>> },
    }
}

impl<B> IdempotencyBody<B> {
    /// A body of these bytes.
    pub fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    /// `body` as it comes.
    pub fn stream(body: B) -> Self {
        Self {
            kind: Kind::Stream { prefix: None, body },
        }
    }

    /// `prefix`, then the rest of a body that was pinned to be read.
    pub(crate) fn prefixed(prefix: Bytes, body: Pin<Box<B>>) -> Self {
        Self {
            kind: Kind::Boxed {
                prefix: (!prefix.is_empty()).then_some(prefix),
                body,
            },
        }
    }
}

impl<B> Body for IdempotencyBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Stream { prefix, body } => match prefix.take() {
                Some(p) => Poll::Ready(Some(Ok(Frame::data(p)))),
                None => body.poll_frame(cx),
            },
            KindProj::Boxed { prefix, body } => match prefix.take() {
                Some(p) => Poll::Ready(Some(Ok(Frame::data(p)))),
                None => body.as_mut().poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Stream { prefix, body } => prefix.is_none() && body.is_end_stream(),
            Kind::Boxed { prefix, body } => prefix.is_none() && body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Stream { prefix, body } => with_prefix(prefix, body.size_hint()),
            Kind::Boxed { prefix, body } => with_prefix(prefix, body.size_hint()),
        }
    }
}

impl<B> std::fmt::Debug for IdempotencyBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyBody").finish_non_exhaustive()
    }
}

fn with_prefix(prefix: &Option<Bytes>, hint: SizeHint) -> SizeHint {
    let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
    let mut out = SizeHint::new();
    out.set_lower(hint.lower() + extra);
    if let Some(upper) = hint.upper() {
        out.set_upper(upper + extra);
    }
    out
}

/// A body read in full: a body of one chunk (a `Full`, most handlers' answer, or a small request
/// that arrived in one read) is kept as it is, without a copy or a list of its chunks.
#[derive(Default)]
pub(crate) struct Collect {
    first: Bytes,
    rest: Option<BytesMut>,
}

impl Collect {
    pub(crate) fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        match &mut self.rest {
            Some(rest) => rest.extend_from_slice(&data),
            None if self.first.is_empty() => self.first = data,
            None => {
                let mut rest = BytesMut::with_capacity(self.first.len() + data.len());
                rest.extend_from_slice(&self.first);
                rest.extend_from_slice(&data);
                self.rest = Some(rest);
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.rest.as_ref().map_or(self.first.len(), BytesMut::len)
    }

    pub(crate) fn into_bytes(self) -> Bytes {
        self.rest.map_or(self.first, BytesMut::freeze)
    }
}
