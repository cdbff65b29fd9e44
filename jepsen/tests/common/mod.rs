//! Shared by the jepsen integration tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// The chatd binary of this build: next to the test's target dir
/// (`<target>/debug/deps/<test>-…` → `<target>/debug/chatd`).
pub fn chatd() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let debug = exe.parent().and_then(Path::parent).unwrap();
    let chatd = debug.join("chatd");
    assert!(
        chatd.is_file(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        chatd.display()
    );
    chatd
}
