//! Registry changes the portal makes beyond the CLI's: renaming and deleting domains,
//! re-issuing an account's certificate; and which audit rows a domain administrator may read.
//!
//! Each change is one audited transaction, like the rest of [`crate::store`]; a running
//! server's watcher sees the commit and hands it to [`crate::hub::Hub::handle_admin_change`],
//! which pushes new inventories and ends the links and sessions the change affects (a
//! replaced certificate ends its link at once).

use rusqlite::{OptionalExtension, params};

use crate::audit::{self, Actor};
use crate::store::{DomainPath, Result, Store, StoreError, expiry, now_rfc3339, within};

/// The tables whose `domain` column names a domain, and what a row of each is, for the
/// message that says why a domain is not empty.
const DOMAIN_REFERENCES: &[(&str, &str, &str)] = &[
    ("sites", "domain", "site"),
    ("grants", "domain", "grant"),
    ("accounts", "domain", "account"),
    ("admins", "domain", "domain administrator"),
];

fn count(n: i64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

impl Store {
    /// Renames `from` to `to` with everything below it (`acme.plant-a.line-3` follows
    /// `acme.plant-a`): sites, grants, accounts' home domains, domain administrators' scopes
    /// and enrollment tokens follow. `to` must not exist, and its parent must.
    pub fn rename_domain(
        &mut self,
        actor: &Actor,
        from: &DomainPath,
        to: &DomainPath,
    ) -> Result<()> {
        let tx = self.tx()?;
        let subtree: Vec<(String, String)> = {
            let mut stmt = tx.prepare("SELECT name, created FROM domains ORDER BY name")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<rusqlite::Result<Vec<(String, String)>>>()?
                .into_iter()
                .filter(|(d, _)| within(d, from.as_str()))
                .collect()
        };
        if subtree.is_empty() {
            return Err(StoreError::NotFound(format!("domain {from}")));
        }
        if within(to.as_str(), from.as_str()) {
            return Err(StoreError::Invalid(format!(
                "domain {from} cannot be renamed to {to}, below itself"
            )));
        }
        if let Some((parent, _)) = to.as_str().rsplit_once('.') {
            let exists = tx
                .query_row(
                    "SELECT 1 FROM domains WHERE name = ?1",
                    [parent],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if !exists {
                return Err(StoreError::NotFound(format!("domain {parent}")));
            }
        }
        let renamed: Vec<(String, String, String)> = subtree
            .into_iter()
            .map(|(old, created)| {
                let new = format!("{to}{}", &old[from.as_str().len()..]);
                (old, new, created)
            })
            .collect();
        for (_, new, created) in &renamed {
            if tx.execute(
                "INSERT OR IGNORE INTO domains (name, created) VALUES (?1, ?2)",
                params![new, created],
            )? == 0
            {
                return Err(StoreError::Exists(format!("domain {new}")));
            }
        }
        let mut moved = [0usize; 2];
        for (old, new, _) in &renamed {
            for (table, column, _) in DOMAIN_REFERENCES {
                let n = tx.execute(
                    &format!("UPDATE {table} SET {column} = ?2 WHERE {column} = ?1"),
                    params![old, new],
                )?;
                match *table {
                    "sites" => moved[0] += n,
                    "grants" => moved[1] += n,
                    _ => {}
                }
            }
            tx.execute(
                "UPDATE tokens SET domain = ?2 WHERE domain = ?1",
                params![old, new],
            )?;
        }
        for (old, _, _) in &renamed {
            tx.execute("DELETE FROM domains WHERE name = ?1", [old])?;
        }
        audit::append(
            &tx,
            actor,
            &format!("domain:{from}"),
            "domain renamed",
            &format!(
                "domain {from} renamed to {to}, with {} below it; {} and {} follow",
                count(renamed.len() as i64 - 1, "subdomain"),
                count(moved[0] as i64, "site"),
                count(moved[1] as i64, "grant"),
            ),
        )?;
        tx.commit()
    }

    /// Deletes `domain` if nothing is in it: no subdomain, site, grant, account, domain
    /// administrator or enrollment token that can still be used. Used and expired tokens go
    /// with it.
    pub fn delete_domain(&mut self, actor: &Actor, domain: &DomainPath) -> Result<()> {
        let tx = self.tx()?;
        let d = domain.as_str();
        if tx
            .query_row("SELECT 1 FROM domains WHERE name = ?1", [d], |_| Ok(()))
            .optional()?
            .is_none()
        {
            return Err(StoreError::NotFound(format!("domain {domain}")));
        }
        let mut inside = Vec::new();
        let below: i64 = tx.query_row(
            "SELECT count(*) FROM domains WHERE substr(name, 1, length(?1) + 1) = ?1 || '.'",
            [d],
            |r| r.get(0),
        )?;
        if below > 0 {
            inside.push(count(below, "subdomain"));
        }
        for (table, column, what) in DOMAIN_REFERENCES {
            let n: i64 = tx.query_row(
                &format!("SELECT count(*) FROM {table} WHERE {column} = ?1"),
                [d],
                |r| r.get(0),
            )?;
            if n > 0 {
                inside.push(count(n, what));
            }
        }
        let now = now_rfc3339();
        let live: i64 = tx.query_row(
            "SELECT count(*) FROM tokens WHERE domain = ?1 AND used IS NULL AND expires > ?2",
            params![d, now],
            |r| r.get(0),
        )?;
        if live > 0 {
            inside.push(count(live, "unused enrollment token"));
        }
        if !inside.is_empty() {
            return Err(StoreError::Invalid(format!(
                "domain {domain} is not empty: {}",
                inside.join(", ")
            )));
        }
        tx.execute("DELETE FROM tokens WHERE domain = ?1", [d])?;
        tx.execute("DELETE FROM domains WHERE name = ?1", [d])?;
        audit::append(
            &tx,
            actor,
            &format!("domain:{domain}"),
            "domain deleted",
            &format!("domain {domain} deleted"),
        )?;
        tx.commit()
    }

    /// Gives open account `name` a new certificate (`serial`, valid `days`) and revokes the
    /// old one in the same transaction: the old bundle stops working at once.
    pub fn reissue_account(
        &mut self,
        actor: &Actor,
        name: &str,
        serial: &[u8],
        days: i64,
    ) -> Result<()> {
        let tx = self.tx()?;
        let (old, closed): (Vec<u8>, Option<String>) = tx
            .query_row(
                "SELECT serial, closed FROM accounts WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("account {name}")))?;
        if closed.is_some() {
            return Err(StoreError::Invalid(format!(
                "account {name} is closed: it gets no new bundle"
            )));
        }
        let now = now_rfc3339();
        tx.execute(
            "INSERT OR IGNORE INTO revoked (serial, revoked) VALUES (?1, ?2)",
            params![old, now],
        )?;
        tx.execute(
            "UPDATE accounts SET serial = ?2, expires = ?3 WHERE name = ?1",
            params![name, serial, expiry(days)],
        )?;
        audit::append(
            &tx,
            actor,
            &format!("account:{name}"),
            "account bundle re-issued",
            &format!(
                "account {name}: certificate {} revoked; certificate {} issued, valid {days} days",
                hex::encode(&old),
                hex::encode(serial)
            ),
        )?;
        tx.commit()
    }

    /// The audit objects a domain administrator of `scope` may read besides the domains
    /// within it (`domain:…`, matched by name): the sites now in its subtree, the accounts
    /// homed there and the administrators of its subtree.
    pub fn audit_objects_within(&self, scope: &DomainPath) -> Result<Vec<String>> {
        let s = scope.as_str();
        let mut out: Vec<String> = self
            .sites()?
            .into_iter()
            .filter(|x| within(&x.domain, s))
            .map(|x| format!("site:{}", x.name))
            .collect();
        for a in self.accounts()? {
            if self.account_domain(&a.name)?.is_some_and(|d| within(&d, s)) {
                out.push(format!("account:{}", a.name));
            }
        }
        for a in self.admins()? {
            if let super::authz::AdminRole::Domain(d) = &a.role
                && within(d.as_str(), s)
            {
                out.push(format!("admin:{}", a.name));
            }
        }
        Ok(out)
    }
}
