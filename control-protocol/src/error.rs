//! Why a control or notify message was refused.

/// Why bytes from the broker could not be turned into a [`ControlCommand`] or
/// [`Notification`].
///
/// Every variant names what was wrong, because these errors end up in operator logs next to
/// the refused message (and a refused control message is never acted on).
///
/// [`ControlCommand`]: crate::ControlCommand
/// [`Notification`]: crate::Notification
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a valid protobuf encoding of the envelope.
    #[error("malformed protobuf message: {0}")]
    Protobuf(#[from] prost::DecodeError),

    /// The sender speaks a newer major protocol version than this build understands: a breaking
    /// change happened in between, so acting on the message could misread it.
    #[error(
        "unsupported control protocol version {found} (this build understands versions 1 to {supported})"
    )]
    UnsupportedVersion {
        /// Version carried by the message.
        found: u32,
        /// Newest version this build accepts ([`crate::PROTOCOL_VERSION`]).
        supported: u32,
    },

    /// The envelope carries a body this build does not know: its `body` oneof is unset but the
    /// envelope holds a field number outside this build's schema.
    ///
    /// This is what a newer same-major sender's new command or notification looks like to an
    /// older receiver (protobuf turns an unknown oneof member into an unknown field). It is not
    /// malformed: the receiver skips it as "not for me" instead of refusing it, so adding a
    /// command never needs a major version bump (see the crate docs, *Compatibility*).
    #[error(
        "unknown message body (envelope field {field} is not in this build's schema; newer sender?)"
    )]
    UnknownBody {
        /// The first envelope field number this build does not know.
        field: u32,
    },

    /// The envelope has no `version` (0 / unset): it was not written by a conforming sender.
    #[error("message has no protocol version (field `version` is 0 or unset)")]
    MissingVersion,

    /// A required field or the envelope body is absent.
    #[error("required field `{0}` is missing")]
    Missing(&'static str),

    /// A field is present but its value is unacceptable.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// Name of the offending field, as in the `.proto` file.
        field: &'static str,
        /// What is wrong with it, including the offending value.
        reason: String,
    },
}

impl DecodeError {
    /// Shorthand used by the validators.
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}
