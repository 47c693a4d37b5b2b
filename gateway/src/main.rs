//! `pinhole-gateway`: the gateway server and its administration commands.
//!
//! Every administration command works on the state directory, whether the server runs or
//! not; a running server applies the change within a quarter of a second (see
//! `pinhole_gateway::server`).
#![allow(clippy::print_stdout)] // a CLI prints for its user

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use pinhole_certs::ca::DEFAULT_TECHNICIAN_DAYS;
use pinhole_certs::fsutil::write_private_atomic;
use pinhole_certs::{Bundle, GatewayAddress, GatewayInfo, PeerIdentity, Protection};
use pinhole_gateway::audit::{self, Actor, AuditPublicKey, Checkpoint, Verdict, escape};
use pinhole_gateway::disk::{DiskReserve, disk_status};
use pinhole_gateway::state::{StateDir, generate_password};
use pinhole_gateway::store::DomainPath;
use zeroize::Zeroizing;

/// Pinhole gateway: the relay server, registry and audit log.
///
/// The gateway is the only Pinhole component with an open port. Technicians (with a PKCS#12
/// bundle this command creates) and sites (enrolled with a one-time token) connect to it with
/// mutual TLS.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// State directory: keys, certificates, database and audit log.
    #[arg(
        long,
        global = true,
        env = "PINHOLE_GATEWAY_STATE",
        default_value = "/var/lib/pinhole-gateway"
    )]
    state: PathBuf,
    /// The key that signs audit checkpoints (Ed25519, PKCS#8 PEM, mode 0600), created on first
    /// use. Default: STATE/audit.key. Keep it on another file system or device so that whoever
    /// takes the database cannot sign.
    #[arg(
        long,
        global = true,
        env = "PINHOLE_GATEWAY_AUDIT_KEY",
        value_name = "PATH"
    )]
    audit_key: Option<PathBuf>,
    /// Free space to keep in the state directory's file system, below which the gateway warns
    /// (log, `status`): a size (512MiB, 2GiB) or a share of the file system (5%). Default: 256MiB
    /// or 2%, whichever is larger.
    #[arg(
        long,
        global = true,
        env = "PINHOLE_GATEWAY_DISK_RESERVE",
        value_name = "SIZE|PERCENT"
    )]
    disk_reserve: Option<DiskReserve>,
    /// The CA signer's socket (`pinhole-gateway signer`): certificates are signed there and the
    /// CA key need not be in STATE. Default: STATE/ca.key when it is there, else the signer at
    /// /run/pinhole-ca/signer.sock when it listens.
    #[arg(
        long,
        global = true,
        env = "PINHOLE_GATEWAY_SIGNER",
        value_name = "SOCKET"
    )]
    signer: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the CA, the server key and certificate, the database and the first portal admin.
    Init {
        /// An address technicians and sites dial (HOST:PORT), in the order to try; repeat for
        /// several (e.g. gw.example.com:443 and gw.example.com:11444).
        #[arg(long = "public-address", required = true)]
        public_addresses: Vec<GatewayAddress>,
    },
    /// Run the server until SIGTERM.
    Serve {
        /// Address to listen on; repeat for several.
        #[arg(long = "listen", default_values = ["0.0.0.0:443", "0.0.0.0:11444"])]
        listen: Vec<SocketAddr>,
        /// Address of the admin portal (HTTPS). Keep it on loopback and reach it through an
        /// SSH tunnel or a VPN; see README, "Admin portal".
        #[arg(long, default_value = "127.0.0.1:8443", value_name = "ADDR")]
        admin_listen: SocketAddr,
        /// The portal's certificate chain (PEM, leaf first). Default: the gateway's server
        /// certificate, which browsers do not trust until its CA (STATE/ca.crt) is imported.
        #[arg(long, value_name = "PATH", requires = "admin_key")]
        admin_cert: Option<PathBuf>,
        /// The private key of --admin-cert (PEM, readable by the gateway's user only).
        #[arg(long, value_name = "PATH", requires = "admin_cert")]
        admin_key: Option<PathBuf>,
        /// A host name the portal answers to (checked against the Host header), besides
        /// localhost, the listen address and the public addresses; repeat for several.
        #[arg(long = "admin-host", value_name = "NAME")]
        admin_hosts: Vec<String>,
    },
    /// Run the CA signer: the only process that holds the CA key.
    ///
    /// It listens on a Unix socket and signs site certificates (at enrollment) and technician
    /// certificates (portal bundles, `account create`) for `serve` and the account commands,
    /// so that the internet-facing server never holds the CA key. Run it as its own user,
    /// without network access (the packaged unit pinhole-ca.service does), with ca.crt and
    /// ca.key (0600) in --ca-state. Every request is checked (names, keys, validity, the
    /// caller's uid) and limited (--per-minute); every certificate issued is logged with its
    /// serial and appended to CA_STATE/issued.log. The global --state is not used.
    Signer {
        /// The signer's state directory: ca.crt, ca.key (mode 0600) and issued.log.
        #[arg(long, default_value = pinhole_gateway::signer::DEFAULT_CA_STATE, value_name = "DIR")]
        ca_state: PathBuf,
        /// The socket to listen on (created mode 0660; a stale socket is replaced).
        #[arg(long, default_value = pinhole_gateway::signer::DEFAULT_SOCKET, value_name = "PATH")]
        socket: PathBuf,
        /// A user who may ask for certificates, besides root and the signer's own user (the
        /// caller's uid is read from the socket, SO_PEERCRED); repeat for several.
        #[arg(long = "allow-user", value_name = "NAME")]
        allow_users: Vec<String>,
        /// The group to give the socket, so that the gateway's user can connect (the signer's
        /// user must be a member, unless the socket's directory is set-group-ID of that group,
        /// which gives it that group from the start).
        #[arg(long, value_name = "NAME")]
        socket_group: Option<String>,
        /// Certificates issued a minute, at most; further requests are refused until the
        /// minute has passed.
        #[arg(long, default_value_t = pinhole_gateway::signer::DEFAULT_PER_MINUTE, value_parser = clap::value_parser!(u32).range(1..))]
        per_minute: u32,
    },
    /// Portal administrators.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Domains: the tree that sites belong to and grants name.
    #[command(subcommand)]
    Domain(DomainCmd),
    /// Revoke or remove an enrolled site.
    #[command(subcommand)]
    Site(SiteCmd),
    /// Enrollment tokens for sites.
    #[command(subcommand, name = "site-token")]
    SiteToken(TokenCmd),
    /// Technician accounts.
    #[command(subcommand)]
    Account(AccountCmd),
    /// Give an account access to a domain and everything below it.
    Grant { account: String, domain: DomainPath },
    /// Take a domain grant away from an account.
    Ungrant { account: String, domain: DomainPath },
    /// List the enrolled sites.
    Sites {
        #[arg(long)]
        json: bool,
    },
    /// List the accounts.
    Accounts {
        #[arg(long)]
        json: bool,
    },
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Show the database, audit log, last checkpoint, audit key and free space.
    ///
    /// Exits with status 1 while the free space is below the reserve (--disk-reserve). Reads
    /// only: it creates no key and writes no record.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCmd {
    /// Create a portal administrator and print a one-time password; at first login they set
    /// their own password and enroll TOTP.
    Create {
        name: String,
        /// gateway (everything), auditor (reads everything, the audit log included), or
        /// domain:PATH (everything within the domain PATH and below it).
        #[arg(long, default_value = "gateway")]
        role: pinhole_gateway::portal::authz::AdminRole,
    },
    /// Give an administrator a new one-time password and remove their TOTP and recovery
    /// codes (a lost phone); they enroll again at next login.
    Reset { name: String },
    /// List the portal administrators.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DomainCmd {
    /// Create a domain (and its missing parents), e.g. `acme.plant-a`.
    Create { domain: DomainPath },
    /// Rename a domain with everything below it; its sites, grants, accounts and domain
    /// administrators follow. The new name's parent must exist.
    Rename { from: DomainPath, to: DomainPath },
    /// Delete an empty domain (no subdomain, site, grant, account, administrator or unused
    /// enrollment token in it).
    Delete { domain: DomainPath },
}

