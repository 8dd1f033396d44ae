//! What the agent keeps in its state directory is written atomically (a temporary file, synced,
//! then renamed) and readable by root only; the maps behind it are bounded the same way
//! everywhere: past the budget the least recently seen tenth goes.

use std::{collections::HashMap, hash::Hash, path::Path};

/// Writes `bytes` to `path` atomically, mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
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
    fn evicts_the_least_recently_seen_tenth() {
        let mut m: HashMap<u32, u64> = (0..120).map(|i| (i, i as u64)).collect();
        assert_eq!(evict_oldest(&mut m, 200, |v| *v), 0);
        assert_eq!(evict_oldest(&mut m, 100, |v| *v), 30);
        assert_eq!(m.len(), 90);
        assert!(m.contains_key(&119) && !m.contains_key(&29));
    }
}
