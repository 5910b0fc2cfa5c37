//! Everything a client can send before and after login goes through the
//! parsers here; none may panic, whatever the bytes.
//! Run: cd proxy && cargo +nightly fuzz run frontend_messages
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtm_proxy::net::frame::{parse_text, query_text, FrameReader};

fuzz_target!(|data: &[u8]| {
    // The first packet (length-prefixed, no tag).
    let _ = mtm_proxy::startup::parse_startup(bytes::BytesMut::from(data));

    // Frames after login, with a small limit so the too-large path runs too.
    let mut reader = FrameReader::new(4096);
    reader.push(data);
    while let Ok(Some(batch)) = reader.split_batch() {
        for f in &batch.frames {
            let body = batch.body(f);
            match f.tag {
                b'Q' => {
                    if let Ok(sql) = query_text(body) {
                        let _ = mtm_proxy::classify::Classifier::new(&["f".into()]).classify(sql);
                    }
                }
                b'P' => {
                    let _ = parse_text(body);
                }
                _ => {}
            }
        }
    }

    // The SCRAM messages a client sends.
    if let Ok(text) = std::str::from_utf8(data) {
        let v = mtm_proxy::auth::scram::Verifier::from_password("pw");
        if let Ok(ex) = mtm_proxy::auth::scram::server_first(text, &v, "nonce") {
            let _ = mtm_proxy::auth::scram::server_final(&ex, text, &v);
        }
    }
});
