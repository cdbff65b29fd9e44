//! Golden JSON of every client and server frame, every field set. The client protocol is
//! public (docs/protocol.md): a failure here means clients see a different protocol, which
//! must be a deliberate, documented change, never an accident.

#![allow(clippy::unwrap_used)]

use chatd_proto::{
    parse_client_frame, ChatState, ClaimedKeyPackage, ClientFrame, DeviceView, FileRef, FileView,
    KeyPackageUpload, MessageView, PresenceView, ServerFrame,
};

/// `json` parses to `frame` and `frame` serialises to exactly `json`.
fn pin_client(json: &str, frame: ClientFrame) {
    assert_eq!(parse_client_frame(json).unwrap(), frame, "{json}");
    assert_eq!(serde_json::to_string(&frame).unwrap(), json);
}

/// `frame` serialises to exactly `json`, which deserialises back to `frame`.
fn pin_server(frame: ServerFrame, json: &str) {
    assert_eq!(serde_json::to_string(&frame).unwrap(), json);
    assert_eq!(serde_json::from_str::<ServerFrame>(json).unwrap(), frame);
}

fn s(v: &str) -> String {
    v.to_string()
}

#[test]
fn golden_client_frames() {
    let cases = [
        (
            r#"{"type":"auth","token":"t"}"#,
            ClientFrame::Auth { token: s("t") },
        ),
        (
            r#"{"type":"ping","id":"1"}"#,
            ClientFrame::Ping { id: Some(s("1")) },
        ),
        (
            r#"{"type":"send","id":"1","chat":"d:a:b","client_msg_id":"m","text":"hi","reply_to":3}"#,
            ClientFrame::Send {
                id: s("1"),
                chat: s("d:a:b"),
                client_msg_id: s("m"),
                text: s("hi"),
                reply_to: Some(3),
                files: Vec::new(),
            },
        ),
        (
            r#"{"type":"send","id":"1","chat":"c","client_msg_id":"m","text":"","reply_to":null,"files":[{"file_id":"f:1"},{"file_id":"f:2","name":"n","mime":"m","size":3}]}"#,
            ClientFrame::Send {
                id: s("1"),
                chat: s("c"),
                client_msg_id: s("m"),
                text: s(""),
                reply_to: None,
                files: vec![
                    FileRef {
                        file_id: s("f:1"),
                        name: None,
                        mime: None,
                        size: None,
                    },
                    FileRef {
                        file_id: s("f:2"),
                        name: Some(s("n")),
                        mime: Some(s("m")),
                        size: Some(3),
                    },
                ],
            },
        ),
        (
            r#"{"type":"edit","id":"1","chat":"c","seq":2,"text":"x"}"#,
            ClientFrame::Edit {
                id: s("1"),
                chat: s("c"),
                seq: 2,
                text: s("x"),
            },
        ),
        (
            r#"{"type":"delete","id":"1","chat":"c","seq":2}"#,
            ClientFrame::Delete {
                id: s("1"),
                chat: s("c"),
                seq: 2,
            },
        ),
        (
            r#"{"type":"open_direct","id":"1","user":"b"}"#,
            ClientFrame::OpenDirect {
                id: s("1"),
                user: s("b"),
            },
        ),
        (
            r#"{"type":"create_group","id":"1","name":"n","members":["b","c"]}"#,
            ClientFrame::CreateGroup {
                id: s("1"),
                name: s("n"),
                members: vec![s("b"), s("c")],
            },
        ),
        (
            r#"{"type":"add_members","id":"1","chat":"g:1","users":["d"]}"#,
            ClientFrame::AddMembers {
                id: s("1"),
                chat: s("g:1"),
                users: vec![s("d")],
            },
        ),
        (
            r#"{"type":"remove_member","id":"1","chat":"g:1","user":"d"}"#,
            ClientFrame::RemoveMember {
                id: s("1"),
                chat: s("g:1"),
                user: s("d"),
            },
        ),
        (
            r#"{"type":"leave","id":"1","chat":"g:1"}"#,
            ClientFrame::Leave {
                id: s("1"),
                chat: s("g:1"),
            },
        ),
        (
            r#"{"type":"history","id":"1","chat":"c","before":9,"after":2,"limit":50}"#,
            ClientFrame::History {
                id: s("1"),
                chat: s("c"),
                before: Some(9),
                after: Some(2),
                limit: Some(50),
            },
        ),
        (
            r#"{"type":"sync","id":"1","after":"d:a:b","limit":10}"#,
            ClientFrame::Sync {
                id: s("1"),
                after: Some(s("d:a:b")),
                limit: Some(10),
            },
        ),
        (
            r#"{"type":"receipt","chat":"c","delivered":5,"read":4}"#,
            ClientFrame::Receipt {
                chat: s("c"),
                delivered: Some(5),
                read: Some(4),
            },
        ),
        (
            r#"{"type":"presence","id":"1","users":["a","b"]}"#,
            ClientFrame::Presence {
                id: s("1"),
                users: vec![s("a"), s("b")],
            },
        ),
        (
            r#"{"type":"subscribe","id":"1","users":["a"]}"#,
            ClientFrame::Subscribe {
                id: s("1"),
                users: vec![s("a")],
            },
        ),
        (
            r#"{"type":"typing","chat":"c"}"#,
            ClientFrame::Typing { chat: s("c") },
        ),
    ];
    println!("{} client frame types pinned", cases.len());
    for (json, frame) in cases {
        pin_client(json, frame);
    }
}

