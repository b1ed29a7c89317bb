//! Relay B's pairing routes: `HEAD /api/mte-relay` issues or refreshes a client id, and
//! `POST /api/mte-pair` answers a pairing request and stores the new pairs before answering.

use actix_web::{HttpRequest, HttpResponse, web};
use api_relay_actors::{PairSnapshot, Role as PairRole, StoreError};
use api_relay_protocol::ClientId;
use api_relay_protocol::pairing::{self, PairingRequest};

use crate::error::{RelayCode, RelayError};
use crate::headers;
use crate::metrics::StoreOperation;
use crate::server::{RelayState, Role};

/// Returns `x-mte-relay: <client id>`: the caller's id re-signed with the current secret when it
/// sent a valid one, else a new id.
pub async fn client_id(request: HttpRequest, state: web::Data<RelayState>) -> HttpResponse {
    state.metrics.role(&request, Role::Local);
    let presented = request
        .headers()
        .get(headers::RELAY)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| ClientId::parse(text.split(',').next().unwrap_or_default()).ok())
        .filter(|id| state.signer.verify(id).is_ok());
    let id = match presented {
        Some(id) => state.signer.refresh(&id),
        None => state.signer.issue(),
    };
    HttpResponse::Ok().insert_header((headers::RELAY, id.to_string())).finish()
}

/// Answers a pairing request.
///
/// # Errors
/// 566 for a client id this relay did not sign, 559 for another protocol version, 564 for a
/// malformed or over-limit request or a pair id already stored, 568 when the new pairs could
/// not be stored.
pub async fn pair(
    request: HttpRequest,
    body: web::Bytes,
    state: web::Data<RelayState>,
) -> Result<HttpResponse, RelayError> {
    state.metrics.role(&request, Role::Inbound);
    state.metrics.pairing("inbound", "started");
    let client = request.peer_addr().map(|address| headers::ip_text(address.ip())).unwrap_or_default();
    crate::telemetry::note(&request, |fields| fields.peer = Some(client.clone()));
    let result = answer(&body, &state, &client).await;
    match &result {
        Ok(_) => state.metrics.pairing("inbound", "succeeded"),
        Err(error) => {
            state.metrics.pairing("inbound", "failed");
            if let Some(code) = error.relay_code() {
                state.metrics.rejected(code);
            }
            tracing::warn!(%error, "pairing request rejected");
        }
    }
    result
}

async fn answer(body: &[u8], state: &RelayState, address: &str) -> Result<HttpResponse, RelayError> {
    let pairing_request: PairingRequest = serde_json::from_slice(body).map_err(|_| {
        RelayError::relay(
            RelayCode::PairingRejected,
            "pairing request is not valid JSON of the expected shape",
        )
    })?;
    // Requests without a client id are counted per address; the uuid part is the client.
    let rate_key = pairing_request
        .client_id
        .as_deref()
        .and_then(|text| text.split_once('.'))
        .map_or(address, |(uuid, _)| uuid)
        .to_owned();
    let _slot = state.pairing_limits.admit(&rate_key)?;
    let client_id = match pairing_request.client_id.as_deref() {
        Some(text) => {
            let id = ClientId::parse(text)?;
            state.signer.verify(&id)?;
            state.signer.refresh(&id)
        }
        None => state.signer.issue(),
    };
    let psk = state.config.pairing_psk.as_ref().map(|psk| psk.expose().as_bytes());
    let (response, pairs) =
        pairing::respond(&pairing_request, &client_id, psk, state.config.max_pairs_per_request)?;
    for pair in pairs {
        let snapshot = PairSnapshot::new(
            pair.pair_id,
            client_id.clone(),
            PairRole::Inbound,
            pair.keys,
            state.config.replay_window,
        );
        let stored = state.registry.insert(snapshot).await;
        state.metrics.store_operation(StoreOperation::SavePair, stored.is_ok());
        stored.map_err(|error| match error {
            // An offer may not take over the id of a stored pair, which may still be live.
            StoreError::PairExists { .. } => {
                RelayError::relay(RelayCode::PairingRejected, "pair id already in use; offer a new one")
            }
            error => {
                tracing::error!(%error, "could not store a new pair");
                RelayError::relay(RelayCode::StoreUnavailable, "state store unavailable")
            }
        })?;
    }
    tracing::info!(client = client_id.uuid(), pairs = response.pairs.len(), "paired with relay A");
    Ok(HttpResponse::Ok().json(response))
}
