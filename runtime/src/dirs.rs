//! The data dir's private directories.
//!
//! Unpacked layers and containers' files hold image files as the image made them, setuid
//! binaries among them: a local user who could reach one would have a root shell. The data
//! dir, `layers/`, `containers/` and each container's dir are therefore 0700 (root's), made
//! so when created and narrowed when found wider. (A container's `upper/` keeps its mode: it
//! is the mode of the container's `/`.)

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Mode of the private directories.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Creates `dir` and any missing parents with mode 0700; an existing `dir` owned by this
/// user that others may enter is narrowed to 0700 (one owned by someone else is left alone).
pub fn private_dir(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if !fs::metadata(dir)?.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} is not a directory", dir.display()),
        ));
    }
    narrow(dir)
}

/// Narrows an existing directory `dir` owned by this user that others may enter to 0700;
/// nothing if it does not exist or is not a directory.
pub fn narrow(dir: &Path) -> io::Result<()> {
    let md = match fs::metadata(dir) {
        Ok(md) => md,
        // Not ours to narrow (another user's path), or not there.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
            ) =>
        {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    if md.is_dir() && md.mode() & 0o077 != 0 && md.uid() == nix::unistd::geteuid().as_raw() {
        fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE))?;
    }
    Ok(())
}

/// Creates the single directory `dir` (its parent must exist) with mode 0700.
pub fn create_private(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(PRIVATE_DIR_MODE).create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn made_private_and_narrowed_when_found_wider() {
        let d = tempfile::tempdir().unwrap();
        let fresh = d.path().join("a/b/data");
        private_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        assert_eq!(mode(&d.path().join("a")), 0o700);
        let wide = d.path().join("wide");
        fs::create_dir(&wide).unwrap();
        fs::set_permissions(&wide, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&wide).unwrap();
        assert_eq!(mode(&wide), 0o700);
        // Idempotent; a file is refused.
        private_dir(&wide).unwrap();
        let f = d.path().join("file");
        fs::write(&f, b"").unwrap();
        assert!(private_dir(&f).is_err());
        create_private(&d.path().join("one")).unwrap();
        fs::set_permissions(&wide, fs::Permissions::from_mode(0o711)).unwrap();
        narrow(&wide).unwrap();
        assert_eq!(mode(&wide), 0o700);
        narrow(&d.path().join("missing")).unwrap();
        narrow(&f).unwrap();
        assert_eq!(mode(&d.path().join("one")), 0o700);
    }
}
