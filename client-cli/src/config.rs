//! Where the server address and the token come from: the command line, the environment,
//! or a config file, in that order of precedence.
//!
//! The config file is TOML with optional keys `server`, `token` and `admin_token`:
//!
//! ```toml
//! server = "127.0.0.1:7000"
//! token = "3f1c…"        # a user token, for messaging commands
//! admin_token = "9a0b…"  # used by `admin …` commands (falls back to `token`)
//! ```
//!
//! Its path is `--config`, else `$CHAT_CLI_CONFIG`, else
//! `$XDG_CONFIG_HOME/chat-cli/config.toml`, else `~/.config/chat-cli/config.toml`. A file
//! named explicitly must exist; the default one may be absent.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::client::CliError;

/// The server used when neither flag, environment nor config file names one.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7000";

/// The contents of a config file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ConfigFile {
    /// The node to talk to.
    #[serde(default)]
    pub server: Option<String>,
    /// A user token.
    #[serde(default)]
    pub token: Option<String>,
    /// The admin token, for `admin` commands.
    #[serde(default)]
    pub admin_token: Option<String>,
}

/// The default config path: `$XDG_CONFIG_HOME/chat-cli/config.toml`, else
/// `$HOME/.config/chat-cli/config.toml`.
pub fn default_path() -> Option<PathBuf> {
    let from_xdg = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = match from_xdg {
        Some(p) => p,
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".config"),
    };
    Some(base.join("chat-cli").join("config.toml"))
}

/// Parses config text; `path` is only for the error message.
pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, CliError> {
    toml::from_str(text).map_err(|e| {
        CliError::Failed(format!(
            "invalid config file {}: {}",
            path.display(),
            e.to_string().trim_end()
        ))
    })
}

/// Loads the config file: `explicit` (from `--config` or `$CHAT_CLI_CONFIG`) must exist;
/// the default path may be missing, which gives an empty config.
pub fn load(explicit: Option<&Path>) -> Result<ConfigFile, CliError> {
    let (path, required) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => match default_path() {
            Some(p) => (p, false),
            None => return Ok(ConfigFile::default()),
        },
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let config = parse(&text, &path)?;
            warn_if_readable_by_others(&path, &config);
            Ok(config)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            Ok(ConfigFile::default())
        }
        Err(e) => Err(CliError::Failed(format!(
            "cannot read config file {}: {e}",
            path.display()
        ))),
    }
}

/// Tokens are secrets: say so when a file holding one can be read by other users.
fn warn_if_readable_by_others(path: &Path, config: &ConfigFile) {
    use std::os::unix::fs::PermissionsExt;
    if config.token.is_none() && config.admin_token.is_none() {
        return;
    }
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "chat-cli: warning: {} holds a token and is readable by other users (chmod 600 it)",
                path.display()
            );
        }
    }
}

/// Picks the first non-empty value.
fn first_set(values: &[Option<&str>]) -> Option<String> {
    values
        .iter()
        .flatten()
        .map(|v| v.trim())
        .find(|v| !v.is_empty())
        .map(str::to_string)
}

/// The server: `given` (flag or environment, already merged by clap), else the file's,
/// else [`DEFAULT_SERVER`].
pub fn pick_server(given: &str, file: &ConfigFile) -> String {
    first_set(&[Some(given), file.server.as_deref()]).unwrap_or_else(|| DEFAULT_SERVER.to_string())
}

/// The token: `given` (flag or environment), else from the file — for admin commands its
/// `admin_token` first, then `token`.
pub fn pick_token(given: Option<&str>, file: &ConfigFile, admin: bool) -> Option<String> {
    if admin {
        first_set(&[given, file.admin_token.as_deref(), file.token.as_deref()])
    } else {
        first_set(&[given, file.token.as_deref()])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn precedence() {
        let file = parse(
            "server = \"10.0.0.1:7000\"\ntoken = \"user-t\"\nadmin_token = \"admin-t\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(pick_server("", &file), "10.0.0.1:7000");
        assert_eq!(pick_server("h:1", &file), "h:1");
        assert_eq!(pick_server("", &ConfigFile::default()), DEFAULT_SERVER);
        assert_eq!(pick_token(None, &file, false).as_deref(), Some("user-t"));
        assert_eq!(pick_token(None, &file, true).as_deref(), Some("admin-t"));
        assert_eq!(pick_token(Some("f"), &file, true).as_deref(), Some("f"));
        assert_eq!(
            pick_token(Some(" "), &file, false).as_deref(),
            Some("user-t")
        );
        let only_user = ConfigFile {
            token: Some("u".into()),
            ..ConfigFile::default()
        };
        assert_eq!(pick_token(None, &only_user, true).as_deref(), Some("u"));
        assert_eq!(pick_token(None, &ConfigFile::default(), false), None);
    }

    #[test]
    fn bad_files_are_named() {
        let err = parse("server = 5", Path::new("/x/config.toml")).unwrap_err();
        assert!(err.to_string().contains("/x/config.toml"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        assert!(load(Some(&missing)).is_err());
        std::fs::write(&missing, "token = \"t\"\n").unwrap();
        assert_eq!(load(Some(&missing)).unwrap().token.as_deref(), Some("t"));
    }
}
