//! Asks for a password through `pinentry`, the desktop's secure password dialog (GnuPG's),
//! speaking its Assuan protocol over the program's stdin and stdout: a line per command, a
//! line per answer (`OK`, `ERR code text`, `D data`, `S …`, `# …`), data percent-escaped.
//! Which dialog appears (GNOME, Qt, curses, tty) is the desktop's choice of `pinentry`
//! program, not ours. The password is never logged and lives in [`Zeroizing`] buffers.
//!
//! The codec ([`escape`], [`parse`]) is pure; [`ask`] drives one program.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use zeroize::Zeroizing;

/// Assuan's line limit (including the newline): longer answers are a broken pinentry.
const MAX_LINE: usize = 1000;

/// libgpg-error's GPG_ERR_CANCELED, the low 16 bits of an `ERR` code when the technician
/// closed the dialog; the high bits name the source (pinentry's is 5).
const GPG_ERR_CANCELED: u32 = 99;

/// What the dialog shows.
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    pub title: String,
    pub description: String,
    pub prompt: String,
    /// Shown above the field: why the last attempt was refused.
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PinentryError {
    #[error("cannot start {program}: {source}")]
    Start {
        program: String,
        source: std::io::Error,
    },
    #[error("talking to pinentry: {0}")]
    Io(#[from] std::io::Error),
    #[error("pinentry refused {command}: {text}")]
    Refused { command: String, text: String },
    #[error("pinentry broke the protocol: {0}")]
    Protocol(String),
}

/// One answer line.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Ok,
    Err {
        code: u32,
        text: String,
    },
    /// Data, already unescaped.
    Data(Zeroizing<Vec<u8>>),
    /// Status and comment lines: information only.
    Other,
    /// The server asks the client for data, which this client never supplies.
    Inquire(String),
}

