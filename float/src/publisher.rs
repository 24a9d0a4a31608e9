//! Publishing one inbound link's transfers into the broker.
//!
//! Each link has its own confirm-mode channel, so its publishes and confirms stay in order
//! and a channel the broker closes (an access refusal, say) affects that link only. The
//! channel is reopened on whatever broker connection is current when it is next needed; a
//! publish returns its confirm as a future, so the link keeps many in flight.

use std::sync::Arc;

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

/// One link's publishing side.
#[derive(Debug, Default)]
pub(crate) struct Publisher {
    /// Confirm-mode channel and the connection it is on.
    channel: Option<(Arc<Live>, Channel)>,
}

impl Publisher {
    /// Publish `body` persistent and mandatory to `inbox` through `exchange` (the inboxes'
    /// direct exchange, or `""`: the default exchange); the returned future settles once
    /// the broker confirmed (or not within the operation timeout). A failure before the
    /// broker has the message is returned at once.
    pub(crate) async fn publish(
        &mut self,
        broker: &BrokerSession,
        exchange: &str,
        inbox: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Confirm, Transient> {
        let (live, channel) = match self.channel(broker).await {
            Ok(c) => c,
            Err(e) => {
                if let ChannelError::Open(source) = &e {
                    warn!(reason = %source, "cannot open a broker channel");
                }
                return Err(Transient::BrokerUnavailable);
            }
        };
        let op = broker.config().op_timeout;
        let publish = tokio::time::timeout(
            op,
            channel.basic_publish(
                ShortString::from(exchange),
                ShortString::from(inbox),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            ),
        )
        .await;
        let confirm = match publish {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.channel = None;
                return Err(Transient::PublishFailed(e.to_string()));
            }
            Err(_) => {
                self.channel = None;
                live.report_broken("publish timed out");
                return Err(Transient::ConfirmTimedOut(op));
            }
        };
        let inbox = inbox.to_string();
        Ok(async move {
            let answer = tokio::time::timeout(op, confirm).await.ok();
            if answer.is_none() {
                live.report_broken("publisher confirm timed out");
            }
            settle::confirmed(BrokerAnswer::from_confirm(answer), &inbox, op)
        }
        .boxed())
    }

    /// The link's confirm-mode channel, reopened on the current connection when needed.
    async fn channel(
        &mut self,
        broker: &BrokerSession,
    ) -> Result<(Arc<Live>, Channel), ChannelError> {
        if let Some((live, ch)) = &self.channel {
            if !live.is_lost() && ch.status().connected() {
                return Ok((live.clone(), ch.clone()));
            }
        }
        self.channel = None;
        let live = broker.current().ok_or(ChannelError::NoConnection)?;
        let opened = tokio::time::timeout(broker.config().op_timeout, async {
            let ch = live.conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>(ch)
        })
        .await;
        match opened {
            Ok(Ok(ch)) => {
                self.channel = Some((live.clone(), ch.clone()));
                Ok((live, ch))
            }
            Ok(Err(e)) => Err(ChannelError::Open(e)),
            Err(_) => {
                live.report_broken("channel open timed out");
                Err(ChannelError::TimedOut)
            }
        }
    }
}
