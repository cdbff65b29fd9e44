//! The gateway's parser of client WebSocket text frames (`chatd_proto::parse_client_frame`
//! and `request_id_of`, run on every text frame a client sends, ≤ 64 KiB). It may answer
//! with an error code; it must not panic, and a frame it accepts serialises to JSON that
//! parses back to the same frame.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        // The gateway refuses binary and non-UTF-8 frames before parsing (close 4009).
        if data.len() > chatd_proto::FRAME_BYTES_MAX {
            return;
        }
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let id = chatd_proto::request_id_of(text);
        assert!(id.is_none_or(|id| id.len() <= chatd_proto::REQUEST_ID_BYTES_MAX));
        match chatd_proto::parse_client_frame(text) {
            Ok(frame) => {
                let json = serde_json::to_string(&frame).expect("a frame serialises");
                let again = chatd_proto::parse_client_frame(&json)
                    .unwrap_or_else(|e| panic!("{json} does not parse back: {e:?}"));
                assert_eq!(again, frame);
            }
            Err((code, _)) => assert!(
                [
                    chatd_proto::code::MALFORMED,
                    chatd_proto::code::UNKNOWN_TYPE,
                    chatd_proto::code::INVALID_FIELD
                ]
                .contains(&code),
                "{code}"
            ),
        }
    });
}
