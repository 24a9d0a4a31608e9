//! SASL for inbound peers: identity comes from the TLS client certificate, so EXTERNAL
//! (and ANONYMOUS, which some clients insist on) simply succeed once TLS has verified the
//! certificate chain.

use fe2o3_amqp::{
    acceptor::{sasl_acceptor::SaslServerFrame, SaslAcceptor},
    types::{
        primitives::{Array, Symbol},
        sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse},
    },
};

/// SASL EXTERNAL / ANONYMOUS acceptor; authentication already happened in TLS.
#[derive(Debug, Clone, Default)]
pub struct TlsIdentitySasl;

impl SaslAcceptor for TlsIdentitySasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![Symbol::from("EXTERNAL"), Symbol::from("ANONYMOUS")])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let code = match init.mechanism.0.as_str() {
            "EXTERNAL" | "ANONYMOUS" => SaslCode::Ok,
            _ => SaslCode::Auth,
        };
        SaslServerFrame::Outcome(SaslOutcome {
            code,
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Auth,
            additional_data: None,
        })
    }
}
