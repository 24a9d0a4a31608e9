//! Refusing secret files (private keys, password files) that others can read.
//!
//! A daemon's TLS key or broker password file readable by group or others lets any local
//! account (or a backup job, or a shared group) impersonate the node. Daemons check every
//! secret file they read with [`check_secret_file`] and refuse to start, naming the file, its
//! mode and the `chmod` that fixes it. `<daemon>.allow_group_readable_key = true` accepts
//! group-readable files (the `root:drawbridge 0640` layout); files readable by others are
//! always refused.

use std::path::{Path, PathBuf};

use crate::CertError;

/// Who besides the owner may access a secret file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyFileAccess {
    /// The owner only (mode 0600 or 0400): the default.
    #[default]
    OwnerOnly,
    /// The owner, and the file's group may read it (0640, 0440). Others never.
    GroupReadable,
}

impl KeyFileAccess {
    /// `GroupReadable` if `allow_group_readable`, else `OwnerOnly`.
    pub fn from_allow_group_readable(allow_group_readable: bool) -> Self {
        if allow_group_readable {
            Self::GroupReadable
        } else {
            Self::OwnerOnly
        }
    }

    /// Permission bits this policy refuses.
    fn forbidden_bits(self) -> u32 {
        match self {
            // Any access by group or others.
            Self::OwnerOnly => 0o077,
            // Group may read (and traverse); it may not write. Others: nothing.
            Self::GroupReadable => 0o027,
        }
    }

    fn fix(self) -> &'static str {
        match self {
            Self::OwnerOnly => "600",
            Self::GroupReadable => "640",
        }
    }
}

/// A secret file that others can access.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SecretFileExposed {
    /// The file (as configured).
    pub path: PathBuf,
    /// Its permission bits.
    pub mode: u32,
    /// The policy it failed.
    pub policy: KeyFileAccess,
}

impl std::fmt::Display for SecretFileExposed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.path.display();
        let who = if self.mode & 0o007 != 0 {
            "others"
        } else {
            "its group"
        };
        write!(
            f,
            "`{path}` is accessible to {who} (mode {:04o}); a private key or password file must \
             be readable by its owner only: run `chmod {} {path}`",
            self.mode,
            self.policy.fix()
        )?;
        if self.policy == KeyFileAccess::OwnerOnly
            && self.mode & KeyFileAccess::GroupReadable.forbidden_bits() == 0
        {
            f.write_str(
                " (or set `allow_group_readable_key = true` in the daemon's section to accept a \
                 group-readable file)",
            )?;
        }
        Ok(())
    }
}

/// Checks that `path` (followed through symlinks) is not accessible beyond what `access`
/// allows. A file that cannot be inspected is reported as an I/O error on it.
pub fn check_secret_file(path: &Path, access: KeyFileAccess) -> Result<(), CertError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(path).map_err(CertError::io(path))?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & access.forbidden_bits() != 0 {
            return Err(CertError::SecretFileExposed(SecretFileExposed {
                path: path.to_owned(),
                mode,
                policy: access,
            }));
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, access);
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn file_with_mode(dir: &Path, mode: u32) -> PathBuf {
        let p = dir.join(format!("key-{mode:o}.pem"));
        std::fs::write(&p, "secret").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn owner_only_files_are_accepted() {
        let d = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o400] {
            let p = file_with_mode(d.path(), mode);
            check_secret_file(&p, KeyFileAccess::OwnerOnly).unwrap();
            check_secret_file(&p, KeyFileAccess::GroupReadable).unwrap();
        }
    }

    #[test]
    fn a_world_readable_key_is_refused_with_its_mode_and_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let p = file_with_mode(d.path(), 0o644);
        let e = check_secret_file(&p, KeyFileAccess::OwnerOnly)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(e.contains("mode 0644"), "{e}");
        assert!(e.contains(&format!("chmod 600 {}", p.display())), "{e}");
        assert!(e.contains("others"), "{e}");
        // Allowing group-readable keys does not allow world-readable ones.
        let e = check_secret_file(&p, KeyFileAccess::GroupReadable)
            .unwrap_err()
            .to_string();
        assert!(e.contains("mode 0644"), "{e}");
        assert!(e.contains("chmod 640"), "{e}");
    }

    #[test]
    fn a_group_readable_key_is_refused_unless_allowed() {
        let d = tempfile::tempdir().unwrap();
        let p = file_with_mode(d.path(), 0o640);
        let e = check_secret_file(&p, KeyFileAccess::OwnerOnly)
            .unwrap_err()
            .to_string();
        assert!(e.contains("mode 0640"), "{e}");
        assert!(e.contains("its group"), "{e}");
        assert!(e.contains("allow_group_readable_key = true"), "{e}");
        check_secret_file(&p, KeyFileAccess::GroupReadable).unwrap();
        check_secret_file(
            &file_with_mode(d.path(), 0o440),
            KeyFileAccess::from_allow_group_readable(true),
        )
        .unwrap();
        // Group-writable is never fine.
        let p = file_with_mode(d.path(), 0o660);
        assert!(check_secret_file(&p, KeyFileAccess::GroupReadable).is_err());
    }

    #[test]
    fn a_missing_file_is_an_io_error_naming_it() {
        let e = check_secret_file(Path::new("/nonexistent/key.pem"), KeyFileAccess::OwnerOnly)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/key.pem"), "{e}");
    }
}
