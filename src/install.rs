//! `dbagent install <dir>`: copies this binary into a directory shared with another container.
//!
//! An init container runs it to put `dbagent` into an `emptyDir` that the database container
//! mounts, so `archive_command` can run it inside an image that does not have it. No shell is
//! needed (the agent image may have none, and a read-only root filesystem forbids scratch
//! files): the copy is written beside its destination, made executable, flushed, and renamed
//! over it, so a container that starts at the same moment never runs half a binary.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::input_err;

/// The file name the binary gets in the target directory.
pub const BINARY_NAME: &str = "dbagent";

/// Copies the running binary to `<dir>/dbagent` (mode 0755), atomically. Returns the
/// destination and its size.
pub fn install(dir: &Path) -> anyhow::Result<(PathBuf, u64)> {
    let source = std::env::current_exe().context("finding the running binary")?;
    install_from(&source, dir)
}

/// Copies `source` to `<dir>/dbagent`; see [`install`].
pub fn install_from(source: &Path, dir: &Path) -> anyhow::Result<(PathBuf, u64)> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(input_err!(
                "install: {} is not a directory: give the mount point of the shared volume",
                dir.display()
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(input_err!(
                "install: {} does not exist: mount the shared volume there (an emptyDir) or give its path",
                dir.display()
            ));
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", dir.display()))),
    }
    let dest = dir.join(BINARY_NAME);
    let tmp = dir.join(format!(".{BINARY_NAME}.{}.tmp", std::process::id()));
    let result = copy_durably(source, &tmp, &dest, dir);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    let size = result?;
    Ok((dest, size))
}

fn copy_durably(source: &Path, tmp: &Path, dest: &Path, dir: &Path) -> anyhow::Result<u64> {
    let mut from = File::open(source).with_context(|| format!("opening {}", source.display()))?;
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(tmp)
        .map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => input_err!(
                "install: cannot write into {}: {e}: mount a writable volume there",
                dir.display()
            ),
            _ => anyhow::Error::new(e).context(format!("creating {}", tmp.display())),
        })?;
    let size = io::copy(&mut from, &mut to)
        .with_context(|| format!("copying {} to {}", source.display(), tmp.display()))?;
    to.flush()?;
    // The umask may have taken bits away from the mode given at creation.
    to.set_permissions(Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", tmp.display()))?;
    to.sync_all()
        .with_context(|| format!("flushing {}", tmp.display()))?;
    drop(to);
    fs::rename(tmp, dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("flushing directory {}", dir.display()))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_an_executable_and_nothing_else() {
        let src_dir = tempfile::tempdir().unwrap();
        let source = src_dir.path().join("agent");
        fs::write(&source, b"#!binary").unwrap();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(BINARY_NAME), b"old").unwrap();

        let (dest, size) = install_from(&source, dir.path()).unwrap();

        assert_eq!(dest, dir.path().join(BINARY_NAME));
        assert_eq!(size, 8);
        assert_eq!(fs::read(&dest).unwrap(), b"#!binary");
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(BINARY_NAME)]);
    }

    #[test]
    fn a_missing_directory_is_an_input_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = install_from(Path::new("/bin/true"), &dir.path().join("absent")).unwrap_err();
        assert_eq!(crate::error::exit_code(&err), crate::error::EXIT_INPUT);
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
