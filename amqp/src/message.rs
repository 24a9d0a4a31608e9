//! The bare message as bytes: the engine carries a delivery's payload as the encoded sections
//! it is, without decoding it. This module writes the sections Drawbridge sends.

use crate::codec::{Buf, Writer};

/// Section descriptors (part 3.2).
pub mod section {
    /// header
    pub const HEADER: u64 = 0x70;
    /// message-annotations
    pub const MESSAGE_ANNOTATIONS: u64 = 0x72;
    /// properties
    pub const PROPERTIES: u64 = 0x73;
    /// application-properties
    pub const APPLICATION_PROPERTIES: u64 = 0x74;
    /// data
    pub const DATA: u64 = 0x75;
}

/// Writes a `properties` section holding only a binary message id, and one `data` section.
pub fn write_data_message<B: Buf>(out: &mut B, message_id: &[u8], body: &[u8]) {
    let mut w = Writer::new(out);
    let mut m = w.begin_described_list(section::PROPERTIES);
    w.field(&mut m, Some(message_id), |w, v| w.binary(v));
    w.end_list(m);
    data_section(&mut w, body);
}

/// Writes a `data` section.
pub fn data_section<B: Buf>(w: &mut Writer<'_, B>, body: &[u8]) {
    // Described: 0x00, smallulong 0x75, then vbin.
    w.raw(&[0x00, 0x53, section::DATA as u8]);
    w.binary(body);
}
