//! The "remote access active" output: a file that gets `1`/`0` and/or a command run with
//! `on`/`off`. Failures are logged, never fatal: a broken lamp must not stop the site.

use tracing::warn;

use crate::config::Light;

/// Sets the output. The command runs in the background; its exit status is logged.
pub fn set(light: Option<&Light>, on: bool) {
    let Some(light) = light else { return };
    if let Some(path) = &light.path
        && let Err(e) = std::fs::write(path, if on { "1\n" } else { "0\n" })
    {
        warn!(path = %path.display(), error = %e, "cannot write the light output");
    }
    if let Some(cmd) = &light.command {
        let arg = if on { "on" } else { "off" };
        match tokio::process::Command::new(cmd).arg(arg).spawn() {
            Ok(mut child) => {
                let cmd = cmd.clone();
                tokio::spawn(async move {
                    match child.wait().await {
                        Ok(s) if s.success() => {}
                        Ok(s) => {
                            warn!(command = %cmd.display(), status = %s, "light command failed")
                        }
                        Err(e) => {
                            warn!(command = %cmd.display(), error = %e, "light command failed")
                        }
                    }
                });
            }
            Err(e) => warn!(command = %cmd.display(), error = %e, "cannot run the light command"),
        }
    }
}
