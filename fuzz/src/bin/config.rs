//! The node's config file parser (`chatd_config::Config::parse`: TOML, every key known,
//! paths resolved, values validated). It may refuse the text with a typed error; it must not
//! panic, and a config it accepts serialises to TOML that parses back to the same config.

use std::path::Path;

use chatd_config::Config;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let path = Path::new("/etc/chatd/chatd.toml");
        let Ok(config) = Config::parse(text, path) else {
            return;
        };
        // Some values the TOML writer cannot write back (integers above i64::MAX, runs of
        // 256 quotes): `to_toml` refuses those with a typed error, which is fine.
        let Ok(written) = config.to_toml(path) else {
            return;
        };
        let again = Config::parse(&written, path)
            .unwrap_or_else(|e| panic!("{written}\ndoes not parse back: {e}"));
        assert_eq!(format!("{again:?}"), format!("{config:?}"));
    });
}
