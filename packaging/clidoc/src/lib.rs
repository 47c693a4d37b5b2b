//! Man pages and shell completions generated from a binary's own clap definition.
//!
//! Each Pinhole binary calls [`hook`] first thing in `main`, with its `Cli` type: started as
//! `BINARY __generate-docs DIR`, it writes its pages and completions into `DIR` and exits;
//! otherwise the call does nothing. The argument is not part of the clap definition (so it is
//! in no help text, page or completion), and the definitions stay untouched: what
//! `packaging/build` installs is generated from exactly what the binary parses.
//!
//! ```text
//! DIR/man1/BINARY.1, DIR/man1/BINARY-SUBCOMMAND….1   one page per command and subcommand
//! DIR/bash/BINARY  DIR/zsh/_BINARY  DIR/fish/BINARY.fish
//! ```

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// The first argument that asks for the documents.
pub const ARG: &str = "__generate-docs";

/// If the process was started as `BINARY __generate-docs DIR`, writes the documents for
/// `C`'s command (named `bin`, the installed program's name) into `DIR` and exits with status 0
/// (1 and a message on failure). Any other command line is left to the binary.
pub fn hook<C: clap::CommandFactory>(bin: &'static str) {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(ARG)) {
        return;
    }
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("{bin}: {ARG} needs a directory");
        std::process::exit(2);
    };
    match generate(C::command(), bin, &dir) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!(
                "{bin}: writing man pages and completions to {}: {e}",
                dir.display()
            );
            std::process::exit(1);
        }
    }
}

/// Writes the man pages (one per command and subcommand) and the bash, zsh and fish
/// completions of `cmd`, named `bin`, into `dir`.
pub fn generate(cmd: clap::Command, bin: &'static str, dir: &Path) -> std::io::Result<()> {
    // Not built here: clap_mangen leaves out clap's `help` subcommand only on an unbuilt command.
    let mut cmd = cmd.name(bin).bin_name(bin);
    let man = dir.join("man1");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(cmd.clone(), &man)?;
    for (shell, sub) in [
        (Shell::Bash, "bash"),
        (Shell::Zsh, "zsh"),
        (Shell::Fish, "fish"),
    ] {
        let out = dir.join(sub);
        std::fs::create_dir_all(&out)?;
        let written = clap_complete::generate_to(shell, &mut cmd, bin, &out)?;
        // clap_complete names the bash file `BINARY.bash`; bash-completion looks for `BINARY`.
        if shell == Shell::Bash {
            std::fs::rename(written, out.join(bin))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_pages_for_subcommands_and_three_shells() {
        let cmd = clap::Command::new("x")
            .version("1.0")
            .about("demo")
            .subcommand(clap::Command::new("run").about("runs"))
            .subcommand(clap::Command::new("secret").hide(true));
        let dir = tempfile::tempdir().expect("tempdir");
        generate(cmd, "demo-bin", dir.path()).expect("generate");
        for f in [
            "man1/demo-bin.1",
            "man1/demo-bin-run.1",
            "bash/demo-bin",
            "zsh/_demo-bin",
            "fish/demo-bin.fish",
        ] {
            assert!(dir.path().join(f).is_file(), "{f} missing");
        }
        let page = std::fs::read_to_string(dir.path().join("man1/demo-bin.1")).expect("page");
        assert!(
            page.contains("demo\\-bin") && page.contains("run"),
            "{page}"
        );
        assert!(!dir.path().join("man1/demo-bin-secret.1").exists());
        assert!(!dir.path().join("man1/demo-bin-help.1").exists());
    }
}
