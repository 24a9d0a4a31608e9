//! Encoded values shared by the frame guard's tests.

use fe2o3_amqp::types::{
    messaging::{annotations::OwnedKey, Body, Message, MessageAnnotations, Properties},
    primitives::{Array, OrderedMap, Symbol, Value},
};
use serde_amqp::to_vec;

/// `depth` lists nested in each other, built iteratively (list32, one element each,
/// around an empty list8).
pub(super) fn nested_lists(depth: usize) -> Vec<u8> {
    let mut inner = vec![0xc0, 1, 0];
    for _ in 0..depth.saturating_sub(1) {
        let mut next = vec![0xd0];
        next.extend_from_slice(&(inner.len() as u32 + 4).to_be_bytes());
        next.extend_from_slice(&1u32.to_be_bytes());
        next.extend_from_slice(&inner);
        inner = next;
    }
    inner
}

pub(super) fn a_message() -> Vec<u8> {
    let mut nested = Value::Int(1);
    for _ in 0..20 {
        nested = Value::List(vec![nested, Value::String("x".into())]);
    }
    let mut map = OrderedMap::new();
    map.insert(Value::String("k".into()), nested);
    map.insert(
        Value::Symbol(Symbol::from("arr")),
        Value::Array(Array::from(vec![Value::Int(1), Value::Int(2)])),
    );
    let mut ann = OrderedMap::new();
    ann.insert(OwnedKey::from("x-opt-h"), Value::Map(map));
    let m = Message::builder()
        .properties(Properties {
            message_id: Some(fe2o3_amqp::types::messaging::MessageId::String(
                "m-1".into(),
            )),
            ..Default::default()
        })
        .message_annotations(MessageAnnotations(ann))
        .body(Body::<Value>::Value(
            fe2o3_amqp::types::messaging::AmqpValue(Value::Binary(vec![7; 300].into())),
        ))
        .build();
    to_vec(&fe2o3_amqp::types::messaging::message::__private::Serializable(m)).unwrap()
}
