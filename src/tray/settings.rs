//! The tray's per-user settings, `$XDG_CONFIG_HOME/pinhole/tray.toml`, and where it keeps its
//! log (`$XDG_STATE_HOME/pinhole/tray.log`). Every setting has a default: the file is
//! optional, and a wrong one is refused with its path and line rather than half-read.
//!
//! ```toml
//! pinentry = "/usr/bin/pinentry-gnome3"  # the password dialog (default: `pinentry` in PATH)
//! notifications = true                   # tell when a session ends that you did not end
//! open = "xdg-open"                      # what "Open log" runs with the log's path
//! remember_password = false              # keep the password in the Secret Service
//! ```
//!
//! `remember_password` is also the menu's "Remember password" check item, which writes this
//! file back ([`Settings::save`]: the values stay, comments do not). It has effect only where
//! the gateway allows it for the account and the desktop has a Secret Service.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Overrides the `pinentry` setting (tests, or a one-off run).
pub const PINENTRY_ENV: &str = "PINHOLE_PINENTRY";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub pinentry: PathBuf,
    pub notifications: bool,
    pub open: String,
    /// Keep the bundle password in the desktop's Secret Service after a login, and log in
    /// with it without asking. Off by default.
    pub remember_password: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            pinentry: PathBuf::from("pinentry"),
            notifications: true,
            open: "xdg-open".into(),
            remember_password: false,
        }
    }
}

/// The directories of the `pinhole` application for this user.
fn dirs() -> Option<directories::ProjectDirs> {
    directories::ProjectDirs::from("", "", "pinhole")
}

/// `~/.config/pinhole/tray.toml` (or under `$XDG_CONFIG_HOME`).
pub fn path() -> Option<PathBuf> {
    dirs().map(|d| d.config_dir().join("tray.toml"))
}

/// The tray's log: `~/.local/state/pinhole/tray.log` (or under `$XDG_STATE_HOME`).
pub fn log_path() -> Option<PathBuf> {
    let d = dirs()?;
    let dir = d.state_dir().unwrap_or_else(|| d.data_local_dir());
    Some(dir.join("tray.log"))
}

impl Settings {
    /// Parses the settings file's text.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Reads `path` (absent: the defaults), then applies [`PINENTRY_ENV`].
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut s = match path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(text) => Self::parse(&text).with_context(|| format!("in {}", p.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::default(),
                Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
            },
            None => Self::default(),
        };
        if let Some(p) = std::env::var_os(PINENTRY_ENV).filter(|p| !p.is_empty()) {
            s.pinentry = PathBuf::from(p);
        }
        Ok(s)
    }

    /// Turns `remember_password` on or off in the file at `path` (atomically; its directory is
    /// created), keeping the file's other values (not its comments), and not writing what
    /// came from the environment.
    pub fn save_remember_password(path: &Path, on: bool) -> anyhow::Result<()> {
        use anyhow::Context;
        let mut on_disk = match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).with_context(|| format!("in {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        on_disk.remember_password = on;
        let text = toml::to_string(&on_disk).context("writing the settings as TOML")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        pinhole_certs::fsutil::write_private_atomic(path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// The gateway and account of the last login whose password the tray stored: where it looks
/// when the daemon does not know them yet (it learns them from the bundle at login, and a
/// restarted daemon has not read it).
pub fn last_login_path() -> Option<PathBuf> {
    log_path().map(|p| p.with_file_name("last-login.toml"))
}

/// See [`last_login_path`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LastLogin {
    pub gateway: String,
    pub account: String,
}

impl LastLogin {
    /// The stored one; `None` if there is none or it does not parse.
    pub fn load() -> Option<Self> {
        let text = std::fs::read_to_string(last_login_path()?).ok()?;
        toml::from_str(&text).ok()
    }

    /// Best effort: without it, a restarted daemon's first login asks for the password.
    pub fn save(&self) {
        let Some(path) = last_login_path() else {
            return;
        };
        if let (Ok(text), Some(dir)) = (toml::to_string(self), path.parent()) {
            let _ = std::fs::create_dir_all(dir);
            let _ = pinhole_certs::fsutil::write_private_atomic(&path, text.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_what_the_file_leaves_out() {
        assert_eq!(Settings::parse("").expect("empty"), Settings::default());
        let s = Settings::parse("notifications = false\n").expect("parses");
        assert!(!s.notifications);
        assert_eq!(s.pinentry, PathBuf::from("pinentry"));
    }

    #[test]
    fn remembering_is_off_by_default_and_saved_as_read() {
        assert!(!Settings::default().remember_password);
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("pinhole/tray.toml");
        Settings::save_remember_password(&path, true).expect("a new file");
        assert!(Settings::load(Some(&path)).expect("load").remember_password);
        std::fs::write(
            &path,
            "notifications = false\npinentry = \"/usr/bin/pinentry-qt\"\n",
        )
        .expect("write");
        Settings::save_remember_password(&path, true).expect("save");
        let back = Settings::parse(&std::fs::read_to_string(&path).expect("read")).expect("parse");
        assert!(back.remember_password);
        assert!(!back.notifications, "the other settings stay");
        assert_eq!(back.pinentry, PathBuf::from("/usr/bin/pinentry-qt"));
        Settings::save_remember_password(&path, false).expect("off");
        assert!(!Settings::load(Some(&path)).expect("load").remember_password);
        // A broken file is not overwritten.
        std::fs::write(&path, "remember = yes\n").expect("write");
        assert!(Settings::save_remember_password(&path, true).is_err());
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "remember = yes\n"
        );
    }

    #[test]
    fn unknown_settings_are_refused() {
        let e = Settings::parse("notification = false\n").expect_err("typo");
        assert!(e.to_string().contains("notification"), "{e}");
    }
}
