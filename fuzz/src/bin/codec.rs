//! `chatd_codec::decode` on arbitrary bytes, into types of every shape chatd's persisted and
//! wire types use (strings, bytes, options, vectors, maps, tuples, unit / newtype / struct
//! enum variants, every integer width, bool, char, floats). A decode may fail with a typed
//! error; it must not panic, and a value it returns must survive an encode/decode round trip.

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_bytes::ByteBuf;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Record {
    chat: String,
    seq: u64,
    reply_to: Option<u64>,
    members: BTreeMap<String, (u64, Option<u64>)>,
    payload: ByteBuf,
    flag: bool,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Command {
    Unit,
    Bytes(ByteBuf),
    Batch(Vec<ByteBuf>),
    Struct {
        group: u64,
        name: String,
        users: Vec<String>,
        limit: usize,
    },
    Nested(Box<Record>),
    Receipts(Vec<(String, Option<u64>, Option<u64>)>),
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Scalars {
    a: u8,
    b: u16,
    c: u32,
    d: u128,
    e: i8,
    f: i16,
    g: i32,
    h: i64,
    i: i128,
    j: char,
    k: f32,
    l: f64,
    m: (),
    n: [u8; 3],
}

/// Decodes `data` as `T`; if that works, the value's encoding decodes to the same value.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let Ok(value) = chatd_codec::decode::<T>(data) else {
        return;
    };
    let bytes = chatd_codec::encode(&value).expect("a decoded value encodes");
    let again: T = chatd_codec::decode(&bytes).expect("an encoded value decodes");
    // Floats: NaN != NaN, so compare encodings for them.
    if again != value {
        assert_eq!(chatd_codec::encode(&again).ok(), Some(bytes), "{value:?}");
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        round_trip::<Record>(data);
        round_trip::<Command>(data);
        round_trip::<Scalars>(data);
        round_trip::<String>(data);
        round_trip::<Vec<u64>>(data);
        round_trip::<BTreeMap<u64, ByteBuf>>(data);
        round_trip::<Option<(u64, String)>>(data);
    });
}