#[derive(Debug, Subcommand)]
enum SiteCmd {
    /// Revoke a site's certificate: it cannot log in again.
    ///
    /// A running gateway ends its link. The site stays listed (as revoked) until `site
    /// remove`.
    Revoke { name: String },
    /// Revoke a site's certificate and delete the site.
    ///
    /// To enroll it again, create a new token (`site-token create DOMAIN`); on the site,
    /// delete site.crt from its state directory and set the new token in site.toml.
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Print a one-time enrollment token for a site in DOMAIN.
    ///
    /// The token carries the gateway's key pin (after `@`), so that the site's first contact
    /// is pinned too: one string to paste into the site's site.toml.
    Create {
        domain: DomainPath,
        /// The name of the site that may use the token; any other name is refused.
        #[arg(long)]
        site: Option<String>,
        /// How long the token stays valid (s, m, h or d).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
enum AccountCmd {
    /// Create a technician account and write its PKCS#12 bundle.
    Create {
        name: String,
        /// Where to write the bundle (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Read the bundle password from this file (first line); otherwise a strong one-time
        /// password is generated and printed once.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Encrypt the bundle with 3DES and a SHA-1 MAC, for old platforms.
        #[arg(long)]
        legacy: bool,
        /// Certificate validity in days.
        #[arg(long, default_value_t = DEFAULT_TECHNICIAN_DAYS)]
        days: i64,
        /// The domain the account belongs to, whose domain administrators manage it in the
        /// portal. Default: none (gateway administrators only).
        #[arg(long)]
        domain: Option<DomainPath>,
        /// The technician's tray must not remember the bundle password in the desktop's
        /// Secret Service (default: it may, if the technician turns it on). See `account set`.
        #[arg(long)]
        forbid_remembered_password: bool,
    },
    /// Give an open account a new bundle and revoke its current certificate (a running
    /// gateway ends the old bundle's connections).
    Reissue {
        name: String,
        /// Where to write the new bundle (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Read the bundle password from this file (first line); otherwise a strong one-time
        /// password is generated and printed once.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Encrypt the bundle with 3DES and a SHA-1 MAC, for old platforms.
        #[arg(long)]
        legacy: bool,
        /// Certificate validity in days.
        #[arg(long, default_value_t = DEFAULT_TECHNICIAN_DAYS)]
        days: i64,
    },
    /// Close an account: revoke its certificate and end its live connections.
    Close { name: String },
    /// Change an account's settings.
    Set {
        name: String,
        /// Whether the technician's tray may remember the bundle password in the desktop's
        /// Secret Service. Takes effect at the account's next login; on `forbid`, a tray that
        /// remembered it deletes it then.
        #[arg(long, value_enum)]
        remembered_password: RememberedPassword,
    },
}

/// `account set --remembered-password`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RememberedPassword {
    Allow,
    Forbid,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ExportFormat {
    Jsonl,
    Csv,
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Print the events, oldest first.
    List {
        #[arg(long)]
        json: bool,
        /// Only events at or after this UTC time (RFC 3339, e.g. 2026-11-27T10:00:00Z).
        #[arg(long)]
        since: Option<String>,
    },
    /// Check the hash chain and, with --checkpoint, the log against stored checkpoints.
    ///
    /// Names the first bad row of the chain, and for each checkpoint whether the log was cut
    /// or rewritten since, or the checkpoint forged. Exits with status 1 on any finding.
    Verify {
        /// A file of checkpoints (lines from `audit checkpoint`, or log lines that contain
        /// them). Finds a log cut or rewritten since, and a forged checkpoint.
        #[arg(long, value_name = "FILE")]
        checkpoint: Option<PathBuf>,
        /// The audit public key to trust (64 hex digits, as `init` and `status` print it).
        /// Default: the public half of the audit key (--audit-key). Give your own stored copy
        /// to trust nothing on this machine.
        #[arg(long, value_name = "HEX", requires = "checkpoint")]
        audit_public_key: Option<AuditPublicKey>,
    },
    /// Print a signed checkpoint of the log as one line, and record it in the log.
    ///
    /// The line holds the row count, the last row's hash, the time, the audit public key and
    /// an Ed25519 signature over them. Store it away from the gateway; `audit verify
    /// --checkpoint FILE` checks the log against it later.
    Checkpoint,
    /// Write every event to standard output.
    Export {
        #[arg(long, value_enum)]
        format: ExportFormat,
    },
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    pinhole_proto::duration::parse(s).map_err(|e| e.to_string())
}

/// The operator running the CLI, for the audit log: the real uid, never `$USER`.
fn operator() -> Actor {
    pinhole_gateway::operator::cli_operator()
}

/// Says so loudly, before the audit log starts failing, when free space is below the reserve.
fn warn_if_disk_low(state: &StateDir) {
    if let Ok(status) = disk_status(state.root(), state.disk_reserve())
        && let Some(warning) = status.warning()
    {
        tracing::warn!("{warning}");
    }
}

fn read_password_file(path: &PathBuf) -> anyhow::Result<Zeroizing<String>> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    );
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        bail!(
            "{} is empty: the first line must hold the password",
            path.display()
        );
    }
    Ok(Zeroizing::new(line.to_owned()))
}

