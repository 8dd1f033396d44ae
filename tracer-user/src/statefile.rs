//! What the agent keeps in its state directory is written atomically (a temporary file, synced,
//! then renamed) and readable by root only; the maps behind it are bounded the same way
//! everywhere: past the budget the least recently seen tenth goes.

use std::{collections::HashMap, hash::Hash, path::Path};

/// Writes `bytes` to `path` atomically, mode 0600.
///
/// The temporary file (`<path>.tmp`) is created with `O_CREAT|O_EXCL|O_NOFOLLOW`: whatever
/// already sits at that name (a stale file from a crash, or a symlink planted to make the agent
/// write through it) is never opened. A stale entry is unlinked (the link itself, never its
/// target) and the exclusive create is tried once more; if something reappears in between, the
/// save fails instead of following it.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600)
            .open(&tmp)
    };
    let mut f = match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(&tmp)?;
            create()?
        }
        r => r?,
    };
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Keeps `map` within `max` entries: when it is over, the least recently seen (by `seen`)
/// go until a tenth of the budget is free. Returns how many went (0 when within budget).
pub fn evict_oldest<K: Eq + Hash + Clone + Ord, V>(
    map: &mut HashMap<K, V>,
    max: usize,
    seen: impl Fn(&V) -> u64,
) -> usize {
    if map.len() <= max {
        return 0;
    }
    let mut order: Vec<(u64, K)> = map.iter().map(|(k, v)| (seen(v), k.clone())).collect();
    order.sort_unstable();
    let n = map.len() - max + max / 10;
    for (_, k) in order.into_iter().take(n) {
        map.remove(&k);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_at_the_temporary_name_is_never_followed() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = dir.path().join("detector.json");
        let tmp = dir.path().join("detector.json.tmp");
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        write_private(&path, b"{}").unwrap();
        // The link's target is untouched (content and mode); the state file is a regular file
        // of its own, mode 0600; the link is gone.
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::metadata(&victim).unwrap().mode() & 0o777, 0o644);
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_file());
        assert_eq!(m.mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
        assert!(std::fs::symlink_metadata(&tmp).is_err());
        // A dangling link (to a file that does not exist yet) does not create its target.
        let ghost = dir.path().join("ghost");
        std::os::unix::fs::symlink(&ghost, &tmp).unwrap();
        write_private(&path, b"[1]").unwrap();
        assert!(std::fs::symlink_metadata(&ghost).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"[1]");
        // A stale temporary file from a crash is replaced.
        std::fs::write(&tmp, b"stale").unwrap();
        write_private(&path, b"[2]").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"[2]");
    }

    #[test]
    fn evicts_the_least_recently_seen_tenth() {
        let mut m: HashMap<u32, u64> = (0..120).map(|i| (i, i as u64)).collect();
        assert_eq!(evict_oldest(&mut m, 200, |v| *v), 0);
        assert_eq!(evict_oldest(&mut m, 100, |v| *v), 30);
        assert_eq!(m.len(), 90);
        assert!(m.contains_key(&119) && !m.contains_key(&29));
    }
}
