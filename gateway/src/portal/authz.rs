//! Who may do what: the three administrator roles, as a value, checked per object.
//!
//! Every handler asks [`AdminRole::may_read`] or [`AdminRole::may_write`] with the domain of
//! the object it touches (the site's domain, the account's home domain, the granted domain),
//! after loading the object and before acting. An object without a domain (an account
//! created from the CLI without `--domain`, the audit log) belongs to the gateway.

use std::fmt;
use std::str::FromStr;

use crate::store::{DomainPath, within};

/// A portal administrator's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRole {
    /// Everything.
    Gateway,
    /// Only objects in this domain or below it.
    Domain(DomainPath),
    /// Reads everything, the audit log included; changes nothing.
    Auditor,
}

impl AdminRole {
    /// Whether the role may see an object of `domain` (`None`: a gateway-wide object).
    pub fn may_read(&self, domain: Option<&str>) -> bool {
        match self {
            AdminRole::Gateway | AdminRole::Auditor => true,
            AdminRole::Domain(scope) => domain.is_some_and(|d| within(d, scope.as_str())),
        }
    }

    /// Whether the role may change an object of `domain`.
    pub fn may_write(&self, domain: Option<&str>) -> bool {
        match self {
            AdminRole::Gateway => true,
            AdminRole::Domain(scope) => domain.is_some_and(|d| within(d, scope.as_str())),
            AdminRole::Auditor => false,
        }
    }

    /// Renaming or deleting `domain` itself: a domain administrator's own root was given by
    /// a gateway administrator and stays theirs; the domains below it are its own.
    pub fn may_manage_domain(&self, domain: &str) -> bool {
        match self {
            AdminRole::Gateway => true,
            AdminRole::Domain(scope) => domain != scope.as_str() && within(domain, scope.as_str()),
            AdminRole::Auditor => false,
        }
    }

    /// The whole audit log: the gateway's own records and every domain's.
    pub fn may_read_audit(&self) -> bool {
        matches!(self, AdminRole::Gateway | AdminRole::Auditor)
    }

    /// The subtree whose audit records a role reads (its domains, and its sites, accounts and
    /// administrators as they are now); `None`: the whole log.
    pub fn audit_scope(&self) -> Option<&DomainPath> {
        match self {
            AdminRole::Gateway | AdminRole::Auditor => None,
            AdminRole::Domain(d) => Some(d),
        }
    }

    /// Creating and closing administrators, revoking sites' certificates gateway-wide.
    pub fn is_gateway(&self) -> bool {
        matches!(self, AdminRole::Gateway)
    }

    /// The column values: role name and scope.
    pub fn to_columns(&self) -> (&'static str, Option<&str>) {
        match self {
            AdminRole::Gateway => ("gateway", None),
            AdminRole::Domain(d) => ("domain", Some(d.as_str())),
            AdminRole::Auditor => ("auditor", None),
        }
    }

    pub fn from_columns(role: &str, domain: Option<&str>) -> Option<Self> {
        match (role, domain) {
            ("gateway", _) => Some(AdminRole::Gateway),
            ("auditor", _) => Some(AdminRole::Auditor),
            ("domain", Some(d)) => d.parse().ok().map(AdminRole::Domain),
            _ => None,
        }
    }
}

impl fmt::Display for AdminRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminRole::Gateway => f.write_str("gateway administrator"),
            AdminRole::Domain(d) => write!(f, "domain administrator of {d}"),
            AdminRole::Auditor => f.write_str("auditor"),
        }
    }
}

/// `gateway`, `auditor` or `domain:PATH` (the CLI's form).
impl FromStr for AdminRole {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gateway" => Ok(AdminRole::Gateway),
            "auditor" => Ok(AdminRole::Auditor),
            _ => match s.strip_prefix("domain:") {
                Some(d) => d
                    .parse()
                    .map(AdminRole::Domain)
                    .map_err(|e: crate::store::StoreError| e.to_string()),
                None => Err(format!(
                    "`{s}` is not a role: use gateway, auditor or domain:PATH (e.g. domain:acme)"
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acme() -> AdminRole {
        AdminRole::Domain("acme".parse().expect("domain"))
    }

    #[test]
    fn a_domain_admin_reaches_only_its_subtree() {
        let r = acme();
        assert!(r.may_read(Some("acme")) && r.may_write(Some("acme")));
        assert!(r.may_write(Some("acme.plant-a.line-3")));
        for other in [Some("globex"), Some("acme2"), Some("acm"), None] {
            assert!(!r.may_read(other) && !r.may_write(other), "{other:?}");
        }
        assert!(!r.may_read_audit());
        assert!(!r.is_gateway());
        assert!(r.may_manage_domain("acme.plant-a") && !r.may_manage_domain("acme"));
        assert!(!r.may_manage_domain("globex") && !r.may_manage_domain("acme2"));
    }

    #[test]
    fn an_auditor_reads_everything_and_writes_nothing() {
        let r = AdminRole::Auditor;
        assert!(r.may_read(Some("globex")) && r.may_read(None) && r.may_read_audit());
        assert!(!r.may_write(Some("globex")) && !r.may_write(None));
    }

    #[test]
    fn a_gateway_admin_does_everything() {
        let r = AdminRole::Gateway;
        assert!(r.may_write(None) && r.may_write(Some("globex")) && r.may_read_audit());
    }

    #[test]
    fn roles_round_trip() {
        for r in [AdminRole::Gateway, AdminRole::Auditor, acme()] {
            let (role, d) = r.to_columns();
            assert_eq!(AdminRole::from_columns(role, d), Some(r.clone()));
        }
        assert_eq!("domain:acme".parse::<AdminRole>(), Ok(acme()));
        assert!("domain:ACME".parse::<AdminRole>().is_err());
        assert!("root".parse::<AdminRole>().is_err());
        assert_eq!(AdminRole::from_columns("domain", None), None);
    }
}