fn main() -> std::process::ExitCode {
    pinhole_clidoc::hook::<Cli>("pinhole-gateway"); // `__generate-docs DIR`, for packaging/build
    let cli = Cli::parse();
    pinhole_shell::telemetry::init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pinhole-gateway: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let state = StateDir::new(&cli.state)
        .with_audit_key(cli.audit_key)
        .with_disk_reserve(cli.disk_reserve.unwrap_or_default());
    let signer = cli.signer.as_deref();
    if !matches!(
        cli.command,
        Command::Init { .. } | Command::Status { .. } | Command::Signer { .. }
    ) {
        warn_if_disk_low(&state);
    }
    match cli.command {
        Command::Init { public_addresses } => {
            let init = state.init(&public_addresses)?;
            println!("initialized {}", state.root().display());
            println!("server pin: {}", init.pin);
            println!(
                "audit public key (store it away from this machine, to verify checkpoints): {}",
                init.audit_public_key
            );
            println!("portal administrator: {}", init.admin);
            println!(
                "one-time password (shown once, change it at first login): {}",
                init.admin_password.as_str()
            );
        }
        Command::Status { json } => {
            let status = pinhole_gateway::status::status(&state)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{status}");
            }
            if status.disk.low {
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
        Command::Serve {
            listen,
            admin_listen,
            admin_cert,
            admin_key,
            admin_hosts,
        } => {
            let admin = pinhole_gateway::serve::AdminOptions {
                listen: admin_listen,
                cert: admin_cert.zip(admin_key),
                hosts: admin_hosts,
            };
            // Before the runtime's threads: each would get an arena of its own.
            pinhole_gateway::memory::limit_arenas();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            runtime.block_on(pinhole_gateway::serve::serve(
                &state, &listen, &admin, signer,
            ))?;
        }
        Command::Signer {
            ca_state,
            socket,
            allow_users,
            socket_group,
            per_minute,
        } => {
            run_signer(
                ca_state,
                socket,
                &allow_users,
                socket_group.as_deref(),
                per_minute,
            )?;
        }
        Command::Admin(AdminCmd::Create { name, role }) => {
            let password = generate_password();
            let hash = pinhole_gateway::state::hash_password(&password)?;
            state.store()?.add_admin(&operator(), &name, &role, &hash)?;
            println!("created portal administrator {name} ({role})");
            println!(
                "one-time password (shown once, change it at first login): {}",
                password.as_str()
            );
        }
        Command::Admin(AdminCmd::Reset { name }) => {
            let password = generate_password();
            let hash = pinhole_gateway::state::hash_password(&password)?;
            state.store()?.reset_admin(&operator(), &name, &hash)?;
            println!("reset portal administrator {name}: TOTP and recovery codes removed");
            println!(
                "one-time password (shown once, change it at first login): {}",
                password.as_str()
            );
        }
        Command::Admin(AdminCmd::List { json }) => {
            let admins = state.store()?.admins()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&admins)?);
            } else {
                println!("{:<20} {:<36} {:<10} CREATED", "ADMIN", "ROLE", "TOTP");
                for a in admins {
                    println!(
                        "{:<20} {:<36} {:<10} {}",
                        escape(&a.name),
                        escape(&a.role.to_string()),
                        if a.must_change {
                            "first login"
                        } else if a.totp_enrolled {
                            "enrolled"
                        } else {
                            "none"
                        },
                        a.created
                    );
                }
            }
        }
        Command::Domain(DomainCmd::Create { domain }) => {
            let created = state.store()?.create_domain(&operator(), &domain)?;
            println!("created {}", created.join(", "));
        }
        Command::Domain(DomainCmd::Rename { from, to }) => {
            state.store()?.rename_domain(&operator(), &from, &to)?;
            println!("renamed domain {from} to {to}, with everything below it");
        }
        Command::Domain(DomainCmd::Delete { domain }) => {
            state.store()?.delete_domain(&operator(), &domain)?;
            println!("deleted domain {domain}");
        }
        Command::Site(SiteCmd::Revoke { name }) => {
            state.store()?.revoke_site(&operator(), &name)?;
            println!(
                "revoked site {name}: its certificate is refused from now on and a running gateway ends its link; to let it back: `pinhole-gateway site remove {name}`, then enroll it with a new token"
            );
        }
        Command::Site(SiteCmd::Remove { name }) => {
            state.store()?.remove_site(&operator(), &name)?;
            println!(
                "removed site {name}: certificate revoked, site deleted; to enroll it again: `pinhole-gateway site-token create DOMAIN`, then on the site delete site.crt from its state directory and set the new token in site.toml"
            );
        }
        Command::SiteToken(TokenCmd::Create { domain, site, ttl }) => {
            let pin = state.load()?.pin;
            let (secret, expires) =
                state
                    .store()?
                    .create_site_token(&operator(), &domain, site.as_deref(), ttl)?;
            let token = pinhole_certs::EnrollmentToken::new(&secret, Some(pin))
                .context("the token the store made")?;
            match &site {
                Some(site) => eprintln!(
                    "one-time enrollment token for site {site} in {domain}, valid until {expires}:"
                ),
                None => eprintln!(
                    "one-time enrollment token for a site in {domain}, valid until {expires} \
                     (any site name may use it; give --site NAME to bind it to one):"
                ),
            }
            println!("{token}");
        }
        Command::Account(AccountCmd::Create {
            name,
            out,
            password_file,
            legacy,
            days,
            domain,
            forbid_remembered_password,
        }) => {
            create_account(
                &state,
                signer,
                &name,
                &out,
                password_file.as_ref(),
                legacy,
                days,
                domain.as_ref(),
            )?;
            if forbid_remembered_password {
                state
                    .store()?
                    .set_remembered_password(&operator(), &name, true)
                    .with_context(|| {
                        format!(
                            "account {name} was created, but a remembered password is still                              allowed: run `account set {name} --remembered-password forbid`"
                        )
                    })?;
                println!("account {name}: a remembered password is forbidden");
            }
        }
        Command::Account(AccountCmd::Reissue {
            name,
            out,
            password_file,
            legacy,
            days,
        }) => {
            reissue_account(
                &state,
                signer,
                &name,
                &out,
                password_file.as_ref(),
                legacy,
                days,
            )?;
        }
        Command::Account(AccountCmd::Close { name }) => {
            state.store()?.close_account(&operator(), &name)?;
            println!("closed account {name}: certificate revoked, live connections ended");
        }
        Command::Account(AccountCmd::Set {
            name,
            remembered_password,
        }) => {
            let forbid = remembered_password == RememberedPassword::Forbid;
            state
                .store()?
                .set_remembered_password(&operator(), &name, forbid)?;
            println!(
                "account {name}: a remembered password is {} from its next login",
                if forbid { "forbidden" } else { "allowed" }
            );
        }
        Command::Grant { account, domain } => {
            state
                .store()?
                .set_grant(&operator(), &account, &domain, true)?;
            println!("granted {domain} to {account}");
        }
        Command::Ungrant { account, domain } => {
            state
                .store()?
                .set_grant(&operator(), &account, &domain, false)?;
            println!("removed {domain} from {account}");
        }
        Command::Sites { json } => {
            let sites = state.store()?.sites()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sites)?);
            } else {
                println!(
                    "{:<20} {:<24} {:<8} {:<8} {:<21} AGENTS",
                    "SITE", "DOMAIN", "STATE", "ONLINE", "LAST SEEN"
                );
                for s in sites {
                    let agents: Vec<String> = s
                        .agents
                        .iter()
                        .map(|a| format!("{} ({} {})", escape(&a.name), a.address, a.ports_text()))
                        .collect();
                    println!(
                        "{:<20} {:<24} {:<8} {:<8} {:<21} {}",
                        escape(&s.name),
                        escape(&s.domain),
                        if s.revoked.is_some() {
                            "revoked"
                        } else {
                            "enrolled"
                        },
                        match (s.online, s.switched_off) {
                            (true, _) => "yes",
                            (false, true) => "off",
                            (false, false) => "no",
                        },
                        escape(s.last_seen.as_deref().unwrap_or("-")),
                        if agents.is_empty() {
                            "-".into()
                        } else {
                            agents.join(", ")
                        }
                    );
                }
            }
        }
        Command::Accounts { json } => {
            let accounts = state.store()?.accounts()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&accounts)?);
            } else {
                println!(
                    "{:<20} {:<8} {:<16} {:<9} GRANTS",
                    "ACCOUNT", "STATE", "TUNNEL", "REMEMBER"
                );
                for a in accounts {
                    println!(
                        "{:<20} {:<8} {:<16} {:<9} {}",
                        escape(&a.name),
                        if a.closed.is_some() { "closed" } else { "open" },
                        a.tunnel_ip,
                        if a.forbid_remembered_password {
                            "forbidden"
                        } else {
                            "allowed"
                        },
                        if a.grants.is_empty() {
                            "-".into()
                        } else {
                            escape(&a.grants.join(", ")).into_owned()
                        }
                    );
                }
            }
        }
        Command::Audit(cmd) => return audit_cmd(&state, cmd),
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Issues `name` a new certificate and writes its bundle to `out` (mode 0600); the store then
/// swaps the serial and revokes the old one, or the bundle is removed again.
fn reissue_account(
    state: &StateDir,
    signer: Option<&std::path::Path>,
    name: &str,
    out: &PathBuf,
    password_file: Option<&PathBuf>,
    legacy: bool,
    days: i64,
) -> anyhow::Result<()> {
    if days < 1 {
        bail!("--days must be at least 1");
    }
    if out.exists() {
        bail!("{} exists; refusing to overwrite a bundle", out.display());
    }
    let mut store = state.store()?;
    match store.account(name)? {
        None => bail!("account {name} not found"),
        Some(a) if a.closed.is_some() => bail!("account {name} is closed: it gets no new bundle"),
        Some(_) => {}
    }
    let (password, generated) = match password_file {
        Some(p) => (read_password_file(p)?, false),
        None => (generate_password(), true),
    };
    let mut loaded = state.load()?;
    let ca = pinhole_gateway::signer::open(state, &mut loaded, signer)?;
    let info = GatewayInfo::new(loaded.addresses.clone(), loaded.pin)?;
    let identity = ca.issue_technician(name, &info, days)?;
    let serial = PeerIdentity::from_certificate(identity.certificate())?.serial;
    let protection = if legacy {
        Protection::Legacy
    } else {
        Protection::Modern
    };
    let p12 = Bundle::new(identity)?.to_pkcs12(&password, protection)?;
    write_private_atomic(out, &p12).with_context(|| format!("writing {}", out.display()))?;
    if let Err(e) = store.reissue_account(&operator(), name, &serial, days) {
        let _ = std::fs::remove_file(out);
        return Err(e.into());
    }
    println!(
        "re-issued the bundle of {name}: old certificate revoked; new bundle written to {}",
        out.display()
    );
    if generated {
        println!("bundle password (shown once): {}", password.as_str());
    }
    std::io::stdout().flush()?;
    Ok(())
}

