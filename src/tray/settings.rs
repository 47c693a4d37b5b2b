//! The tray's per-user settings, `$XDG_CONFIG_HOME/pinhole/tray.toml`, and where it keeps its
//! log (`$XDG_STATE_HOME/pinhole/tray.log`). Every setting has a default: the file is
//! optional, and a wrong one is refused with its path and line rather than half-read.
//!
//! ```toml
//! pinentry = "/usr/bin/pinentry-gnome3"  # the password dialog (default: `pinentry` in PATH)
//! notifications = true                   # tell when a session ends that you did not end
//! open = "xdg-open"                      # what "Open log" runs with the log's path
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Overrides the `pinentry` setting (tests, or a one-off run).
pub const PINENTRY_ENV: &str = "PINHOLE_PINENTRY";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub pinentry: PathBuf,
    pub notifications: bool,
    pub open: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            pinentry: PathBuf::from("pinentry"),
            notifications: true,
            open: "xdg-open".into(),
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
    fn unknown_settings_are_refused() {
        let e = Settings::parse("notification = false\n").expect_err("typo");
        assert!(e.to_string().contains("notification"), "{e}");
    }
}
