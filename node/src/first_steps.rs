//! What a person who just started chatd for the first time types next: printed once, when
//! `chatd` (no arguments) or `chatd demo` creates its cluster, to the terminal only — never
//! into the logs systemd collects.

use std::path::{Path, PathBuf};

/// How the printed commands name chat-cli.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliName {
    /// `./dev cli`: chatd runs in a checkout (started by `./dev run`).
    Dev,
    /// The chat-cli binary beside this chatd, by its full path.
    Path(PathBuf),
    /// `chat-cli`, on the PATH (installed).
    OnPath,
}

impl CliName {
    /// The right name for this process: `./dev cli` when the working directory is a chatd
    /// checkout, else the chat-cli beside this executable, else `chat-cli`.
    pub fn detect() -> Self {
        if Path::new("dev").is_file() && Path::new("node").join("Cargo.toml").is_file() {
            return Self::Dev;
        }
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("chat-cli")))
            .filter(|p| p.is_file());
        beside.map_or(Self::OnPath, Self::Path)
    }

    fn command(&self) -> String {
        match self {
            Self::Dev => "./dev cli".into(),
            Self::Path(p) => p.display().to_string(),
            Self::OnPath => "chat-cli".into(),
        }
    }
}

/// The next steps after a cluster was created: where the admin token is, a user to create,
/// a first message, an interactive chat. `CHATD_SERVER` is set first when the node is not
/// at chat-cli's default address.
pub fn text(what: &str, admin_token: &Path, server: &str, cli: &CliName) -> String {
    let token = std::path::absolute(admin_token).unwrap_or_else(|_| admin_token.to_path_buf());
    let cli = cli.command();
    let web = server.to_string();
    let server = if server == DEFAULT_SERVER {
        String::new()
    } else {
        format!("export CHATD_SERVER={server}\n  ")
    };
    format!(
        "\n{what}\n\
         The admin token is in {token}. Next, in another terminal:\n\
         \n  \
         {server}export CHATD_TOKEN=$(cat {token})\n  \
         alice=$({cli} admin users add alice)    # alice's token, shown once\n  \
         bob=$({cli} admin users add bob)\n  \
         CHATD_TOKEN=$alice {cli} send d:alice:bob \"hi bob\"   # the first send opens the chat\n  \
         CHATD_TOKEN=$bob {cli} chat d:alice:bob              # interactive: /help\n\
         \n\
         Or in a browser: http://{web}/ (sign in with a token; `admin users add` also\n\
         prints a sign-in link).\n\
         \n\
         README.md (\"First steps\") has more. This is printed once, at the first start.\n",
        token = token.display(),
        web = web,
    )
}

/// chat-cli's default server.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7000";

/// Prints [`text`] to stderr, unless the output goes to systemd's journal.
pub fn print(what: &str, admin_token: &Path, server: &str) {
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        return;
    }
    eprint!("{}", text(what, admin_token, server, &CliName::detect()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_token_file_and_the_server_when_not_the_default() {
        let t = text(
            "created",
            Path::new("/srv/chatd-data/admin.token"),
            DEFAULT_SERVER,
            &CliName::Dev,
        );
        assert!(t.contains("export CHATD_TOKEN=$(cat /srv/chatd-data/admin.token)"));
        assert!(t.contains("alice=$(./dev cli admin users add alice)"));
        assert!(!t.contains("--server"), "{t}");
        let t = text(
            "created",
            Path::new("/d/admin.token"),
            "127.0.0.1:7100",
            &CliName::OnPath,
        );
        assert!(
            t.contains("\n  export CHATD_SERVER=127.0.0.1:7100\n  export CHATD_TOKEN="),
            "{t}"
        );
        assert!(t.contains("alice=$(chat-cli admin users add alice)"), "{t}");
    }
}
