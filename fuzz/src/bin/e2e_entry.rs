//! chat-cli's E2E device (`chatd_e2e::Device`) fed arbitrary chat log entries: the first
//! byte picks the kind (application, commit, welcome, proposal), the rest is the MLS
//! message. An E2E chat's entries come from whoever is in it; processing one may refuse it
//! (`Undecryptable`, `Ignored`, a typed error) but must never panic. The same bytes are
//! then opened as a device state file, which must be refused with a typed error.

use std::cell::RefCell;
use std::path::PathBuf;

use chatd_e2e::{Device, Kind, StoreKey};

const CHAT: &str = "e:fuzz";

struct Fixture {
    dir: PathBuf,
    key: StoreKey,
    device: Device,
    seq: u64,
}

thread_local! {
    static FIXTURE: RefCell<Option<Fixture>> = const { RefCell::new(None) };
}

fn fixture() -> Fixture {
    let dir = std::env::temp_dir().join(format!("chatd-fuzz-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let key = StoreKey::from_bytes([7; 32]);
    let mut device =
        Device::create(&dir.join("device.mls"), &key, "alice", "phone").expect("device");
    device.create_group(CHAT).expect("group");
    Fixture {
        dir,
        key,
        device,
        seq: 0,
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&selector, message)) = data.split_first() else {
            return;
        };
        let kind = match selector % 4 {
            0 => Kind::Application,
            1 => Kind::Commit,
            2 => Kind::Welcome,
            _ => Kind::Proposal,
        };
        FIXTURE.with(|f| {
            let mut f = f.borrow_mut();
            let f = f.get_or_insert_with(fixture);
            f.seq += 1;
            // Garbage is Undecryptable or Ignored; an Err is a typed refusal. Neither panics.
            let _ = f.device.process(CHAT, f.seq, "bob", kind, message, 0);
            let path = f.dir.join("input.mls");
            if std::fs::write(&path, data).is_ok() {
                assert!(
                    Device::open(&path, &f.key).is_err(),
                    "arbitrary bytes opened as a state file"
                );
            }
        });
    });
}
