//! A stream inbox as a node finds it, without a float: declared as the float declares it
//! (`inbox_args(QueueType::Stream, ..)`, bound to the inbox exchange) and filled as the float
//! fills it (peer messages with `drawbridge-sender`, `drawbridge-destination`, a typed
//! message id; window markers with no sender), with publisher confirms. For the tests of the
//! node's side of a stream inbox (`drawbridge_node::stream_inbox`, the Python example).

use anyhow::{bail, Context, Result};
use drawbridge_node::topology::{self, QueueType, StreamRetention};
use futures::StreamExt;
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties, Channel, Confirmation,
};

/// One entry of a stream inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A peer message: its authenticated sender, its destination, its (string) message id
    /// and its body.
    Message {
        /// `drawbridge-sender`.
        sender: String,
        /// `drawbridge-destination`.
        destination: String,
        /// `message_id`.
        id: String,
        /// The body.
        body: Vec<u8>,
    },
    /// A float's window marker (`drawbridge-window-marker` = this value, empty, no sender).
    Marker(String),
}

impl Entry {
    /// Message `i` of run `run` from `sender` to `destination`: id `<run>-<i:08>`, body
    /// `<run> message <i>`.
    pub fn message(run: &str, i: u64, sender: &str, destination: &str) -> Entry {
        Entry::Message {
            sender: sender.into(),
            destination: destination.into(),
            id: format!("{run}-{i:08}"),
            body: format!("{run} message {i}").into_bytes(),
        }
    }
}

/// Declare `queue` as a stream inbox (durable, the float's arguments with the default
/// retention) and bind it to the inbox exchange, as the float does.
pub async fn declare_stream_inbox(ch: &Channel, queue: &str) -> Result<()> {
    ch.queue_declare(
        ShortString::from(queue),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        topology::inbox_args(QueueType::Stream, &StreamRetention::default()),
    )
    .await
    .with_context(|| format!("declaring the stream {queue}"))?;
    topology::bind_to_direct(ch, topology::INBOX_EXCHANGE, queue).await?;
    Ok(())
}

/// Publish `entries` into the inbox `queue` through the inbox exchange, as the float does,
/// all in flight at once, and wait until the broker confirmed every one.
pub async fn publish_as_float(ch: &Channel, queue: &str, entries: &[Entry]) -> Result<()> {
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    let mut pending = futures::stream::FuturesOrdered::new();
    for e in entries {
        let mut headers = FieldTable::default();
        let (props, body) = match e {
            Entry::Message {
                sender,
                destination,
                id,
                body,
            } => {
                headers.insert(ShortString::from("drawbridge-sender"), text(sender));
                headers.insert(
                    ShortString::from("drawbridge-destination"),
                    text(destination),
                );
                headers.insert(
                    ShortString::from("drawbridge-message-id-type"),
                    text("string"),
                );
                (
                    BasicProperties::default().with_message_id(ShortString::from(id.as_str())),
                    body.as_slice(),
                )
            }
            Entry::Marker(value) => {
                headers.insert(ShortString::from("drawbridge-window-marker"), text(value));
                (BasicProperties::default(), &[][..])
            }
        };
        let confirm = ch
            .basic_publish(
                ShortString::from(topology::INBOX_EXCHANGE),
                ShortString::from(queue),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props.with_delivery_mode(2).with_headers(headers),
            )
            .await?;
        pending.push_back(confirm);
    }
    while let Some(c) = pending.next().await {
        match c? {
            Confirmation::Ack(None) => {}
            other => bail!("publish into {queue} not accepted: {other:?}"),
        }
    }
    Ok(())
}
