//! DID documents as PLC or a did:web host serve them: parsing, the signing key (Multikey
//! and legacy forms), the PDS endpoint, the handle and the size estimate must never panic,
//! and keys that decode must keep decoding the same way from their did:key form.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tap_atproto::PublicKey;
use tap_atproto::did_doc::DidDocument;

fuzz_target!(|data: &[u8]| {
    if let Ok(doc) = DidDocument::parse(data) {
        let _ = doc.pds_endpoint();
        let _ = doc.handle();
        let _ = doc.approx_size();
        if let Ok(key) = doc.atproto_key() {
            let again = PublicKey::from_did_key(&key.to_did_key()).expect("a decoded key re-encodes");
            assert_eq!(again, key);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = PublicKey::from_multikey(text);
        let _ = PublicKey::from_did_key(text);
    }
});