fn message() -> MessageView {
    MessageView {
        chat: s("c"),
        seq: 2,
        msg_id: s("c/2"),
        sender: s("a"),
        kind: s("text"),
        text: s("hi"),
        ts: 7,
        reply_to: Some(1),
        edited_ts: Some(8),
        files: Vec::new(),
        epoch: None,
    }
}

const MESSAGE: &str = r#"{"chat":"c","seq":2,"msg_id":"c/2","sender":"a","kind":"text","text":"hi","ts":7,"reply_to":1,"edited_ts":8}"#;

#[test]
fn golden_message_with_files() {
    let mut m = message();
    m.files.push(FileView {
        file_id: s("f:1"),
        name: s("cat.png"),
        mime: s("image/png"),
        size: 3,
    });
    let json = r#"{"chat":"c","seq":2,"msg_id":"c/2","sender":"a","kind":"text","text":"hi","ts":7,"reply_to":1,"edited_ts":8,"files":[{"file_id":"f:1","name":"cat.png","mime":"image/png","size":3}]}"#;
    assert_eq!(serde_json::to_string(&m).unwrap(), json);
    assert_eq!(serde_json::from_str::<MessageView>(json).unwrap(), m);
}

#[test]
fn golden_server_frames() {
    pin_server(
        ServerFrame::Ready {
            user: s("a"),
            session: s("s1"),
        },
        r#"{"type":"ready","user":"a","session":"s1"}"#,
    );
    pin_server(
        ServerFrame::Pong { id: Some(s("1")) },
        r#"{"type":"pong","id":"1"}"#,
    );
    pin_server(ServerFrame::Pong { id: None }, r#"{"type":"pong"}"#);
    pin_server(
        ServerFrame::Ack {
            id: s("1"),
            chat: s("c"),
            seq: 2,
            msg_id: s("c/2"),
            ts: 7,
            duplicate: true,
        },
        r#"{"type":"ack","id":"1","chat":"c","seq":2,"msg_id":"c/2","ts":7,"duplicate":true}"#,
    );
    pin_server(
        ServerFrame::Done {
            id: s("1"),
            chat: s("c"),
            seq: 3,
        },
        r#"{"type":"done","id":"1","chat":"c","seq":3}"#,
    );
    pin_server(
        ServerFrame::History {
            id: s("1"),
            chat: s("c"),
            messages: vec![message()],
            more: true,
        },
        &format!(r#"{{"type":"history","id":"1","chat":"c","messages":[{MESSAGE}],"more":true}}"#),
    );
    pin_server(
        ServerFrame::Chats {
            id: s("1"),
            chats: vec![ChatState {
                chat: s("g:1"),
                kind: s("group"),
                name: s("n"),
                members: vec![s("a"), s("b")],
                last_seq: 9,
                delivered: 8,
                read: 7,
                unread: 2,
            }],
            next: Some(s("g:1")),
        },
        r#"{"type":"chats","id":"1","chats":[{"chat":"g:1","kind":"group","name":"n","members":["a","b"],"last_seq":9,"delivered":8,"read":7,"unread":2}],"next":"g:1"}"#,
    );
    pin_server(
        ServerFrame::PresenceList {
            id: s("1"),
            users: vec![PresenceView {
                user: s("a"),
                online: false,
                last_seen: Some(5),
            }],
        },
        r#"{"type":"presence_list","id":"1","users":[{"user":"a","online":false,"last_seen":5}]}"#,
    );
    pin_server(
        ServerFrame::Message { message: message() },
        &format!(r#"{{"type":"message","message":{MESSAGE}}}"#),
    );
    pin_server(
        ServerFrame::Updated { message: message() },
        &format!(r#"{{"type":"updated","message":{MESSAGE}}}"#),
    );
    pin_server(
        ServerFrame::Receipt {
            chat: s("c"),
            user: s("b"),
            delivered: 5,
            read: 4,
        },
        r#"{"type":"receipt","chat":"c","user":"b","delivered":5,"read":4}"#,
    );
    pin_server(
        ServerFrame::Presence {
            presence: PresenceView {
                user: s("a"),
                online: true,
                last_seen: None,
            },
        },
        r#"{"type":"presence","presence":{"user":"a","online":true}}"#,
    );
    pin_server(
        ServerFrame::Typing {
            chat: s("c"),
            user: s("a"),
        },
        r#"{"type":"typing","chat":"c","user":"a"}"#,
    );
    pin_server(
        ServerFrame::Error {
            id: Some(s("1")),
            code: s("forbidden"),
            message: s("no"),
        },
        r#"{"type":"error","id":"1","code":"forbidden","message":"no"}"#,
    );
}

#[test]
fn golden_e2e_frames() {
    let cases = [
        (
            r#"{"type":"create_e2e","id":"1","name":"n","direct":true}"#,
            ClientFrame::CreateE2e {
                id: s("1"),
                name: s("n"),
                direct: true,
            },
        ),
        (
            r#"{"type":"e2e_send","id":"2","chat":"e:1","client_msg_id":"m","kind":"commit","epoch":3,"data":"AQ==","welcome":"Ag==","add":["b"],"remove":["c"],"files":[{"file_id":"f"}]}"#,
            ClientFrame::E2eSend {
                id: s("2"),
                chat: s("e:1"),
                client_msg_id: s("m"),
                kind: s("commit"),
                epoch: 3,
                data: s("AQ=="),
                welcome: Some(s("Ag==")),
                add: vec![s("b")],
                remove: vec![s("c")],
                files: vec![FileRef {
                    file_id: s("f"),
                    name: None,
                    mime: None,
                    size: None,
                }],
            },
        ),
        (
            r#"{"type":"key_packages_upload","id":"3","device":"phone","packages":[{"data":"AQ==","expires":9}],"last_resort":{"data":"Ag==","expires":10}}"#,
            ClientFrame::KeyPackagesUpload {
                id: s("3"),
                device: s("phone"),
                packages: vec![KeyPackageUpload {
                    data: s("AQ=="),
                    expires: 9,
                }],
                last_resort: Some(KeyPackageUpload {
                    data: s("Ag=="),
                    expires: 10,
                }),
            },
        ),
        (
            r#"{"type":"key_packages_claim","id":"4","user":"b"}"#,
            ClientFrame::KeyPackagesClaim {
                id: s("4"),
                user: s("b"),
            },
        ),
        (
            r#"{"type":"devices","id":"5","user":"b"}"#,
            ClientFrame::Devices {
                id: s("5"),
                user: s("b"),
            },
        ),
        (
            r#"{"type":"retire_device","id":"6","device":"phone"}"#,
            ClientFrame::RetireDevice {
                id: s("6"),
                device: s("phone"),
            },
        ),
    ];
    for (json, frame) in cases {
        pin_client(json, frame);
    }
    // The optional fields may be left out.
    assert_eq!(
        parse_client_frame(r#"{"type":"e2e_send","id":"2","chat":"e:1","client_msg_id":"m","kind":"application","epoch":3,"data":"AQ=="}"#).unwrap(),
        ClientFrame::E2eSend {
            id: s("2"),
            chat: s("e:1"),
            client_msg_id: s("m"),
            kind: s("application"),
            epoch: 3,
            data: s("AQ=="),
            welcome: None,
            add: vec![],
            remove: vec![],
            files: vec![],
        }
    );
    pin_server(
        ServerFrame::Devices {
            id: s("5"),
            user: s("b"),
            devices: vec![DeviceView {
                device: s("phone"),
                available: 4,
                last_resort: true,
            }],
        },
        r#"{"type":"devices","id":"5","user":"b","devices":[{"device":"phone","available":4,"last_resort":true}]}"#,
    );
    pin_server(
        ServerFrame::KeyPackages {
            id: s("4"),
            user: s("b"),
            packages: vec![ClaimedKeyPackage {
                device: s("phone"),
                data: s("AQ=="),
            }],
        },
        r#"{"type":"key_packages","id":"4","user":"b","packages":[{"device":"phone","data":"AQ=="}]}"#,
    );
    let mut m = message();
    m.kind = s("mls_commit");
    m.text = s("AQ==");
    m.reply_to = None;
    m.edited_ts = None;
    m.epoch = Some(3);
    let json = r#"{"chat":"c","seq":2,"msg_id":"c/2","sender":"a","kind":"mls_commit","text":"AQ==","ts":7,"epoch":3}"#;
    assert_eq!(serde_json::to_string(&m).unwrap(), json);
    assert_eq!(serde_json::from_str::<MessageView>(json).unwrap(), m);
}
