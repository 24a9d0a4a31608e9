//! Publishing inbound links' transfers into the broker.
//!
//! The float publishes on a small, fixed set of confirm-mode channels
//! (`float.publish_channels`), not one per link: a channel per link would let peers use up
//! the broker's `channel_max` (shared with everything else on the connection) by opening
//! links. Each link is given one channel slot for its life, round robin, so its publishes
//! keep their order. A slot's channel is opened on whatever broker connection is current when
//! it is next needed, and reopened when the broker closed it; a publish returns its confirm
//! as a future, so a link keeps many in flight.
//!
//! What sharing costs: a channel the broker closes takes the unconfirmed publishes of every
//! link on it along; they settle `released` and their peers resend them (the dedup window
//! then tells the second copy from a first one). The float only publishes what it validated
//! to inboxes it declared, so the broker has no reason to close a channel short of a broken
//! connection, which takes every channel anyway.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use drawbridge_mapping::{self as mapping, inbound::Invalid};
use drawbridge_runtime::broker::{BrokerSession, Live};
use futures::{future::BoxFuture, FutureExt};
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::ShortString,
    BasicProperties, Channel,
};
use tracing::warn;

use crate::settle::{self, BrokerAnswer, Settle, Transient};

/// Why the link has no channel to publish on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ChannelError {
    /// No broker connection right now.
    #[error("no broker connection")]
    NoConnection,
    /// The broker refused the channel or confirm mode.
    #[error("cannot open a broker channel: {0}")]
    Open(#[source] lapin::Error),
    /// The broker did not answer within the operation timeout (the connection is recycled).
    #[error("opening a broker channel timed out")]
    TimedOut,
}

/// The broker's verdict on one publish, mapped to how its transfer settles.
pub(crate) type Confirm = BoxFuture<'static, Settle>;

/// A confirm-mode channel and the connection it is on.
type Current = Option<(Arc<Live>, Channel)>;

/// The float's publishing channels.
#[derive(Debug)]
pub(crate) struct Channels {
    slots: Vec<Arc<tokio::sync::Mutex<Current>>>,
    next: AtomicUsize,
}

