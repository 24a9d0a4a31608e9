//! Noticing that a file changed without reading it: the one rule both the CRL files
//! ([`crate::Revocation::reload_now`]) and the daemons' TLS files
//! (`drawbridge_runtime::tls_reload`) are polled with.

use std::path::Path;
use std::time::SystemTime;

/// What polling can tell about one file's version without reading it: two stamps that
/// differ mean the file may have changed, so it is read again.
///
/// Modification time, size and inode catch edits and replacements (a rename over the file
/// brings a new inode). Change time and mode are in as well because a `chmod` changes
/// nothing else: fixing a key file's permissions must be noticed, since the TLS reload
/// refuses a key others can read until they are fixed. For CRL files that is more than
/// needed; a `chmod` then only makes them be read again, which changes nothing when their
/// contents are the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    ino: u64,
    /// Change time (seconds, nanoseconds).
    #[cfg(unix)]
    ctime: (i64, i64),
    #[cfg(unix)]
    mode: u32,
}

impl FileStamp {
    /// The stamp of the file at `path` now (symbolic links followed: what a read would see).
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let m = std::fs::metadata(path)?;
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt as _;
        Ok(Self {
            modified: m.modified().ok(),
            len: m.len(),
            #[cfg(unix)]
            ino: m.ino(),
            #[cfg(unix)]
            ctime: (m.ctime(), m.ctime_nsec()),
            #[cfg(unix)]
            mode: m.mode(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_replacement_and_chmod_change_the_stamp() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "one").unwrap();
        let first = FileStamp::of(&path).unwrap();
        assert_eq!(FileStamp::of(&path).unwrap(), first, "nothing changed");

        std::fs::write(&path, "one, two").unwrap();
        let written = FileStamp::of(&path).unwrap();
        assert_ne!(written, first);

        let tmp = dir.path().join("f.tmp");
        std::fs::write(&tmp, "one, two").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let replaced = FileStamp::of(&path).unwrap();
        assert_ne!(replaced, written, "same size, new inode");

        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode ^ 0o004)).unwrap();
        assert_ne!(FileStamp::of(&path).unwrap(), replaced, "chmod only");

        assert!(FileStamp::of(&dir.path().join("missing")).is_err());
    }
}
