//! What API clients send (`tap_api`): `/repos/*` DID lists, collection and rule lists,
//! `/channel` frames. The first byte picks the decoder, the rest is the body. Any bytes are
//! decoded or refused with a message, never a panic; what is accepted is valid and reads
//! back the same when a client sends it again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tap_api::{ClientFrame, Collections, DidList, Rules};
use tap_atproto::syntax::Did;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    match pick % 4 {
        0 => {
            if let Ok(dids) = tap_api::did_list(body) {
                assert!(!dids.is_empty(), "an accepted list names a DID");
                let texts: Vec<String> = dids.iter().map(|d| d.as_str().to_owned()).collect();
                for text in &texts {
                    assert_eq!(text.parse::<Did>().expect("valid again").as_str(), text);
                }
                let again = serde_json::to_vec(&DidList { dids: Some(texts) }).unwrap();
                assert_eq!(tap_api::did_list(&again).expect("sent again"), dids);
            }
        }
        1 => {
            if let Ok(collections) = tap_api::collections(body) {
                let again = serde_json::to_vec(&Collections {
                    collections: collections.clone(),
                })
                .unwrap();
                assert_eq!(tap_api::collections(&again).unwrap(), collections);
            }
        }
        2 => {
            if let Ok(rules) = tap_api::rules(body) {
                let again = serde_json::to_vec(&Rules {
                    rules: rules.clone(),
                })
                .unwrap();
                assert_eq!(tap_api::rules(&again).unwrap(), rules);
            }
        }
        _ => match tap_api::client_frame(body) {
            Ok(ClientFrame::Ack(id)) => {
                assert_eq!(
                    tap_api::client_frame(tap_api::ack(id).as_bytes()),
                    Ok(ClientFrame::Ack(id))
                );
            }
            Ok(ClientFrame::Other) | Err(_) => {}
        },
    }
});
