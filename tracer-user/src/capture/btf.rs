//! Reads the two `struct sock_common` field offsets the kernel programs need (IPv6 addresses)
//! from the running kernel's BTF, so the capture does not depend on one kernel's layout.

use log::warn;

/// x86_64 layout of 5.x/6.x kernels with IPv6; used when BTF cannot be read.
pub const DEFAULT_V6_OFFSETS: (u16, u16) = (56, 72);

/// (`skc_v6_daddr`, `skc_v6_rcv_saddr`) byte offsets.
pub fn sock_common_v6_offsets() -> (u16, u16) {
    match std::fs::read("/sys/kernel/btf/vmlinux") {
        Ok(b) => {
            match struct_member_offsets(&b, "sock_common", &["skc_v6_daddr", "skc_v6_rcv_saddr"]) {
                Some(v) if v.len() == 2 => (v[0], v[1]),
                _ => {
                    warn!("struct sock_common has no IPv6 address fields in BTF; using offsets {DEFAULT_V6_OFFSETS:?}");
                    DEFAULT_V6_OFFSETS
                }
            }
        }
        Err(e) => {
            warn!("cannot read /sys/kernel/btf/vmlinux ({e}); using sock_common offsets {DEFAULT_V6_OFFSETS:?}");
            DEFAULT_V6_OFFSETS
        }
    }
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

fn str_at(strs: &[u8], off: u32) -> &[u8] {
    let s = strs.get(off as usize..).unwrap_or_default();
    &s[..s.iter().position(|&c| c == 0).unwrap_or(s.len())]
}

/// Byte offsets of `members` of the struct `name`, in the order asked; None if the BTF is
/// malformed, the struct is missing, or a member is missing.
pub fn struct_member_offsets(b: &[u8], name: &str, members: &[&str]) -> Option<Vec<u16>> {
    if b.get(0..2)? != [0x9f, 0xeb] {
        return None;
    }
    let hdr_len = u32_at(b, 4)? as usize;
    let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
    let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
    let types = b.get(hdr_len + type_off..hdr_len + type_off + type_len)?;
    let strs = b.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
    let mut o = 0usize;
    while o + 12 <= types.len() {
        let name_off = u32_at(types, o)?;
        let info = u32_at(types, o + 4)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        o += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,
            3 => 12,
            4 | 5 | 15 | 19 => vlen * 12,
            6 | 13 => vlen * 8,
            _ => 0,
        };
        if kind == 4 && str_at(strs, name_off) == name.as_bytes() {
            let mut found = vec![None; members.len()];
            for i in 0..vlen {
                let m = o + i * 12;
                let mname = str_at(strs, u32_at(types, m)?);
                let bits = u32_at(types, m + 8)?;
                let bits = if kind_flag { bits & 0x00ff_ffff } else { bits };
                if let Some(j) = members.iter().position(|x| x.as_bytes() == mname) {
                    found[j] = Some((bits / 8) as u16);
                }
            }
            return found.into_iter().collect();
        }
        o += extra;
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn garbage_is_none() {
        assert_eq!(
            super::struct_member_offsets(b"nope", "sock_common", &["a"]),
            None
        );
        assert_eq!(
            super::struct_member_offsets(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0], "x", &["a"]),
            None
        );
    }

    #[test]
    fn this_kernel_if_readable() {
        if let Ok(b) = std::fs::read("/sys/kernel/btf/vmlinux") {
            // Direct members only (skc_daddr and skc_num sit inside anonymous unions).
            let v = super::struct_member_offsets(
                &b,
                "sock_common",
                &["skc_v6_daddr", "skc_v6_rcv_saddr"],
            )
            .unwrap();
            assert_eq!(v[1], v[0] + 16, "{v:?}");
            assert!(v[0] >= 16, "{v:?}");
        }
    }
}
