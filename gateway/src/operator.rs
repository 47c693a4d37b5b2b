//! Who runs an administration command, for the audit log.
//!
//! The operator is the process's real uid, named through `/etc/passwd`: the kernel vouches for
//! the uid, while `$USER`, `$LOGNAME` and `$SUDO_USER` are whatever the caller put in the
//! environment. When the real uid is 0 and `SUDO_UID` is set, the uid that sudo recorded is
//! named instead, marked `sudo:` — only root can set it, and root could write the database
//! directly anyway, so it attributes the action without granting anything.
//!
//! | how the command ran               | actor                            |
//! |-----------------------------------|----------------------------------|
//! | as alice (uid 1000)               | `admin:cli:uid=1000(alice)`      |
//! | `sudo pinhole-gateway …` by alice | `admin:cli:sudo:uid=1000(alice)` |
//! | as root, no sudo                  | `admin:cli:uid=0(root)`          |
//! | a uid without a passwd entry      | `admin:cli:uid=4000`             |
//!
//! Must never read `$USER` or `$SUDO_USER`.

use std::path::Path;

use crate::audit::Actor;

/// The passwd database read for names. Names from NSS sources other than files (LDAP, sssd)
/// are not looked up; such a user is recorded by uid, which identifies them as well.
const PASSWD: &str = "/etc/passwd";

/// The actor for a command run from the CLI by this process.
pub fn cli_operator() -> Actor {
    let real = rustix::process::getuid().as_raw();
    let sudo = std::env::var("SUDO_UID").ok();
    let passwd = std::fs::read_to_string(Path::new(PASSWD)).unwrap_or_default();
    Actor::Admin(describe(real, sudo.as_deref(), &passwd))
}

/// `cli:uid=N(name)`, or `cli:sudo:uid=N(name)` when root ran it through sudo.
fn describe(real_uid: u32, sudo_uid: Option<&str>, passwd: &str) -> String {
    let sudo = (real_uid == 0)
        .then(|| sudo_uid.and_then(|s| s.parse::<u32>().ok()))
        .flatten();
    let (prefix, uid) = match sudo {
        Some(uid) => ("cli:sudo:", uid),
        None => ("cli:", real_uid),
    };
    match user_name(passwd, uid) {
        Some(name) => format!("{prefix}uid={uid}({name})"),
        None => format!("{prefix}uid={uid}"),
    }
}

/// The first name in `passwd` (the `/etc/passwd` format) with `uid`.
fn user_name(passwd: &str, uid: u32) -> Option<&str> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let line_uid: u32 = fields.next()?.parse().ok()?;
        // `+`/`-` lines are NIS compatibility entries, not users.
        (line_uid == uid && !name.is_empty() && !name.starts_with(['+', '-', '#'])).then_some(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
# a comment:x:1000:
+nis:x:1000:1000::/:
alice:x:1000:1000:Alice,,,:/home/alice:/bin/bash
alias:x:1000:1000::/home/alice:/bin/sh
broken line
bob:x:notanumber:1:::
";

    #[test]
    fn names_the_real_uid_and_believes_sudo_only_from_root() {
        assert_eq!(describe(1000, None, PASSWD), "cli:uid=1000(alice)");
        assert_eq!(
            describe(1000, Some("0"), PASSWD),
            "cli:uid=1000(alice)",
            "a user cannot pose as root through SUDO_UID"
        );
        assert_eq!(describe(0, None, PASSWD), "cli:uid=0(root)");
        assert_eq!(
            describe(0, Some("1000"), PASSWD),
            "cli:sudo:uid=1000(alice)"
        );
        assert_eq!(describe(0, Some("garbage"), PASSWD), "cli:uid=0(root)");
        assert_eq!(describe(4000, None, PASSWD), "cli:uid=4000");
        assert_eq!(describe(0, Some("4000"), ""), "cli:sudo:uid=4000");
    }
}
