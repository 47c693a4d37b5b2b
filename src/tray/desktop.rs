//! The desktop's services on the session bus that the tray uses besides the StatusNotifier
//! host: notifications (`org.freedesktop.Notifications`) and the file chooser of the desktop
//! portal (`org.freedesktop.portal.FileChooser`). Thin: one call each, over the tray's zbus
//! connection; [`file_uri_path`] is the only logic, and it is tested.

use std::collections::HashMap;
use std::path::PathBuf;

use futures_util::StreamExt;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};

use super::model::Notice;

const NOTIFICATIONS: &str = "org.freedesktop.Notifications";
const PORTAL: &str = "org.freedesktop.portal.Desktop";
const PORTAL_PATH: &str = "/org/freedesktop/portal/desktop";

/// Shows `notice` with `icon` (a theme name). Returns the server's notification id.
pub async fn notify(conn: &zbus::Connection, notice: &Notice, icon: &str) -> zbus::Result<u32> {
    let mut hints: HashMap<&str, Value<'_>> = HashMap::new();
    // The .desktop file the package installs: servers show its name and icon.
    hints.insert("desktop-entry", Value::from("pinhole-tray"));
    // Normal urgency: a session ended, nothing is on fire.
    hints.insert("urgency", Value::U8(1));
    let reply = conn
        .call_method(
            Some(NOTIFICATIONS),
            "/org/freedesktop/Notifications",
            Some(NOTIFICATIONS),
            "Notify",
            &(
                "Pinhole",
                0u32,
                icon,
                notice.summary.as_str(),
                notice.body.as_str(),
                Vec::<&str>::new(),
                hints,
                -1i32,
            ),
        )
        .await?;
    reply.body().deserialize::<u32>()
}

/// What the file chooser gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Chosen {
    File(PathBuf),
    Cancelled,
    /// No portal on this desktop (or it has no file chooser): why, in words.
    NoPortal(String),
}

/// Asks the desktop portal for one PKCS#12 bundle to open.
pub async fn choose_bundle(conn: &zbus::Connection) -> zbus::Result<Chosen> {
    // The portal answers with a Response signal on a request object; subscribe before asking
    // so that a quick answer is not missed, and take only the one for our request.
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.freedesktop.portal.Request")?
        .member("Response")?
        .build();
    let mut responses = zbus::MessageStream::for_match_rule(rule, conn, Some(4)).await?;
    let token = format!("pinhole{}", std::process::id());
    let mut options: HashMap<&str, Value<'_>> = HashMap::new();
    options.insert("handle_token", Value::from(token.as_str()));
    options.insert("modal", Value::from(true));
    options.insert(
        "filters",
        Value::from(vec![
            (
                "Pinhole certificate bundles (*.p12, *.pfx)",
                vec![(0u32, "*.p12"), (0u32, "*.pfx")],
            ),
            ("All files", vec![(0u32, "*")]),
        ]),
    );
    let reply = conn
        .call_method(
            Some(PORTAL),
            PORTAL_PATH,
            Some("org.freedesktop.portal.FileChooser"),
            "OpenFile",
            &("", "Import a Pinhole certificate bundle", options),
        )
        .await;
    let handle: OwnedObjectPath = match reply {
        Ok(m) => m.body().deserialize()?,
        Err(zbus::Error::MethodError(name, text, _))
            if matches!(
                name.as_str(),
                "org.freedesktop.DBus.Error.ServiceUnknown"
                    | "org.freedesktop.DBus.Error.NameHasNoOwner"
                    | "org.freedesktop.DBus.Error.UnknownInterface"
                    | "org.freedesktop.DBus.Error.UnknownMethod"
            ) =>
        {
            return Ok(Chosen::NoPortal(text.unwrap_or(name.to_string())));
        }
        Err(e) => return Err(e),
    };
    while let Some(msg) = responses.next().await {
        let msg = msg?;
        if msg.header().path().map(|p| p.as_str()) != Some(handle.as_str()) {
            continue;
        }
        let (code, results): (u32, HashMap<String, OwnedValue>) = msg.body().deserialize()?;
        if code != 0 {
            return Ok(Chosen::Cancelled);
        }
        let uris: Vec<String> = results
            .get("uris")
            .and_then(|v| Vec::<String>::try_from(v.clone()).ok())
            .unwrap_or_default();
        return Ok(match uris.first().and_then(|u| file_uri_path(u)) {
            Some(p) => Chosen::File(p),
            None => Chosen::Cancelled,
        });
    }
    Ok(Chosen::Cancelled)
}

/// The local path of a `file://` URI (percent-decoded), or `None` for any other URI.
pub fn file_uri_path(uri: &str) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let rest = uri.strip_prefix("file://")?;
    // `file:///p` or `file://localhost/p`; another host is not a local file.
    let path = match rest.strip_prefix("localhost") {
        Some(p) => p,
        None => rest,
    };
    if !path.starts_with('/') {
        return None;
    }
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let v = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(v, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(PathBuf::from(std::ffi::OsString::from_vec(out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_uris_become_paths() {
        assert_eq!(
            file_uri_path("file:///home/alice/My%20Bundles/alice.p12"),
            Some(PathBuf::from("/home/alice/My Bundles/alice.p12"))
        );
        assert_eq!(
            file_uri_path("file://localhost/tmp/a.p12"),
            Some(PathBuf::from("/tmp/a.p12"))
        );
        assert_eq!(file_uri_path("file://otherhost/tmp/a.p12"), None);
        assert_eq!(file_uri_path("https://example.com/a.p12"), None);
        assert_eq!(file_uri_path("file:///bad%2"), None);
    }
}