#[allow(clippy::too_many_arguments)] // the command's options, one by one
fn create_account(
    state: &StateDir,
    signer: Option<&std::path::Path>,
    name: &str,
    out: &PathBuf,
    password_file: Option<&PathBuf>,
    legacy: bool,
    days: i64,
    domain: Option<&DomainPath>,
) -> anyhow::Result<()> {
    if days < 1 {
        bail!("--days must be at least 1");
    }
    if out.exists() {
        bail!("{} exists; refusing to overwrite a bundle", out.display());
    }
    let (password, generated) = match password_file {
        Some(p) => (read_password_file(p)?, false),
        None => (generate_password(), true),
    };
    let mut loaded = state.load()?;
    let mut store = state.store()?;
    if store.account(name)?.is_some() {
        bail!("account {name} already exists");
    }
    let ca = pinhole_gateway::signer::open(state, &mut loaded, signer)?;
    let info = GatewayInfo::new(loaded.addresses.clone(), loaded.pin)?;
    let identity = ca.issue_technician(name, &info, days)?;
    let serial = PeerIdentity::from_certificate(identity.certificate())?.serial;
    let bundle = Bundle::new(identity)?;
    let protection = if legacy {
        Protection::Legacy
    } else {
        Protection::Modern
    };
    let p12 = bundle.to_pkcs12(&password, protection)?;
    // The bundle is written before the account is recorded: a failed write leaves no account
    // without a bundle; a failed record removes the bundle again.
    write_private_atomic(out, &p12).with_context(|| format!("writing {}", out.display()))?;
    let created = match domain {
        Some(d) => store.create_account_in(&operator(), name, &serial, days, d),
        None => store.create_account(&operator(), name, &serial, days),
    };
    let ip = match created {
        Ok(ip) => ip,
        Err(e) => {
            let _ = std::fs::remove_file(out);
            return Err(e.into());
        }
    };
    println!(
        "created account {name} (tunnel address {ip}); bundle written to {}",
        out.display()
    );
    if generated {
        println!("bundle password (shown once): {}", password.as_str());
    }
    let mut stdout = std::io::stdout();
    stdout.flush()?;
    Ok(())
}