impl Channels {
    /// `n` slots (at least one), channels opened on first use.
    pub(crate) fn new(n: usize) -> Self {
        Channels {
            slots: (0..n.max(1)).map(|_| Arc::default()).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// A publisher for a new link, on the next slot.
    pub(crate) fn publisher(&self) -> Publisher {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        Publisher {
            slot: self.slots.get(i).cloned().unwrap_or_default(),
            last: Arc::default(),
        }
    }

    /// Slots with an open channel right now (for `/status`).
    pub(crate) fn open(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| {
                s.try_lock()
                    .map(|c| c.as_ref().is_some_and(|(_, ch)| ch.status().connected()))
                    .unwrap_or(true)
            })
            .count()
    }
}

/// One link's publishing side: its slot of [`Channels`].
#[derive(Debug)]
pub(crate) struct Publisher {
    slot: Arc<tokio::sync::Mutex<Current>>,
    /// The slot's channel as this link last saw it (or opened it): used while another link
    /// holds the slot's lock. Never held across an await.
    last: Arc<std::sync::Mutex<Current>>,
}

/// `current` if its connection and channel are still open.
fn usable(current: &Current) -> Current {
    let (live, ch) = current.as_ref()?;
    (!live.is_lost() && ch.status().connected()).then(|| (live.clone(), ch.clone()))
}

impl Publisher {
    /// The slot's channel, if it is open now. Never waits: the connection's task calls it, and
    /// while it waited the peer's frames (its heartbeats included) would wait too.
    ///
    /// While another link holds the slot (opening its channel: when many links start at
    /// once, each `opening` takes the lock in turn), the channel this link last saw or opened
    /// is used if it is still open. Without that, a link whose own `opening` had just found
    /// the channel open could find the lock taken by the next link's and release its
    /// delivery as `broker_unavailable` (seen when 30 links started together, hot-hot).
    pub(crate) fn channel_now(&self) -> Option<(Arc<Live>, Channel)> {
        match self.slot.try_lock() {
            Ok(slot) => {
                let current = usable(&slot);
                self.last
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone_from(&current);
                current
            }
            Err(_) => usable(&self.last.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }

    /// Opens the slot's channel on the current broker connection (or finds it opened by
    /// another link meanwhile): polled by the connection's task among its other futures, so
    /// a broker slow to open channels stalls no peer. A failure is logged and left to the
    /// publish that follows (it settles `released`).
    pub(crate) fn opening(&self, broker: &BrokerSession) -> BoxFuture<'static, ()> {
        let slot = self.slot.clone();
        let last = self.last.clone();
        let broker = broker.clone();
        async move {
            match open(&slot, &broker).await {
                Ok(current) => *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(current),
                Err(ChannelError::Open(source)) => {
                    warn!(reason = %source, "cannot open a broker channel")
                }
                Err(_) => {}
            }
        }
        .boxed()
    }

    /// Publish `body` persistent and mandatory to `inbox` through `exchange` (the inboxes'
    /// direct exchange, or `""`: the default exchange) on `channel` (from
    /// [`Publisher::channel_now`]); the returned future settles once the broker confirmed (or
    /// not within `op`, the operation timeout). A publish that fails later settles `released`
    /// through the future.
    ///
    /// The publish is handed to lapin before this returns, in the link's order, but not
    /// awaited: lapin's `basic_publish` completes only once its I/O thread has written the
    /// frames, and awaiting that per transfer costs two thread hand-offs per message (the
    /// largest cost in the float's profile, docs/performance.md). Not awaited, a link hands
    /// lapin its next transfers while the I/O thread writes, so one wake-up carries several.
    ///
    /// `properties_len` is the encoded size of `properties`: properties that do not fit one
    /// frame of the connection (its negotiated `frame_max`) are never handed to lapin — the
    /// broker would close the whole connection (`frame_too_large`) — and the transfer is
    /// rejected instead. `Err` is how the transfer settles at once.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn publish(
        &self,
        (live, channel): (Arc<Live>, Channel),
        op: Duration,
        exchange: &str,
        inbox: Arc<str>,
        body: Vec<u8>,
        properties: BasicProperties,
        properties_len: usize,
    ) -> Result<Confirm, Settle> {
        let frame_max = live.conn.configuration().frame_max();
        if !mapping::fits_frame(properties_len, frame_max) {
            return Err(Settle::Reject(
                Invalid::HeadersTooLarge {
                    size: properties_len,
                    max: (frame_max as usize).saturating_sub(mapping::CONTENT_HEADER_OVERHEAD),
                }
                .to_string(),
            ));
        }
        let slot = self.slot.clone();
        let exchange = ShortString::from(exchange);
        let mut confirm = async move {
            let publish = tokio::time::timeout(
                op,
                channel.basic_publish(
                    exchange,
                    ShortString::from(&*inbox),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &body,
                    properties,
                ),
            )
            .await;
            drop(body);
            let confirm = match publish {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    forget(&slot, &live, &channel).await;
                    return Settle::Release(Transient::PublishFailed(e.to_string()));
                }
                Err(_) => {
                    forget(&slot, &live, &channel).await;
                    live.report_broken("publish timed out");
                    return Settle::Release(Transient::ConfirmTimedOut(op));
                }
            };
            let answer = tokio::time::timeout(op, confirm).await.ok();
            if answer.is_none() {
                live.report_broken("publisher confirm timed out");
            }
            settle::confirmed(BrokerAnswer::from_confirm(answer), &inbox, op)
        }
        .boxed();
        // One poll runs `basic_publish` up to where lapin holds the frames (and has numbered
        // the publish for its confirm): from here the order among this link's publishes is
        // fixed, whoever polls the rest. The waker is a no-op: the connection's task polls the
        // future again (a future pushed into its `FuturesUnordered` is polled at once).
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if let std::task::Poll::Ready(settle) = confirm.as_mut().poll(&mut cx) {
            return Ok(std::future::ready(settle).boxed());
        }
        Ok(confirm)
    }
}

/// `slot`'s confirm-mode channel, reopened on the current connection when needed. The slot
/// stays locked while a channel opens, so links sharing it open one, not one each.
async fn open(
    slot: &tokio::sync::Mutex<Current>,
    broker: &BrokerSession,
) -> Result<(Arc<Live>, Channel), ChannelError> {
    let mut slot = slot.lock().await;
    if let Some((live, ch)) = slot.as_ref() {
        if !live.is_lost() && ch.status().connected() {
            return Ok((live.clone(), ch.clone()));
        }
    }
    *slot = None;
    let live = broker.current().ok_or(ChannelError::NoConnection)?;
    let opened = tokio::time::timeout(broker.config().op_timeout, async {
        let ch = live.conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok::<_, lapin::Error>(ch)
    })
    .await;
    match opened {
        Ok(Ok(ch)) => {
            *slot = Some((live.clone(), ch.clone()));
            Ok((live, ch))
        }
        Ok(Err(e)) => Err(ChannelError::Open(e)),
        Err(_) => {
            live.report_broken("channel open timed out");
            Err(ChannelError::TimedOut)
        }
    }
}

/// Drop `slot`'s channel if it is still `channel` on `live` (another link may have reopened
/// it), closing it in the background in case the broker still has it open.
async fn forget(slot: &tokio::sync::Mutex<Current>, live: &Arc<Live>, channel: &Channel) {
    let mut slot = slot.lock().await;
    if slot
        .as_ref()
        .is_some_and(|(l, ch)| Arc::ptr_eq(l, live) && ch.id() == channel.id())
    {
        *slot = None;
        let ch = channel.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                ch.close(200, "publish failed".into()),
            )
            .await;
        });
    }
}
