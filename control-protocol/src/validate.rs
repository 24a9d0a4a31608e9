//! Shape checks shared by the message conversions.

use crate::DecodeError;

/// Longest queue name the broker accepts: AMQP 0.9.1 `shortstr` is at most 255 bytes.
pub const MAX_QUEUE_NAME_LEN: usize = 255;

/// A queue name the broker will accept and that does not collide with RabbitMQ's own.
pub(crate) fn queue_name(field: &'static str, name: &str) -> Result<(), DecodeError> {
    if name.is_empty() {
        return Err(DecodeError::invalid(field, "queue name is empty"));
    }
    if name.len() > MAX_QUEUE_NAME_LEN {
        return Err(DecodeError::invalid(
            field,
            format!(
                "queue name is {} bytes long, the limit is {MAX_QUEUE_NAME_LEN} (starts `{}`)",
                name.len(),
                name.chars().take(40).collect::<String>()
            ),
        ));
    }
    if name.starts_with("amq.") {
        return Err(DecodeError::invalid(
            field,
            format!("queue name `{name}` uses the broker-reserved prefix `amq.`"),
        ));
    }
    Ok(())
}

/// A non-empty identifier (node identity, bridge id).
pub(crate) fn non_empty(field: &'static str, value: &str) -> Result<(), DecodeError> {
    if value.trim().is_empty() {
        return Err(DecodeError::invalid(field, "must not be empty"));
    }
    Ok(())
}

/// Splits on commas not escaped by a backslash (`O=Foo\, Inc` is one attribute), as
/// `drawbridge-certs` does.
fn split_unescaped_commas(name: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in name.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            ',' => {
                parts.push(&name[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&name[start..]);
    parts
}

/// Something that looks like an X.500 name: comma-separated `KEY=VALUE` pairs, keys and values
/// non-empty. Full parsing (known attributes, set comparison) is `drawbridge-certs`' job.
pub(crate) fn legal_name(field: &'static str, name: &str) -> Result<(), DecodeError> {
    if name.trim().is_empty() {
        return Err(DecodeError::invalid(field, "legal name is empty"));
    }
    for part in split_unescaped_commas(name) {
        let Some((key, value)) = part.split_once('=') else {
            return Err(DecodeError::invalid(
                field,
                format!(
                    "legal name `{name}`: `{}` is not a KEY=VALUE pair",
                    part.trim()
                ),
            ));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(DecodeError::invalid(
                field,
                format!(
                    "legal name `{name}`: attribute `{}` has no key",
                    part.trim()
                ),
            ));
        }
        if !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        {
            return Err(DecodeError::invalid(
                field,
                format!("legal name `{name}`: `{key}` is not an attribute key"),
            ));
        }
        if value.trim().is_empty() {
            return Err(DecodeError::invalid(
                field,
                format!("legal name `{name}`: attribute `{key}` has an empty value"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names() {
        assert!(queue_name("queue", "drawbridge.peers.bank-b").is_ok());
        assert!(queue_name("queue", &"q".repeat(255)).is_ok());
        let err = queue_name("queue", &"q".repeat(256)).unwrap_err();
        assert!(err.to_string().contains("256 bytes"), "{err}");
        assert!(queue_name("queue", "").is_err());
        let err = queue_name("queue", "amq.gen-123").unwrap_err();
        assert!(err.to_string().contains("amq."), "{err}");
    }

    #[test]
    fn legal_name_shapes() {
        assert!(legal_name("legal_names", "O=Bank A, L=London, C=GB").is_ok());
        assert!(legal_name("legal_names", "CN=x").is_ok());
        assert!(legal_name("legal_names", "2.5.4.10=Bank").is_ok());
        assert!(legal_name("legal_names", r"O=Foo\, Inc, C=US").is_ok());
        for bad in [
            "",
            "  ",
            "Bank A",
            "O=Bank A,",
            "=x",
            "O=",
            "O = , C=GB",
            "O B=x",
        ] {
            let err = legal_name("legal_names", bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    DecodeError::Invalid {
                        field: "legal_names",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
        }
    }
}