/// `pinhole-gateway signer`: resolves the names, then serves until SIGTERM or SIGINT.
fn run_signer(
    ca_state: PathBuf,
    socket: PathBuf,
    allow_users: &[String],
    socket_group: Option<&str>,
    per_minute: u32,
) -> anyhow::Result<()> {
    use pinhole_gateway::signer;
    let allowed_uids = allow_users
        .iter()
        .map(|u| signer::user_id(u).with_context(|| format!("--allow-user {u}: no such user")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let socket_gid = socket_group
        .map(|g| signer::group_id(g).with_context(|| format!("--socket-group {g}: no such group")))
        .transpose()?;
    let options = signer::SignerOptions {
        socket,
        allowed_uids,
        socket_gid,
        per_minute,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        signer::run_signer(&ca_state, &options, stop).await
    })
}

/// Checks every checkpoint in `file` against the log; prints one verdict per checkpoint.
/// Returns whether all hold.
fn verify_checkpoints(
    conn: &rusqlite::Connection,
    file: &std::path::Path,
    trusted: &AuditPublicKey,
) -> anyhow::Result<bool> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut checked = 0;
    let mut ok = true;
    for (n, line) in text.lines().enumerate() {
        let Some(parsed) = Checkpoint::find(line) else {
            continue;
        };
        let cp = parsed.with_context(|| format!("{} line {}", file.display(), n + 1))?;
        let verdict = audit::verify_checkpoint(conn, &cp, trusted)?;
        checked += 1;
        if verdict == audit::CheckpointVerdict::Holds {
            println!("checkpoint of {} ({} rows): holds", cp.time, cp.rows);
        } else {
            println!(
                "checkpoint of {} ({} rows, {} line {}): {verdict}",
                escape(&cp.time),
                cp.rows,
                escape(&file.display().to_string()),
                n + 1
            );
            ok = false;
        }
    }
    if checked == 0 {
        bail!(
            "{} holds no checkpoint (lines starting `{}`)",
            file.display(),
            pinhole_gateway::checkpoint::MARKER
        );
    }
    Ok(ok)
}

