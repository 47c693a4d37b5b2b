//! The embedded SQLite store as the hub's [`Registry`].

use pinhole_proto::{Agent, SiteView};
use rusqlite::{OptionalExtension, params};

use crate::audit;
use crate::registry::{
    Account, AuditRecord, EnrollError, Issued, Registry, RegistryError, Site, SiteReport,
    SiteSerials,
};
use crate::store::{Store, StoreError, now_rfc3339};

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        RegistryError(e.to_string())
    }
}

impl From<rusqlite::Error> for RegistryError {
    fn from(e: rusqlite::Error) -> Self {
        RegistryError(e.to_string())
    }
}

impl Registry for Store {
    fn account(&mut self, name: &str) -> Result<Option<Account>, RegistryError> {
        Ok(Store::account(self, name)?.map(|a| Account {
            name: a.name,
            closed: a.closed.is_some(),
            tunnel_ip: a.tunnel_ip,
            serial: a.serial,
            grants: a.grants,
            forbid_remembered_password: a.forbid_remembered_password,
        }))
    }

    fn site(&mut self, name: &str) -> Result<Option<Site>, RegistryError> {
        let row: Option<(String, Vec<u8>, String, bool)> = self
            .conn()
            .query_row(
                "SELECT s.domain, s.serial, s.agents,
                        EXISTS (SELECT 1 FROM revoked r WHERE r.serial = s.serial)
                 FROM sites s WHERE s.name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        Ok(row.map(|(domain, serial, agents, revoked)| Site {
            name: name.to_owned(),
            domain,
            serial,
            revoked,
            // Stored agents were validated before they were written; a row that does not
            // parse offers no agent rather than a guessed one.
            agents: serde_json::from_str::<Vec<Agent>>(&agents).unwrap_or_default(),
        }))
    }

    fn site_serials(&mut self) -> Result<SiteSerials, RegistryError> {
        let mut stmt = self.conn().prepare_cached(
            "SELECT s.name, s.serial FROM sites s
             WHERE NOT EXISTS (SELECT 1 FROM revoked r WHERE r.serial = s.serial)",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let mut out = SiteSerials::new();
        for row in rows {
            let (name, serial): (String, Vec<u8>) = row?;
            out.insert(name, serial);
        }
        Ok(out)
    }

    fn inventory(&mut self, account: &Account) -> Result<Vec<SiteView>, RegistryError> {
        Ok(Store::inventory(self, &account.name)?)
    }

    fn enroll(
        &mut self,
        token: &str,
        site: &str,
        issue: &mut dyn FnMut() -> Result<Issued, String>,
    ) -> Result<Vec<u8>, EnrollError> {
        match Store::enroll(self, token, site, || {
            issue().map(|i| (i.certificate, i.serial))
        }) {
            Ok(cert) => Ok(cert),
            Err(StoreError::TokenRefused(why)) => Err(EnrollError::Refused(why)),
            Err(StoreError::Invalid(why)) => Err(EnrollError::Invalid(why)),
            Err(e) => Err(EnrollError::Registry(e.into())),
        }
    }

    fn site_connected(&mut self, site: &str, report: &SiteReport<'_>) -> Result<(), RegistryError> {
        Ok(Store::site_connected(
            self,
            site,
            report.software,
            report.boot_id,
            report.agents,
            report.from,
        )?)
    }

    fn site_agents(&mut self, site: &str, agents: &[Agent]) -> Result<(), RegistryError> {
        Ok(Store::site_agents(self, site, agents)?)
    }

    fn site_disconnected(
        &mut self,
        site: &str,
        switched_off: bool,
        record: &AuditRecord,
    ) -> Result<(), RegistryError> {
        Ok(Store::site_disconnected(
            self,
            site,
            switched_off,
            record.event,
            &record.description,
        )?)
    }

    fn sites_seen(&mut self, sites: &[String]) -> Result<(), RegistryError> {
        let tx = self.tx()?;
        let now = now_rfc3339();
        for s in sites {
            tx.execute(
                "UPDATE sites SET last_seen = ?1 WHERE name = ?2",
                params![now, s],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn record(&mut self, records: &[AuditRecord]) -> Result<(), RegistryError> {
        let tx = self.tx()?;
        for r in records {
            audit::append(&tx, &r.actor, &r.object, r.event, &r.description)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn record_pending(&mut self, records: &[AuditRecord]) -> Result<(), RegistryError> {
        self.unflushed(|s| Registry::record(s, records))?;
        // Durable while the site works on it, off the technician's way.
        self.sync_wal_soon();
        Ok(())
    }
}
