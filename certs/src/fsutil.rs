//! Private files: written whole or not at all, readable by their owner only.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Owner read and write, nobody else: keys, pins, tokens.
pub const PRIVATE_MODE: u32 = 0o600;

/// Writes `data` to `path` atomically with mode 0600.
///
/// The bytes go to a temporary file in the same directory (created with mode 0600, so the
/// secret is never readable by others, not even for an instant), which is flushed to disk and
/// renamed over `path`; the directory is then synced so that the rename survives power loss.
/// A crash leaves either the old file or the new one, never a mix.
pub fn write_private_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    write_private(path, data, Publish::Replace)
}

/// Like [`write_private_atomic`], but only if `path` does not exist yet: the file is linked
/// into place, never renamed over another, so two processes creating the same key at once end
/// with one key. Fails with [`io::ErrorKind::AlreadyExists`] otherwise.
pub fn write_private_new(path: &Path, data: &[u8]) -> io::Result<()> {
    write_private(path, data, Publish::CreateNew)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Publish {
    Replace,
    CreateNew,
}

fn write_private(path: &Path, data: &[u8], publish: Publish) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(PRIVATE_MODE)
            .open(&tmp)?;
        // An existing temporary file keeps its old mode: force ours.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(PRIVATE_MODE))?;
        file.write_all(data)?;
        file.sync_all()?;
        match publish {
            Publish::Replace => fs::rename(&tmp, path)?,
            Publish::CreateNew => fs::hard_link(&tmp, path)?,
        }
        File::open(dir)?.sync_all()
    })();
    // After a rename the temporary name is gone already; after a link (made or not) it goes.
    if result.is_err() || publish == Publish::CreateNew {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_whole_file_with_private_mode() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("secret");
        fs::write(&path, b"old").expect("old");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        write_private_atomic(&path, b"new contents").expect("write");
        assert_eq!(fs::read(&path).expect("read"), b"new contents");
        assert_eq!(
            fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path()).expect("ls").collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn a_new_file_never_replaces_an_existing_one() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("key");
        write_private_new(&path, b"first").expect("first");
        let e = write_private_new(&path, b"second").expect_err("exists");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).expect("read"), b"first");
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn failure_leaves_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("missing-dir").join("secret");
        assert!(write_private_atomic(&path, b"x").is_err());
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 0);
    }
}