/// Escapes `text` for a command argument: `%`, CR, LF and other control bytes as `%XX`.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '%' || c.is_control() && (c as u32) < 0x20 {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Undoes `%XX` escapes.
fn unescape(data: &[u8]) -> Result<Zeroizing<Vec<u8>>, PinentryError> {
    let mut out = Zeroizing::new(Vec::with_capacity(data.len()));
    let mut i = 0;
    while i < data.len() {
        if data[i] == b'%' {
            let hex = data
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| PinentryError::Protocol("a bad %-escape in data".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Parses one answer line (without its newline).
pub fn parse(line: &[u8]) -> Result<Line, PinentryError> {
    let word_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let (word, rest) = (&line[..word_end], line.get(word_end + 1..).unwrap_or(&[]));
    Ok(match word {
        b"OK" => Line::Ok,
        b"D" => Line::Data(unescape(rest)?),
        b"ERR" => {
            let text = String::from_utf8_lossy(rest);
            let (code, text) = text.split_once(' ').unwrap_or((&text, ""));
            Line::Err {
                code: code.parse().unwrap_or(0),
                text: text.to_owned(),
            }
        }
        b"S" | b"#" => Line::Other,
        b"INQUIRE" => Line::Inquire(String::from_utf8_lossy(rest).into_owned()),
        _ if line.starts_with(b"#") => Line::Other,
        _ => {
            return Err(PinentryError::Protocol(format!(
                "unexpected answer {:?}",
                String::from_utf8_lossy(&line[..word_end.min(20)])
            )));
        }
    })
}

/// The data of a command that succeeded, or the code and text of its `ERR`.
type Answer = Result<Zeroizing<Vec<u8>>, (u32, String)>;

/// The conversation with a started pinentry.
struct Session<R, W> {
    rd: R,
    wr: W,
}

impl<R: BufRead, W: Write> Session<R, W> {
    /// Reads answer lines up to the closing `OK` or `ERR`; returns the data, or the error.
    fn answer(&mut self) -> Result<Answer, PinentryError> {
        let mut data = Zeroizing::new(Vec::new());
        loop {
            let mut line = Zeroizing::new(Vec::new());
            let n = <&mut R as std::io::Read>::take(&mut self.rd, MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)?;
            if n == 0 {
                return Err(PinentryError::Protocol("pinentry closed its output".into()));
            }
            if line.last() != Some(&b'\n') {
                return Err(PinentryError::Protocol("a line over 1000 bytes".into()));
            }
            line.pop();
            match parse(&line)? {
                Line::Ok => return Ok(Ok(data)),
                Line::Err { code, text } => return Ok(Err((code, text))),
                Line::Data(d) => data.extend_from_slice(&d),
                Line::Other => {}
                Line::Inquire(what) => {
                    // Not ours to answer: cancel the inquiry, the command then fails.
                    self.wr.write_all(b"CAN\n")?;
                    self.wr.flush()?;
                    tracing::debug!(%what, "pinentry inquired; cancelled");
                }
            }
        }
    }

    /// Sends a command whose success is required.
    fn command(&mut self, command: &str) -> Result<(), PinentryError> {
        self.wr.write_all(command.as_bytes())?;
        self.wr.write_all(b"\n")?;
        self.wr.flush()?;
        match self.answer()? {
            Ok(_) => Ok(()),
            Err((_, text)) => Err(PinentryError::Refused {
                command: command.split(' ').next().unwrap_or("").to_owned(),
                text,
            }),
        }
    }

    /// The whole dialog: greeting, settings, GETPIN. `None` when the technician cancelled.
    fn run(
        &mut self,
        prompt: &Prompt,
        tty: Option<(&str, &str)>,
    ) -> Result<Option<Zeroizing<String>>, PinentryError> {
        if let Err((_, text)) = self.answer()? {
            return Err(PinentryError::Refused {
                command: "the greeting".into(),
                text,
            });
        }
        if let Some((name, kind)) = tty {
            self.command(&format!("OPTION ttyname={}", escape(name)))?;
            self.command(&format!("OPTION ttytype={}", escape(kind)))?;
        }
        self.command(&format!("SETTITLE {}", escape(&prompt.title)))?;
        self.command(&format!("SETDESC {}", escape(&prompt.description)))?;
        self.command(&format!("SETPROMPT {}", escape(&prompt.prompt)))?;
        if let Some(e) = &prompt.error {
            self.command(&format!("SETERROR {}", escape(e)))?;
        }
        self.wr.write_all(b"GETPIN\n")?;
        self.wr.flush()?;
        let pin = match self.answer()? {
            Ok(data) => data,
            Err((code, _)) if code & 0xFFFF == GPG_ERR_CANCELED => return Ok(None),
            Err((_, text)) => {
                return Err(PinentryError::Refused {
                    command: "GETPIN".into(),
                    text,
                });
            }
        };
        let _ = self.wr.write_all(b"BYE\n");
        let _ = self.wr.flush();
        let text = String::from_utf8(pin.to_vec())
            .map_err(|_| PinentryError::Protocol("the password is not UTF-8".into()))?;
        Ok(Some(Zeroizing::new(text)))
    }
}

/// Shows `prompt` with `program` (a path, or a name looked up in PATH) and returns the
/// password, or `None` when the technician cancelled. Blocks until the dialog closes.
pub fn ask(program: &Path, prompt: &Prompt) -> Result<Option<Zeroizing<String>>, PinentryError> {
    let mut child = Command::new(program)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| PinentryError::Start {
            program: program.display().to_string(),
            source,
        })?;
    let (Some(wr), Some(rd)) = (child.stdin.take(), child.stdout.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(PinentryError::Protocol("no pipes to pinentry".into()));
    };
    // A terminal pinentry (curses, tty) needs to be told which terminal: ours, if we have one.
    let tty = std::fs::read_link("/proc/self/fd/0")
        .ok()
        .map(|p| p.display().to_string())
        .filter(|p| p.starts_with("/dev/pts/") || p.starts_with("/dev/tty"));
    let term = std::env::var("TERM").unwrap_or_else(|_| "dumb".into());
    let mut session = Session {
        rd: BufReader::new(rd),
        wr,
    };
    let result = session.run(prompt, tty.as_deref().map(|t| (t, term.as_str())));
    drop(session);
    // Closing its input ends a pinentry that is still waiting; reap it either way.
    let _ = child.wait();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dialog(server: &str, prompt: &Prompt) -> (Result<Option<String>, String>, String) {
        let mut sent = Vec::new();
        let mut s = Session {
            rd: std::io::Cursor::new(server.as_bytes().to_vec()),
            wr: &mut sent,
        };
        let r = s
            .run(prompt, None)
            .map(|p| p.map(|p| p.to_string()))
            .map_err(|e| e.to_string());
        (r, String::from_utf8(sent).expect("utf8"))
    }

    fn prompt() -> Prompt {
        Prompt {
            title: "Pinhole".into(),
            description: "Password of alice's bundle\n100% private".into(),
            prompt: "Password:".into(),
            error: None,
        }
    }

    #[test]
    fn a_password_comes_back_unescaped() {
        let (r, sent) = dialog(
            "OK Pleased to meet you\nOK\nOK\nOK\n# a comment\nS PIN_REPEATED\nD p%25w %0Aend\nOK\n",
            &prompt(),
        );
        assert_eq!(r, Ok(Some("p%w \nend".into())));
        assert_eq!(
            sent,
            "SETTITLE Pinhole\nSETDESC Password of alice's bundle%0A100%25 private\nSETPROMPT Password:\nGETPIN\nBYE\n"
        );
    }

    #[test]
    fn cancelling_is_not_an_error() {
        let (r, _) = dialog(
            "OK hi\nOK\nOK\nOK\nERR 83886179 Operation cancelled <Pinentry>\n",
            &prompt(),
        );
        assert_eq!(r, Ok(None));
    }

    #[test]
    fn the_error_of_the_last_try_is_shown() {
        let mut p = prompt();
        p.error = Some("Wrong password".into());
        let (r, sent) = dialog("OK\nOK\nOK\nOK\nOK\nD x\nOK\n", &p);
        assert_eq!(r, Ok(Some("x".into())));
        assert!(sent.contains("SETERROR Wrong password\nGETPIN\n"), "{sent}");
    }

    #[test]
    fn a_broken_pinentry_is_an_error() {
        let (r, _) = dialog("OK\nOK\n", &prompt());
        assert!(r.is_err());
        let (r, _) = dialog("HELLO\n", &prompt());
        assert!(r.is_err());
        let (r, _) = dialog(&format!("OK\n{}\n", "#".repeat(2000)), &prompt());
        assert!(r.expect_err("too long").contains("1000"));
        assert!(parse(b"D %4").is_err());
        let (r, _) = dialog("OK\nERR 5 no\n", &prompt());
        assert_eq!(r, Err("pinentry refused SETTITLE: no".into()));
    }

    #[test]
    fn escaping_covers_percent_and_control_characters() {
        assert_eq!(escape("a%b\r\nc é"), "a%25b%0D%0Ac é");
    }
}
