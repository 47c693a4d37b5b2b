//! The remembered password: the bundle password kept in the desktop's Secret Service
//! (`org.freedesktop.secrets`: GNOME Keyring, KWallet 6, KeePassXC; the freedesktop.org Secret
//! Service API 0.2), through the `secret-service` crate on the tray's own session bus.
//!
//! One item per gateway and account, found by its attributes ([`Key::attributes`]): the
//! `xdg:schema` [`SCHEMA`], `gateway` (the address the daemon logged in to, `host:port`) and
//! `account`. The secret crosses the bus encrypted (the `dh-ietf1024-sha256-aes128-cbc-pkcs7`
//! session of the spec) and is held in [`Zeroizing`] memory; it is never logged.
//!
//! A desktop without a Secret Service is no error the technician must handle: every call says
//! [`SecretsError::Unavailable`], and the tray asks for the password as it would anyway.

use std::collections::HashMap;
use std::time::Duration;

use secret_service::{EncryptionType, SecretService};
use zeroize::Zeroizing;

/// The `xdg:schema` attribute of Pinhole's items (libsecret's convention for the kind of item).
pub const SCHEMA: &str = "org.pinhole.Password";

/// How long one call may take. An unlock prompt waits for the technician, so this is long; a
/// Secret Service that hangs must not keep a login waiting for ever.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Which password: that of `account` at `gateway`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub gateway: String,
    pub account: String,
}

impl Key {
    /// The attributes the item is stored and found by.
    pub fn attributes(&self) -> HashMap<&str, &str> {
        HashMap::from([
            ("xdg:schema", SCHEMA),
            ("gateway", self.gateway.as_str()),
            ("account", self.account.as_str()),
        ])
    }

    /// The label the desktop's password manager shows.
    pub fn label(&self) -> String {
        format!("Pinhole password of {} at {}", self.account, self.gateway)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// No Secret Service on the session bus (or no session bus).
    #[error("no Secret Service on the session bus ({0})")]
    Unavailable(String),
    /// The technician dismissed the unlock prompt.
    #[error("the keyring was not unlocked")]
    Dismissed,
    #[error("the Secret Service did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the Secret Service failed: {0}")]
    Failed(String),
}

fn map(e: secret_service::Error) -> SecretsError {
    use secret_service::Error as E;
    match e {
        E::Unavailable => SecretsError::Unavailable("no bus".into()),
        E::Prompt | E::PromptDisconnected => SecretsError::Dismissed,
        // Nothing owns org.freedesktop.secrets and nothing can be activated for it.
        E::Zbus(zbus::Error::MethodError(name, _, _))
            if name.as_str() == "org.freedesktop.DBus.Error.ServiceUnknown"
                || name.as_str() == "org.freedesktop.DBus.Error.NameHasNoOwner" =>
        {
            SecretsError::Unavailable(name.to_string())
        }
        E::Zbus(zbus::Error::FDO(f))
            if matches!(
                *f,
                zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_)
            ) =>
        {
            SecretsError::Unavailable(f.to_string())
        }
        E::ZbusFdo(
            f @ (zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_)),
        ) => SecretsError::Unavailable(f.to_string()),
        other => SecretsError::Failed(other.to_string()),
    }
}

async fn bounded<T>(f: impl Future<Output = Result<T, SecretsError>>) -> Result<T, SecretsError> {
    tokio::time::timeout(TIMEOUT, f)
        .await
        .unwrap_or(Err(SecretsError::Timeout(TIMEOUT)))
}

async fn connect(bus: &zbus::Connection) -> Result<SecretService<'static>, SecretsError> {
    SecretService::connect_with_existing(EncryptionType::Dh, bus.clone())
        .await
        .map_err(map)
}

/// The remembered password for `key`, if there is one (unlocking the keyring if it is locked:
/// the desktop may ask the technician for the keyring's password).
pub async fn get(
    bus: &zbus::Connection,
    key: &Key,
) -> Result<Option<Zeroizing<String>>, SecretsError> {
    bounded(async {
        let ss = connect(bus).await?;
        let found = ss.search_items(key.attributes()).await.map_err(map)?;
        let item = match (found.unlocked.first(), found.locked.first()) {
            (Some(i), _) => i,
            (None, Some(i)) => {
                ss.unlock_all(&[i]).await.map_err(map)?;
                i
            }
            (None, None) => return Ok(None),
        };
        let secret = Zeroizing::new(item.get_secret().await.map_err(map)?);
        // Not text: not ours, or damaged; as if there were none (the next login replaces it).
        Ok(std::str::from_utf8(&secret)
            .ok()
            .map(|s| Zeroizing::new(s.to_owned())))
    })
    .await
}

/// Stores `password` for `key` in the default collection (the login keyring), replacing an
/// earlier one.
pub async fn store(bus: &zbus::Connection, key: &Key, password: &str) -> Result<(), SecretsError> {
    bounded(async {
        let ss = connect(bus).await?;
        let collection = ss.get_default_collection().await.map_err(map)?;
        collection.ensure_unlocked().await.map_err(map)?;
        collection
            .create_item(
                &key.label(),
                key.attributes(),
                password.as_bytes(),
                true,
                "text/plain",
            )
            .await
            .map_err(map)?;
        Ok(())
    })
    .await
}

/// Deletes every remembered password for `key`; returns how many there were.
pub async fn delete(bus: &zbus::Connection, key: &Key) -> Result<usize, SecretsError> {
    bounded(async {
        let ss = connect(bus).await?;
        let found = ss.search_items(key.attributes()).await.map_err(map)?;
        let mut n = 0;
        for item in found.unlocked.iter().chain(found.locked.iter()) {
            item.delete().await.map_err(map)?;
            n += 1;
        }
        Ok(n)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_is_found_by_schema_gateway_and_account() {
        let k = Key {
            gateway: "gw.example:443".into(),
            account: "alice".into(),
        };
        let a = k.attributes();
        assert_eq!(a.len(), 3);
        assert_eq!(a["xdg:schema"], SCHEMA);
        assert_eq!(a["gateway"], "gw.example:443");
        assert_eq!(a["account"], "alice");
        assert_eq!(k.label(), "Pinhole password of alice at gw.example:443");
    }
}