fn audit_cmd(state: &StateDir, cmd: AuditCmd) -> anyhow::Result<std::process::ExitCode> {
    let mut store = state.store()?;
    match cmd {
        AuditCmd::List { json, since } => {
            if let Some(s) = &since {
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .with_context(|| {
                        format!("--since {s}: expected RFC 3339 like 2026-11-27T10:00:00Z")
                    })?;
            }
            for r in audit::list(store.conn(), since.as_deref())? {
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "{:>5} {} {:<28} {:<24} {}",
                        r.id,
                        escape(&r.time),
                        escape(&r.event),
                        escape(&r.actor),
                        escape(&r.description)
                    );
                }
            }
        }
        AuditCmd::Verify {
            checkpoint,
            audit_public_key,
        } => {
            let mut ok = true;
            match audit::verify(store.conn())? {
                Verdict::Intact { rows } => println!("audit log intact: {rows} rows verified"),
                Verdict::Broken { row, why } => {
                    println!("audit log TAMPERED: first bad row is {row}: {why}");
                    ok = false;
                }
            }
            if let Some(file) = checkpoint {
                let trusted = match audit_public_key {
                    Some(k) => k,
                    None => state.audit_public_key()?,
                };
                ok &= verify_checkpoints(store.conn(), &file, &trusted)?;
            }
            if !ok {
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
        AuditCmd::Checkpoint => {
            let key = state.audit_key()?;
            let cp = store
                .record_checkpoint(&operator(), &key)
                .context("recording the checkpoint")?;
            println!("{cp}");
            eprintln!(
                "store this line away from the gateway (with the audit public key {}); check the log against it with `pinhole-gateway audit verify --checkpoint FILE`",
                cp.key
            );
        }
        AuditCmd::Export { format } => {
            let rows = audit::list(store.conn(), None)?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            if matches!(format, ExportFormat::Csv) {
                writeln!(out, "id,time,actor,object,event,description,hash")?;
            }
            for r in rows {
                match format {
                    ExportFormat::Jsonl => writeln!(out, "{}", serde_json::to_string(&r)?)?,
                    ExportFormat::Csv => writeln!(
                        out,
                        "{},{},{},{},{},{},{}",
                        r.id,
                        audit::csv_field(&r.time),
                        audit::csv_field(&r.actor),
                        audit::csv_field(&r.object),
                        audit::csv_field(&r.event),
                        audit::csv_field(&r.description),
                        hex::encode(&r.hash)
                    )?,
                }
            }
            out.flush()?;
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
